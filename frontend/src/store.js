// Chart points over time: history from /api/history first, then one point
// per live snapshot. Kept for the largest window (15 min) and a little more.

const KEEP_MS = 16 * 60 * 1000;

export class Store {
  constructor() {
    this.points = [];
    this.windowSeconds = 300;
    this.paused = false;
  }

  /** Merges points (history or live), keeping time order and no duplicates. */
  add(points) {
    const byTime = new Map(this.points.map((p) => [p.t, p]));
    for (const p of points) if (p && p.t) byTime.set(p.t, p);
    const newest = Math.max(...byTime.keys(), 0);
    this.points = [...byTime.values()].filter((p) => p.t >= newest - KEEP_MS).sort((a, b) => a.t - b.t);
  }

  push(point) {
    const last = this.points[this.points.length - 1];
    if (!point || !point.t) return;
    if (last && point.t <= last.t) {
      this.add([point]);
      return;
    }
    this.points.push(point);
    const cutoff = point.t - KEEP_MS;
    while (this.points.length && this.points[0].t < cutoff) this.points.shift();
  }

  /** The points inside the selected window, ending at the newest one. */
  visible() {
    const last = this.points[this.points.length - 1];
    if (!last) return [];
    const from = last.t - this.windowSeconds * 1000;
    return this.points.filter((p) => p.t >= from);
  }
}
