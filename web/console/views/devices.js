// Devices: the paged, filtered list and a device's page (presence,
// diagnosis, connection timeline with a telemetry metric on the same time
// axis, decommission and token rotation).

import {h, fill, card, table, link, uiPath, devicePath, dl, fmtTime, ago, fmtDuration, fmtNum, protoName, onlineBadge, badge,
  debounce, settle, errorBox, confirmDialog, modal} from '../lib/dom.js';
import {api, qs, enc} from '../lib/api.js';
import {NEEDS_OPERATOR} from '../lib/role.js';
import {setQuery} from '../lib/nav.js';
import {buildSessions, timeline, timeAxis, seriesChart, seriesPoints, visiblePoints, crosshair, stepMs, legend, reasonLabel} from '../lib/charts.js';
import {presenceAfter} from '../lib/live.js';
import {commandsCard} from './commands.js';
import {configCard} from './config.js';

const PAGE = 100;

function select(testid, label, options, value) {
  return h('select', {'data-testid': testid, 'aria-label': label, value},
    options.map(([v, text]) => h('option', {value: v}, text)));
}

export async function devicesView(ctx) {
  ctx.title('Devices');
  const q = new URLSearchParams(location.search);
  const f = {};
  for (const k of ['status', 'model', 'firmware', 'protocol', 'compat', 'tag', 'state', 'q']) f[k] = q.get(k) || '';

  const controls = {
    q: h('input', {type: 'search', placeholder: 'id starts with…', 'data-testid': 'filter-search', 'aria-label': 'Search by id prefix', value: f.q}),
    status: select('filter-status', 'Status', [['', 'any'], ['online', 'online'], ['offline', 'offline']], f.status),
    model: h('input', {type: 'text', placeholder: 'any', 'data-testid': 'filter-model', 'aria-label': 'Model', value: f.model}),
    firmware: h('input', {type: 'text', placeholder: 'any', 'data-testid': 'filter-firmware', 'aria-label': 'Firmware version', value: f.firmware}),
    protocol: select('filter-protocol', 'Protocol', [['', 'any'], ['3.1', 'MQTT 3.1'], ['3.1.1', 'MQTT 3.1.1'], ['5', 'MQTT 5']], f.protocol),
    compat: select('filter-compat', 'Compatibility', [['', 'any'], ['incompatible', 'incompatible'], ['compatible', 'compatible']], f.compat),
    tag: h('input', {type: 'text', placeholder: 'site=lyon', 'data-testid': 'filter-tag', 'aria-label': 'Tag', value: f.tag}),
    state: select('filter-state', 'State', [['', 'active'], ['decommissioned', 'decommissioned'], ['all', 'all']], f.state),
  };
  const reset = h('button', {type: 'button', class: 'btn ghost small', 'data-testid': 'filter-reset'}, 'Clear filters');
  const summary = h('p', {class: 'muted small', 'data-testid': 'device-summary', 'aria-live': 'polite'});
  const problem = h('div');
  const tbody = h('tbody');
  const prev = h('button', {type: 'button', class: 'btn small', 'data-testid': 'page-prev', disabled: true}, '← Previous');
  const next = h('button', {type: 'button', class: 'btn small', 'data-testid': 'page-next', disabled: true}, 'Next →');

  ctx.root.append(
    h('div', {class: 'page-head'}, h('h1', null, 'Devices'), summary),
    h('form', {class: 'filters card', 'data-testid': 'device-filters', role: 'search', onsubmit: (e) => e.preventDefault()},
      h('label', {class: 'mini search'}, h('span', null, 'Search'), controls.q),
      h('label', {class: 'mini'}, h('span', null, 'Status'), controls.status),
      h('label', {class: 'mini'}, h('span', null, 'Model'), controls.model),
      h('label', {class: 'mini'}, h('span', null, 'Firmware'), controls.firmware),
      h('label', {class: 'mini'}, h('span', null, 'Protocol'), controls.protocol),
      h('label', {class: 'mini'}, h('span', null, 'Compatibility'), controls.compat),
      h('label', {class: 'mini'}, h('span', null, 'Tag'), controls.tag),
      h('label', {class: 'mini'}, h('span', null, 'State'), controls.state),
      h('div', {class: 'mini end'}, reset)),
    problem,
    h('div', {class: 'table-wrap card flush'},
      h('table', {'data-testid': 'device-table'},
        h('thead', null, h('tr', null, ['Device', 'Status', 'Model', 'Firmware', 'Protocol', 'Last disconnect', 'Last seen', 'Compatibility']
          .map((x) => h('th', {scope: 'col'}, x)))),
        tbody)),
    h('div', {class: 'pager'}, prev, next));

  const rows = new Map(); // id → {tr, d}
  let cursors = [''];
  let pageIdx = 0;
  let nextCursor = '';
  let loaded = [];
  let seq = 0;

  function row(d) {
    const inc = d.incompatible ? badge('incompatible', 'bad', {title: (d.incompatibilities || []).map((i) => i.detail).join('\n')}) : h('span', {class: 'muted'}, 'compatible');
    const tr = h('tr', {'data-testid': 'device-row', 'data-device-id': d.id, 'data-online': String(!!d.online), 'data-firmware': d.firmware || ''},
      h('td', null, link(devicePath(d.id), d.id)),
      h('td', null, d.state === 'decommissioned' ? badge('decommissioned', 'off') : onlineBadge(d.online, {'data-testid': 'device-status'})),
      h('td', null, d.model || '—'),
      h('td', {'data-testid': 'device-firmware'}, d.firmware || '—'),
      h('td', null, d.protocol_version || '—'),
      h('td', null, d.last_disconnect ? reasonLabel(d.last_disconnect) : '—'),
      h('td', {title: fmtTime(d.last_seen)}, d.online ? 'now' : ago(d.last_seen || d.disconnected_at)),
      h('td', null, inc));
    return tr;
  }

  function draw() {
    const prefix = f.q.toLowerCase();
    const shown = prefix ? loaded.filter((d) => d.id.toLowerCase().startsWith(prefix)) : loaded;
    rows.clear();
    tbody.replaceChildren(...shown.map((d) => {
      const tr = row(d);
      rows.set(d.id, {tr, d});
      return tr;
    }));
    if (!shown.length) {
      tbody.append(h('tr', null, h('td', {colspan: 8, class: 'empty'},
        loaded.length ? `No device on this page starts with "${f.q}".` : 'No device matches these filters.')));
    }
    const first = pageIdx * PAGE + 1;
    summary.textContent = loaded.length ?
      `Devices ${first}–${first + loaded.length - 1}${nextCursor ? ' (more on the next pages)' : ''}` +
        (prefix ? `; ${shown.length} on this page start with "${f.q}"` : '') :
      '';
    prev.disabled = pageIdx === 0;
    next.disabled = !nextCursor;
  }

  async function load() {
    const my = ++seq;
    const {q: _q, ...server} = f;
    const page = await api('GET', '/devices' + qs({...server, limit: PAGE, cursor: cursors[pageIdx]}), undefined, {signal: ctx.signal});
    if (!ctx.alive() || my !== seq) return;
    problem.replaceChildren();
    loaded = page.devices || [];
    nextCursor = page.next_cursor || '';
    draw();
  }

  const reload = () => load().catch((err) => {
    if (ctx.alive() && err.name !== 'AbortError') {
      problem.replaceChildren(errorBox(err));
      loaded = [];
      nextCursor = '';
      draw();
    }
  });

  const apply = () => {
    for (const k of Object.keys(controls)) f[k] = controls[k].value.trim();
    setQuery(f);
    cursors = [''];
    pageIdx = 0;
    reload();
  };
  const applySoon = debounce(apply, 400);
  ctx.onDispose(applySoon.cancel);
  for (const [k, el] of Object.entries(controls)) {
    if (k === 'q') {
      el.addEventListener('input', () => {
        f.q = el.value.trim();
        setQuery(f);
        draw();
      });
    } else if (el.tagName === 'SELECT') {
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

  // A presence event updates the device's row in place.
  ctx.on('presence', (ev) => {
    const r = rows.get(ev.device_id);
    if (!r) return;
    const d = r.d;
    d.online = presenceAfter(ev, !!d.online);
    if (ev.firmware) d.firmware = ev.firmware;
    if (ev.protocol_version) d.protocol_version = ev.protocol_version;
    if (ev.kind === 'disconnect') {
      d.last_disconnect = ev.reason || d.last_disconnect;
      d.disconnected_at = ev.at;
    } else {
      d.connected_at = ev.at;
    }
    d.last_seen = ev.at;
    const tr = row(d);
    tr.classList.add('flash');
    r.tr.replaceWith(tr);
    r.tr = tr;
  });
  ctx.on('open', reload);
  ctx.refresh = reload;
  ctx.every(30_000, draw); // "5 min ago" moves on

  await load();
}

const problemTitles = {
  incompatible_firmware: 'Incompatible firmware',
  malformed_pings: 'Malformed pings',
  no_pings: 'Never pings',
  stalls: 'Hangs with its connection open',
  oversized_packets: 'Packets too large',
  duplicate_client_id: 'Two devices share this id',
  keepalive_mismatch: 'Idle connections are cut',
  throttled: 'Throttled by the broker',
  flapping: 'Flapping',
  tls_handshake_failures: 'TLS handshakes fail',
  auth_failures: 'Authentication fails',
  id_used_elsewhere: 'Someone else uses this id',
  decommissioned_retrying: 'Decommissioned, still trying',
  keepalive_above_policy: 'Keepalive above policy',
  weak_signal: 'Weak signal',
  congested_channel: 'Congested WiFi channel',
  bad_access_point: 'Bad access point',
  roaming_drops: 'Drops when it roams',
};

function evidenceValue(v) {
  if (v === null || v === undefined) return '—';
  if (Array.isArray(v)) return v.map(evidenceValue).join(', ');
  if (typeof v === 'object') return JSON.stringify(v);
  if (typeof v === 'number') return fmtNum(v);
  if (typeof v === 'string' && /^\d{4}-\d\d-\d\dT\d\d:\d\d/.test(v)) return fmtTime(v);
  return String(v);
}

// problemView shows one problem. A problem whose diagnosis names a
// configuration change gets a button that applies it (apply(problem,
// status)); a cleared one says why it is over instead.
function problemView(p, apply) {
  const ev = Object.entries(p.evidence || {});
  const status = h('div', {'data-testid': 'fix-status'});
  let action = null;
  if (p.cleared) {
    action = h('p', {class: 'notice', 'data-testid': 'problem-cleared'}, badge('cleared', 'ok'), ' ', p.cleared);
  } else if (p.remedy && p.remedy.config) {
    const change = Object.entries(p.remedy.config).map(([k, v]) => `${k} = ${JSON.stringify(v)}`).join(', ');
    const btn = h('button', {type: 'button', class: 'btn small primary', 'data-testid': 'fix-apply', ...NEEDS_OPERATOR}, `Apply fix: ${change}`);
    btn.addEventListener('click', async () => {
      btn.disabled = true;
      try {
        await apply(p, status);
      } finally {
        btn.disabled = false;
      }
    });
    action = h('div', {class: 'actions'}, btn);
  }
  return h('article', {class: 'problem', 'data-testid': 'problem', 'data-code': p.code, 'data-cleared': p.cleared ? 'true' : null},
    h('h3', null, problemTitles[p.code] || p.code, ' ', h('code', {class: 'muted small'}, p.code)),
    h('p', {class: 'cause'}, p.cause),
    ev.length ? h('dl', {class: 'evidence-list'}, ev.map(([k, v]) => [h('dt', null, k.replaceAll('_', ' ')), h('dd', null, evidenceValue(v))])) : null,
    p.fix ? h('p', {class: 'fix'}, h('strong', null, 'Fix: '), p.fix) : null,
    action, status);
}

const windows = [
  ['', 'all loaded events'],
  ['300000', 'last 5 minutes'],
  ['900000', 'last 15 minutes'],
  ['3600000', 'last hour'],
  ['21600000', 'last 6 hours'],
  ['86400000', 'last 24 hours'],
  ['604800000', 'last 7 days'],
];

// fleetd has no list of the metrics a device reports, so the device page
// asks for these (and the one in the address, ?metric=) and offers those
// that have points.
const knownMetrics = ['rssi_dbm', 'snr_db', 'noise_dbm', 'channel', 'tx_rate_mbps', 'uptime_s', 'temp_c', 'battery_pct', 'heap_free'];
const metricsLookBack = 7 * 86_400_000;

// telemetryStep is the step a period is read at: raw points up to 90
// minutes, per-minute rollups up to 3 days, hourly ones beyond (at most
// 5000 points an answer).
function telemetryStep(span) {
  if (span <= 90 * 60_000) return '';
  if (span <= 3 * 86_400_000) return '1m';
  return '1h';
}

const stepNames = {'': 'raw points', '1m': 'per-minute means', '1h': 'hourly means'};

const iso = (ms) => new Date(ms).toISOString();

export async function deviceView(ctx, id) {
  ctx.title(id);
  const path = '/devices/' + enc(id);
  const head = h('div', {class: 'page-head'});
  const actionsStatus = h('div');
  const presence = h('div');
  const firmware = h('div');
  const diagBox = h('div', {'data-testid': 'diagnosis'});
  const query = new URLSearchParams(location.search);
  const tlBox = h('div', {class: 'chart-box', 'data-testid': 'timeline'});
  const tlLegend = h('div', {'data-testid': 'timeline-legend'});
  const tlNote = h('p', {class: 'caption'});
  const tlWindow = h('select', {'data-testid': 'timeline-window', 'aria-label': 'Timeline period'}, windows.map(([v, t]) => h('option', {value: v}, t)));
  if (windows.some(([v]) => v && v === query.get('period'))) tlWindow.value = query.get('period');
  const telBox = h('div', {class: 'chart-box', 'data-testid': 'telemetry-chart'});
  const telNote = h('p', {class: 'caption', 'data-testid': 'telemetry-caption'});
  const telMetric = h('select', {'data-testid': 'telemetry-metric', 'aria-label': 'Telemetry metric', hidden: true});
  const readout = h('p', {class: 'caption readout', 'data-testid': 'chart-readout', 'aria-live': 'off'});
  const charts = h('div', {class: 'charts-stack'}, telBox, tlBox);
  const older = h('button', {type: 'button', class: 'btn small ghost', 'data-testid': 'events-older', hidden: true}, 'Load older events');
  const eventsBox = h('div', {'data-testid': 'events'});
  ctx.root.append(head, actionsStatus,
    h('div', {class: 'grid-2'}, card('Presence', presence), card('Firmware and protocol', firmware)),
    card('Diagnosis', diagBox),
    configCard(ctx, id),
    commandsCard(ctx, id),
    h('section', {class: 'card', 'data-testid': 'timeline-card'},
      h('div', {class: 'card-head'}, h('h2', null, 'Connection timeline and telemetry'),
        h('div', {class: 'actions'}, telMetric, tlWindow)),
      charts, readout, telNote, tlLegend, tlNote),
    h('section', {class: 'card'}, h('div', {class: 'card-head'}, h('h2', null, 'Connection events'), older), eventsBox));

  let device = null;
  const events = new Map(); // event id → event
  let olderCursor = '';
  let pagedOlder = false;
  // Both charts are drawn on axis; sessions are the timeline's.
  let axis = null;
  let sessions = [];
  // metrics: what the device reported (null until asked); series: the
  // metric over the period, as last read.
  let metric = query.get('metric') || 'rssi_dbm';
  let metrics = null;
  let series = null;
  let telError = null;
  let telSeq = 0;
  let probedAt = 0;

  function drawHead() {
    const d = device;
    const rotate = h('button', {type: 'button', class: 'btn', 'data-testid': 'btn-rotate', disabled: d.state === 'decommissioned', ...NEEDS_OPERATOR}, 'Rotate token');
    const decom = h('button', {type: 'button', class: 'btn danger', 'data-testid': 'btn-decommission', disabled: d.state === 'decommissioned', ...NEEDS_OPERATOR},
      'Decommission');
    rotate.addEventListener('click', rotateToken);
    decom.addEventListener('click', decommission);
    head.replaceChildren(
      h('div', null,
        h('p', {class: 'crumbs'}, link(uiPath('devices'), 'Devices'), ' /'),
        h('h1', {'data-testid': 'device-title'}, d.id, ' ',
          d.state === 'decommissioned' ? badge('decommissioned', 'off', {'data-testid': 'device-state'}) : onlineBadge(d.online, {'data-testid': 'device-online'}),
          d.incompatible ? badge('incompatible', 'bad') : null)),
      h('div', {class: 'actions'}, rotate, decom));
  }

  function drawFacts() {
    const d = device;
    presence.replaceChildren(dl([
      ['Status', d.state === 'decommissioned' ? `decommissioned ${fmtTime(d.decommissioned_at)}` : d.online ? 'online' : 'offline', 'presence-status'],
      ['Connected', d.connected_at ? fmtTime(d.connected_at) + (d.online && Date.now() - Date.parse(d.connected_at) >= 1000 ?
        ` (online for ${fmtDuration(Date.now() - Date.parse(d.connected_at))})` : '') : ''],
      ['Disconnected', d.online ? '' : fmtTime(d.disconnected_at)],
      ['Last disconnect', d.last_disconnect ? reasonLabel(d.last_disconnect) : '', 'last-disconnect'],
      ['Last seen', d.last_seen ? `${fmtTime(d.last_seen)} (${ago(d.last_seen)})` : ''],
      ['Session epoch', String(d.session_epoch ?? '')],
      ['Remote address', d.remote_addr],
      ['Listener', [d.listener, d.tls_version].filter(Boolean).join(' · ')],
      ['Broker node', d.broker_node],
    ]));
    firmware.replaceChildren(dl([
      ['Model', d.model],
      ['Firmware', d.firmware, 'device-fw'],
      ['Protocol', d.protocol_version ? protoName(d.protocol_version) : '', 'device-protocol'],
      ['Keepalive', d.keepalive_requested || d.keepalive_effective ?
        `${d.keepalive_requested} s requested, ${d.keepalive_effective} s effective` : ''],
      ['Tags', (d.tags || []).length ? h('span', null, d.tags.map((t) => h('code', {class: 'tag'}, t))) : ''],
      ['Compatibility', d.incompatible ? h('span', null, 'incompatible: ',
        (d.incompatibilities || []).map((i) => h('code', {class: 'tag', title: i.detail}, i.reason)), h('span', {class: 'muted small'}, ' (see the diagnosis)')) :
        'compatible'],
      ['Registered', fmtTime(d.created_at)],
    ]));
  }

  function drawDiagnosis(diag) {
    const probs = diag.problems || [];
    const incs = diag.incompatibilities || [];
    fill(diagBox,
      incs.length ? h('div', {class: 'incompat', 'data-testid': 'incompatibilities'},
        h('h3', null, 'Incompatibilities'),
        h('ul', {class: 'plain'}, incs.map((i) => h('li', {'data-reason': i.reason}, h('code', null, i.reason), ' — ', i.detail)))) : null,
      probs.length ? probs.map((p) => problemView(p, applyFix)) :
        h('p', {class: 'empty', 'data-testid': 'no-problems'}, incs.length ? 'No connection problem found in its recent events.' : 'No problem found: this device connects as it should.'));
  }

  // applyFix merges the problem's configuration change into this device's
  // desired configuration (POST /fixes); the device takes it at its next
  // connect, and the diagnosis says when the problem is cleared.
  async function applyFix(p, status) {
    try {
      const r = await api('POST', '/fixes', {problem: p.code, devices: [id]});
      const o = (r.devices || [])[0] || {};
      status.replaceChildren(o.applied ?
        h('p', {class: 'notice', 'data-testid': 'fix-applied'},
          `Applied: desired configuration version ${o.version} carries ${JSON.stringify(o.config)}; the device takes it at its next connect.`) :
        h('p', {class: 'notice', 'data-testid': 'fix-skipped'}, `Not applied: ${o.skipped || o.error || 'no outcome'}.`));
    } catch (err) {
      status.replaceChildren(errorBox(err));
    }
  }

  // currentAxis is the period on screen: the one chosen, or the loaded
  // events with a margin, up to now.
  function currentAxis(now = Date.now()) {
    let from;
    if (tlWindow.value) {
      from = now - Number(tlWindow.value);
    } else {
      const times = [...events.values()].map((e) => Date.parse(e.at)).filter(isFinite);
      from = times.length ? Math.min(...times) : now - 3_600_000;
      from -= Math.max(1_000, (now - from) * 0.03);
    }
    return timeAxis(from, now, tlBox.clientWidth || telBox.clientWidth || 800);
  }

  // drawTimeline draws the timeline and the telemetry chart on one new
  // axis (up to now).
  function drawTimeline() {
    const all = [...events.values()];
    const now = Date.now();
    axis = currentAxis(now);
    readout.textContent = '';
    const built = buildSessions(all, device, now);
    sessions = built.sessions;
    const marks = built.marks;
    drawTelemetry();
    if (!all.length) {
      tlBox.replaceChildren(h('p', {class: 'empty'}, 'No connection events recorded for this device.'));
      tlLegend.replaceChildren();
      tlNote.textContent = '';
      return;
    }
    tlBox.replaceChildren(timeline({sessions, marks}, axis));
    const reasons = [...new Set([...sessions.map((s) => s.reason), ...marks.map((m) => m.reason)])]
      .sort((a, b) => (a === 'online') - (b === 'online') || String(a).localeCompare(String(b)));
    tlLegend.replaceChildren(legend(reasons.map((r) => [r,
      r === 'online' ? 'online (current session)' : r === 'unknown' ? 'end not recorded' : r === 'firmware' ? 'firmware change' : r]),
    {'data-testid': 'timeline-reasons'}));
    const ended = sessions.filter((s) => !s.ongoing && !s.unknownEnd);
    const counts = {};
    for (const s of ended) counts[s.reason] = (counts[s.reason] || 0) + 1;
    tlNote.textContent = `${sessions.length} session${sessions.length === 1 ? '' : 's'} in ${all.length} loaded events` +
      (ended.length ? `; ended by ${Object.entries(counts).sort((a, b) => b[1] - a[1]).map(([r, n]) => `${r} × ${n}`).join(', ')}` : '') +
      '. Each bar runs from connect to disconnect, coloured by how the session ended; triangles are refused connection attempts. Hover for details.';
  }

  function drawTelemetry() {
    if (!axis) return;
    if (telError) {
      telBox.replaceChildren(errorBox(telError));
      telNote.textContent = '';
      return;
    }
    if (metrics && !metrics.length) {
      telBox.replaceChildren(h('p', {class: 'empty', 'data-testid': 'telemetry-empty'},
        `This device has reported no telemetry in the last 7 days (devices/${id}/telemetry: RSSI, channel, uptime…).`));
      telNote.textContent = '';
      return;
    }
    if (!series || series.metric !== metric) {
      telBox.replaceChildren(h('p', {class: 'muted small'}, 'Loading telemetry…'));
      telNote.textContent = '';
      return;
    }
    const pts = visiblePoints(series, axis);
    if (!pts.length) {
      telBox.replaceChildren(h('p', {class: 'empty', 'data-testid': 'telemetry-none'}, `No ${metric} reported in this period.`));
      telNote.textContent = '';
      return;
    }
    telBox.replaceChildren(seriesChart(series, axis, {sessions}));
    const vals = pts.map((p) => p.v);
    const last = pts[pts.length - 1];
    const n = pts.reduce((k, p) => k + p.n, 0);
    telNote.textContent = `${metric}, ${stepNames[series.step] || series.step}` +
      (series.step ? ` of ${n} point${n === 1 ? '' : 's'} (shaded: each bucket's min–max)` : ` (${pts.length})`) +
      `: from ${fmtNum(Math.min(...vals))} to ${fmtNum(Math.max(...vals))}, last ${fmtNum(last.last)} at ${fmtTime(series.step ? last.at : last.t)}. ` +
      'Same time axis as the timeline below; vertical lines are disconnects.';
  }

  function drawMetricSelect() {
    const names = metrics || [];
    telMetric.replaceChildren(...names.map((m) => h('option', {value: m}, m)));
    telMetric.value = metric;
    telMetric.hidden = !names.length;
  }

  // probeMetrics finds the metrics the device reported recently (hourly
  // rollups, one request per known metric).
  async function probeMetrics() {
    const now = Date.now();
    // Back as far as the period, within what one answer holds (5000 hours).
    const from = Math.max(now - 200 * 86_400_000, Math.min(now - metricsLookBack, axis ? axis.from : now));
    const names = [...new Set([metric, ...knownMetrics])];
    const found = await Promise.all(names.map(async (m) => {
      try {
        const s = await api('GET', `${path}/telemetry` + qs({metric: m, step: '1h', from: iso(from), to: iso(now + 3_600_000)}), undefined, {signal: ctx.signal});
        return s.points && s.points.length ? m : null;
      } catch (err) {
        if (err.status === 400) return null; // a metric name this fleetd refuses
        throw err;
      }
    }));
    metrics = found.filter(Boolean);
    probedAt = Date.now();
    if (metrics.length && !metrics.includes(metric)) metric = metrics.includes('rssi_dbm') ? 'rssi_dbm' : metrics[0];
    drawMetricSelect();
  }

  // loadTelemetry reads the metric over the axis, at the period's step; a
  // range holding too many points for it is read at the next step.
  async function loadTelemetry() {
    const my = ++telSeq;
    try {
      // A device without telemetry is asked again at most once a minute.
      if (!metrics || (!metrics.length && Date.now() - probedAt > 60_000)) await probeMetrics();
      if (!ctx.alive() || my !== telSeq) return;
      if (!metrics.length) {
        series = null;
        telError = null;
        drawTelemetry();
        return;
      }
      const a = axis || currentAxis();
      const want = metric;
      let step = telemetryStep(a.span);
      let s;
      for (;;) {
        try {
          s = await api('GET', `${path}/telemetry` + qs({metric: want, from: iso(a.from), to: iso(a.to + 1_000), step}), undefined, {signal: ctx.signal});
          break;
        } catch (err) {
          if (err.status === 400 && err.field === 'from' && step !== '1h') {
            step = step === '' ? '1m' : '1h';
            continue;
          }
          throw err;
        }
      }
      if (!ctx.alive() || my !== telSeq || want !== metric) return;
      series = s;
      telError = null;
    } catch (err) {
      if (!ctx.alive() || my !== telSeq || err.name === 'AbortError') return;
      telError = err;
    }
    drawTelemetry();
  }

  // describe is the readout under the pointer: the instant, the metric's
  // nearest value and the link's state then.
  function describe(t) {
    const parts = [fmtTime(t)];
    if (series && series.metric === metric) {
      let best = null;
      for (const p of seriesPoints(series)) if (!best || Math.abs(p.t - t) < Math.abs(best.t - t)) best = p;
      const near = Math.max(axis ? (axis.span / axis.pw) * 12 : 0, stepMs[series.step] || 0); // within 12 px or a bucket
      if (best && Math.abs(best.t - t) <= near) parts.push(`${metric} ${fmtNum(best.v)}`);
    }
    const s = sessions.find((x) => (x.start === null || x.start <= t) && x.end >= t);
    if (s) parts.push(s.ongoing ? 'online' : `online, in a session that ended ${fmtTime(s.end)} (${s.reason})`);
    else if (sessions.length) parts.push('offline');
    return parts.join(' · ');
  }

  function drawEvents() {
    const list = [...events.values()].sort((a, b) => Date.parse(b.at) - Date.parse(a.at));
    eventsBox.replaceChildren(list.length ? table(['Time', 'Event', 'Reason', 'Detail', 'Epoch', 'Protocol', 'Keepalive', 'Pings', 'Remote'],
      list.slice(0, 200).map((e) => h('tr', {'data-testid': 'event-row'},
        h('td', {class: 'nowrap'}, fmtTime(e.at)),
        h('td', null, e.kind),
        h('td', null, e.reason ? reasonLabel(e.reason) : ''),
        h('td', {class: 'detail'}, e.detail || (e.firmware && e.kind === 'birth' ? `firmware ${e.firmware}` : '')),
        h('td', {class: 'num'}, e.session_epoch ? String(e.session_epoch) : ''),
        h('td', null, e.protocol_version || ''),
        h('td', {class: 'num'}, e.keepalive_effective ? `${e.keepalive_effective} s` : ''),
        h('td', {class: 'num'}, e.kind === 'disconnect' ? String(e.pings || 0) : ''),
        h('td', null, e.remote_addr || ''))), {class: 'compact'}) :
      h('p', {class: 'empty'}, 'No events.'));
    if (list.length > 200) eventsBox.append(h('p', {class: 'muted small'}, `Showing the latest 200 of ${list.length} loaded events.`));
  }

  async function loadEvents(cursor = '') {
    const page = await api('GET', `${path}/events` + qs({limit: 500, cursor}), undefined, {signal: ctx.signal});
    if (!ctx.alive()) return;
    for (const e of page.events || []) events.set(e.id || `${e.at}/${e.kind}/${e.session_epoch}`, e);
    // The first page is reloaded on updates; once older pages are loaded,
    // the cursor of the oldest one is kept.
    if (cursor) {
      olderCursor = page.next_cursor || '';
      pagedOlder = true;
    } else if (!pagedOlder) {
      olderCursor = page.next_cursor || '';
    }
    older.hidden = !olderCursor;
  }

  async function loadDiagnosis() {
    try {
      const diag = await api('GET', `${path}/diagnosis`, undefined, {signal: ctx.signal});
      if (ctx.alive()) drawDiagnosis(diag);
    } catch (err) {
      if (ctx.alive() && err.name !== 'AbortError') diagBox.replaceChildren(errorBox(err));
    }
  }

  async function refresh() {
    try {
      device = await api('GET', path, undefined, {signal: ctx.signal});
      if (!ctx.alive()) return;
      drawHead();
      drawFacts();
      await loadEvents();
      drawTimeline();
      drawEvents();
    } catch (err) {
      if (ctx.alive() && err.name !== 'AbortError') actionsStatus.replaceChildren(errorBox(err));
    }
    loadTelemetry();
    loadDiagnosis();
  }

  async function rotateToken() {
    const ok = await confirmDialog({title: `Rotate the token of ${id}?`, confirm: 'Rotate token',
      message: 'fleetd issues a new token; the current one stops working for new connections. The device must be given the new token before it reconnects.'});
    if (!ok) return;
    try {
      const r = await api('POST', `${path}/token`);
      actionsStatus.replaceChildren();
      const code = h('code', {class: 'token', 'data-testid': 'new-token'}, r.token);
      const copy = h('button', {type: 'button', class: 'btn small'}, 'Copy');
      copy.addEventListener('click', async () => {
        try {
          await navigator.clipboard.writeText(r.token);
          copy.textContent = 'Copied';
        } catch {
          getSelection().selectAllChildren(code);
          copy.textContent = 'Press Ctrl+C';
        }
      });
      const m = modal(h('div', null,
        h('h2', null, `New token for ${id}`),
        h('p', null, 'This token is shown once. Give it to the device now; fleetd keeps only its hash.'),
        h('div', {class: 'token-box'}, code, copy),
        h('div', {class: 'dialog-actions'}, h('button', {type: 'button', class: 'btn primary', 'data-testid': 'token-done', onclick: () => m.close()}, 'Done'))),
      {testid: 'token-dialog', label: 'New device token'});
    } catch (err) {
      actionsStatus.replaceChildren(errorBox(err));
    }
  }

  async function decommission() {
    const ok = await confirmDialog({title: `Decommission ${id}?`, confirm: 'Decommission', danger: true,
      message: 'Its credential is revoked, its live session is ended within a second and every later connection is refused. Its history stays. The id can be registered again later.'});
    if (!ok) return;
    try {
      device = await api('DELETE', path);
      actionsStatus.replaceChildren(h('p', {class: 'notice', 'data-testid': 'decommissioned-notice'},
        `${id} is decommissioned: its credential is revoked and its session ended.`));
      drawHead();
      drawFacts();
    } catch (err) {
      actionsStatus.replaceChildren(errorBox(err));
    }
  }

  try {
    device = await api('GET', path, undefined, {signal: ctx.signal});
  } catch (err) {
    if (err.status === 404) {
      ctx.root.replaceChildren(h('h1', null, id), errorBox(err, {title: 'No such device'}),
        h('p', null, link(uiPath('devices'), 'Back to the devices')));
      return;
    }
    throw err;
  }
  drawHead();
  drawFacts();
  try {
    await loadEvents();
  } catch (err) {
    if (err.name === 'AbortError') throw err;
    tlBox.replaceChildren(errorBox(err));
  }
  drawTimeline();
  drawEvents();
  loadTelemetry();
  loadDiagnosis();

  older.addEventListener('click', async () => {
    older.disabled = true;
    try {
      await loadEvents(olderCursor);
      drawTimeline();
      drawEvents();
      if (!tlWindow.value) loadTelemetry(); // the period grew
    } catch (err) {
      actionsStatus.replaceChildren(errorBox(err));
    } finally {
      older.disabled = false;
    }
  });
  const keepQuery = () => setQuery({metric: metric === 'rssi_dbm' ? '' : metric, period: tlWindow.value});
  tlWindow.addEventListener('change', () => {
    keepQuery();
    drawTimeline();
    loadTelemetry();
  });
  telMetric.addEventListener('change', () => {
    metric = telMetric.value;
    keepQuery();
    drawTelemetry();
    loadTelemetry();
  });
  crosshair(charts, () => axis, readout, describe);
  const refreshSoon = settle(refresh, 1500);
  ctx.onDispose(refreshSoon.cancel);
  ctx.on('presence', (ev) => {
    if (ev.device_id !== id) return;
    // Show the change at once; the full record, events and diagnosis follow.
    device.online = presenceAfter(ev, !!device.online);
    if (ev.firmware) device.firmware = ev.firmware;
    if (ev.protocol_version) device.protocol_version = ev.protocol_version;
    if (ev.kind === 'connect') device.connected_at = ev.at;
    else if (ev.reason !== 'session_takeover') {
      device.disconnected_at = ev.at;
      device.last_disconnect = ev.reason || device.last_disconnect;
    }
    device.last_seen = ev.at;
    drawHead();
    drawFacts();
    refreshSoon();
  });
  ctx.on('open', refresh);
  ctx.refresh = refresh;
  // The live session grows, and an online device keeps reporting.
  ctx.every(20_000, () => {
    if (!device || !device.online) return;
    drawTimeline();
    loadTelemetry();
  });
  const ro = new ResizeObserver(debounce(() => ctx.alive() && drawTimeline(), 150));
  ro.observe(ctx.root);
  ctx.onDispose(() => ro.disconnect());
}
