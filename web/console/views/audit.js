// The audit log (admin): every state-changing API request, by any
// principal, newest first (GET /audit): who, what (method, route, the ids
// in the path, a summary of the body with secrets redacted), when, from
// where, the request id and the outcome. Filtered as the API filters, the
// filters kept in the address (a campaign's history links here with
// ?request_id=), paged with the API's cursor.

import {h, table, fmtTime, badge, debounce, errorBox} from '../lib/dom.js';
import {api, qs} from '../lib/api.js';
import {setQuery} from '../lib/nav.js';
import {principalLabel} from '../lib/role.js';

const PAGE = 100;
const keys = ['principal', 'method', 'route', 'target', 'request_id', 'outcome', 'from', 'to'];

function select(testid, label, options, value) {
  const s = h('select', {'data-testid': testid, 'aria-label': label}, options.map(([v, t]) => h('option', {value: v}, t)));
  s.value = value;
  return s;
}

// localInput shows an RFC 3339 time in a datetime-local input, and back.
const pad = (n) => String(n).padStart(2, '0');
function toLocal(v) {
  const d = new Date(v);
  if (!v || isNaN(d)) return '';
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
}
function fromLocal(v) {
  const d = new Date(v);
  return v && !isNaN(d) ? d.toISOString().replace(/\.\d{3}Z$/, 'Z') : '';
}

function outcomeBadge(status) {
  return badge(String(status), status < 400 ? 'ok' : status === 401 || status === 403 ? 'warn' : 'bad',
    {'data-testid': 'audit-status', title: status < 400 ? 'succeeded' : 'refused or failed'});
}

function summaryText(s) {
  if (s === null || s === undefined) return '';
  return JSON.stringify(s, null, 1);
}

