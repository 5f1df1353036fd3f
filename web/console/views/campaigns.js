// Campaigns: the list, the creation form (with a live count of the devices
// the selector matches) and a campaign's page: state, actions, per-stage
// progress, devices and history, kept current by the live stream.

import {h, card, table, link, uiPath, devicePath, dl, fmtTime, fmtNum, fmtBytes, badge, settle, errorBox, confirmDialog, orNotFound} from '../lib/dom.js';
import {api, enc} from '../lib/api.js';
import {NEEDS_OPERATOR, NEEDS_ADMIN} from '../lib/role.js';
import {input, field, list, numberField, checkDuration, selectorInputs, scanDevices, matchCounter, onSubmit} from '../lib/form.js';
import {navigate} from '../lib/nav.js';
import {progressBar} from '../lib/charts.js';
import {parseConstraint} from '../lib/semver.js';

const stateKinds = {
  draft: '', running: 'busy', awaiting_approval: 'warn', paused: 'warn', completed: 'ok', aborted: 'bad', rolling_back: 'warn', rolled_back: 'off',
};

function stateBadge(state, attrs = {}) {
  return badge(String(state).replace('_', ' '), stateKinds[state] || '', {'data-state': state, ...attrs});
}

function stageStatus(c, i) {
  if (c.state === 'draft') return 'not started';
  if (c.state === 'completed' || i < c.stage) return 'done';
  if (i > c.stage) return c.state === 'aborted' || c.state === 'rolled_back' ? 'not reached' : 'waiting';
  switch (c.state) {
    case 'aborted': return 'aborted';
    case 'paused': return 'paused';
    case 'awaiting_approval': return 'awaiting approval';
    case 'rolling_back':
    case 'rolled_back': return 'rolled back';
  }
  return c.stage_done_at ? 'soaking' : 'running';
}

function stageSize(s) {
  return s.count ? `${s.count} device${s.count === 1 ? '' : 's'}` : `to ${fmtNum(s.percent)} % of the selection`;
}

function gatesText(s) {
  const g = [`failure rate ≤ ${fmtNum(s.max_failure_rate * 100, 1)} %`,
    s.max_not_back_online < 0 ? 'no limit on devices not back online' :
      s.max_not_back_online === 0 ? 'every device back online' : `≤ ${s.max_not_back_online} not back online`];
  if (s.connectivity_ratio) g.push(`disconnects ≤ ${fmtNum(s.connectivity_ratio)} × the fleet's`);
  return g.join(', ');
}

function overall(c) {
  let succeeded = 0;
  let finished = 0;
  let held = 0;
  for (const sc of c.stage_counts || []) {
    succeeded += (sc.by_state && sc.by_state.succeeded) || 0;
    finished += sc.finished || 0;
    held += sc.targets || 0;
  }
  // A campaign that follows the fleet holds more devices than it selected
  // at the start: the ones that joined its last stage since.
  return {succeeded, finished, devices: Math.max(c.total || 0, held)};
}

// ---- list

