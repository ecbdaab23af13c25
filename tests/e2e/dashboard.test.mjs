// The dashboard in a real browser (Debian's chromium driven by
// playwright-core) against the whole system started by stack.mjs.
// Run through scripts/test.sh, which provides PostgreSQL, the broker, the
// msys binary and chromium. Screenshots land in tests/e2e/artifacts/.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';

import { connect, createUser } from './grpc.mjs';
import { Stack } from './stack.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, '../..');
const artifacts = path.join(here, 'artifacts');
// playwright-core is pinned in frontend/package-lock.json with the bundle's tools.
const { chromium } = createRequire(path.join(root, 'frontend/package.json'))('playwright-core');
const XSS_NAME = '<img src=x onerror=alert(1)>';
// Until the monitor role exists in this binary the dashboard has nothing to show: say so, loudly.
const monitorHelp = spawnSync(process.env.MSYS_BIN || 'msys', ['monitor', '--help'], { encoding: 'utf8' });
const skip = /--interval/.test(monitorHelp.stdout || '') ? false : 'this msys binary has no monitor role yet';

let stack;
let browser;
let page;
let users;
const requests = [];
const consoleErrors = [];
const dialogs = [];
let emailSeq = 0;

async function createUsers(count, name = 'E2E User') {
  const calls = [];
  for (let i = 0; i < count; i += 1) {
    emailSeq += 1;
    calls.push(createUser(users, name, `e2e-${process.pid}-${emailSeq}@example.com`));
  }
  await Promise.all(calls);
}

/** Creates users at about `perSecond` until the returned stop() is called. */
function steadyLoad(perSecond) {
  let running = true;
  const loop = (async () => {
    while (running) {
      await createUsers(Math.max(1, Math.round(perSecond / 10)));
      await sleep(100);
    }
  })();
  return async () => {
    running = false;
    await loop;
  };
}

async function shot(name) {
  await page.screenshot({ path: path.join(artifacts, `${name}.png`), fullPage: true });
}

const text = (selector) => page.locator(selector).first().innerText();

before(async () => {
  if (skip) return;
  fs.rmSync(artifacts, { recursive: true, force: true });
  stack = await Stack.start(artifacts);
  users = connect(`127.0.0.1:${stack.ports.user}`);
  browser = await chromium.launch({
    executablePath: process.env.MSYS_CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking'],
  });
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  // Anything not served by msys on 127.0.0.1 is recorded and refused.
  await context.route('**/*', (route) => {
    const url = new URL(route.request().url());
    if (url.hostname === '127.0.0.1' || url.protocol === 'data:') return route.continue();
    return route.abort();
  });
  page = await context.newPage();
  page.on('request', (request) => requests.push(request.url()));
  page.on('console', (message) => {
    if (message.type() === 'error') consoleErrors.push(message.text());
  });
  page.on('pageerror', (error) => consoleErrors.push(`pageerror: ${error.message}`));
  page.on('dialog', async (dialog) => {
    dialogs.push(dialog.message());
    await dialog.dismiss();
  });
});

after(async () => {
  if (users) users.close();
  if (browser) await browser.close();
  if (stack) await stack.stop();
});

test('the page loads, draws its charts from history and shows every part of the system green', { skip }, async () => {
  // Some history first, so the charts have something to draw at once.
  await createUsers(20);
  await sleep(3000);
  const response = await page.goto(stack.frontendUrl);
  assert.equal(response.status(), 200);
  const headers = response.headers();
  assert.match(headers['content-security-policy'], /default-src 'self'/);
  assert.match(headers['content-security-policy'], /frame-ancestors 'none'/);
  assert.doesNotMatch(headers['content-security-policy'], /unsafe-inline/);
  assert.equal(headers['x-content-type-options'], 'nosniff');
  await page.waitForSelector('#health[data-overall="ok"]', { timeout: 15_000 });
  assert.equal(await page.locator('#connection').isHidden(), true);
  for (const subject of ['service user', 'service order', 'service monitor', 'users_db', 'orders_db', 'kafka']) {
    const item = page.locator(`.health-item[data-subject="${subject}"]`);
    assert.equal(await item.getAttribute('data-word'), 'UP', `${subject} is not UP`);
    assert.match(await item.innerText(), /✔ UP/, 'status is a word and an icon, not colour alone');
  }
  // Charts are drawn (uPlot canvases) with more than one point from history.
  await page.waitForSelector('#service-charts canvas', { timeout: 10_000 });
  assert.ok((await page.locator('#service-charts .chart').count()) >= 4);
  assert.ok((await page.locator('#kafka-charts .chart').count()) >= 4);
  await shot('01-loaded');
});

