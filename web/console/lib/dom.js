// DOM building, formatting, dialogs and error display. Every piece of data
// from the API reaches the page as text (textContent, attribute values),
// never as HTML.

const SVG_NS = 'http://www.w3.org/2000/svg';

function build(el, attrs, kids) {
  appendKids(el, kids);
  if (attrs) {
    for (const [k, v] of Object.entries(attrs)) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith('on') && typeof v === 'function') {
        el.addEventListener(k.slice(2), v);
      } else if (k === 'value' && 'value' in el && !(el instanceof SVGElement)) {
        el.value = v;
      } else if (k === 'checked') {
        el.checked = !!v;
      } else {
        el.setAttribute(k, v === true ? '' : String(v));
      }
    }
  }
  return el;
}

function appendKids(el, kids) {
  for (const k of kids) {
    if (k === null || k === undefined || k === false) continue;
    if (Array.isArray(k)) appendKids(el, k);
    else if (k instanceof Node) el.append(k);
    else el.append(document.createTextNode(String(k)));
  }
}

// h builds an HTML element: h('a', {href: '/x', class: 'c', onclick: f}, 'text', child).
export function h(tag, attrs, ...kids) {
  return build(document.createElement(tag), attrs, kids);
}

// fill replaces el's children with kids (flattened; null and false skipped).
export function fill(el, ...kids) {
  el.replaceChildren();
  appendKids(el, kids);
  return el;
}

// svg builds an SVG element the same way.
export function svg(tag, attrs, ...kids) {
  return build(document.createElementNS(SVG_NS, tag), attrs, kids);
}

// link is an in-app link: the router intercepts it, no page reload.
export function link(href, ...kids) {
  return h('a', {href, 'data-link': true}, ...kids);
}

export function uiPath(...parts) {
  return '/ui/' + parts.map((p) => encodeURIComponent(p)).join('/');
}

export function devicePath(id) {
  return uiPath('devices', id);
}

// ---- formatting

const pad = (n) => String(n).padStart(2, '0');

export function fmtTime(v) {
  if (!v) return '—';
  const d = v instanceof Date ? v : new Date(v);
  if (isNaN(d)) return String(v);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

export function fmtClock(v, seconds = true) {
  const d = v instanceof Date ? v : new Date(v);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}` + (seconds ? `:${pad(d.getSeconds())}` : '');
}

export function fmtDuration(ms) {
  if (!isFinite(ms)) return '—';
  const s = Math.round(ms / 1000);
  if (s < 1) return `${Math.max(0, Math.round(ms))} ms`;
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${s % 60} s`;
  const hrs = Math.floor(m / 60);
  if (hrs < 48) return `${hrs} h ${m % 60} min`;
  return `${Math.floor(hrs / 24)} d ${hrs % 24} h`;
}

export function ago(v) {
  if (!v) return '—';
  const ms = Date.now() - new Date(v).getTime();
  if (!isFinite(ms)) return '—';
  if (ms < 5000) return 'just now';
  return fmtDuration(ms) + ' ago';
}

