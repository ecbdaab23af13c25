// The load-test panel: a form that starts a test on the monitor through
// /api/load (with the token as a bearer token when one is needed), live
// progress from `load` frames (target vs achieved rate, p99, errors,
// dropped), then the final report and its thresholds.
import { getJSON, postJSON } from '../api.js';
import { byId, el, fill } from '../dom.js';
import { ms, num } from '../format.js';
import { badge } from '../status.js';

export class Load {
  constructor() {
    this.form = byId('load-form');
    this.status = byId('load-status');
    this.start = byId('load-start');
    this.cancelButton = byId('load-cancel');
    this.running = false;
    this.form.addEventListener('submit', (event) => {
      event.preventDefault();
      this.submit();
    });
    this.cancelButton.addEventListener('click', () => this.cancel());
    this.checkAvailable();
  }

  async checkAvailable() {
    try {
      const answer = await getJSON('/api/load');
      if (!answer.available) {
        this.start.disabled = true;
        fill(this.status, el('p', { class: 'muted', id: 'load-unavailable' }, `Load tests unavailable: ${answer.reason}`));
      }
    } catch (error) {
      fill(this.status, el('p', { class: 'error' }, `✖ ${error.message}`));
    }
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
      profile: f.profile.value,
      thresholds: f.thresholds.value.split(',').map((t) => t.trim()).filter(Boolean),
      [f.mode.value === 'rate' ? 'rate' : 'concurrency']: amount,
    };
    this.start.disabled = true;
    fill(this.status, el('p', {}, 'starting…'));
    try {
      await postJSON('/api/load', payload, this.token());
      this.setRunning(true);
    } catch (error) {
      this.start.disabled = false;
      fill(this.status, el('p', { class: 'error' }, `✖ could not start: ${error.message}`));
    }
  }

  async cancel() {
    try {
      await postJSON('/api/load/cancel', {}, this.token());
    } catch (error) {
      this.status.append(el('p', { class: 'error' }, `✖ could not cancel: ${error.message}`));
    }
  }

  setRunning(running) {
    this.running = running;
    this.start.disabled = running;
    this.cancelButton.disabled = !running;
  }

  frame(frame) {
    const done = frame.state !== 'running';
    this.setRunning(!done);
    const p = frame;
    const rows = [
      ['Scenario', `${p.scenario} (${p.mode})`],
      ['Elapsed', `${num(p.elapsed_s, 1)} s of ${num(p.duration_s, 1)} s`],
      ['Rate', `${num(p.achieved_rps, 1)}/s achieved${p.target_rps ? ` of ${num(p.target_rps, 1)}/s target` : ''}`],
      ['p99', ms(p.p99_ms)],
      ['Requests', `${num(p.requests)} (${num(p.ok)} ok, ${num(p.errors)} errors, ${num(p.dropped)} dropped)`],
    ];
    const parts = [
      el('p', { id: 'load-state' }, badge(stateWord(p.state), p.state), p.error ? el('span', { class: 'reason' }, ` ${p.error}`) : null),
      el('dl', { class: 'figures' }, rows.map(([k, v]) => [el('dt', {}, k), el('dd', {}, v)])),
    ];
    if (p.report) parts.push(report(p.report));
    fill(this.status, parts);
  }
}

function stateWord(state) {
  return { running: 'LAGGING', done: 'OK', passed: 'OK', failed: 'DOWN', cancelled: 'EMPTY' }[state] || 'UNKNOWN';
}

function report(r) {
  const lat = r.latency_ms || {};
  const box = el('div', { class: 'report', id: 'load-report' }, el('h3', {}, 'Report'));
  box.append(
    el(
      'table',
      {},
      el('thead', {}, el('tr', {}, ['p50', 'p90', 'p99', 'p99.9', 'max', 'mean'].map((h) => el('th', { class: 'num' }, h)))),
      el('tbody', {}, el('tr', {}, [lat.p50, lat.p90, lat.p99, lat.p999, lat.max, lat.mean].map((v) => el('td', { class: 'num' }, ms(v))))),
    ),
  );
  const errors = Object.entries(r.errors || {});
  box.append(el('p', {}, errors.length ? `errors: ${errors.map(([code, n]) => `${code} ${n}`).join(', ')}` : 'no errors'));
  if (r.thresholds && r.thresholds.length) {
    box.append(
      el(
        'ul',
        { class: 'thresholds' },
        r.thresholds.map((t) => el('li', {}, badge(t.passed ? 'OK' : 'DOWN', t.passed ? 'pass' : 'fail'), ` ${t.threshold}`, t.actual ? ` (actual ${t.actual})` : '')),
      ),
    );
  }
  return box;
}
