// The event flow as a strip: user service → outbox → user-events → order
// replica, with the numbers on each hop, and a pulse on the arrows while
// events move, so a person sees them go.
import { byId, el, fill } from '../dom.js';
import { ms, num, seconds } from '../format.js';

export class Flow {
  constructor() {
    this.strip = byId('flow-strip');
  }

  snapshot(view) {
    const f = view.flow || {};
    const k = view.kafka || {};
    const user = (view.services || []).find((s) => s.name === 'user');
    const order = (view.services || []).find((s) => s.name === 'order');
    const written = f.written_per_s ?? 0;
    const published = f.published_per_s ?? 0;
    const applied = f.applied_per_s ?? 0;
    fill(
      this.strip,
      stage('User service', user ? `${num(user.interval?.rps, 1)} req/s` : '—', user ? `p99 ${ms(user.interval?.p99_ms)}` : '', user?.state),
      arrow(written, `${num(written, 1)}/s written`),
      stage('Outbox', `${num(f.outbox_pending)} pending`, f.outbox_known ? `oldest ${seconds(f.outbox_oldest_age_s)}` : 'not readable'),
      arrow(published, `${num(published, 1)}/s published`),
      stage(k.topic || 'user-events', `${num(k.msgs_per_s, 1)} msg/s`, `lag ${num(k.lag)} · ${seconds(k.lag_s)}`),
      arrow(applied, `${num(applied, 1)}/s applied`),
      stage(
        'Order replica',
        f.applied === null || f.applied === undefined ? 'not reported' : `${num(f.applied)} applied`,
        `commit→applied p50 ${ms(f.apply_lag_p50_ms)} · p99 ${ms(f.apply_lag_p99_ms)}`,
        order ? order.state : 'UNKNOWN',
      ),
    );
  }
}

function stage(title, value, note, state) {
  return el(
    'div',
    { class: 'stage', dataset: { state: state || '' } },
    el('div', { class: 'card-title' }, title),
    el('div', { class: 'card-value' }, value),
    note ? el('div', { class: 'card-note' }, note) : null,
  );
}

function arrow(rate, label) {
  // Faster flow, faster pulse; no pulse when nothing moves.
  const moving = rate > 0;
  const period = moving ? Math.max(0.3, Math.min(2.5, 10 / Math.sqrt(rate))) : 0;
  const node = el('div', { class: `arrow${moving ? ' moving' : ''}`, 'aria-label': label }, el('span', { class: 'dot' }), el('span', { class: 'arrow-label' }, label));
  if (moving) node.style.setProperty('--period', `${period.toFixed(2)}s`);
  return node;
}
