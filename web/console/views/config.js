// A device's configuration: the effective desired document (its version and
// the layers it was merged from), what the device last reported, where the
// two differ and whether they are in sync; and the device's own layer, which
// the operator edits here (PUT /devices/{id}/config: the document whole).
// fleetd sends no live event for configuration, so the card reads it again
// when the device's presence changes (a device reports after it connects)
// and every 10 s while the page is open.

import {api, enc, APIError} from '../lib/api.js';
import {h, badge, errorBox, fmtTime, dl, table, settle} from '../lib/dom.js';
import {NEEDS_OPERATOR} from '../lib/role.js';

const syncKind = {in_sync: 'ok', stale: 'warn', differs: 'warn', unreported: 'off'};
const syncLabel = {in_sync: 'in sync', stale: 'stale report', differs: 'differs', unreported: 'not reported yet'};

const pretty = (v) => JSON.stringify(v, null, 2);

// parseLayer reads the editor: a JSON object (what fleetd accepts as a
// layer), or the error names the field.
export function parseLayer(text) {
  let v;
  try {
    v = JSON.parse(text.trim() || '{}');
  } catch (err) {
    throw new APIError(0, 'invalid', `config: not JSON (${err.message})`, 'config');
  }
  if (v === null || typeof v !== 'object' || Array.isArray(v)) {
    throw new APIError(0, 'invalid', 'config: must be a JSON object, such as {"keepalive_s": 25}', 'config');
  }
  return v;
}

export function configCard(ctx, id) {
  const path = '/devices/' + enc(id) + '/config';
  const summary = h('div', {'data-testid': 'config-summary'});
  const docs = h('div', {class: 'grid-2'});
  const diffBox = h('div', {'data-testid': 'config-diff'});
  const editor = h('textarea', {id: 'config-layer', 'data-testid': 'config-layer', 'data-field': 'config', rows: 5, spellcheck: 'false',
    'aria-label': `${id}'s own configuration layer`});
  const save = h('button', {type: 'submit', class: 'btn primary', 'data-testid': 'config-save'}, 'Save the device layer');
  const status = h('div', {'data-testid': 'config-status'});
  const form = h('form', {'data-testid': 'config-form', novalidate: true, ...NEEDS_OPERATOR},
    h('div', {class: 'field'}, h('label', {for: 'config-layer'}, 'The device\'s own layer'), editor,
      h('small', null, 'merged over the fleet, model and tag layers; saved whole (a key left out is removed from this layer)')),
    h('div', {class: 'form-actions'}, save));
  let edited = false;
  editor.addEventListener('input', () => {
    edited = true;
  });

  function draw(v) {
    const d = v.desired || {};
    summary.replaceChildren(dl([
      ['Sync', badge(syncLabel[v.sync] || v.sync, syncKind[v.sync] || 'off', {'data-testid': 'config-sync', 'data-sync': v.sync})],
      ['Desired version', String(d.version ?? ''), 'config-version'],
      ['From layers', (d.sources || []).join(' < ') || '—'],
      ['Changed', d.changed_at ? fmtTime(d.changed_at) : ''],
      ['Reported', v.reported ? `version ${v.reported.version}, ${fmtTime(v.reported.at)}` : 'nothing yet', 'config-reported-version'],
      v.problem ? ['Problem', v.problem, 'config-problem'] : null,
    ]));
    docs.replaceChildren(
      h('div', null, h('h3', null, 'Desired'), h('pre', {class: 'doc', 'data-testid': 'config-desired'}, pretty(d.config || {}))),
      h('div', null, h('h3', null, 'Reported'), h('pre', {class: 'doc', 'data-testid': 'config-reported'}, v.reported ? pretty(v.reported.config) : '—')));
    const diff = v.diff || [];
    diffBox.replaceChildren(diff.length ?
      table(['Path', 'Difference', 'Desired', 'Reported'], diff.map((x) => h('tr', {'data-testid': 'config-diff-row', 'data-path': x.path, 'data-kind': x.kind},
        h('td', null, h('code', null, x.path)), h('td', null, x.kind),
        h('td', null, x.desired === undefined ? '—' : h('code', null, JSON.stringify(x.desired))),
        h('td', null, x.reported === undefined ? '—' : h('code', null, JSON.stringify(x.reported)))))) :
      '');
    if (!edited) editor.value = pretty(v.device || {});
  }

  let seq = 0;
  async function load() {
    const my = ++seq;
    try {
      const v = await api('GET', path, undefined, {signal: ctx.signal});
      if (my === seq && ctx.alive()) draw(v);
    } catch (err) {
      if (my === seq && ctx.alive() && err.name !== 'AbortError') summary.replaceChildren(errorBox(err));
    }
  }

  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    status.replaceChildren();
    editor.classList.remove('invalid');
    let doc;
    try {
      doc = parseLayer(editor.value);
    } catch (err) {
      editor.classList.add('invalid');
      status.replaceChildren(errorBox(err));
      return;
    }
    save.disabled = true;
    try {
      const v = await api('PUT', path, doc);
      edited = false;
      draw(v);
      status.replaceChildren(h('p', {class: 'notice', 'data-testid': 'config-saved'},
        `Saved: desired version ${v.desired.version}; the device gets it on devices/${id}/config/desired.`));
    } catch (err) {
      if (err.field === 'config') editor.classList.add('invalid');
      status.replaceChildren(errorBox(err));
    } finally {
      save.disabled = false;
    }
  });

  const loadSoon = settle(load, 1000);
  ctx.onDispose(loadSoon.cancel);
  ctx.on('presence', (ev) => {
    if (ev.device_id === id) loadSoon();
  });
  ctx.on('open', load);
  ctx.every(10_000, load);
  load();
  return h('section', {class: 'card', 'data-testid': 'config-card'}, h('h2', null, 'Configuration'), summary, docs, diffBox, form, status);
}
