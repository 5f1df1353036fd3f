// Form pieces shared by the creation forms (campaigns, bulk commands): the
// inputs, fields checked in the page with an error that names the field as
// fleetd would, the device selector with its live count of matching
// devices, and marking the input a refusal names.

import {h, debounce, errorBox} from './dom.js';
import {api, qs, APIError} from './api.js';

export const durationRe = /^(?:\d+(?:\.\d+)?(?:ns|us|µs|ms|s|m|h))+$|^\d+(?:\.\d+)?$/;

// localError is a refusal found in the page, shaped as fleetd's.
export function localError(field, message) {
  return new APIError(0, 'invalid', `${field}: ${message}`, field);
}

export function input(testid, field, attrs = {}) {
  return h('input', {type: 'text', autocomplete: 'off', 'data-testid': testid, 'data-field': field, id: testid, ...attrs});
}

export function field(label, el, help, wide) {
  return h('div', {class: `field${wide ? ' wide' : ''}`}, h('label', {for: el.id}, label), el, help ? h('small', null, help) : null);
}

// list splits a comma-separated input.
export function list(s) {
  return s.split(',').map((x) => x.trim()).filter(Boolean);
}

// numberField reads a number input; empty is the default.
export function numberField(value, fieldName, {integer = false, empty = 0} = {}) {
  const t = String(value).trim();
  if (t === '') return empty;
  const n = Number(t);
  if (!isFinite(n)) throw localError(fieldName, `"${t}" is not a number`);
  if (integer && !Number.isInteger(n)) throw localError(fieldName, `must be a whole number, got ${t}`);
  return n;
}

// checkDuration refuses what is not a Go duration.
export function checkDuration(d, fieldName) {
  if (!durationRe.test(d)) throw localError(fieldName, `"${d}" is not a duration (e.g. 30s, 10m, 1h30m)`);
  return d;
}

// markField marks the form's element whose data-field is the one named, or
// the closest one: the API names the field as a JSON path
// ("stages[0].percent", "selector.models[1]", "selector"). '' clears.
export function markField(form, fieldName) {
  for (const el of form.querySelectorAll('.invalid')) el.classList.remove('invalid');
  const els = [...form.querySelectorAll('[data-field]')];
  for (let f = fieldName; f;) {
    const el = els.find((x) => x.dataset.field === f);
    if (el) {
      el.classList.add('invalid');
      el.focus({preventScroll: true});
      return;
    }
    const shorter = f.replace(/(\[\d+\]|\.[^.[\]]+)$/, '');
    if (shorter === f) return;
    f = shorter;
  }
}

// selectorInputs are a selector's inputs (models, version, tags, compat),
// their testids prefix-models and so on, their data-field selector.models.
export function selectorInputs(prefix, {models = '', compat = false, modelsPlaceholder = 'any model'} = {}) {
  const s = {
    models: input(`${prefix}-models`, 'selector.models', {placeholder: modelsPlaceholder, value: models}),
    version: input(`${prefix}-version`, 'selector.version', {placeholder: 'e.g. <1.2.0 (any)'}),
    tags: input(`${prefix}-tags`, 'selector.tags', {placeholder: 'e.g. site=lyon'}),
    compat: h('input', {type: 'checkbox', 'data-testid': `${prefix}-compat`, 'data-field': 'selector.compat', id: `${prefix}-compat`, checked: compat}),
  };
  // fields lays them out, with the models' help given.
  s.fields = (modelsHelp) => [
    field('Models', s.models, modelsHelp),
    field('Current version', s.version, 'semver constraint on the firmware they run now'),
    field('Tags', s.tags, 'comma-separated; a device needs all of them'),
    h('div', {class: 'field'}, h('label', {class: 'check', for: s.compat.id}, s.compat, ' only devices fleetd found incompatible')),
  ];
  // selector is the API's selector of what is filled in.
  s.selector = () => {
    const sel = {};
    if (list(s.models.value).length) sel.models = list(s.models.value);
    if (s.version.value.trim()) sel.version = s.version.value.trim();
    if (list(s.tags.value).length) sel.tags = list(s.tags.value);
    if (s.compat.checked) sel.compat = 'incompatible';
    return sel;
  };
  s.elements = [s.models, s.version, s.tags, s.compat];
  return s;
}

// scanDevices calls visit with every active device of the models ([''] for
// any) that has all the tags (and is incompatible with compat), reading at
// most 10 pages of 1000 per model. It returns whether it stopped short, or
// null when current() says the answer is no longer wanted.
export async function scanDevices({models, tags, compat}, {signal, current}, visit) {
  let capped = false;
  for (const m of models) {
    let cursor = '';
    let pages = 0;
    do {
      const page = await api('GET', '/devices' + qs({model: m, tag: tags[0], compat: compat ? 'incompatible' : '', limit: 1000, cursor}),
        undefined, {signal});
      if (!current()) return null;
      for (const d of page.devices || []) {
        if (tags.every((t) => (d.tags || []).includes(t))) visit(d);
      }
      cursor = page.next_cursor || '';
      pages++;
    } while (cursor && pages < 10);
    if (cursor) capped = true;
  }
  return capped;
}

// matchCounter keeps a live count of the devices a form's selector
// matches, run now and after each change of the elements (debounced).
// count(current) resolves to {n, capped, notes}, to {text} when there is
// nothing to count, or to null once current() is false (a newer count
// runs). It returns the count's paragraph (data-testid match-count, with
// data-count once counted).
export function matchCounter(ctx, elements, count) {
  const num = h('span', {class: 'match-count', 'data-testid': 'match-count', 'aria-live': 'polite'}, '…');
  const note = h('small', {class: 'muted'});
  let seq = 0;
  async function run() {
    const my = ++seq;
    const current = () => my === seq && ctx.alive();
    num.dataset.count = '';
    num.textContent = 'counting…';
    note.textContent = '';
    let r;
    try {
      r = await count(current);
    } catch (err) {
      if (!current() || err.name === 'AbortError') return;
      console.error('count matching devices', err);
      num.textContent = 'cannot count';
      note.textContent = err.message;
      return;
    }
    if (!r || !current()) return;
    if (r.text) {
      num.textContent = r.text;
      return;
    }
    num.dataset.count = String(r.n);
    num.textContent = `${r.n}${r.capped ? '+' : ''} device${r.n === 1 ? '' : 's'} match${r.n === 1 ? 'es' : ''}`;
    note.textContent = r.notes && r.notes.length ? `(${r.notes.join('; ')})` : '';
  }
  const soon = debounce(run, 350);
  ctx.onDispose(soon.cancel);
  for (const el of elements) {
    el.addEventListener('input', soon);
    el.addEventListener('change', soon);
  }
  run();
  return h('p', {class: 'match'}, num, ' ', note);
}

// onSubmit handles a creation form: spec() builds the body (or throws an
// error naming the field, shown and marked without asking fleetd), send
// posts it; fleetd's refusal is shown under title with its field marked.
export function onSubmit(ctx, form, {errBox, button, spec, send, title}) {
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    errBox.replaceChildren();
    markField(form, '');
    let body;
    try {
      body = spec();
    } catch (err) {
      errBox.replaceChildren(errorBox(err));
      markField(form, err.field);
      return;
    }
    button.disabled = true;
    try {
      await send(body);
    } catch (err) {
      if (!ctx.alive()) return;
      errBox.replaceChildren(errorBox(err, {title}));
      markField(form, err.field);
      errBox.scrollIntoView({block: 'center'});
    } finally {
      button.disabled = false;
    }
  });
}