export async function campaignsView(ctx) {
  ctx.title('Campaigns');
  const tbody = h('tbody');
  const box = h('div', {class: 'table-wrap card flush'},
    h('table', {'data-testid': 'campaign-table'},
      h('thead', null, h('tr', null, ['Campaign', 'Target', 'State', 'Stage', 'Devices', 'Progress', 'Updated'].map((x) => h('th', {scope: 'col'}, x)))),
      tbody));
  const problem = h('div');
  ctx.root.append(
    h('div', {class: 'page-head'}, h('h1', null, 'Campaigns'),
      h('div', {class: 'actions'}, h('a', {href: uiPath('campaigns', 'new'), 'data-link': true, class: 'btn primary', 'data-testid': 'new-campaign', ...NEEDS_OPERATOR}, 'New campaign'))),
    problem, box);
  const rows = new Map();

  function row(c) {
    const o = overall(c);
    const stage = (c.stages || [])[c.stage];
    const {bar} = progressBar({targets: o.devices, by_state: {succeeded: o.succeeded}}, {'data-testid': 'campaign-progress'});
    return h('tr', {'data-testid': 'campaign-row', 'data-campaign-id': c.id},
      h('td', null, link(uiPath('campaigns', c.id), c.name)),
      h('td', null, c.version),
      h('td', null, stateBadge(c.state)),
      h('td', null, stage ? `${c.stage + 1}/${c.stages.length} ${stage.name || ''}` : '—'),
      h('td', {class: 'num'}, c.state === 'draft' ? '—' : String(o.devices)),
      h('td', {class: 'progress-cell'}, c.state === 'draft' ? h('span', {class: 'muted'}, 'not started') : [bar, h('span', {class: 'small muted'}, `${o.succeeded}/${o.devices}`)]),
      h('td', {class: 'nowrap'}, fmtTime(c.updated_at)));
  }

  function put(c, prepend) {
    const tr = row(c);
    const old = rows.get(c.id);
    if (old) old.replaceWith(tr);
    else if (prepend) tbody.prepend(tr);
    else tbody.append(tr);
    rows.set(c.id, tr);
    const empty = tbody.querySelector('.empty-row');
    if (empty) empty.remove();
  }

  async function load() {
    const r = await api('GET', '/campaigns', undefined, {signal: ctx.signal});
    if (!ctx.alive()) return;
    problem.replaceChildren();
    rows.clear();
    tbody.replaceChildren();
    const list = (r && r.campaigns) || [];
    for (const c of list) put(c, false);
    if (!list.length) {
      tbody.append(h('tr', {class: 'empty-row'}, h('td', {colspan: 7, class: 'empty'}, 'No campaign yet. Upload firmware, then create a campaign.')));
    }
  }
  const reload = () => load().catch((err) => ctx.alive() && err.name !== 'AbortError' && problem.replaceChildren(errorBox(err)));
  ctx.on('campaign', (c) => c && c.id && put(c, true));
  ctx.on('open', reload);
  ctx.refresh = reload;
  await load();
}

// ---- creation form

