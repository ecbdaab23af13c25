// The header: one badge per service, database and the broker (a word and an
// icon, with the reason when not OK), the time of the last update, and the
// banner that says when the monitor (or this server) stopped answering.
import { byId, el, fill } from '../dom.js';
import { clock, num } from '../format.js';
import { badge } from '../status.js';

export class Header {
  constructor() {
    this.health = byId('health');
    this.connection = byId('connection');
    this.lastSnapshotAt = null; // local clock, when the last snapshot arrived
    this.lastTakenAt = null;
    this.status = { monitor: 'unreachable', reason: 'connecting' };
  }

  snapshot(view) {
    this.lastSnapshotAt = Date.now();
    this.lastTakenAt = view.at;
    const items = [];
    for (const s of view.services || []) {
      const word = s.state === 'UP' && !s.stale ? 'UP' : s.state === 'UP' ? 'UNKNOWN' : s.state;
      items.push(item(`service ${s.name}`, word, s.error || (s.stale ? 'stale sample' : '')));
    }
    for (const d of view.databases || []) {
      items.push(item(d.name, d.reachable ? 'UP' : 'DOWN', d.error));
    }
    if (view.kafka) {
      items.push(item('kafka', view.kafka.reachable ? 'UP' : 'DOWN', view.kafka.error));
    }
    const allUp = items.every((i) => i.dataset.word === 'UP');
    this.health.dataset.overall = allUp ? 'ok' : 'bad';
    fill(
      this.health,
      el('span', { class: 'updated', id: 'updated' }, `updated ${clock(view.at)}`),
      items,
    );
    this.render();
  }

  setStatus(status) {
    this.status = status;
    this.render();
  }

  render() {
    const s = this.status;
    if (s.monitor === 'up' && s.server !== false) {
      this.connection.hidden = true;
      fill(this.connection);
      document.body.dataset.monitor = 'up';
      return;
    }
    document.body.dataset.monitor = 'unreachable';
    const age = this.lastSnapshotAt ? Math.round((Date.now() - this.lastSnapshotAt) / 1000) : null;
    const who = s.server === false ? 'dashboard server unreachable' : 'monitor unreachable';
    const text = age === null ? `${who} — no data yet` : `${who} — last data ${num(age)} s old`;
    this.connection.hidden = false;
    fill(this.connection, el('strong', {}, `✖ ${text}`), s.reason ? el('span', { class: 'reason' }, ` (${s.reason})`) : null);
  }
}

function item(name, word, reason) {
  return el(
    'span',
    { class: 'health-item', dataset: { word, subject: name }, title: reason || undefined },
    el('span', { class: 'subject' }, name),
    ' ',
    badge(word),
    reason && word !== 'UP' ? el('span', { class: 'reason' }, ` ${reason}`) : null,
  );
}
