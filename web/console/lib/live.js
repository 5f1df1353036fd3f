// Live updates: GET /api/v1/stream is Server-Sent Events over a normal HTTP
// response that needs the console's credential: the session cookie, or the
// Authorization header of the break-glass token, which EventSource cannot
// send. So the stream is read with fetch() and parsed here: events are
// separated by blank lines, fields are "event:" and "data:", lines starting
// with ":" are comments (keepalives). When the stream drops (or does not
// exist yet) it reconnects with exponential backoff and jitter, and the
// console keeps working without it.

import {API, authHeaders, errorFromBody, reportUnauthorized} from './api.js';

// IDLE_MS: a stream silent for this long (no event, no keepalive comment;
// fleetd sends one every 15 s) is presumed dead and reopened.
const IDLE_MS = 60_000;
const MAX_BACKOFF_MS = 30_000;

// live is the state shared by the views.
export const live = {
  state: 'off', // off | connecting | live | down
  why: '', // why the stream is down
  retryAt: 0, // when the next attempt starts (state down)
  known: new Map(), // device id → online, as the stream last said
  counts: null, // {total, online, offline}: fleet/health plus the stream's changes
};

const listeners = new Set();

// subscribe calls f with every {type, data} the stream produces ("presence",
// "campaign", plus "state" when the connection changes and "open" when it
// (re)opens, a cue to resynchronise). It returns the unsubscribe function.
export function subscribe(f) {
  listeners.add(f);
  return () => listeners.delete(f);
}

function emit(type, data) {
  for (const f of [...listeners]) {
    try {
      f({type, data});
    } catch (err) {
      console.error('live listener', err);
    }
  }
}

function setState(state, why = '', retryAt = 0) {
  live.state = state;
  live.why = why;
  live.retryAt = retryAt;
  emit('state', live);
}

// setCounts takes fleet/health's device counts as the new baseline.
export function setCounts(devices) {
  live.counts = {total: devices.total || 0, online: devices.online || 0, offline: devices.offline || 0};
}

// presenceAfter is whether the device is online after the event. The old
// session of a takeover ends while the device stays online in its new one.
export function presenceAfter(ev, before) {
  if (ev.kind === 'disconnect' && ev.reason === 'session_takeover') return before;
  return ev.online === undefined ? ev.kind === 'connect' : !!ev.online;
}

// applyPresence moves the online count by the device's change. A device the
// stream has not mentioned yet is assumed to have been offline before a
// connect and online before a disconnect; fleet/health corrects any drift.
function applyPresence(ev) {
  if (!ev || typeof ev.device_id !== 'string') return;
  if (ev.kind !== 'connect' && ev.kind !== 'disconnect') return;
  const prev = live.known.has(ev.device_id) ? live.known.get(ev.device_id) : ev.kind !== 'connect';
  const online = presenceAfter(ev, prev);
  live.known.set(ev.device_id, online);
  if (live.counts && prev !== online) {
    // A device registered since the last fleet/health read grows the total.
    const c = live.counts;
    c.online = Math.max(0, c.online + (online ? 1 : -1));
    c.total = Math.max(c.total, c.online);
    c.offline = c.total - c.online;
  }
}

function dispatch(type, raw) {
  let data;
  try {
    data = JSON.parse(raw);
  } catch {
    console.warn('stream: event %s with data that is not JSON', type);
    return;
  }
  if (type === 'presence') applyPresence(data);
  emit(type, data);
}

let running = false;
let ctrl = null;
let wake = null;

export function startLive() {
  if (running) return;
  running = true;
  loop();
}

// stopLive ends the stream (sign-out) and forgets what it counted.
export function stopLive() {
  running = false;
  if (ctrl) ctrl.abort();
  if (wake) wake();
  live.known.clear();
  live.counts = null;
  setState('off');
}

// reconnectNow skips the remaining backoff (the operator clicked the status).
export function reconnectNow() {
  if (wake) wake();
}

function sleep(ms) {
  return new Promise((resolve) => {
    const t = setTimeout(done, ms);
    function done() {
      clearTimeout(t);
      wake = null;
      resolve();
    }
    wake = done;
  });
}

async function loop() {
  let backoff = 1000;
  while (running) {
    setState('connecting');
    const c = new AbortController();
    ctrl = c;
    const started = Date.now();
    let opened = false;
    let why = '';
    let idle = false;
    try {
      const res = await fetch(API + '/stream', {
        headers: {...authHeaders('GET'), Accept: 'text/event-stream'},
        signal: c.signal,
        cache: 'no-store',
        credentials: 'same-origin',
      });
      if (!res.ok) {
        const e = errorFromBody(res.status, await res.text(), res.statusText);
        if (res.status === 401) {
          reportUnauthorized(e);
          return;
        }
        throw new Error(res.status === 404 ? 'this fleetd has no event stream (404)' : `HTTP ${res.status}: ${e.message}`);
      }
      const ct = res.headers.get('Content-Type') || '';
      if (!ct.startsWith('text/event-stream') || !res.body) {
        throw new Error(`the stream answered ${ct || 'without a content type'}`);
      }
      opened = true;
      setState('live');
      emit('open', live);
      await readSSE(res.body, c, () => {
        idle = true;
      });
      why = 'the stream ended';
    } catch (err) {
      if (!running) return;
      why = idle ? `no data for ${IDLE_MS / 1000} s` : (err && err.message) || String(err);
    }
    if (!running) return;
    if (opened && Date.now() - started > 15_000) backoff = 1000;
    const wait = Math.round(backoff * (0.5 + Math.random() * 0.5));
    backoff = Math.min(backoff * 2, MAX_BACKOFF_MS);
    setState('down', why, Date.now() + wait);
    await sleep(wait);
  }
}

// readSSE parses the event stream until it ends; onIdle is called before
// the reader is aborted for silence.
async function readSSE(body, c, onIdle) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buf = '';
  let type = '';
  let data = [];
  let timer = 0;
  const arm = () => {
    clearTimeout(timer);
    timer = setTimeout(() => {
      onIdle();
      c.abort();
    }, IDLE_MS);
  };
  arm();
  try {
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      arm();
      buf += decoder.decode(value, {stream: true});
      for (;;) {
        const m = /\r\n|\r|\n/.exec(buf);
        if (!m) break;
        // A lone CR at the end of the buffer may be the first half of CRLF.
        if (m[0] === '\r' && m.index === buf.length - 1) break;
        const line = buf.slice(0, m.index);
        buf = buf.slice(m.index + m[0].length);
        if (line === '') {
          if (data.length) dispatch(type || 'message', data.join('\n'));
          type = '';
          data = [];
          continue;
        }
        if (line[0] === ':') continue; // comment: keepalive
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        let val = colon < 0 ? '' : line.slice(colon + 1);
        if (val[0] === ' ') val = val.slice(1);
        if (field === 'event') type = val;
        else if (field === 'data') data.push(val);
        // "id" and "retry" are not used: after a drop the views
        // resynchronise from the API instead of replaying.
      }
    }
  } finally {
    clearTimeout(timer);
    reader.cancel().catch(() => {});
  }
}
