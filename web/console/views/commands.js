// A device's commands: send one (name, JSON params, timeout) and follow the
// recent ones to their answer. fleetd delivers a command when the device's
// session listens on devices/{id}/cmd/# (at once, or when it reconnects
// before the command expires); every state change comes back on the live
// stream as a "command" event, and the list is read again then.

import {api, enc, APIError} from '../lib/api.js';
import {h, badge, errorBox, fmtTime, ago, settle, table} from '../lib/dom.js';
import {NEEDS_OPERATOR} from '../lib/role.js';

const SHOWN = 10;
const RESULT_CHARS = 160;

const stateKind = {
  queued: 'off', delivered: 'busy', succeeded: 'ok', failed: 'bad', timed_out: 'warn', expired: 'warn',
};
const stateLabel = {
  queued: 'queued', delivered: 'delivered', succeeded: 'succeeded', failed: 'failed', timed_out: 'timed out', expired: 'expired',
};

const timeouts = [['10s', '10 s'], ['30s', '30 s'], ['1m0s', '1 min'], ['5m0s', '5 min']];

// parseParams reads the params box: empty is no params, anything else must
// be a JSON object (what fleetd accepts), or the error names the field.
export function parseParams(text) {
  const t = text.trim();
  if (!t) return undefined;
  let v;
  try {
    v = JSON.parse(t);
  } catch (err) {
    throw new APIError(0, 'invalid', `params: not JSON (${err.message})`, 'params');
  }
  if (v === null || typeof v !== 'object' || Array.isArray(v)) {
    throw new APIError(0, 'invalid', 'params: must be a JSON object, such as {"lines": 20}', 'params');
  }
  return v;
}

// resultText renders a result compactly, cut to a table cell's width; the
// whole of it is the cell's title.
function resultText(r) {
  if (r === undefined || r === null) return '';
  const s = JSON.stringify(r);
  return s.length > RESULT_CHARS ? s.slice(0, RESULT_CHARS - 1) + '…' : s;
}

// commandsCard returns the device page's Commands section. It reads the
// recent commands at once and again (settled) on each change of one of the
// device's commands, on this replica or another.
export function commandsCard(ctx, id) {
  const path = '/devices/' + enc(id) + '/commands';
  const name = h('input', {type: 'text', id: 'cmd-name', 'data-testid': 'cmd-name', 'data-field': 'name', autocomplete: 'off',
    placeholder: 'e.g. ping, reboot, get_logs', required: true, maxlength: 32});
  const params = h('textarea', {id: 'cmd-params', 'data-testid': 'cmd-params', 'data-field': 'params', rows: 2, spellcheck: 'false',
    placeholder: '{"lines": 20}'});
  const timeout = h('select', {id: 'cmd-timeout', 'data-testid': 'cmd-timeout', 'data-field': 'timeout'},
    timeouts.map(([v, t]) => h('option', {value: v}, t)));
  timeout.value = '30s';
  const send = h('button', {type: 'submit', class: 'btn primary', 'data-testid': 'cmd-send'}, 'Send');
  const status = h('div', {'data-testid': 'cmd-status'});
  const listBox = h('div', {'data-testid': 'cmd-list'});
  const field = (label, el, help) => h('div', {class: 'field'}, h('label', {for: el.id}, label), el, help ? h('small', null, help) : null);
  const form = h('form', {class: 'form-grid', 'data-testid': 'cmd-form', novalidate: true, ...NEEDS_OPERATOR},
    field('Command', name, 'published on devices/' + id + '/cmd/NAME'),
    field('Params', params, 'a JSON object; empty for none'),
    field('Answer within', timeout, 'after delivery; a device offline gets it when it reconnects'),
    h('div', {class: 'form-actions'}, send));

  function markInvalid(fieldName) {
    for (const el of [name, params, timeout]) el.classList.toggle('invalid', el.dataset.field === fieldName);
  }

  function row(c) {
    const result = resultText(c.result);
    return h('tr', {'data-testid': 'cmd-row', 'data-id': c.id, 'data-state': c.state},
      h('td', null, h('code', null, c.name)),
      h('td', null, badge(stateLabel[c.state] || c.state, stateKind[c.state] || 'off', {'data-testid': 'cmd-state'})),
      h('td', {title: fmtTime(c.created_at)}, ago(c.created_at)),
      h('td', {'data-testid': 'cmd-result', title: c.result ? JSON.stringify(c.result) : ''}, result ? h('code', null, result) : '—'));
  }

  let seq = 0;
  async function load() {
    const my = ++seq;
    try {
      const page = await api('GET', path + '?limit=' + SHOWN, undefined, {signal: ctx.signal});
      if (my !== seq || !ctx.alive()) return;
      const cs = page.commands || [];
      listBox.replaceChildren(cs.length ?
        table(['Command', 'State', 'Sent', 'Result'], cs.map(row), {'data-testid': 'cmd-table'}) :
        h('p', {class: 'caption', 'data-testid': 'cmd-empty'}, 'No command sent to this device yet.'));
    } catch (err) {
      if (my === seq && ctx.alive() && err.name !== 'AbortError') listBox.replaceChildren(errorBox(err));
    }
  }

  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    status.replaceChildren();
    markInvalid('');
    let body;
    try {
      if (!name.value.trim()) throw new APIError(0, 'invalid', 'name: give the command a name', 'name');
      body = {name: name.value.trim(), params: parseParams(params.value), timeout: timeout.value};
    } catch (err) {
      markInvalid(err.field);
      status.replaceChildren(errorBox(err));
      return;
    }
    send.disabled = true;
    try {
      const c = await api('POST', path, body);
      status.replaceChildren(h('p', {class: 'notice', 'data-testid': 'cmd-sent'},
        `${c.name} ${c.state === 'queued' ? 'queued: the device gets it when its session listens' : c.state}.`));
      load();
    } catch (err) {
      markInvalid(err.field);
      status.replaceChildren(errorBox(err));
    } finally {
      send.disabled = false;
    }
  });

  const loadSoon = settle(load, 300);
  ctx.onDispose(loadSoon.cancel);
  ctx.on('command', (ev) => {
    if (ev.device_id === id) loadSoon();
  });
  ctx.on('open', load);
  load();
  return h('section', {class: 'card', 'data-testid': 'commands-card'}, h('h2', null, 'Commands'), form, status, listBox);
}