export async function campaignNewView(ctx) {
  ctx.title('New campaign');
  const q = new URLSearchParams(location.search);
  const r = await api('GET', '/firmware', undefined, {signal: ctx.signal});
  if (!ctx.alive()) return;
  const arts = (r && r.firmware) || [];

  const name = input('cf-name', 'name', {placeholder: 'heal 1.0.3', required: true});
  const fwSel = h('select', {'data-testid': 'cf-firmware', 'data-field': 'firmware_id', id: 'cf-firmware'},
    h('option', {value: ''}, arts.length ? 'choose the target firmware…' : 'no firmware uploaded'),
    arts.map((a) => h('option', {value: a.id}, `${a.version} — ${(a.models || []).join(', ')}`)));
  if (q.get('firmware')) fwSel.value = q.get('firmware');
  const sel = selectorInputs('cf', {models: q.get('model') || '', compat: q.get('compat') === 'incompatible', modelsPlaceholder: 'all models of the firmware'});
  const {models, version, tags, compat} = sel;
  const dpm = input('cf-dpm', 'pacing.devices_per_minute', {type: 'number', min: 0, value: '60'});
  const concurrent = input('cf-concurrent', 'pacing.max_concurrent', {type: 'number', min: 0, value: '20'});
  const timeout = input('cf-timeout', 'device_timeout', {value: '15m', placeholder: '15m'});
  const gate = h('select', {'data-testid': 'cf-gate', 'data-field': 'gate_action', id: 'cf-gate'},
    h('option', {value: 'pause'}, 'pause the campaign'), h('option', {value: 'abort'}, 'abort the campaign'));
  const follow = h('input', {type: 'checkbox', 'data-testid': 'cf-follow', 'data-field': 'follow', id: 'cf-follow'});
  const stagesBox = h('div', {class: 'stages-editor', 'data-testid': 'stages-editor'});
  const errBox = h('div', {'data-testid': 'cf-error'});
  const submit = h('button', {type: 'submit', class: 'btn primary', 'data-testid': 'cf-submit'}, 'Create campaign');

  let stages = [{name: 'all', mode: 'percent', value: '100', soak: '', mfr: '0.1', mnbo: '1', conn: ''}];

  function drawStages() {
    stagesBox.replaceChildren(...stages.map((s, i) => {
      const f = (k) => `stages[${i}]${k}`;
      const bind = (el, key) => {
        el.addEventListener('input', () => {
          s[key] = el.value;
        });
        return el;
      };
      const mode = bind(h('select', {'data-testid': 'stage-mode', 'aria-label': `Stage ${i + 1} size`, 'data-field': f(''), value: s.mode},
        h('option', {value: 'percent'}, '% of the selection (cumulative)'), h('option', {value: 'count'}, 'number of devices')), 'mode');
      mode.addEventListener('change', () => {
        s.mode = mode.value;
        drawStages();
      });
      const remove = h('button', {type: 'button', class: 'btn small ghost', 'data-testid': 'stage-remove', disabled: stages.length === 1,
        'aria-label': `Remove stage ${i + 1}`}, 'Remove');
      remove.addEventListener('click', () => {
        stages.splice(i, 1);
        drawStages();
      });
      const sf = (label, el) => h('label', {class: 'mini'}, h('span', null, label), el);
      return h('fieldset', {class: 'stage-row', 'data-testid': 'stage-row', 'aria-label': `Stage ${i + 1}`},
        h('div', {class: 'stage-title'}, h('strong', null, `Stage ${i + 1}`), remove),
        sf('Name', bind(h('input', {type: 'text', 'data-testid': 'stage-name', 'data-field': f('.name'), value: s.name}), 'name')),
        sf('Size', mode),
        sf(s.mode === 'count' ? 'Devices' : 'Percent', bind(h('input', {type: 'number', min: 0, max: s.mode === 'percent' ? 100 : null,
          'data-testid': 'stage-value', 'data-field': f(s.mode === 'count' ? '.count' : '.percent'), value: s.value}), 'value')),
        sf('Soak', bind(h('input', {type: 'text', placeholder: 'e.g. 10m', 'data-testid': 'stage-soak', 'data-field': f('.soak'), value: s.soak}), 'soak')),
        sf('Max failure rate (0–1)', bind(h('input', {type: 'number', step: '0.01', min: 0, max: 1, 'data-testid': 'stage-mfr',
          'data-field': f('.max_failure_rate'), value: s.mfr}), 'mfr')),
        sf('Max not back online (−1: no limit)', bind(h('input', {type: 'number', min: -1, 'data-testid': 'stage-mnbo',
          'data-field': f('.max_not_back_online'), value: s.mnbo}), 'mnbo')),
        sf('Connectivity ratio (optional)', bind(h('input', {type: 'number', step: '0.1', min: 0, placeholder: 'off', 'data-testid': 'stage-conn',
          'data-field': f('.connectivity_ratio'), value: s.conn}), 'conn')));
    }));
  }

  const addStage = h('button', {type: 'button', class: 'btn small', 'data-testid': 'add-stage'}, 'Add stage');
  addStage.addEventListener('click', () => {
    stages.push({name: '', mode: 'percent', value: '100', soak: '', mfr: '0.1', mnbo: '1', conn: ''});
    drawStages();
  });
  const preset = h('button', {type: 'button', class: 'btn small ghost', 'data-testid': 'preset-canary'}, 'Canary, 50 %, 100 %');
  preset.addEventListener('click', () => {
    stages = [
      {name: 'canary', mode: 'count', value: '5', soak: '10m', mfr: '0.2', mnbo: '1', conn: '2'},
      {name: 'half', mode: 'percent', value: '50', soak: '30m', mfr: '0.1', mnbo: '2', conn: '2'},
      {name: 'all', mode: 'percent', value: '100', soak: '', mfr: '0.1', mnbo: '5', conn: ''},
    ];
    drawStages();
  });

  const form = h('form', {class: 'campaign-form', 'data-testid': 'campaign-form', novalidate: true},
    h('section', {class: 'card'}, h('h2', null, 'What'),
      h('div', {class: 'form-grid'},
        field('Name', name),
        field('Target firmware', fwSel, arts.length ? '' : h('span', null, link(uiPath('firmware'), 'Upload firmware'), ' first.')))),
    h('section', {class: 'card'}, h('h2', null, 'Which devices'),
      h('div', {class: 'form-grid'},
        sel.fields('comma-separated; empty: every model the firmware is built for')),
      matchCounter(ctx, [fwSel, ...sel.elements], countMatching)),
    h('section', {class: 'card'}, h('div', {class: 'card-head'}, h('h2', null, 'Stages'), h('div', {class: 'actions'}, preset, addStage)),
      h('p', {class: 'muted small'}, 'Each stage upgrades its share, then soaks with its gates watched before the next one starts. ' +
        'Percent stages are cumulative; the last one must reach 100 % (or be a count).'),
      stagesBox),
    h('section', {class: 'card'}, h('h2', null, 'Pace and safety'),
      h('div', {class: 'form-grid'},
        field('Devices per minute', dpm, '0: unlimited'),
        field('Max concurrent jobs', concurrent, '0: unlimited'),
        field('Device timeout', timeout, 'from dispatch to back online on the new version'),
        field('When a gate breaches', gate),
        h('div', {class: 'field'}, h('label', {class: 'check', for: 'cf-follow'}, follow,
          ' follow the fleet: devices that start matching later join the last stage')))),
    errBox,
    h('div', {class: 'form-actions'}, submit,
      h('a', {href: uiPath('campaigns'), 'data-link': true, class: 'btn ghost'}, 'Cancel')),
  );

  ctx.root.append(h('div', {class: 'page-head'},
    h('div', null, h('p', {class: 'crumbs'}, link(uiPath('campaigns'), 'Campaigns'), ' /'), h('h1', null, 'New campaign'))), form);
  drawStages();

  // The live count lists the devices with the selector's filters, as the
  // campaign will select them at start: active devices of the models, with
  // every tag, incompatible if asked, not already on the target version,
  // and within the version constraint.
  async function countMatching(current) {
    const art = arts.find((a) => a.id === fwSel.value);
    const ms = list(models.value);
    const cons = version.value.trim() ? parseConstraint(version.value) : null;
    let n = 0;
    let already = 0;
    const capped = await scanDevices({models: ms.length ? ms : art ? art.models || [] : [''], tags: list(tags.value), compat: compat.checked},
      {signal: ctx.signal, current}, (d) => {
        if (art && d.firmware === art.version) already++;
        else if (!cons || cons(d.firmware)) n++;
      });
    if (capped === null) return null;
    const notes = [];
    if (already) notes.push(`${already} already on ${art.version} not counted`);
    if (version.value.trim() && !cons) notes.push('the version constraint is not counted here (fleetd checks it)');
    if (!art && !ms.length) notes.push('choose the firmware to count only its models');
    notes.push('counted now; fleetd selects the devices when the campaign starts');
    return {n, capped, notes};
  }

  function spec() {
    const durations = [];
    const stageSpecs = stages.map((s, i) => {
      const f = (k) => `stages[${i}].${k}`;
      const st = {name: s.name.trim()};
      if (s.mode === 'count') st.count = numberField(s.value, f('count'), {integer: true});
      else st.percent = numberField(s.value, f('percent'));
      st.soak = s.soak.trim() || '0s';
      durations.push([st.soak, f('soak')]);
      st.max_failure_rate = numberField(s.mfr, f('max_failure_rate'));
      st.max_not_back_online = numberField(s.mnbo, f('max_not_back_online'), {integer: true});
      const conn = numberField(s.conn, f('connectivity_ratio'));
      if (conn) st.connectivity_ratio = conn;
      return st;
    });
    const dt = timeout.value.trim() || '0s';
    durations.push([dt, 'device_timeout']);
    for (const [d, fieldName] of durations) checkDuration(d, fieldName);
    return {
      name: name.value.trim(),
      firmware_id: fwSel.value,
      selector: sel.selector(),
      stages: stageSpecs,
      pacing: {devices_per_minute: numberField(dpm.value, 'pacing.devices_per_minute', {integer: true}),
        max_concurrent: numberField(concurrent.value, 'pacing.max_concurrent', {integer: true})},
      device_timeout: dt,
      gate_action: gate.value,
      follow: follow.checked,
    };
  }

  onSubmit(ctx, form, {errBox, button: submit, spec, title: 'fleetd refused the campaign', send: async (body) => {
    const v = await api('POST', '/campaigns', body);
    navigate(uiPath('campaigns', v.id));
  }});
}

