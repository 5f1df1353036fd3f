// Firmware: the stored images, and an upload form with a progress bar.

import {h, card, table, uiPath, fmtTime, fmtBytes, errorBox, confirmDialog} from '../lib/dom.js';
import {api, qs, enc, upload} from '../lib/api.js';
import {NEEDS_OPERATOR} from '../lib/role.js';

export async function firmwareView(ctx) {
  ctx.title('Firmware');
  const listBox = h('div', {'data-testid': 'firmware-list'});
  const problem = h('div');

  const file = h('input', {type: 'file', id: 'fw-file', 'data-testid': 'upload-file', required: true});
  const version = h('input', {type: 'text', id: 'fw-version', 'data-testid': 'upload-version', placeholder: '1.2.0', autocomplete: 'off'});
  const models = h('input', {type: 'text', id: 'fw-models', 'data-testid': 'upload-models', placeholder: 'gw-100, gw-200', autocomplete: 'off'});
  const notes = h('input', {type: 'text', id: 'fw-notes', 'data-testid': 'upload-notes', placeholder: 'what changed', autocomplete: 'off'});
  const submit = h('button', {type: 'submit', class: 'btn primary', 'data-testid': 'upload-submit'}, 'Upload');
  const cancel = h('button', {type: 'button', class: 'btn ghost', hidden: true}, 'Cancel');
  const fill = h('div', {class: 'seg busy'});
  const bar = h('div', {class: 'progress', role: 'progressbar', 'aria-valuemin': 0, 'aria-valuemax': 100, 'aria-valuenow': 0,
    'aria-label': 'Upload progress', 'data-testid': 'upload-progress', hidden: true}, fill);
  const status = h('div', {class: 'upload-status', 'data-testid': 'upload-status', 'aria-live': 'polite'});
  const field = (label, input, help) => h('div', {class: 'field'}, h('label', {for: input.id}, label), input, help ? h('small', null, help) : null);
  const form = h('form', {class: 'form-grid', 'data-testid': 'upload-form', novalidate: true},
    field('Image', file),
    field('Version', version, 'one version per model'),
    field('Models', models, 'comma-separated'),
    field('Notes', notes),
    h('div', {class: 'field wide'}, bar, status),
    h('div', {class: 'form-actions wide'}, submit, cancel));

  ctx.root.append(
    h('div', {class: 'page-head'}, h('h1', null, 'Firmware')),
    h('section', {class: 'card', 'data-testid': 'upload-card', ...NEEDS_OPERATOR}, h('h2', null, 'Upload an image'), h('p', {class: 'muted small'},
      'fleetd stores the image with its SHA-256 and signs it with the server key; devices verify the signature before installing.'), form),
    problem,
    card('Images', listBox));

  async function load() {
    const r = await api('GET', '/firmware', undefined, {signal: ctx.signal});
    if (!ctx.alive()) return;
    problem.replaceChildren();
    const arts = (r && r.firmware) || [];
    listBox.replaceChildren(arts.length ? table(['Version', 'Models', 'Size', 'SHA-256', 'Signed by', 'Notes', 'Uploaded', ''],
      arts.map((a) => {
        const del = h('button', {type: 'button', class: 'btn small ghost danger-text', 'data-testid': 'firmware-delete', ...NEEDS_OPERATOR}, 'Delete');
        del.addEventListener('click', () => remove(a));
        return h('tr', {'data-testid': 'firmware-row', 'data-firmware-id': a.id, 'data-version': a.version},
          h('td', null, h('strong', null, a.version)),
          h('td', null, (a.models || []).map((m) => h('code', {class: 'tag'}, m))),
          h('td', {class: 'num nowrap'}, fmtBytes(a.size)),
          h('td', null, h('code', {class: 'hash', title: a.sha256}, (a.sha256 || '').slice(0, 16) + '…')),
          h('td', null, a.signed_by || '—'),
          h('td', {class: 'detail'}, a.notes || ''),
          h('td', {class: 'nowrap'}, fmtTime(a.created_at)),
          h('td', {class: 'nowrap'}, h('a', {href: uiPath('campaigns', 'new') + `?firmware=${enc(a.id)}`, 'data-link': true, ...NEEDS_OPERATOR}, 'New campaign'), ' ', del));
      })) : h('p', {class: 'empty'}, 'No firmware uploaded yet.'));
  }

  async function remove(a) {
    const ok = await confirmDialog({title: `Delete firmware ${a.version}?`, danger: true, confirm: 'Delete',
      message: `The image for ${(a.models || []).join(', ')} is removed from fleetd. fleetd refuses while a campaign uses it.`});
    if (!ok) return;
    try {
      await api('DELETE', '/firmware/' + enc(a.id));
      await load();
    } catch (err) {
      problem.replaceChildren(errorBox(err));
    }
  }

  let current = null;
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    status.replaceChildren();
    const f = file.files && file.files[0];
    if (!f) {
      status.replaceChildren(errorBox({code: 'invalid', message: 'Choose the image file to upload.', field: 'file'}));
      return;
    }
    const ms = models.value.split(',').map((m) => m.trim()).filter(Boolean).join(',');
    const path = '/firmware' + qs({version: version.value.trim(), models: ms, notes: notes.value.trim()});
    submit.disabled = true;
    cancel.hidden = false;
    bar.hidden = false;
    const show = (sent, total) => {
      const pct = total ? Math.min(100, (sent / total) * 100) : 0;
      fill.style.width = `${pct}%`;
      bar.setAttribute('aria-valuenow', String(Math.round(pct)));
      status.textContent = pct >= 100 ? `${fmtBytes(total)} sent; fleetd is hashing and signing the image…` :
        `${fmtBytes(sent)} of ${fmtBytes(total)} (${Math.floor(pct)} %)`;
    };
    show(0, f.size);
    current = upload(path, f, show);
    try {
      const art = await current.done;
      status.replaceChildren(h('p', {class: 'notice', 'data-testid': 'upload-result'},
        `Uploaded firmware ${art.version} for ${(art.models || []).join(', ')} (${fmtBytes(art.size)}), SHA-256 ${art.sha256.slice(0, 16)}…, signed by ${art.signed_by}.`));
      form.reset();
      await load();
    } catch (err) {
      bar.hidden = true;
      status.replaceChildren(errorBox(err, {title: err.code === 'aborted' ? 'Upload cancelled' : 'The upload was refused'}));
    } finally {
      current = null;
      submit.disabled = false;
      cancel.hidden = true;
      setTimeout(() => {
        if (!current) bar.hidden = true;
      }, 1500);
    }
  });
  cancel.addEventListener('click', () => current && current.abort());
  ctx.onDispose(() => current && current.abort());

  await load();
}
