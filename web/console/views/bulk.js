// Bulk commands: the list, the form that sends one command to every device
// a selector matches (with a live count of them), and a bulk's page: its
// summary and progress, kept current by the live stream's bulk_command
// events, its devices' results by state, and cancel.

import {h, card, table, link, uiPath, devicePath, dl, fmtTime, ago, badge, settle, errorBox, confirmDialog, orNotFound} from '../lib/dom.js';
import {api, qs, enc} from '../lib/api.js';
import {NEEDS_OPERATOR} from '../lib/role.js';
import {navigate} from '../lib/nav.js';
import {progressBar} from '../lib/charts.js';
import {parseConstraint} from '../lib/semver.js';
import {input, field, numberField, checkDuration, localError, selectorInputs, scanDevices, matchCounter, onSubmit} from '../lib/form.js';
import {parseParams} from './commands.js';

const PAGE = 50;

const stateKinds = {running: 'busy', completed: 'ok', cancelled: 'off'};

// The per-device states, in the order of a command's life (command.TargetStates).
const targetStates = ['pending', 'queued', 'delivered', 'succeeded', 'failed', 'timed_out', 'expired', 'skipped', 'cancelled', 'pruned'];
const targetKinds = {
  pending: '', queued: 'off', delivered: 'busy', succeeded: 'ok', failed: 'bad', timed_out: 'warn', expired: 'warn',
  skipped: 'off', cancelled: 'off', pruned: 'off',
};
const label = (s) => String(s).replaceAll('_', ' ');

function stateBadge(state, attrs = {}) {
  return badge(label(state), stateKinds[state] || '', {'data-state': state, ...attrs});
}

// selectorText says which devices a bulk's selector chose.
function selectorText(s) {
  if (!s || s.all) return 'every active device';
  const parts = [];
  if (s.models && s.models.length) parts.push(`models ${s.models.join(', ')}`);
  if (s.version) parts.push(`running ${s.version}`);
  if (s.tags && s.tags.length) parts.push(`tagged ${s.tags.join(' and ')}`);
  if (s.compat === 'incompatible') parts.push('found incompatible');
  return parts.join(', ') || 'every active device';
}

// finished is how many devices are done with: answered, timed out, expired,
// skipped or cancelled.
function finished(c) {
  return ['succeeded', 'failed', 'timed_out', 'expired', 'skipped', 'cancelled'].reduce((n, k) => n + ((c && c[k]) || 0), 0);
}

// bar draws the counts with the campaigns' progress bar: queued and
// delivered are in flight, expired counts with timed out.
function bar(b, attrs) {
  const c = b.counts || {};
  return progressBar({targets: b.total, by_state: {succeeded: c.succeeded, failed: c.failed, timed_out: (c.timed_out || 0) + (c.expired || 0),
    dispatched: (c.queued || 0) + (c.delivered || 0), pending: c.pending}}, attrs);
}

// ---- list

