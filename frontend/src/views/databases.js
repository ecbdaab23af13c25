// Databases: for users_db and orders_db, connections (active / idle against
// max_connections), size, TPS, cache hit ratio, the longest query, pool
// usage per role and the top statements; TPS and connections as charts.
import { byId, el, fill } from '../dom.js';
import { Chart } from '../charts.js';
import { bytes, ms, num, seconds } from '../format.js';
import { badge } from '../status.js';
import { SortableTable } from '../table.js';
import { card } from './kafka.js';

const db = (name, key) => (p) => {
  const d = (p.db || []).find((x) => x.name === name);
  return d ? d[key] : null;
};

export class Databases {
  constructor() {
    this.cards = byId('database-cards');
    const charts = byId('database-charts');
    this.names = [];
    this.blocks = new Map();
    this.tps = new Chart(charts, { title: 'Transactions per second', unit: (v) => num(v, v < 10 ? 1 : 0), series: [] });
    this.conn = new Chart(charts, { title: 'Connections', unit: (v) => num(v), series: [] });
  }

  ensure(names) {
    if (names.length && names.join() !== this.names.join()) {
      this.names = names;
      this.tps.setSeries(names.map((n) => ({ label: n, get: db(n, 'tps') })));
      this.conn.setSeries(names.map((n) => ({ label: n, get: db(n, 'conn') })));
    }
  }

  block(name) {
    let b = this.blocks.get(name);
    if (b) return b;
    const root = el('article', { class: 'db', dataset: { db: name } });
    const head = el('h3');
    const figures = el('div', { class: 'cards' });
    const meter = el('div', { class: 'meter-wrap' });
    const longest = el('div', { class: 'longest' });
    const pools = el('div', { class: 'pools' });
    const statements = el('div', { class: 'table-wrap' });
    root.append(head, meter, figures, longest, pools, statements);
    this.cards.append(root);
    const table = new SortableTable(
      statements,
      [
        { label: 'Statement', value: (r) => r.query, show: (r) => el('code', { class: 'query' }, r.query) },
        { label: 'Calls', value: (r) => r.calls, show: (r) => num(r.calls), num: true },
        { label: 'Mean', value: (r) => r.mean_ms, show: (r) => ms(r.mean_ms), num: true },
        { label: 'Total', value: (r) => r.total_ms, show: (r) => ms(r.total_ms), num: true },
        { label: 'Rows', value: (r) => r.rows, show: (r) => num(r.rows), num: true },
      ],
      { sortBy: 3, descending: true, caption: 'Top statements (pg_stat_statements)', empty: 'no statements recorded yet' },
    );
    b = { root, head, figures, meter, longest, pools, table };
    this.blocks.set(name, b);
    return b;
  }

  snapshot(view) {
    const dbs = view.databases || [];
    this.ensure(dbs.map((d) => d.name));
    for (const d of dbs) {
      const b = this.block(d.name);
      fill(b.head, `${d.name} `, badge(d.reachable ? 'UP' : 'DOWN'), d.error ? el('span', { class: 'reason' }, ` ${d.error}`) : null);
      const max = d.max_connections || 0;
      const used = d.server_connections || 0;
      const share = max ? Math.min(100, (100 * used) / max) : 0;
      const bar = el('div', { class: `meter${share > 80 ? ' high' : ''}` }, el('span', { class: 'meter-fill' }));
      bar.firstChild.style.width = `${share.toFixed(1)}%`;
      fill(
        b.meter,
        el('div', { class: 'meter-label' }, `connections: ${num(d.active)} active, ${num(d.idle)} idle, ${num(d.idle_in_transaction)} idle in transaction on this database; ${num(used)} of max ${num(max)} on the server`),
        bar,
      );
      fill(
        b.figures,
        card('Size', bytes(d.size_bytes), `${bytes(d.size_growth_bps)}/s`),
        card('TPS', num(d.tps, 1), `rollback ${num(d.rollback_percent, 1)} %`),
        card('Cache hit', `${num(d.cache_hit_percent, 2)} %`),
        card('Blocked', num(d.blocked_sessions), 'sessions waiting on a lock'),
      );
      fill(
        b.longest,
        el('span', { class: 'card-title' }, 'Longest query '),
        d.longest_query ? [el('strong', {}, seconds(d.longest_query_s)), ' ', el('code', { class: 'query' }, d.longest_query)] : el('span', { class: 'muted' }, 'none running'),
        el('span', { class: 'muted' }, ` · longest transaction ${seconds(d.longest_transaction_s)}`),
      );
      fill(
        b.pools,
        (d.pools || []).map((p) => el('span', { class: 'pool' }, `${p.role} pool: ${num(p.in_use)} / ${num(p.size)} in use, ${num(p.waiters)} waiting`)),
      );
      if (d.statements_enabled) b.table.update([...(d.top_by_total || [])]);
      else {
        b.table.empty = d.statements_note || 'pg_stat_statements not enabled';
        b.table.update([]);
      }
    }
  }

  draw(points) {
    const last = points[points.length - 1];
    if (last) this.ensure((last.db || []).map((d) => d.name));
    this.tps.update(points);
    this.conn.update(points);
  }
}
