// Time-series charts on uPlot (canvas; it writes labels as text, not HTML).
// A chart is described by its series (label + how to read a value from a
// chart point); it is rebuilt when the series change or the theme flips.
import uPlot from 'uplot';
import { el, fill } from './dom.js';
import { clock } from './format.js';

// Okabe–Ito: distinguishable with the common colour-vision deficiencies.
const PALETTE = ['#0072B2', '#E69F00', '#009E73', '#D55E00', '#CC79A7', '#56B4E9', '#F0E442', '#000000'];

const charts = new Set();

function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

export class Chart {
  /** spec: { title, unit: v => string, series: [{ label, get: point => number|null, dash? }] } */
  constructor(parent, spec) {
    this.box = el('figure', { class: 'chart' });
    this.caption = el('figcaption', {}, spec.title);
    this.canvas = el('div', { class: 'plot' });
    this.box.append(this.caption, this.canvas);
    parent.append(this.box);
    this.spec = spec;
    this.key = '';
    this.plot = null;
    this.points = [];
    charts.add(this);
    this.observer = new ResizeObserver(() => this.resize());
    this.observer.observe(this.canvas);
  }

  setSeries(series) {
    this.spec = { ...this.spec, series };
  }

  size() {
    return { width: Math.max(200, this.canvas.clientWidth || 300), height: 160 };
  }

  resize() {
    if (this.plot) this.plot.setSize(this.size());
  }

  build() {
    if (this.plot) this.plot.destroy();
    fill(this.canvas);
    const axis = cssVar('--muted') || '#666';
    const grid = cssVar('--grid') || '#ddd';
    const unit = this.spec.unit || ((v) => String(v));
    const opts = {
      ...this.size(),
      // Labels only: live values under every chart took more room than the charts.
      legend: { live: false },
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true }, y: { range: (u, min, max) => [Math.min(0, min), max > 0 ? max * 1.1 : 1] } },
      axes: [
        { stroke: axis, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid }, space: 80, values: (u, vals) => vals.map((v) => clock(v * 1000)) },
        { stroke: axis, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid }, size: 72, values: (u, vals) => vals.map(this.spec.axis || unit) },
      ],
      series: [
        {},
        ...this.spec.series.map((s, i) => ({
          label: s.label,
          stroke: PALETTE[i % PALETTE.length],
          width: 2,
          dash: s.dash,
          value: (u, v) => (v === null || v === undefined ? '—' : unit(v)),
          spanGaps: false,
        })),
      ],
    };
    this.plot = new uPlot(opts, this.data(), this.canvas);
    this.key = this.spec.series.map((s) => s.label).join('|');
  }

  data() {
    const xs = this.points.map((p) => p.t / 1000);
    const ys = this.spec.series.map((s) => this.points.map((p) => {
      const v = s.get(p);
      return v === undefined || Number.isNaN(v) ? null : v;
    }));
    return [xs, ...ys];
  }

  update(points) {
    this.points = points;
    const key = this.spec.series.map((s) => s.label).join('|');
    if (!this.plot || key !== this.key) this.build();
    else this.plot.setData(this.data());
  }
}

/** Redraws every chart with the current theme's colours. */
export function rebuildAll() {
  for (const chart of charts) if (chart.plot) chart.build();
}
