// Users (admin): the accounts that sign in to the console, each with a
// role; add one, change a role, disable or enable, set a password, delete.

import {h, card, table, fmtTime, badge, errorBox, confirmDialog, modal} from '../lib/dom.js';
import {api, enc, principal} from '../lib/api.js';
import {input, field, localError, onSubmit} from '../lib/form.js';

export const roles = [
  ['viewer', 'viewer: reads everything but the admin pages'],
  ['operator', 'operator: runs the fleet (devices, commands, firmware, campaigns)'],
  ['admin', 'admin: policy, users, API keys, webhooks, the audit log'],
];

// roleSelect chooses a role; short shows the names alone (in a table).
export function roleSelect(testid, fieldName, value = 'viewer', {short = false, ...attrs} = {}) {
  const sel = h('select', {'data-testid': testid, 'data-field': fieldName, id: short ? null : testid, ...attrs},
    roles.map(([v, text]) => h('option', {value: v}, short ? v : text)));
  sel.value = value;
  return sel;
}

export async function usersView(ctx) {
  ctx.title('Users');
  const listBox = h('div', {'data-testid': 'user-list'});
  const problem = h('div');
  const status = h('div', {'data-testid': 'user-status'});

  const name = input('user-name', 'name', {placeholder: 'alice', autocapitalize: 'none', spellcheck: 'false'});
  const password = input('user-password', 'password', {type: 'password', autocomplete: 'new-password'});
  const role = roleSelect('user-role', 'role');
  const errBox = h('div', {'data-testid': 'user-error'});
  const submit = h('button', {type: 'submit', class: 'btn primary', 'data-testid': 'user-create'}, 'Add user');
  const form = h('form', {class: 'form-grid', 'data-testid': 'user-form', novalidate: true},
    field('Name', name, 'what they sign in with'),
    field('Password', password, 'at least what fleetd asks for; they can be given a new one later'),
    field('Role', role),
    h('div', {class: 'form-actions wide'}, submit), h('div', {class: 'wide'}, errBox));

  ctx.root.append(
    h('div', {class: 'page-head'}, h('h1', null, 'Users')),
    card('Add a user', form),
    problem, status,
    card('Users', listBox));

  onSubmit(ctx, form, {errBox, button: submit, title: 'fleetd refused the user',
    spec: () => {
      if (!name.value.trim()) throw localError('name', 'give the user a name');
      if (!password.value) throw localError('password', 'give the user a password');
      return {name: name.value.trim(), password: password.value, role: role.value};
    },
    send: async (body) => {
      const u = await api('POST', '/users', body);
      form.reset();
      role.value = 'viewer';
      status.replaceChildren(h('p', {class: 'notice', 'data-testid': 'user-created'}, `Added ${u.name} (${u.role}).`));
      await load();
    }});

  async function change(u, patch, what) {
    status.replaceChildren();
    try {
      const v = await api('PATCH', '/users/' + enc(u.id), patch);
      status.replaceChildren(h('p', {class: 'notice', 'data-testid': 'user-changed'}, `${v.name}: ${what}.`));
    } catch (err) {
      status.replaceChildren(errorBox(err, {title: `Cannot change ${u.name}`}));
    }
    await load();
  }

  function setPassword(u) {
    const pw = input('user-new-password', 'password', {type: 'password', autocomplete: 'new-password'});
    const err = h('div');
    const save = h('button', {type: 'submit', class: 'btn primary', 'data-testid': 'user-password-save'}, 'Set password');
    const f = h('form', {novalidate: true},
      h('h2', null, `New password for ${u.name}`),
      field('Password', pw, 'their sessions stay open until they sign out or expire'),
      err,
      h('div', {class: 'dialog-actions'}, h('button', {type: 'button', class: 'btn ghost', onclick: () => m.close()}, 'Cancel'), save));
    const m = modal(f, {testid: 'user-password-dialog', label: `New password for ${u.name}`});
    f.addEventListener('submit', async (e) => {
      e.preventDefault();
      if (!pw.value) {
        err.replaceChildren(errorBox(localError('password', 'enter the new password')));
        return;
      }
      save.disabled = true;
      try {
        await api('PATCH', '/users/' + enc(u.id), {password: pw.value});
        m.close();
        status.replaceChildren(h('p', {class: 'notice'}, `${u.name} has a new password.`));
      } catch (ex) {
        err.replaceChildren(errorBox(ex));
        save.disabled = false;
      }
    });
    pw.focus();
  }

  async function remove(u) {
    const ok = await confirmDialog({title: `Delete ${u.name}?`, danger: true, confirm: 'Delete',
      message: 'The account is removed and its console sessions end. The audit log keeps what it did. Disable it instead to keep the account.'});
    if (!ok) return;
    status.replaceChildren();
    try {
      await api('DELETE', '/users/' + enc(u.id));
      status.replaceChildren(h('p', {class: 'notice', 'data-testid': 'user-deleted'}, `Deleted ${u.name}.`));
    } catch (err) {
      status.replaceChildren(errorBox(err, {title: `Cannot delete ${u.name}`}));
    }
    await load();
  }

  function row(u) {
    const me = principal();
    const self = me && me.kind === 'user' && me.id === u.id;
    const sel = roleSelect('user-row-role', 'role', u.role, {short: true, 'aria-label': `Role of ${u.name}`});
    sel.addEventListener('change', () => change(u, {role: sel.value}, `role ${sel.value}`));
    const toggle = h('button', {type: 'button', class: 'btn small', 'data-testid': u.disabled ? 'user-enable' : 'user-disable'},
      u.disabled ? 'Enable' : 'Disable');
    toggle.addEventListener('click', () => change(u, {disabled: !u.disabled}, u.disabled ? 'enabled' : 'disabled, its sessions ended'));
    const pw = h('button', {type: 'button', class: 'btn small ghost', 'data-testid': 'user-password'}, 'Set password');
    pw.addEventListener('click', () => setPassword(u));
    const del = h('button', {type: 'button', class: 'btn small ghost danger-text', 'data-testid': 'user-delete'}, 'Delete');
    del.addEventListener('click', () => remove(u));
    return h('tr', {'data-testid': 'user-row', 'data-user-id': u.id, 'data-name': u.name, 'data-role': u.role, 'data-disabled': String(!!u.disabled)},
      h('td', null, h('strong', null, u.name), self ? h('span', {class: 'muted small'}, ' (you)') : null),
      h('td', null, sel),
      h('td', null, u.disabled ? badge('disabled', 'off', {'data-testid': 'user-state'}) : badge('enabled', 'ok', {'data-testid': 'user-state'})),
      h('td', {class: 'small'}, u.created_by || '—'),
      h('td', {class: 'nowrap'}, fmtTime(u.created_at)),
      h('td', {class: 'nowrap'}, toggle, ' ', pw, ' ', del));
  }

  async function load() {
    const r = await api('GET', '/users', undefined, {signal: ctx.signal});
    if (!ctx.alive()) return;
    problem.replaceChildren();
    const us = (r && r.users) || [];
    listBox.replaceChildren(us.length ? table(['Name', 'Role', 'State', 'Created by', 'Created', ''], us.map(row), {'data-testid': 'user-table'}) :
      h('p', {class: 'empty'}, 'No user yet: add the first one above (the break-glass token signs in meanwhile).'));
  }
  ctx.refresh = () => load().catch((err) => ctx.alive() && err.name !== 'AbortError' && problem.replaceChildren(errorBox(err)));
  await load();
}