// ---- one campaign

function historyDetail(e) {
  const d = e.detail;
  if (!d || typeof d !== 'object') return d === null || d === undefined ? '' : String(d);
  const parts = [];
  if (d.reason) parts.push(d.reason);
  if (d.gate && d.gate.detail && !String(d.reason || '').includes(d.gate.detail)) {
    parts.push(`${d.gate.gate}${d.gate.breached ? ' breached' : ''}: ${d.gate.detail}`);
  }
  if (e.action === 'approve' && d.stage !== undefined) parts.push(`stage ${d.stage + 1}${d.name ? ` "${d.name}"` : ''} approved`);
  if (d.from) parts.push(`from ${d.from}`);
  if (d.devices !== undefined) parts.push(`${d.devices} devices`);
  if (d.first_stage !== undefined) parts.push(`first stage ${d.first_stage}`);
  if (d.firmware) parts.push(`firmware ${d.firmware}`);
  if (d.selector) {
    const s = d.selector;
    const sel = [s.models && s.models.length ? `models ${s.models.join(', ')}` : '', s.version ? `version ${s.version}` : '',
      s.tags && s.tags.length ? `tags ${s.tags.join(', ')}` : '', s.compat ? s.compat : ''].filter(Boolean);
    parts.push(`selector: ${sel.join(', ') || 'all devices of the firmware\'s models'}`);
  }
  if (d.stats && !d.reason) {
    const s = d.stats;
    parts.push(`stage ${(d.stage ?? 0) + 1}: ${s.Succeeded ?? 0}/${s.Targets ?? 0} succeeded, ${s.Failed ?? 0} failed, ${s.TimedOut ?? 0} timed out`);
  }
  return parts.join(' · ');
}

