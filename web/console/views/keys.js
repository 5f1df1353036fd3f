// API keys (admin): credentials for scripts and pipelines, each with a
// role, a name and an optional expiry. A new key's token is shown once
// (fleetd keeps only its hash); a revoked one is refused at once, on every
// replica.

import {h, card, table, fmtTime, ago, badge, errorBox, confirmDialog} from '../lib/dom.js';
import {api, enc} from '../lib/api.js';
import {input, field, localError, onSubmit} from '../lib/form.js';
import {secretDialog} from '../lib/secret.js';
import {roleSelect} from './users.js';

const lifetimes = [['', 'never'], ['1d', '1 day'], ['7d', '7 days'], ['30d', '30 days'], ['90d', '90 days'], ['365d', '1 year']];

function keyState(k, now = Date.now()) {
  if (k.revoked_at) return ['revoked', 'off'];
  if (k.expires_at && Date.parse(k.expires_at) <= now) return ['expired', 'warn'];
  return ['active', 'ok'];
}

export async function keysView(ctx) {
  ctx.title('API keys');
  const listBox = h('div', {'data-testid': 'key-list'});
  const problem = h('div');
  const status = h('div', {'data-testid': 'key-status'});

  const name = input('key-name', 'name', {placeholder: 'ci-firmware-upload'});
  const role = roleSelect('key-role', 'role', 'viewer');
  const expiry = h('select', {'data-testid': 'key-expiry', 'data-field': 'expires_in', id: 'key-expiry'},
    lifetimes.map(([v, t]) => h('option', {value: v}, t)));
  expiry.value = '90d';
  const errBox = h('div', {'data-testid': 'key-error'});
  const submit = h('button', {type: 'submit', class: 'btn primary', 'data-testid': 'key-create'}, 'Create key');
  const form = h('form', {class: 'form-grid', 'data-testid': 'key-form', novalidate: true},
    field('Name', name, 'what uses it, to recognise it in the list and the audit log'),
    field('Role', role, 'the least the script needs'),
    field('Expires', expiry, 'after this it is refused'),
    h('div', {class: 'form-actions wide'}, submit), h('div', {class: 'wide'}, errBox));

  ctx.root.append(
    h('div', {class: 'page-head'}, h('h1', null, 'API keys')),
    card('Create a key', h('p', {class: 'muted small'}, 'A key goes in ', h('code', null, 'Authorization: Bearer <token>'),
      ' (fleetctl reads it from a file or the environment). Its token is shown once, when it is created.'), form),
    problem, status,
    card('Keys', listBox));

  onSubmit(ctx, form, {errBox, button: submit, title: 'fleetd refused the key',
    spec: () => {
      if (!name.value.trim()) throw localError('name', 'give the key a name');
      const body = {name: name.value.trim(), role: role.value};
      if (expiry.value) body.expires_in = expiry.value;
      return body;
    },
    send: async (body) => {
      const k = await api('POST', '/keys', body);
      form.reset();
      role.value = 'viewer';
      expiry.value = '90d';
      status.replaceChildren(h('p', {class: 'notice', 'data-testid': 'key-created'},
        `Created key ${k.name} (${k.role}${k.expires_at ? `, expires ${fmtTime(k.expires_at)}` : ', no expiry'}).`));
      secretDialog({title: `Token of the key ${k.name}`, testid: 'key-token-dialog', valueTestid: 'new-key-token', value: k.token,
        intro: `Give it to what uses the key, as "Authorization: Bearer <token>". It has the ${k.role} role.`});
      await load();
    }});

  async function revoke(k) {
    const ok = await confirmDialog({title: `Revoke the key ${k.name}?`, danger: true, confirm: 'Revoke',
      message: 'fleetd refuses it from now on, on every replica. This cannot be undone: create a new key instead.'});
    if (!ok) return;
    status.replaceChildren();
    try {
      await api('DELETE', '/keys/' + enc(k.id));
      status.replaceChildren(h('p', {class: 'notice', 'data-testid': 'key-revoked'}, `Revoked ${k.name}.`));
    } catch (err) {
      status.replaceChildren(errorBox(err, {title: `Cannot revoke ${k.name}`}));
    }
    await load();
  }

  function row(k) {
    const [state, kind] = keyState(k);
    let action = null;
    if (state === 'active') {
      action = h('button', {type: 'button', class: 'btn small danger', 'data-testid': 'key-revoke'}, 'Revoke');
      action.addEventListener('click', () => revoke(k));
    }
    return h('tr', {'data-testid': 'key-row', 'data-key-id': k.id, 'data-name': k.name, 'data-role': k.role, 'data-state': state},
      h('td', null, h('strong', null, k.name), h('div', null, h('code', {class: 'muted small'}, k.id))),
      h('td', {'data-testid': 'key-role-cell'}, k.role),
      h('td', null, badge(state, kind, {'data-testid': 'key-state'})),
      h('td', {class: 'nowrap', 'data-testid': 'key-last-used', title: k.last_used_at ? fmtTime(k.last_used_at) : ''},
        k.last_used_at ? ago(k.last_used_at) : 'never'),
      h('td', {class: 'nowrap'}, k.expires_at ? fmtTime(k.expires_at) : 'never'),
      h('td', {class: 'small'}, k.created_by || '—'),
      h('td', {class: 'nowrap'}, fmtTime(k.created_at)),
      h('td', {class: 'nowrap'}, k.revoked_at ? h('span', {class: 'muted small'}, `revoked ${fmtTime(k.revoked_at)}`) : action));
  }

  async function load() {
    const r = await api('GET', '/keys', undefined, {signal: ctx.signal});
    if (!ctx.alive()) return;
    problem.replaceChildren();
    const ks = (r && r.keys) || [];
    listBox.replaceChildren(ks.length ? table(['Name', 'Role', 'State', 'Last used', 'Expires', 'Created by', 'Created', ''], ks.map(row),
      {'data-testid': 'key-table'}) : h('p', {class: 'empty'}, 'No API key yet.'));
  }
  const reload = () => load().catch((err) => ctx.alive() && err.name !== 'AbortError' && problem.replaceChildren(errorBox(err)));
  ctx.refresh = reload;
  ctx.every(30_000, reload); // last used moves on
  await load();
}
