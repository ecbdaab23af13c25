// The load-test panel: a form that starts a test on the monitor through
// /api/load (with the token as a bearer token when one is needed), live
// progress from `load` frames (target vs achieved rate, p99, errors,
// dropped), then the final report and its thresholds. Every open page gets
// the same frames, so a page opened mid-run shows the run too.
import { getJSON, postJSON } from '../api.js';
import { byId, el, fill } from '../dom.js';
import { ms, num } from '../format.js';
import { badge } from '../status.js';

// How often to ask again while the monitor cannot run load tests.
const RETRY_MS = 5000;

export class Load {
  constructor() {
    this.form = byId('load-form');
    this.status = byId('load-status');
    this.start = byId('load-start');
    this.cancelButton = byId('load-cancel');
    this.tokenField = byId('load-token-field');
    this.available = false;
    this.running = false;
    this.seen = false;
    this.shown = null;
    this.form.addEventListener('submit', (event) => {
      event.preventDefault();
      this.submit();
    });
    this.cancelButton.addEventListener('click', () => this.cancel());
    this.form.elements.mode.addEventListener('change', () => this.modeChanged());
    this.modeChanged();
    this.checkAvailable();
  }

  /** A profile shapes a rate: with workers (closed loop) there is none to shape. */
  modeChanged() {
    const f = this.form.elements;
    const closed = f.mode.value === 'concurrency';
    f.profile.disabled = closed;
    if (closed) f.profile.value = 'constant';
  }

  async checkAvailable() {
    let answer;
    try {
      answer = await getJSON('/api/load');
    } catch (error) {
      answer = { available: false, reason: error.message };
    }
    this.available = Boolean(answer.available);
    // The field shows unless the monitor said it needs no token.
    this.tokenField.hidden = answer.token_required === false;
    if (!this.available) {
      this.start.disabled = true;
      if (!this.seen) fill(this.status, el('p', { class: 'muted', id: 'load-unavailable' }, `Load tests unavailable: ${answer.reason}`));
      setTimeout(() => this.checkAvailable(), RETRY_MS);
      return;
    }
    if (!this.seen) {
      if (answer.current) this.frame(answer.current);
      else fill(this.status);
    }
    this.start.disabled = this.running;
  }

  token() {
    return this.form.elements.token.value.trim();
  }

  async submit() {
    const f = this.form.elements;
    const amount = Number(f.amount.value);
    const payload = {
      scenario: f.scenario.value,
      duration: f.duration.value.trim(),
      profile: f.profile.disabled ? 'constant' : f.profile.value,
      thresholds: f.thresholds.value.split(',').map((t) => t.trim()).filter(Boolean),
      [f.mode.value === 'rate' ? 'rate' : 'concurrency']: amount,
    };
    this.start.disabled = true;
    fill(this.status, el('p', {}, 'starting…'));
    try {
      const first = await postJSON('/api/load', payload, this.token());
      this.frame(first);
    } catch (error) {
      this.start.disabled = false;
      if (error.status === 401) this.tokenField.hidden = false;
      fill(this.status, el('p', { class: 'error', id: 'load-error', dataset: { status: String(error.status || '') } }, `✖ could not start: ${error.message}`));
    }
  }

  async cancel() {
    this.cancelButton.disabled = true;
    try {
      await postJSON('/api/load/cancel', {}, this.token());
    } catch (error) {
      this.cancelButton.disabled = !this.running;
      this.status.append(el('p', { class: 'error' }, `✖ could not cancel: ${error.message}`));
    }
  }

  setRunning(running) {
    this.running = running;
    this.start.disabled = running || !this.available;
    this.cancelButton.disabled = !running;
  }

  frame(frame) {
    // The answer to our POST and the feed's first frame may cross: never step back in a run.
    const older = this.shown && this.shown.state === 'running' && frame.state === 'running' && frame.elapsed_s < this.shown.elapsed_s;
    if (older) return;
    this.seen = true;
    this.shown = frame;
    this.setRunning(frame.state === 'running');
    fill(this.status, progress(frame), frame.report ? report(frame.report) : null);
  }
}