// windowText says where a campaign's maintenance windows stand for the
// devices it has yet to dispatch: why nothing goes out, and until when.
function windowText(w) {
  if (!w) return '—';
  const zones = (w.zones || []).filter((z) => z.pending > 0);
  const open = zones.filter((z) => z.open).map((z) => z.zone);
  if (w.open) {
    return `open${open.length ? ` in ${open.join(', ')}` : ''} until ${fmtTime(w.closes_at)}, ${w.dispatchable} device${w.dispatchable === 1 ? '' : 's'} inside` +
      (w.next_window ? `; the next window for the others opens ${fmtTime(w.next_window)}` : '');
  }
  return w.next_window ? `closed: nothing is dispatched until ${fmtTime(w.next_window)}` : 'closed';
}

// auditLink links a history entry made through the API to its audit log
// entry: the actor names the request ("user alice@10.0.0.7 (request
// 3f2a…)"), and GET /audit filters by request id. The audit log is for
// admins.
function auditLink(actor) {
  const m = /\(request ([^)\s]+)\)/.exec(actor || '');
  if (!m) return null;
  return h('span', NEEDS_ADMIN, ' · ', h('a', {href: uiPath('audit') + '?request_id=' + enc(m[1]), 'data-link': true,
    'data-testid': 'history-audit', 'data-request-id': m[1]}, 'audit entry'));
}

