// The page's one connection to the server: an EventSource on /api/events
// (snapshots, the monitor's status every second, load-test progress), plus
// JSON fetches for history and the load panel. EventSource reconnects by
// itself; a watchdog notices a server that went silent without closing.

const SILENCE_MS = 5000;

export async function getJSON(url) {
  const response = await fetch(url, { headers: { accept: 'application/json' } });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `${url}: HTTP ${response.status}`);
  return body;
}

export async function postJSON(url, payload, token) {
  const headers = { 'content-type': 'application/json', accept: 'application/json' };
  if (token) headers.authorization = `Bearer ${token}`;
  const response = await fetch(url, { method: 'POST', headers, body: JSON.stringify(payload ?? {}) });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    // The status says what to do next (401: a token is needed, 409: a test is already running).
    const error = new Error(body.error || `${url}: HTTP ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

/**
 * Follows /api/events. handlers: snapshot(view), status(status), load(frame),
 * reconnected() (after any gap, so the caller can refill from history).
 */
export function follow(handlers) {
  let lastFrame = Date.now();
  // Starts as a gap: the first word that the monitor is up loads the history, so a page opened
  // while the monitor is away does not ask for history it cannot have.
  let gap = true;
  let source;

  const seen = () => {
    lastFrame = Date.now();
  };
  const parse = (event) => {
    try {
      return JSON.parse(event.data);
    } catch {
      return null;
    }
  };

  function open() {
    source = new EventSource('/api/events');
    // The refill after a gap waits for the first status frame that says the monitor is up.
    source.addEventListener('open', seen);
    source.addEventListener('error', () => {
      gap = true;
      handlers.status({ monitor: 'unreachable', reason: 'the dashboard server does not answer', server: false });
    });
    source.addEventListener('snapshot', (event) => {
      seen();
      const view = parse(event);
      if (view) handlers.snapshot(view);
    });
    source.addEventListener('status', (event) => {
      seen();
      const status = parse(event);
      if (!status) return;
      if (status.monitor !== 'up') gap = true;
      else if (gap) {
        gap = false;
        handlers.reconnected();
      }
      handlers.status({ ...status, server: true });
    });
    source.addEventListener('load', (event) => {
      seen();
      const frame = parse(event);
      if (frame) handlers.load(frame);
    });
  }

  open();
  setInterval(() => {
    if (Date.now() - lastFrame > SILENCE_MS) {
      gap = true;
      handlers.status({ monitor: 'unreachable', reason: 'no data from the dashboard server', server: false });
      // A server that went silent without closing: start over.
      source.close();
      lastFrame = Date.now();
      open();
    }
  }, 1000);
}