export async function auditView(ctx) {
  ctx.title('Audit log');
  const q = new URLSearchParams(location.search);
  const f = {};
  for (const k of keys) f[k] = q.get(k) || '';

  const controls = {
    principal: h('input', {type: 'text', placeholder: 'name or id', 'data-testid': 'audit-principal', 'aria-label': 'Principal', value: f.principal}),
    method: select('audit-method', 'Method', [['', 'any'], ['POST', 'POST'], ['PUT', 'PUT'], ['PATCH', 'PATCH'], ['DELETE', 'DELETE']], f.method),
    route: h('input', {type: 'text', placeholder: '/api/v1/devices/{id}', 'data-testid': 'audit-route', 'aria-label': 'Route', value: f.route}),
    target: h('input', {type: 'text', placeholder: 'a device or campaign id', 'data-testid': 'audit-target', 'aria-label': 'Target', value: f.target}),
    request_id: h('input', {type: 'text', placeholder: 'request id', 'data-testid': 'audit-request-id', 'aria-label': 'Request id', value: f.request_id}),
    outcome: select('audit-outcome', 'Outcome', [['', 'any'], ['success', 'succeeded'], ['failure', 'refused or failed']], f.outcome),
    from: h('input', {type: 'datetime-local', 'data-testid': 'audit-from', 'aria-label': 'From', value: toLocal(f.from)}),
    to: h('input', {type: 'datetime-local', 'data-testid': 'audit-to', 'aria-label': 'To', value: toLocal(f.to)}),
  };
  const reset = h('button', {type: 'button', class: 'btn ghost small', 'data-testid': 'audit-reset'}, 'Clear filters');
  const summary = h('p', {class: 'muted small', 'data-testid': 'audit-summary', 'aria-live': 'polite'});
  const problem = h('div');
  const tbody = h('tbody');
  const prev = h('button', {type: 'button', class: 'btn small', 'data-testid': 'page-prev', disabled: true}, '← Newer');
  const next = h('button', {type: 'button', class: 'btn small', 'data-testid': 'page-next', disabled: true}, 'Older →');
  const mini = (label, el, cls = '') => h('label', {class: `mini ${cls}`.trim()}, h('span', null, label), el);

  ctx.root.append(
    h('div', {class: 'page-head'}, h('h1', null, 'Audit log'), summary),
    h('form', {class: 'filters card', 'data-testid': 'audit-filters', role: 'search', onsubmit: (e) => e.preventDefault()},
      mini('Principal', controls.principal), mini('Method', controls.method), mini('Route', controls.route),
      mini('Target', controls.target), mini('Request id', controls.request_id), mini('Outcome', controls.outcome),
      mini('From', controls.from, 'span-2'), mini('To', controls.to, 'span-2'), h('div', {class: 'mini end'}, reset)),
    problem,
    h('div', {class: 'table-wrap card flush'},
      h('table', {'data-testid': 'audit-table', class: 'compact'},
        h('thead', null, h('tr', null, ['Time', 'Principal', 'Request', 'Targets', 'Outcome', 'Request id', 'From', 'Change']
          .map((x) => h('th', {scope: 'col'}, x)))),
        tbody)),
    h('div', {class: 'pager'}, prev, next));

  let cursors = [''];
  let pageIdx = 0;
  let nextCursor = '';
  let seq = 0;

  function row(e) {
    const p = e.principal || {};
    const targets = Object.entries(e.targets || {});
    const sum = summaryText(e.summary);
    return h('tr', {'data-testid': 'audit-row', 'data-id': e.id, 'data-request-id': e.request_id, 'data-method': e.method, 'data-route': e.route,
      'data-principal': p.name || p.id || '', 'data-status': e.status},
    h('td', {class: 'nowrap'}, fmtTime(e.at)),
    h('td', null, h('strong', null, principalLabel(p) || p.kind), h('div', {class: 'muted small'}, [p.kind, p.role].filter(Boolean).join(' · '))),
    h('td', {title: e.path}, h('code', null, `${e.method} ${e.route || e.path}`)),
    h('td', {class: 'targets'}, targets.length ? targets.map(([k, v]) => h('code', {class: 'tag', title: k}, `${k}=${v}`)) : '—'),
    h('td', null, outcomeBadge(e.status)),
    h('td', null, h('code', {class: 'small'}, e.request_id || '—')),
    h('td', {class: 'small nowrap'}, e.remote || ''),
    h('td', null, sum ? h('details', null, h('summary', {class: 'small'}, 'summary'), h('pre', {class: 'audit-summary'}, sum)) : '—'));
  }

  async function load() {
    const my = ++seq;
    const page = await api('GET', '/audit' + qs({...f, limit: PAGE, cursor: cursors[pageIdx]}), undefined, {signal: ctx.signal});
    if (!ctx.alive() || my !== seq) return;
    problem.replaceChildren();
    const es = page.entries || [];
    nextCursor = page.next_cursor || '';
    tbody.replaceChildren(...es.map(row));
    if (!es.length) tbody.append(h('tr', null, h('td', {colspan: 8, class: 'empty'}, 'No entry matches these filters.')));
    const first = pageIdx * PAGE + 1;
    summary.textContent = es.length ? `Entries ${first}–${first + es.length - 1}, newest first${nextCursor ? ' (older ones on the next pages)' : ''}` : '';
    prev.disabled = pageIdx === 0;
    next.disabled = !nextCursor;
  }

  const reload = () => load().catch((err) => {
    if (ctx.alive() && err.name !== 'AbortError') {
      problem.replaceChildren(errorBox(err));
      tbody.replaceChildren();
      nextCursor = '';
      next.disabled = true;
    }
  });

  const apply = () => {
    for (const k of keys) f[k] = k === 'from' || k === 'to' ? fromLocal(controls[k].value) : controls[k].value.trim();
    setQuery(f);
    cursors = [''];
    pageIdx = 0;
    reload();
  };
  const applySoon = debounce(apply, 400);
  ctx.onDispose(applySoon.cancel);
  for (const el of Object.values(controls)) {
    if (el.tagName === 'SELECT' || el.type === 'datetime-local') {
      el.addEventListener('change', apply);
    } else {
      el.addEventListener('input', applySoon);
      el.addEventListener('change', () => {
        applySoon.cancel();
        apply();
      });
    }
  }
  reset.addEventListener('click', () => {
    for (const el of Object.values(controls)) el.value = '';
    apply();
  });
  next.addEventListener('click', () => {
    if (!nextCursor) return;
    cursors[pageIdx + 1] = nextCursor;
    pageIdx++;
    reload();
  });
  prev.addEventListener('click', () => {
    if (pageIdx === 0) return;
    pageIdx--;
    reload();
  });
  ctx.refresh = reload;
  await load();
}