function selectorText(s) {
  if (!s) return 'all devices of the firmware\'s models';
  const parts = [];
  parts.push(s.models && s.models.length ? `models ${s.models.join(', ')}` : 'every model of the firmware');
  if (s.version) parts.push(`running ${s.version}`);
  if (s.tags && s.tags.length) parts.push(`tagged ${s.tags.join(' and ')}`);
  if (s.compat === 'incompatible') parts.push('found incompatible');
  return parts.join(', ');
}

export async function campaignView(ctx, id) {
  const path = '/campaigns/' + enc(id);
  const head = h('div', {class: 'page-head'});
  const actionStatus = h('div', {'data-testid': 'action-status'});
  const facts = h('div');
  const stagesBox = h('div', {class: 'stages', 'data-testid': 'stages'});
  const devicesBox = h('div', {'data-testid': 'campaign-devices'});
  const historyBox = h('div', {'data-testid': 'campaign-history'});
  ctx.root.append(head, actionStatus,
    h('div', {class: 'grid-2 wide-left'}, card('Stages', stagesBox), card('Campaign', facts)),
    card('Devices', devicesBox),
    card('History', historyBox));
  let c = null;

  function drawHead() {
    const acts = c.actions || []; // what the API allows in this state (firmware.Actions)
    const buttons = acts.map((a) => {
      const b = h('button', {type: 'button', class: `btn ${a === 'start' || a === 'resume' || a === 'approve' ? 'primary' : a === 'abort' || a === 'rollback' ? 'danger' : ''}`,
        'data-testid': `action-${a}`, ...NEEDS_OPERATOR}, a[0].toUpperCase() + a.slice(1));
      b.addEventListener('click', () => act(a, b));
      return b;
    });
    ctx.title(c.name);
    head.replaceChildren(
      h('div', null,
        h('p', {class: 'crumbs'}, link(uiPath('campaigns'), 'Campaigns'), ' /'),
        h('h1', null, c.name, ' ', stateBadge(c.state, {'data-testid': 'campaign-state'}))),
      h('div', {class: 'actions', 'data-testid': 'campaign-actions'}, buttons));
  }

  function drawFacts() {
    const p = c.pacing || {};
    facts.replaceChildren(dl([
      ['Target firmware', h('span', null, h('strong', null, c.version), ' ', h('code', {class: 'muted small'}, c.firmware_id))],
      ['Devices', selectorText(c.selector)],
      ['Selected', c.state === 'draft' ? 'when it starts' : String(c.total), 'campaign-total'],
      ...(c.follow ? [['Follows the fleet', c.state === 'draft' ? 'from its start'
        : `${c.joined || 0} joined${c.following_since ? `, following since ${fmtTime(c.following_since)}` : ''}`, 'campaign-follow']] : []),
      ['Pacing', `${p.devices_per_minute ? `${p.devices_per_minute} devices/min` : 'no rate limit'}, ${p.max_concurrent ? `${p.max_concurrent} at once` : 'no concurrency limit'}`],
      ['Device timeout', c.device_timeout],
      ['Breached gate', c.gate_action === 'abort' ? 'aborts the campaign' : 'pauses the campaign'],
      ['Delta images', c.delta ? 'offered to devices whose version\'s image is stored' : 'off (full images)'],
      ['Bytes sent', bytesText(c.bytes), 'campaign-bytes'],
      ...(c.windows && c.windows.length ? [
        ['Windows', `${c.windows.map((w) => `${w.cron} for ${w.duration}`).join('; ')} (${c.timezone || 'UTC'}${c.timezone_tag ? `, or the zone in each device's tag ${c.timezone_tag}` : ''})`],
        ['Window now', windowText(c.window), 'campaign-window'],
      ] : []),
      ['Created', fmtTime(c.created_at)],
      ['Updated', fmtTime(c.updated_at)],
    ]));
  }

  // bytesText says what the campaign's downloads came to (firmware.DeltaStats).
  function bytesText(b) {
    b = b || {};
    const sent = fmtBytes(b.sent || 0);
    if (!c.delta) return sent;
    const saved = (b.saved || 0) < 0 ? `${fmtBytes(-b.saved)} lost to fallbacks` : `${fmtBytes(b.saved || 0)} saved by deltas`;
    return `${sent}, ${saved} (${b.delta_jobs || 0} jobs offered a delta, ${b.fell_back || 0} fell back to the full image)`;
  }

  function drawStages() {
    const stages = c.stages || [];
    const rows = stages.map((s, i) => {
      const count = (c.stage_counts || [])[i] || {targets: 0, by_state: {}};
      const status = stageStatus(c, i);
      const {bar, text, split} = progressBar(count, {'data-testid': 'stage-progress', 'data-stage': i, 'data-status': status});
      const expected = count.targets ? 0 : count.planned || 0; // the API's firmware.StageTargets
      return h('div', {class: `stage ${status.replace(' ', '-')}`, 'data-testid': 'stage', 'data-stage': i},
        h('div', {class: 'stage-head'},
          h('strong', null, `${i + 1}. ${s.name || 'stage'}`),
          h('span', {class: 'muted small'}, ` ${stageSize(s)}${s.soak && s.soak !== '0s' ? `, soak ${s.soak}` : ''}${s.requires_approval ? ', requires approval' : ''}`),
          h('span', {class: `badge ${status === 'done' ? 'ok' : status === 'running' || status === 'soaking' ? 'busy' : status === 'paused' || status === 'awaiting approval' ? 'warn' : status === 'aborted' ? 'bad' : ''}`,
            'data-testid': 'stage-status'}, status)),
        bar,
        h('p', {class: 'small', 'data-testid': 'stage-text'}, count.targets ? text :
          expected ? `${expected} devices when this stage starts` : c.state === 'draft' ? 'devices are selected at start' : 'no devices'),
        h('p', {class: 'muted small'}, `Gates: ${gatesText(s)}`),
        split.failed + split.timedOut > 0 ? h('p', {class: 'small bad-text'}, 'See the failed devices below for their reasons.') : null);
    });
    if (c.rollback) {
      const {bar, text} = progressBar(c.rollback, {'data-testid': 'rollback-progress'});
      rows.push(h('div', {class: 'stage rollback'}, h('div', {class: 'stage-head'}, h('strong', null, 'Rollback'),
        h('span', {class: 'muted small'}, ' devices sent back to the version they ran before')), bar, h('p', {class: 'small'}, text)));
    }
    stagesBox.replaceChildren(...rows);
  }

  function draw() {
    drawHead();
    drawFacts();
    drawStages();
  }

  async function loadDevices() {
    try {
      const r = await api('GET', `${path}/devices`, undefined, {signal: ctx.signal});
      if (!ctx.alive()) return;
      const ds = (r && r.devices) || [];
      devicesBox.replaceChildren(ds.length ? table(['Device', 'Stage', 'From', 'Job', 'Progress', 'Error', 'Rollback', 'Finished'],
        ds.slice(0, 500).map((d) => h('tr', {'data-testid': 'campaign-device', 'data-state': d.state},
          h('td', null, link(devicePath(d.device_id), d.device_id)),
          h('td', {class: 'num'}, d.stage === null || d.stage === undefined ? '—' : String(d.stage + 1)),
          h('td', null, d.from_version || '—'),
          h('td', null, badge(d.state, d.state === 'succeeded' ? 'ok' : d.state === 'failed' || d.state === 'timed_out' ? 'bad' : d.state === 'pending' ? '' : 'busy')),
          h('td', {class: 'num'}, d.state === 'downloading' ? `${d.progress} %` : ''),
          h('td', {class: 'detail'}, d.error || ''),
          h('td', null, d.rollback_state || ''),
          h('td', {class: 'nowrap'}, d.finished_at ? fmtTime(d.finished_at) : ''))), {class: 'compact'}) :
        h('p', {class: 'empty'}, c && c.state === 'draft' ? 'Devices are selected when the campaign starts.' : 'No devices.'));
      if (ds.length > 500) devicesBox.append(h('p', {class: 'muted small'}, `Showing 500 of ${ds.length} devices.`));
    } catch (err) {
      if (ctx.alive() && err.name !== 'AbortError') devicesBox.replaceChildren(errorBox(err));
    }
  }

  async function loadHistory() {
    try {
      const r = await api('GET', `${path}/history`, undefined, {signal: ctx.signal});
      if (!ctx.alive()) return;
      const hs = ((r && r.history) || []).slice().reverse();
      historyBox.replaceChildren(hs.length ? h('ol', {class: 'history'}, hs.map((e) => h('li', {'data-testid': 'history-entry', 'data-action': e.action},
        h('span', {class: 'when'}, fmtTime(e.at)),
        h('strong', null, e.action.replaceAll('_', ' ')),
        h('span', {class: 'who muted small'}, e.actor, auditLink(e.actor)),
        h('span', {class: 'what'}, historyDetail(e))))) :
        h('p', {class: 'empty'}, 'No history.'));
    } catch (err) {
      if (ctx.alive() && err.name !== 'AbortError') historyBox.replaceChildren(errorBox(err));
    }
  }

  async function act(action, button) {
    const danger = {
      start: ['Start this campaign?', `fleetd selects the devices now and sends jobs stage by stage, paced. Target: firmware ${c.version}.`, false],
      abort: ['Abort this campaign?', 'No more jobs are sent. Devices already upgraded keep the new firmware. An aborted campaign cannot be resumed.', true],
      rollback: ['Roll this campaign back?', 'Each device this campaign upgraded is sent the version it ran before (when that firmware is stored).', true],
      approve: [`Approve stage ${c.stage + 1}${(c.stages[c.stage] || {}).name ? ` "${c.stages[c.stage].name}"` : ''}?`,
        'Its devices are sent jobs, paced, as soon as you approve; the history records that you did.', false],
    }[action];
    if (danger && !(await confirmDialog({title: danger[0], message: danger[1], confirm: action[0].toUpperCase() + action.slice(1), danger: danger[2]}))) return;
    button.disabled = true;
    try {
      c = await api('POST', `${path}/${action}`);
      actionStatus.replaceChildren();
      draw();
      loadHistory();
      loadDevices();
    } catch (err) {
      actionStatus.replaceChildren(errorBox(err, {title: `Cannot ${action} the campaign`}));
      button.disabled = false;
    }
  }

  async function refresh() {
    try {
      const v = await api('GET', path, undefined, {signal: ctx.signal});
      if (!ctx.alive()) return;
      c = v;
      draw();
    } catch (err) {
      if (ctx.alive() && err.name !== 'AbortError') actionStatus.replaceChildren(errorBox(err));
    }
    loadDevices();
    loadHistory();
  }

  c = await orNotFound(ctx, api('GET', path, undefined, {signal: ctx.signal}),
    {heading: 'Campaign', title: 'No such campaign', back: uiPath('campaigns'), backText: 'Back to the campaigns'});
  if (!c) return;
  draw();
  loadDevices();
  loadHistory();

  // A campaign event carries the whole view: the bars move at once; the
  // device list and history follow, at most every 2 s.
  const details = settle(() => {
    loadDevices();
    loadHistory();
  }, 2000);
  ctx.onDispose(details.cancel);
  ctx.on('campaign', (v) => {
    if (!v || v.id !== id) return;
    c = v;
    draw();
    details();
  });
  ctx.on('open', refresh);
  ctx.refresh = refresh;
}