export async function bulksView(ctx) {
  ctx.title('Commands');
  const tbody = h('tbody');
  const problem = h('div');
  const more = h('button', {type: 'button', class: 'btn small', 'data-testid': 'bulk-more', hidden: true}, 'More');
  ctx.root.append(
    h('div', {class: 'page-head'}, h('h1', null, 'Commands'),
      h('div', {class: 'actions'}, h('a', {href: uiPath('commands', 'new'), 'data-link': true, class: 'btn primary', 'data-testid': 'new-bulk', ...NEEDS_OPERATOR}, 'New bulk command'))),
    h('p', {class: 'muted small'}, 'One command to every device a selector matches, paced. A single device\'s commands are on its page.'),
    problem,
    h('div', {class: 'table-wrap card flush'},
      h('table', {'data-testid': 'bulk-table'},
        h('thead', null, h('tr', null, ['Command', 'Devices', 'State', 'Progress', 'Created'].map((x) => h('th', {scope: 'col'}, x)))),
        tbody)),
    h('div', {class: 'pager'}, more));
  const bulks = new Map(); // id → {b, tr}
  let cursor = '';

  function row(b) {
    const {bar: el} = bar(b, {'data-testid': 'bulk-progress'});
    return h('tr', {'data-testid': 'bulk-row', 'data-bulk-id': b.id, 'data-state': b.state},
      h('td', null, link(uiPath('commands', b.id), h('code', null, b.name))),
      h('td', null, selectorText(b.selector)),
      h('td', null, stateBadge(b.state)),
      h('td', {class: 'progress-cell'}, el, h('span', {class: 'small muted', 'data-testid': 'bulk-done'}, `${finished(b.counts)}/${b.total}`)),
      h('td', {class: 'nowrap', title: fmtTime(b.created_at)}, ago(b.created_at)));
  }

  function put(b, prepend) {
    const tr = row(b);
    const old = bulks.get(b.id);
    if (old) old.tr.replaceWith(tr);
    else if (prepend) tbody.prepend(tr);
    else tbody.append(tr);
    bulks.set(b.id, {b, tr});
    const empty = tbody.querySelector('.empty-row');
    if (empty) empty.remove();
  }

  async function load(after = '') {
    const page = await api('GET', '/commands' + qs({limit: PAGE, cursor: after}), undefined, {signal: ctx.signal});
    if (!ctx.alive()) return;
    problem.replaceChildren();
    if (!after) {
      bulks.clear();
      tbody.replaceChildren();
    }
    for (const b of page.bulks || []) put(b, false);
    cursor = page.next_cursor || '';
    more.hidden = !cursor;
    if (!bulks.size) {
      tbody.append(h('tr', {class: 'empty-row'}, h('td', {colspan: 5, class: 'empty'}, 'No bulk command yet.')));
    }
  }
  const reload = () => load().catch((err) => ctx.alive() && err.name !== 'AbortError' && problem.replaceChildren(errorBox(err)));
  more.addEventListener('click', () => load(cursor).catch((err) => ctx.alive() && err.name !== 'AbortError' && problem.replaceChildren(errorBox(err))));
  // A progress event carries the counts, not the selector: a bulk the page
  // does not show yet (created elsewhere) is read whole, settled, once (an
  // older one beyond the first page stays there).
  const reloadSoon = settle(reload, 1000);
  ctx.onDispose(reloadSoon.cancel);
  const asked = new Set();
  ctx.on('bulk_command', (ev) => {
    const known = ev && bulks.get(ev.id);
    if (!known) {
      if (ev && !asked.has(ev.id)) {
        asked.add(ev.id);
        reloadSoon();
      }
      return;
    }
    put({...known.b, state: ev.state, total: ev.total, counts: ev.counts}, false);
  });
  ctx.on('open', reload);
  ctx.refresh = reload;
  await load();
}

// ---- creation form