test('creating users through gRPC makes the user service request rate rise on the page', { skip }, async () => {
  const rateOf = async () => {
    const rows = await page.locator('#service-table tbody tr').allInnerTexts();
    const row = rows.find((r) => r.includes('UserService/CreateUser'));
    if (!row) return 0;
    return Number(row.split('\t')[2].replace(/,/g, '')) || 0;
  };
  const stop = steadyLoad(50);
  try {
    await page.waitForFunction(
      () => [...document.querySelectorAll('#service-table tbody tr')].some((tr) => tr.innerText.includes('UserService/CreateUser') && Number(tr.children[2].innerText.replace(/,/g, '')) >= 10),
      null,
      { timeout: 15_000 },
    );
    assert.ok((await rateOf()) >= 10);
    assert.match(await text('#flow-strip'), /applied/);
    await shot('02-users-created');
  } finally {
    await stop();
  }
});

test(`a user named ${XSS_NAME} shows as literal text and no script runs`, { skip }, async () => {
  await createUsers(1, XSS_NAME);
  // The name also travels in a long query's text, which the databases panel shows.
  const query = stack.psql('users', `SELECT pg_sleep(8), '${XSS_NAME}' AS name`);
  try {
    await page.waitForFunction(
      (name) => [...document.querySelectorAll('.db .longest code')].some((c) => c.textContent.includes(name)),
      XSS_NAME,
      { timeout: 10_000 },
    );
    assert.equal(await page.locator('img').count(), 0, 'an <img> element was created from a user string');
    assert.deepEqual(dialogs, [], 'a script ran');
    await shot('03-literal-name');
  } finally {
    query.kill();
  }
});

test('the window selector, pause and the dark theme work', { skip }, async () => {
  await page.selectOption('#window', '60');
  await page.click('#pause');
  assert.equal(await page.getAttribute('#pause', 'aria-pressed'), 'true');
  const before = await text('#updated');
  await sleep(2500);
  assert.equal(await text('#updated'), before, 'the page kept changing while paused');
  await page.click('#pause');
  await page.waitForFunction((b) => document.querySelector('#updated')?.textContent !== b, before, { timeout: 5000 });
  await page.click('#theme');
  assert.equal(await page.getAttribute('html', 'data-theme'), 'dark');
  await shot('04-dark');
  await page.click('#theme');
  await page.selectOption('#window', '300');
});

test('the page is readable on a phone-sized screen', { skip }, async () => {
  await page.setViewportSize({ width: 390, height: 844 });
  await sleep(500);
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 1, `the page is ${overflow}px wider than the screen`);
  await shot('05-phone');
  await page.setViewportSize({ width: 1280, height: 900 });
});

test('freezing the order role turns its group status away from OK on the page', { skip }, async () => {
  await page.waitForSelector('#group-status [data-status="OK"]', { timeout: 30_000 });
  stack.freeze('order');
  const stop = steadyLoad(20);
  try {
    await page.waitForFunction(() => {
      const badge = document.querySelector('#group-status .badge');
      return badge && badge.dataset.status !== 'OK';
    }, null, { timeout: 40_000 });
    const word = await page.getAttribute('#group-status .badge', 'data-status');
    assert.ok(['LAGGING', 'STALLED', 'STOPPED'].includes(word), `group status ${word}`);
    await shot('08-order-frozen');
  } finally {
    await stop();
    stack.resume('order');
  }
  await page.waitForSelector('#group-status [data-status="OK"]', { timeout: 60_000 });
});

test('a page whose stream was cut fills the gap from the monitor history when it reconnects', { skip }, async () => {
  await page.selectOption('#window', '60');
  stack.freeze('frontend');
  await sleep(8000);
  stack.resume('frontend');
  await page.waitForSelector('#connection', { state: 'hidden', timeout: 15_000 });
  // The monitor kept collecting while the page heard nothing: once history is merged, the last
  // minute has no hole longer than a couple of collection intervals.
  await page.waitForFunction(() => Number(document.body.dataset.maxGapMs) > 0 && Number(document.body.dataset.maxGapMs) <= 2500, null, {
    timeout: 15_000,
  });
  await page.selectOption('#window', '300');
});

test('freezing the monitor makes the page say it is unreachable within 5 s, and resuming it recovers', { skip }, async () => {
  await page.waitForSelector('#health[data-overall="ok"]', { timeout: 30_000 });
  stack.freeze('monitor');
  const frozenAt = Date.now();
  try {
    await page.waitForFunction(
      () => /monitor unreachable — last data \d+ s old/.test(document.querySelector('#connection')?.textContent || ''),
      null,
      { timeout: 5000 },
    );
    assert.ok(Date.now() - frozenAt <= 5000);
    await shot('09-monitor-frozen');
  } finally {
    stack.resume('monitor');
  }
  await page.waitForSelector('#connection', { state: 'hidden', timeout: 15_000 });
  await page.waitForSelector('#health[data-overall="ok"]', { timeout: 15_000 });
  await shot('10-monitor-back');
});

