// Wires the panels to the data: history first (charts drawn at once), then
// the live SSE feed. Window selector, pause and theme live here too.
import 'uplot/dist/uPlot.min.css';
import './style.css';
import { follow, getJSON } from './api.js';
import { rebuildAll } from './charts.js';
import { byId } from './dom.js';
import { Store } from './store.js';
import { Databases } from './views/databases.js';
import { Flow } from './views/flow.js';
import { Header } from './views/header.js';
import { Kafka } from './views/kafka.js';
import { Load } from './views/load.js';
import { Services } from './views/services.js';

const store = new Store();
const header = new Header();
const services = new Services();
const kafka = new Kafka();
const flow = new Flow();
const databases = new Databases();
const load = new Load();
let latest = null;

function draw() {
  const points = store.visible();
  // What the charts hold, as attributes a test (or a curious person) can read.
  let gap = 0;
  for (let i = 1; i < points.length; i += 1) gap = Math.max(gap, points[i].t - points[i - 1].t);
  document.body.dataset.points = String(points.length);
  document.body.dataset.maxGapMs = String(gap);
  services.draw(points);
  kafka.draw(points);
  databases.draw(points);
}

function render(view) {
  header.snapshot(view);
  services.snapshot(view);
  kafka.snapshot(view);
  flow.snapshot(view);
  databases.snapshot(view);
}

async function loadHistory() {
  try {
    const history = await getJSON('/api/history?window=900');
    store.add(history.points || []);
    if (!store.paused) draw();
  } catch (error) {
    // The live feed still fills the charts; the header says why data is missing.
    console.warn(`history unavailable: ${error.message}`);
  }
}

function setupControls() {
  const windowSelect = byId('window');
  windowSelect.addEventListener('change', () => {
    store.windowSeconds = Number(windowSelect.value);
    draw();
  });
  const pause = byId('pause');
  pause.addEventListener('click', () => {
    store.paused = !store.paused;
    pause.setAttribute('aria-pressed', String(store.paused));
    pause.textContent = store.paused ? 'Resume' : 'Pause';
    document.body.dataset.paused = String(store.paused);
    if (!store.paused) {
      if (latest) render(latest);
      draw();
    }
  });
  const theme = byId('theme');
  const apply = (name) => {
    document.documentElement.dataset.theme = name;
    theme.textContent = name === 'dark' ? 'Light theme' : 'Dark theme';
    rebuildAll();
  };
  let saved = null;
  try {
    saved = localStorage.getItem('msys-theme');
  } catch {
    saved = null;
  }
  apply(saved || (window.matchMedia('(prefers-color-scheme: dark)').matches ? 'dark' : 'light'));
  theme.addEventListener('click', () => {
    const next = document.documentElement.dataset.theme === 'dark' ? 'light' : 'dark';
    try {
      localStorage.setItem('msys-theme', next);
    } catch {
      // private mode: the choice lasts for this page only
    }
    apply(next);
  });
}

setupControls();
follow({
  snapshot(view) {
    latest = view;
    store.push(view.point);
    // Paused: data keeps arriving (nothing is lost), the screen holds still.
    if (store.paused) return;
    render(view);
    draw();
  },
  status(status) {
    header.setStatus(status);
  },
  load(frame) {
    load.frame(frame);
  },
  reconnected() {
    loadHistory();
  },
});
setInterval(() => header.render(), 1000);