export async function bulkNewView(ctx) {
  ctx.title('New bulk command');
  const q = new URLSearchParams(location.search);
  const name = input('bf-name', 'name', {placeholder: 'e.g. ping, reboot, get_logs', required: true, maxlength: 32, value: q.get('name') || ''});
  const params = h('textarea', {id: 'bf-params', 'data-testid': 'bf-params', 'data-field': 'params', rows: 3, spellcheck: 'false', placeholder: '{"lines": 20}'});
  const timeout = input('bf-timeout', 'timeout', {value: '30s', placeholder: '30s'});
  const expires = input('bf-expires', 'expires_in', {placeholder: 'fleetd\'s default'});
  const sel = selectorInputs('bf', {models: q.get('model') || '', compat: q.get('compat') === 'incompatible'});
  const all = h('input', {type: 'checkbox', 'data-testid': 'bf-all', 'data-field': 'selector.all', id: 'bf-all'});
  const concurrent = input('bf-concurrent', 'pacing.max_concurrent', {type: 'number', min: 1, value: '100'});
  const dpm = input('bf-dpm', 'pacing.devices_per_minute', {type: 'number', min: 0, value: '0'});
  const errBox = h('div', {'data-testid': 'bf-error'});
  const submit = h('button', {type: 'submit', class: 'btn primary', 'data-testid': 'bf-submit'}, 'Send to the devices');

  // The selector's card carries data-field "selector": fleetd names it when
  // the selector names nothing or matches no device.
  const form = h('form', {class: 'campaign-form', 'data-testid': 'bulk-form', novalidate: true},
    h('section', {class: 'card'}, h('h2', null, 'What'),
      h('div', {class: 'form-grid'},
        field('Command', name, 'published on devices/{id}/cmd/NAME'),
        field('Params', params, 'a JSON object; empty for none', true),
        field('Answer within', timeout, 'after delivery, e.g. 30s'),
        field('Expires after', expires, 'a device offline that long never gets it, e.g. 10m'))),
    h('section', {class: 'card', 'data-field': 'selector', 'data-testid': 'bf-selector', tabindex: -1}, h('h2', null, 'Which devices'),
      h('div', {class: 'form-grid'},
        sel.fields('comma-separated; empty: any model'),
        h('div', {class: 'field'}, h('label', {class: 'check', for: 'bf-all'}, all, ' every active device (alone)'))),
      matchCounter(ctx, [...sel.elements, all], countMatching)),
    h('section', {class: 'card'}, h('h2', null, 'Pace'),
      h('div', {class: 'form-grid'},
        field('Max in flight', concurrent, 'commands sent and not answered yet; an offline device holds its slot until its command expires'),
        field('Devices per minute', dpm, '0: no rate limit'))),
    errBox,
    h('div', {class: 'form-actions'}, submit, h('a', {href: uiPath('commands'), 'data-link': true, class: 'btn ghost'}, 'Cancel')));

  ctx.root.append(h('div', {class: 'page-head'},
    h('div', null, h('p', {class: 'crumbs'}, link(uiPath('commands'), 'Commands'), ' /'), h('h1', null, 'New bulk command'))), form);

  // The live count lists the devices as fleetd selects them at creation:
  // active, of the models, with every tag, incompatible if asked, and
  // within the version constraint (a device with no version is outside it).
  async function countMatching(current) {
    const s = sel.selector();
    if (!Object.keys(s).length && !all.checked) return {text: 'no device selected yet'};
    const cons = !all.checked && s.version ? parseConstraint(s.version) : null;
    let n = 0;
    const capped = await scanDevices(all.checked ? {models: [''], tags: [], compat: false} : {models: s.models || [''], tags: s.tags || [], compat: !!s.compat},
      {signal: ctx.signal, current}, (d) => {
        if (!cons || cons(d.firmware)) n++;
      });
    if (capped === null) return null;
    const notes = [];
    if (s.version && !all.checked && !cons) notes.push('the version constraint is not counted here (fleetd checks it)');
    notes.push('counted now; fleetd selects the devices when you send');
    return {n, capped, notes};
  }

  function spec() {
    const n = name.value.trim();
    if (!n) throw localError('name', 'give the command a name');
    const body = {name: n, params: parseParams(params.value), selector: sel.selector(),
      pacing: {max_concurrent: numberField(concurrent.value, 'pacing.max_concurrent', {integer: true}),
        devices_per_minute: numberField(dpm.value, 'pacing.devices_per_minute', {integer: true})}};
    if (all.checked) body.selector.all = true;
    if (timeout.value.trim()) body.timeout = checkDuration(timeout.value.trim(), 'timeout');
    if (expires.value.trim()) body.expires_in = checkDuration(expires.value.trim(), 'expires_in');
    return body;
  }

  onSubmit(ctx, form, {errBox, button: submit, spec, title: 'fleetd refused the bulk command', send: async (body) => {
    const b = await api('POST', '/commands', body);
    navigate(uiPath('commands', b.id));
  }});
}

// ---- one bulk

