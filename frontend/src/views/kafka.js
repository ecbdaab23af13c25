// Kafka: messages and bytes in per second, per-partition lag in records and
// seconds (charts and a sortable table), the group's status with its reason,
// the DLQ count, and the list of status transitions.
import { byId, el, fill } from '../dom.js';
import { Chart } from '../charts.js';
import { bytes, clock, num, seconds } from '../format.js';
import { badge } from '../status.js';
import { SortableTable } from '../table.js';

const part = (id, key) => (p) => {
  const q = (p.parts || []).find((x) => x.p === id);
  return q ? q[key] : null;
};

export class Kafka {
  constructor() {
    this.summary = byId('kafka-summary');
    this.transitions = byId('transitions');
    const charts = byId('kafka-charts');
    this.partitions = [];
    this.msgs = new Chart(charts, {
      title: 'Messages in per second',
      unit: (v) => num(v, v < 10 ? 1 : 0),
      series: [{ label: 'messages/s', get: (p) => p.msgs }],
    });
    this.bytes = new Chart(charts, { title: 'Bytes in per second', unit: bytes, series: [{ label: 'bytes/s', get: (p) => p.bytes }] });
    this.lag = new Chart(charts, { title: 'Lag per partition (records)', unit: (v) => num(v), series: [] });
    this.lagSeconds = new Chart(charts, { title: 'Lag per partition (seconds)', unit: seconds, series: [] });
    this.table = new SortableTable(
      byId('partition-table'),
      [
        { label: 'Partition', value: (r) => r.partition, num: true },
        { label: 'Status', value: (r) => r.status, show: (r) => badge(r.status) },
        { label: 'Low', value: (r) => r.low, show: (r) => num(r.low), num: true },
        { label: 'High watermark', value: (r) => r.high, show: (r) => num(r.high), num: true },
        { label: 'Committed', value: (r) => r.committed, show: (r) => (r.committed < 0 ? 'none' : num(r.committed)), num: true },
        { label: 'Lag', value: (r) => r.lag, show: (r) => num(r.lag), num: true },
        { label: 'Lag (s)', value: (r) => r.lag_s, show: (r) => seconds(r.lag_s), num: true },
        { label: 'Trend', value: (r) => r.trend },
        { label: 'Reason', value: (r) => r.reason || '' },
      ],
      { sortBy: 0, caption: 'Partitions of the events topic' },
    );
  }

  ensure(ids) {
    if (ids.length && ids.join() !== this.partitions.join()) {
      this.partitions = ids;
      this.lag.setSeries(ids.map((id) => ({ label: `p${id}`, get: part(id, 'lag') })));
      this.lagSeconds.setSeries(ids.map((id) => ({ label: `p${id}`, get: part(id, 'lag_s') })));
    }
  }

  snapshot(view) {
    const k = view.kafka;
    if (!k) return;
    this.ensure(k.partitions.map((p) => p.partition));
    fill(
      this.summary,
      card('Broker', badge(k.reachable ? 'UP' : 'DOWN'), k.error),
      card(`Group ${k.group}`, el('span', { id: 'group-status' }, badge(k.group_status)), k.group_reason),
      card('Topic', k.topic, `${num(k.messages_total)} messages`),
      card('In', `${num(k.msgs_per_s, 1)} msg/s`, `${bytes(k.bytes_per_s)}/s`),
      card('Lag', `${num(k.lag)} records`, `${seconds(k.lag_s)} · ${k.lag_trend.toLowerCase()}`),
      card('Dead letters', num(k.dlq_records), k.dlq_topic),
    );
    this.table.update(k.partitions);
    this.events(view.events || []);
  }

  events(events) {
    if (!events.length) {
      fill(this.transitions, el('li', { class: 'muted' }, 'no status change since the monitor started'));
      return;
    }
    fill(
      this.transitions,
      [...events].reverse().slice(0, 20).map((e) =>
        el('li', {}, el('time', {}, clock(e.at)), ' ', el('strong', {}, e.subject), ': ', badge(e.from), ' → ', badge(e.to), e.reason ? ` — ${e.reason}` : ''),
      ),
    );
  }

  draw(points) {
    const last = points[points.length - 1];
    if (last) this.ensure((last.parts || []).map((p) => p.p));
    for (const chart of [this.msgs, this.bytes, this.lag, this.lagSeconds]) chart.update(points);
  }
}

export function card(title, value, note) {
  return el('div', { class: 'card' }, el('div', { class: 'card-title' }, title), el('div', { class: 'card-value' }, value), note ? el('div', { class: 'card-note' }, note) : null);
}
