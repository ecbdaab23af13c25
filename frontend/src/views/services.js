// Services: requests/s, error rate and p50/p99 latency per service as
// charts (history first, then live), and a sortable per-method table.
import { byId } from '../dom.js';
import { Chart } from '../charts.js';
import { method, ms, num, percent } from '../format.js';
import { SortableTable } from '../table.js';

const svc = (name, key) => (p) => {
  const s = (p.svc || []).find((x) => x.name === name);
  return s ? s[key] : null;
};

export class Services {
  constructor() {
    const charts = byId('service-charts');
    this.names = [];
    this.rps = new Chart(charts, { title: 'Requests per second', unit: (v) => num(v, v < 10 ? 1 : 0), series: [] });
    this.errors = new Chart(charts, { title: 'Error rate', unit: (v) => percent(v), axis: (v) => percent(v, 0), series: [] });
    this.p50 = new Chart(charts, { title: 'Latency p50', unit: ms, series: [] });
    this.p99 = new Chart(charts, { title: 'Latency p99', unit: ms, series: [] });
    this.table = new SortableTable(
      byId('service-table'),
      [
        { label: 'Service', value: (r) => r.service },
        { label: 'Method', value: (r) => method(r.method) },
        { label: 'Req/s', value: (r) => r.interval?.rps ?? 0, show: (r) => num(r.interval?.rps, 1), num: true },
        { label: 'Errors', value: (r) => r.interval?.error_rate ?? 0, show: (r) => percent(r.interval?.error_rate), num: true },
        { label: 'p50', value: (r) => r.interval?.p50_ms ?? 0, show: (r) => ms(r.interval?.p50_ms), num: true },
        { label: 'p99', value: (r) => r.interval?.p99_ms ?? 0, show: (r) => ms(r.interval?.p99_ms), num: true },
        { label: 'Total', value: (r) => r.since_start?.total ?? 0, show: (r) => num(r.since_start?.total), num: true },
        { label: 'Failed', value: (r) => r.since_start?.failed ?? 0, show: (r) => num(r.since_start?.failed), num: true },
      ],
      { sortBy: 2, descending: true, caption: 'Per method (last interval; totals since start)' },
    );
  }

  ensure(names) {
    if (names.length && names.join() !== this.names.join()) {
      this.names = names;
      this.rps.setSeries(names.map((n) => ({ label: n, get: svc(n, 'rps') })));
      this.errors.setSeries(names.map((n) => ({ label: n, get: svc(n, 'err') })));
      this.p50.setSeries(names.map((n) => ({ label: n, get: svc(n, 'p50') })));
      this.p99.setSeries(names.map((n) => ({ label: n, get: svc(n, 'p99') })));
    }
  }

  snapshot(view) {
    this.ensure((view.services || []).map((s) => s.name));
    const rows = [];
    for (const s of view.services || []) for (const m of s.methods || []) rows.push({ service: s.name, ...m });
    this.table.update(rows);
  }

  draw(points) {
    const last = points[points.length - 1];
    if (last) this.ensure((last.svc || []).map((s) => s.name));
    for (const chart of [this.rps, this.errors, this.p50, this.p99]) chart.update(points);
  }
}