export function fmtBytes(n) {
  if (!isFinite(n)) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${i === 0 ? n : n.toFixed(1)} ${units[i]}`;
}

export function fmtNum(n, digits = 2) {
  if (typeof n !== 'number' || !isFinite(n)) return String(n ?? '—');
  return Number.isInteger(n) ? String(n) : n.toFixed(digits);
}

// protoName renders a protocol version for people: "MQTT 3.1.1".
export function protoName(p) {
  return p ? `MQTT ${p}` : 'unknown protocol';
}

// ---- errors

const errorTitles = {
  invalid: 'The request was refused',
  not_found: 'Not found',
  conflict: 'Conflict',
  unauthorized: 'Not signed in',
  forbidden: 'Not allowed',
  csrf: 'Refused: the session\'s CSRF token is missing',
  last_admin: 'The last admin cannot go',
  too_many_requests: 'Too many requests',
  network: 'Cannot reach fleetd',
  internal: 'fleetd failed',
  busy: 'fleetd is busy',
};

// errorBox shows an error as a readable message: the API's message and, for
// a refused request, the field it names.
export function errorBox(err, {title} = {}) {
  const code = err && err.code;
  const heading = title || errorTitles[code] || (err && err.status ? `Error ${err.status}` : 'Something went wrong');
  return h('div', {class: 'error', role: 'alert', 'data-testid': 'error', 'data-field': (err && err.field) || null},
    h('strong', null, heading),
    h('span', {class: 'error-message', 'data-testid': 'error-message'}, (err && err.message) || String(err)),
    err && err.field ? h('span', {class: 'error-field', 'data-testid': 'error-field'}, 'field: ', h('code', null, err.field)) : null,
  );
}

// orNotFound awaits the object a view shows; when fleetd has no such thing
// (404) the page says so with a link back, and it resolves to null. Other
// errors are thrown (the router shows them).
export async function orNotFound(ctx, load, {heading, title, back, backText}) {
  try {
    return await load;
  } catch (err) {
    if (err.status !== 404) throw err;
    ctx.root.replaceChildren(h('h1', null, heading), errorBox(err, {title}), h('p', null, link(back, backText)));
    return null;
  }
}

// ---- dialogs

// modal opens a <dialog> holding content; close() removes it.
export function modal(content, {testid, label} = {}) {
  const dlg = h('dialog', {class: 'dialog', 'data-testid': testid, 'aria-label': label}, content);
  document.body.append(dlg);
  dlg.addEventListener('close', () => dlg.remove());
  dlg.showModal();
  return {dialog: dlg, close: () => dlg.close()};
}

// confirmDialog asks before something irreversible; it resolves to true
// when the operator confirms.
export function confirmDialog({title, message, confirm = 'Confirm', danger = false}) {
  return new Promise((resolve) => {
    let answered = false;
    const answer = (v) => {
      if (answered) return;
      answered = true;
      m.close();
      resolve(v);
    };
    const ok = h('button', {type: 'button', class: danger ? 'btn danger' : 'btn primary', 'data-testid': 'confirm-ok', onclick: () => answer(true)}, confirm);
    const content = h('div', null,
      h('h2', null, title),
      typeof message === 'string' ? h('p', null, message) : message,
      h('div', {class: 'dialog-actions'},
        h('button', {type: 'button', class: 'btn ghost', 'data-testid': 'confirm-cancel', onclick: () => answer(false)}, 'Cancel'),
        ok));
    const m = modal(content, {testid: 'confirm-dialog', label: title});
    m.dialog.addEventListener('close', () => answer(false));
    ok.focus();
  });
}

// debounce delays f until calls stop for ms.
export function debounce(f, ms) {
  let t = 0;
  const d = (...args) => {
    clearTimeout(t);
    t = setTimeout(() => f(...args), ms);
  };
  d.cancel = () => clearTimeout(t);
  return d;
}

// settle calls f at most once per ms while triggers keep coming, and once
// more at least ms after the last trigger. fleetd announces an event on the
// stream a moment before it is readable through the API, so a reload that
// follows a burst must not run right after its last event.
export function settle(f, ms) {
  let timer = 0;
  let last = 0;
  const run = () => {
    timer = 0;
    f();
    if (Date.now() - last < ms) timer = setTimeout(run, ms);
  };
  const g = () => {
    last = Date.now();
    if (!timer) timer = setTimeout(run, ms);
  };
  g.cancel = () => {
    clearTimeout(timer);
    timer = 0;
  };
  return g;
}

export function badge(text, kind, attrs = {}) {
  return h('span', {...attrs, class: `badge ${kind || ''}`.trim()}, text);
}

export function onlineBadge(online, attrs = {}) {
  return badge(online ? 'online' : 'offline', online ? 'ok' : 'off', attrs);
}

// dl renders [label, value] pairs as a definition list.
export function dl(pairs, attrs) {
  return h('dl', {class: 'facts', ...attrs}, pairs.filter(Boolean).map(([k, v, testid]) => [
    h('dt', null, k),
    h('dd', {'data-testid': testid}, v === '' || v === null || v === undefined ? '—' : v),
  ]));
}

export function card(title, ...body) {
  return h('section', {class: 'card'}, title ? h('h2', null, title) : null, ...body);
}

// table builds a table inside a horizontally scrolling wrapper, so that wide
// tables work on a tablet.
export function table(headers, rows, attrs = {}) {
  return h('div', {class: 'table-wrap'},
    h('table', attrs,
      h('thead', null, h('tr', null, headers.map((x) => h('th', {scope: 'col'}, x)))),
      h('tbody', null, rows)));
}
