// A status is always a word and an icon, never colour alone (colour-blind
// readers), and the colour classes use a palette that stays apart for them.
import { el } from './dom.js';

const LEVELS = {
  OK: ['ok', '✔'],
  UP: ['ok', '✔'],
  LAGGING: ['warn', '▲'],
  NOT_SERVING: ['warn', '▲'],
  STALLED: ['bad', '■'],
  STOPPED: ['bad', '✖'],
  DOWN: ['bad', '✖'],
  EMPTY: ['idle', '○'],
  UNKNOWN: ['idle', '?'],
  UNSPECIFIED: ['idle', '?'],
};

export function level(word) {
  return (LEVELS[word] || LEVELS.UNKNOWN)[0];
}

/** A badge such as `✔ OK`; `label` replaces the word shown. */
export function badge(word, label) {
  const [cls, icon] = LEVELS[word] || LEVELS.UNKNOWN;
  return el('span', { class: `badge ${cls}`, 'data-status': word }, `${icon} ${label ?? word}`);
}
