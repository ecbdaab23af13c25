// A sortable table: click a heading to sort by it, again to reverse. The
// sort survives live updates (the table is redrawn every second).
import { el, fill } from './dom.js';

export class SortableTable {
  /** columns: [{ label, value: row => sortable, show?: row => text|Node, num?: bool }] */
  constructor(parent, columns, { sortBy = 0, descending = false, empty = 'no data yet', caption } = {}) {
    this.columns = columns;
    this.sortBy = sortBy;
    this.descending = descending;
    this.empty = empty;
    this.rows = [];
    this.table = el('table', { class: 'sortable' });
    if (caption) this.table.append(el('caption', {}, caption));
    this.head = el('thead');
    this.body = el('tbody');
    this.table.append(this.head, this.body);
    parent.append(this.table);
    this.drawHead();
    this.draw();
  }

  drawHead() {
    const cells = this.columns.map((col, i) => {
      const sorted = i === this.sortBy;
      const arrow = sorted ? (this.descending ? ' ▼' : ' ▲') : '';
      return el(
        'th',
        {
          class: col.num ? 'num' : undefined,
          scope: 'col',
          'aria-sort': sorted ? (this.descending ? 'descending' : 'ascending') : 'none',
        },
        el('button', { type: 'button', class: 'sort', onclick: () => this.sort(i) }, col.label + arrow),
      );
    });
    fill(this.head, el('tr', {}, cells));
  }

  sort(index) {
    if (this.sortBy === index) this.descending = !this.descending;
    else {
      this.sortBy = index;
      this.descending = Boolean(this.columns[index].num);
    }
    this.drawHead();
    this.draw();
  }

  update(rows) {
    this.rows = rows;
    this.draw();
  }

  draw() {
    const col = this.columns[this.sortBy];
    const sorted = [...this.rows].sort((a, b) => {
      const x = col.value(a);
      const y = col.value(b);
      const order = typeof x === 'number' && typeof y === 'number' ? x - y : String(x).localeCompare(String(y));
      return this.descending ? -order : order;
    });
    if (!sorted.length) {
      fill(this.body, el('tr', {}, el('td', { colspan: this.columns.length, class: 'muted' }, this.empty)));
      return;
    }
    fill(
      this.body,
      sorted.map((row) => el('tr', {}, this.columns.map((c) => el('td', { class: c.num ? 'num' : undefined }, c.show ? c.show(row) : c.value(row))))),
    );
  }
}
