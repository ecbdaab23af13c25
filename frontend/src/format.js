// Numbers as people read them.

export function num(value, digits = 0) {
  if (value === null || value === undefined || Number.isNaN(value)) return '—';
  return Number(value).toLocaleString('en-US', { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

export function ms(value) {
  if (value === null || value === undefined) return '—';
  if (value >= 1000) return `${num(value / 1000, 2)} s`;
  return `${num(value, value < 10 ? 2 : 1)} ms`;
}

export function seconds(value) {
  if (value === null || value === undefined) return '—';
  if (value < 1) return `${num(value * 1000, 0)} ms`;
  if (value < 120) return `${num(value, 1)} s`;
  return `${num(value / 60, 1)} min`;
}

export function bytes(value) {
  if (value === null || value === undefined) return '—';
  const units = ['B', 'KB', 'MB', 'GB', 'TB'];
  let v = Number(value);
  let i = 0;
  while (Math.abs(v) >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${num(v, i === 0 && !(v > 0 && v < 10 && v % 1) ? 0 : 1)} ${units[i]}`;
}

export function percent(ratio, digits = 1) {
  if (ratio === null || ratio === undefined) return '—';
  return `${num(ratio * 100, digits)} %`;
}

export function clock(epochMs) {
  if (!epochMs) return '—';
  return new Date(epochMs).toLocaleTimeString('en-GB', { hour12: false });
}

/** `/msys.v1.UserService/CreateUser` → `UserService/CreateUser`. */
export function method(path) {
  return String(path).replace(/^\/msys\.v1\./, '');
}