// Last but one: the load test keeps the machine busy for a while, and the tests above judge
// timings of the system at rest (status windows, history gaps, the 5 s unreachable notice).
test('a short load test started from the page runs to its report (and the README screenshots are taken under it)', { skip }, async () => {
  const probe = await (await fetch(`${stack.frontendUrl}/api/load`)).json();
  assert.equal(probe.available, true, `load tests are not available: ${probe.reason}`);
  assert.equal(probe.token_required, true, 'the stack sets MSYS_ADMIN_TOKEN');
  await page.waitForSelector('#load-token-field', { state: 'visible' });
  await page.selectOption('#load-form select[name=scenario]', 'users');
  await page.selectOption('#load-form select[name=mode]', 'rate');
  await page.fill('#load-form input[name=amount]', '60');
  await page.fill('#load-form input[name=duration]', '12s');
  await page.selectOption('#load-form select[name=profile]', 'constant');
  await page.fill('#load-form input[name=thresholds]', 'errors<1%, p99<5s');

  // The monitor's refusal of a wrong token reaches the page in its own words.
  const errorsBefore = consoleErrors.length;
  await page.fill('#load-form input[name=token]', 'not-the-token');
  await page.click('#load-start');
  await page.waitForSelector('#load-error[data-status="401"]', { timeout: 10_000 });
  assert.match(await text('#load-error'), /the admin token is wrong/);
  // Chromium logs the refused request itself ("status of 401"): provoking it was the point here.
  const provoked = consoleErrors.splice(errorsBefore);
  consoleErrors.push(...provoked.filter((message) => !/status of 401/.test(message)));

  await page.fill('#load-form input[name=token]', stack.token);
  await page.click('#load-start');
  await page.waitForSelector('#load-state[data-state="running"]', { timeout: 10_000 });
  assert.equal(await page.isDisabled('#load-start'), true, 'one run at a time');
  assert.equal(await page.isEnabled('#load-cancel'), true);
  // Live progress: the target and the achieved rate, p99, errors and drops.
  await page.waitForFunction(
    () => {
      const rate = document.querySelector('#load-figures [data-figure="rate"]')?.textContent || '';
      return /of 60(\.0)?\/s target/.test(rate) && Number(rate.split('/')[0].replace(/,/g, '')) > 0;
    },
    null,
    { timeout: 10_000 },
  );
  for (const figure of ['p99', 'errors', 'dropped']) {
    assert.ok(await page.locator(`#load-figures [data-figure="${figure}"]`).count(), `${figure} is shown`);
  }

  // A page opened mid-run shows the run under way.
  const late = await page.context().newPage();
  try {
    await late.goto(stack.frontendUrl);
    await late.waitForSelector('#load-state[data-state="running"]', { timeout: 5000 });
  } finally {
    await late.close();
  }

  // The system under the page's own load: the user service's rate climbs on the charts and table.
  await page.waitForFunction(
    () => [...document.querySelectorAll('#service-table tbody tr')].some((tr) => tr.innerText.includes('UserService/CreateUser') && Number(tr.children[2].innerText.replace(/,/g, '')) >= 30),
    null,
    { timeout: 15_000 },
  );
  // A few seconds of it on the charts before the picture.
  await sleep(3000);
  await page.evaluate(() => window.scrollTo(0, 0));
  await shot('11-load-running');
  if (process.env.MSYS_E2E_README_SCREENSHOT === '1') {
    await page.screenshot({ path: path.join(root, 'frontend/docs/dashboard.png'), fullPage: false });
  }

  await page.waitForSelector('#load-report', { timeout: 40_000 });
  const state = await page.getAttribute('#load-state', 'data-state');
  assert.ok(['passed', 'failed'].includes(state), `the run ended ${state}: ${await text('#load-status')}`);
  assert.match(await text('#load-status'), /achieved/);
  const verdicts = await page.locator('#load-thresholds li').allInnerTexts();
  assert.equal(verdicts.length, 2, verdicts.join(' | '));
  assert.match(verdicts[0], /errors<1%/);
  assert.equal(await page.isEnabled('#load-start'), true, 'a new run can start');
  await page.locator('#load').screenshot({ path: path.join(artifacts, '12-load-report.png') });
  if (process.env.MSYS_E2E_README_SCREENSHOT === '1') {
    await page.locator('#load').screenshot({ path: path.join(root, 'frontend/docs/load-panel.png') });
  }
});

test('no request left 127.0.0.1 and the console stayed free of errors', { skip }, () => {
  assert.ok(requests.length > 0);
  const outside = requests.filter((url) => new URL(url).hostname !== '127.0.0.1');
  assert.deepEqual(outside, []);
  assert.deepEqual(consoleErrors, []);
});