export async function bulkView(ctx, id) {
  const path = '/commands/' + enc(id);
  const head = h('div', {class: 'page-head'});
  const status = h('div', {'data-testid': 'bulk-status'});
  const progress = h('div', {'data-testid': 'bulk-summary'});
  const facts = h('div', {'data-testid': 'bulk-facts'});
  const stateFilter = h('select', {'data-testid': 'bd-state', 'aria-label': 'Show the devices in state'},
    h('option', {value: ''}, 'every state'), targetStates.map((s) => h('option', {value: s}, label(s))));
  stateFilter.value = new URLSearchParams(location.search).get('state') || '';
  const devicesBox = h('div', {'data-testid': 'bulk-devices'});
  const prev = h('button', {type: 'button', class: 'btn small', 'data-testid': 'page-prev', disabled: true}, '← Previous');
  const next = h('button', {type: 'button', class: 'btn small', 'data-testid': 'page-next', disabled: true}, 'Next →');
  ctx.root.append(head, status,
    h('div', {class: 'grid-2 wide-left'}, card('Progress', progress), card('Command', facts)),
    h('section', {class: 'card'},
      h('div', {class: 'card-head'}, h('h2', null, 'Devices'), h('label', {class: 'mini'}, h('span', null, 'State '), stateFilter)),
      devicesBox, h('div', {class: 'pager'}, prev, next)));
  let b = null;

  function drawHead() {
    ctx.title(b.name);
    const cancel = h('button', {type: 'button', class: 'btn danger', 'data-testid': 'bulk-cancel', disabled: b.state !== 'running',
      title: b.state === 'running' ? 'Stop sending' : `The bulk is ${b.state}`, ...NEEDS_OPERATOR}, 'Cancel bulk');
    cancel.addEventListener('click', () => doCancel(cancel));
    head.replaceChildren(
      h('div', null,
        h('p', {class: 'crumbs'}, link(uiPath('commands'), 'Commands'), ' /'),
        h('h1', null, h('code', null, b.name), ' ', stateBadge(b.state, {'data-testid': 'bulk-state'}))),
      h('div', {class: 'actions'}, cancel));
  }

  function drawProgress() {
    const c = b.counts || {};
    const {bar: el, text} = bar(b, {'data-testid': 'bulk-bar'});
    progress.replaceChildren(el,
      h('p', {class: 'small', 'data-testid': 'bulk-text'}, `${finished(c)}/${b.total} done · ${text}`),
      h('ul', {class: 'counts', 'data-testid': 'bulk-counts'}, targetStates.filter((s) => s !== 'pruned').map((s) =>
        h('li', {'data-testid': 'bulk-count', 'data-state': s, 'data-count': c[s] || 0},
          badge(label(s), targetKinds[s]), ' ', h('strong', null, String(c[s] || 0))))));
  }

  function drawFacts() {
    const p = b.pacing || {};
    facts.replaceChildren(dl([
      ['Params', b.params && Object.keys(b.params).length ? h('code', null, JSON.stringify(b.params)) : 'none'],
      ['Devices', selectorText(b.selector)],
      ['Selected', String(b.total), 'bulk-total'],
      ['Pacing', `${p.max_concurrent} in flight at most, ${p.devices_per_minute ? `${p.devices_per_minute} device${p.devices_per_minute === 1 ? '' : 's'}/min` : 'no rate limit'}`],
      ['Answer within', b.timeout],
      ['Expires after', b.expires_in],
      ['Created', fmtTime(b.created_at)],
      ['Finished', b.finished_at ? fmtTime(b.finished_at) : '—'],
    ]));
  }

  function draw() {
    drawHead();
    drawProgress();
    drawFacts();
  }

  let cursors = [''];
  let pageIdx = 0;
  let seq = 0;
  async function loadDevices() {
    const my = ++seq;
    try {
      const page = await api('GET', `${path}/devices` + qs({state: stateFilter.value, limit: PAGE, cursor: cursors[pageIdx]}), undefined, {signal: ctx.signal});
      if (my !== seq || !ctx.alive()) return;
      const ds = page.devices || [];
      cursors[pageIdx + 1] = page.next_cursor || '';
      prev.disabled = pageIdx === 0;
      next.disabled = !page.next_cursor;
      devicesBox.replaceChildren(ds.length ? table(['Device', 'State', 'Result', 'Sent', 'Finished'],
        ds.map((d) => h('tr', {'data-testid': 'bulk-device', 'data-device-id': d.device_id, 'data-state': d.state},
          h('td', null, link(devicePath(d.device_id), d.device_id)),
          h('td', null, badge(label(d.state), targetKinds[d.state] || '')),
          h('td', {class: 'detail', 'data-testid': 'bulk-result'}, d.skipped ? d.skipped : d.result !== undefined ? h('code', null, JSON.stringify(d.result)) : ''),
          h('td', {class: 'nowrap'}, d.sent_at ? fmtTime(d.sent_at) : '—'),
          h('td', {class: 'nowrap'}, d.finished_at ? fmtTime(d.finished_at) : '—'))), {class: 'compact', 'data-testid': 'bulk-device-table'}) :
        h('p', {class: 'empty', 'data-testid': 'bulk-devices-empty'}, stateFilter.value ? `No device is ${label(stateFilter.value)}.` : 'No devices.'));
    } catch (err) {
      if (my === seq && ctx.alive() && err.name !== 'AbortError') devicesBox.replaceChildren(errorBox(err));
    }
  }
  stateFilter.addEventListener('change', () => {
    const u = new URLSearchParams(location.search);
    if (stateFilter.value) u.set('state', stateFilter.value);
    else u.delete('state');
    history.replaceState(null, '', location.pathname + (u.toString() ? '?' + u : ''));
    cursors = [''];
    pageIdx = 0;
    loadDevices();
  });
  next.addEventListener('click', () => {
    if (!cursors[pageIdx + 1]) return;
    pageIdx++;
    loadDevices();
  });
  prev.addEventListener('click', () => {
    if (pageIdx === 0) return;
    pageIdx--;
    loadDevices();
  });

  async function doCancel(button) {
    const left = (b.counts && b.counts.pending) || 0;
    if (!(await confirmDialog({title: `Cancel ${b.name}?`, confirm: 'Cancel the bulk', danger: true,
      message: `Nothing more is sent: ${left} device${left === 1 ? '' : 's'} not sent yet count as cancelled, queued commands expire at once; delivered ones may still be answered.`}))) return;
    button.disabled = true;
    try {
      b = await api('POST', `${path}/cancel`);
      status.replaceChildren();
      draw();
      loadDevices();
    } catch (err) {
      if (!ctx.alive()) return;
      status.replaceChildren(errorBox(err, {title: 'Cannot cancel the bulk'}));
      refresh();
    }
  }

  async function refresh() {
    try {
      const v = await api('GET', path, undefined, {signal: ctx.signal});
      if (!ctx.alive()) return;
      b = v;
      draw();
    } catch (err) {
      if (ctx.alive() && err.name !== 'AbortError') status.replaceChildren(errorBox(err));
    }
    loadDevices();
  }

  b = await orNotFound(ctx, api('GET', path, undefined, {signal: ctx.signal}),
    {heading: 'Bulk command', title: 'No such bulk command', back: uiPath('commands'), backText: 'Back to the commands'});
  if (!b) return;
  draw();
  loadDevices();

  // A bulk_command event carries the state and counts: the bar moves at
  // once; the device list follows, at most every second.
  const devicesSoon = settle(loadDevices, 1000);
  ctx.onDispose(devicesSoon.cancel);
  ctx.on('bulk_command', (ev) => {
    if (!ev || ev.id !== id) return;
    const ended = b.state === 'running' && ev.state !== 'running';
    b = {...b, state: ev.state, total: ev.total, counts: ev.counts};
    draw();
    // Its end is read whole (finished_at), with the devices' last results.
    if (ended) refresh();
    else devicesSoon();
  });
  ctx.on('open', refresh);
  ctx.refresh = refresh;
}