const STATES = {
  running: ['LAGGING', 'running'],
  done: ['OK', 'done'],
  passed: ['OK', 'passed'],
  failed: ['DOWN', 'thresholds failed'],
  cancelled: ['EMPTY', 'cancelled'],
  error: ['DOWN', 'failed'],
  lost: ['UNKNOWN', 'lost'],
};

function progress(p) {
  const [word, label] = STATES[p.state] || ['UNKNOWN', p.state];
  const what = p.scenario ? `${p.scenario}${p.mode ? ` (${p.mode})` : ''}` : 'a run started outside this dashboard';
  const share = p.duration_s ? Math.min(100, (100 * (p.elapsed_s || 0)) / p.duration_s) : 0;
  const bar = el('div', { class: 'meter' }, el('span', { class: 'meter-fill' }));
  bar.firstChild.style.width = `${p.state === 'running' ? share.toFixed(1) : 100}%`;
  const rate = p.target_rps ? `${num(p.achieved_rps, 1)}/s achieved of ${num(p.target_rps, 1)}/s target` : `${num(p.achieved_rps, 1)}/s achieved`;
  const rows = [
    ['Scenario', what],
    ['Elapsed', p.elapsed_s === null || p.elapsed_s === undefined ? '—' : `${num(p.elapsed_s, 1)} s of ${num(p.duration_s, 1)} s${p.warming_up ? ' (warming up)' : ''}`],
    ['Rate', rate],
    [p.state === 'running' ? 'p99 (last second)' : 'p99', ms(p.p99_ms)],
    ['Errors', num(p.errors)],
    ['Dropped', num(p.dropped)],
    ['Requests', `${num(p.requests)} (${num(p.ok)} ok)`],
  ];
  return [
    el('p', { id: 'load-state', dataset: { state: p.state } }, badge(word, label), p.error ? el('span', { class: 'reason' }, ` ${p.error}`) : null),
    bar,
    el('dl', { class: 'figures', id: 'load-figures' }, rows.map(([k, v]) => [el('dt', {}, k), el('dd', { dataset: { figure: k.split(' ')[0].toLowerCase() } }, v)])),
  ];
}

function report(r) {
  const lat = r.latency_ms || {};
  const box = el('div', { class: 'report', id: 'load-report' }, el('h3', {}, 'Report'));
  if (r.error) box.append(el('p', { class: 'error' }, `✖ ${r.error}`));
  box.append(
    el('p', {}, `${r.profile || r.mode || ''}: ${num(r.requests)} requests, ${num(r.achieved_rps, 1)}/s achieved${r.target_rps ? ` of ${num(r.target_rps, 1)}/s` : ''}, ${num(r.ok)} ok, ${num(r.dropped)} dropped`),
    el(
      'table',
      {},
      el('caption', {}, 'Latency from the intended start'),
      el('thead', {}, el('tr', {}, ['p50', 'p90', 'p99', 'p99.9', 'max', 'mean'].map((h) => el('th', { class: 'num' }, h)))),
      el('tbody', {}, el('tr', {}, [lat.p50, lat.p90, lat.p99, lat.p999, lat.max, lat.mean].map((v) => el('td', { class: 'num' }, ms(v))))),
    ),
  );
  const errors = Object.entries(r.errors || {});
  box.append(el('p', {}, errors.length ? `errors: ${errors.map(([code, n]) => `${code} ${num(n)}`).join(', ')}` : 'no errors'));
  if (r.event_lag_p99_ms !== null && r.event_lag_p99_ms !== undefined) {
    box.append(el('p', {}, `event lag during the run (commit → applied): p99 ${ms(r.event_lag_p99_ms)}, mean ${ms(r.event_lag_mean_ms)}`));
  }
  if (r.thresholds && r.thresholds.length) {
    box.append(
      el('p', { id: 'load-verdict' }, badge(r.passed ? 'OK' : 'DOWN', r.passed ? 'all thresholds passed' : 'a threshold failed')),
      el(
        'ul',
        { class: 'thresholds', id: 'load-thresholds' },
        r.thresholds.map((t) => el('li', { dataset: { passed: String(t.passed) } }, badge(t.passed ? 'OK' : 'DOWN', t.passed ? 'pass' : 'fail'), ` ${t.threshold}`, t.actual ? ` (actual ${t.actual})` : '')),
      ),
    );
  }
  return box;
}
