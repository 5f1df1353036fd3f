// Fleet overview: presence totals, connects and disconnects over the last
// hour, day or week (GET /fleet/history), why devices dropped (by firmware ×
// protocol), incompatible devices, flagged firmware and flapping devices
// (GET /fleet/health), and disconnects by radio link (GET /fleet/links),
// kept current by the live stream.

import {h, card, table, link, uiPath, devicePath, fmtNum, fmtTime, protoName, debounce, settle, errorBox} from '../lib/dom.js';
import {api, qs} from '../lib/api.js';
import {NEEDS_OPERATOR} from '../lib/role.js';
import {live, setCounts} from '../lib/live.js';
import {historyChart, historyTotals, reasonsChart, groupDisconnects, legend, reasonLabel} from '../lib/charts.js';
import {linksCard} from './links.js';

const incompatExplained = {
  below_minimum_firmware: 'firmware below its model\'s minimum',
  protocol_unsupported: 'speaks an MQTT version its firmware range does not list',
  rejects_pings: 'runs a firmware flagged for rejecting pings',
};

function stat(label, testid, cls = '') {
  const value = h('span', {class: 'stat-value', 'data-testid': testid}, '…');
  const sub = h('span', {class: 'stat-sub'});
  const el = h('div', {class: `stat ${cls}`.trim()}, h('span', {class: 'stat-label'}, label), value, sub);
  return {el, value, sub};
}

// The periods of the activity chart: how far back, and the bucket size
// (GET /fleet/history serves 1m, 5m, 1h and 1d buckets, at most 2000).
const activityPeriods = {
  hour: {label: 'last hour', ms: 3_600_000, step: '1m', per: 'per minute'},
  day: {label: 'last 24 hours', ms: 86_400_000, step: '5m', per: 'per 5 minutes'},
  week: {label: 'last 7 days', ms: 7 * 86_400_000, step: '1h', per: 'per hour'},
};

function plural(n, one, many = one + 's') {
  return `${n} ${n === 1 ? one : many}`;
}

export async function overviewView(ctx) {
  ctx.title('Overview');
  const root = ctx.root;
  let health = null;
  let period = 'last_hour';

  const updated = h('p', {class: 'muted small', 'data-testid': 'health-updated'});
  const problem = h('div');
  const online = stat('Online', 'online-count', 'good');
  const offline = stat('Offline', 'offline-count');
  const total = stat('Devices', 'total-count');
  const incompatible = stat('Incompatible', 'incompatible-count', 'warn');
  const flagged = stat('Flagged firmware', 'flagged-count', 'warn');
  const flapping = stat('Flapping', 'flapping-count', 'warn');

  let activity = null; // the last GET /fleet/history answer
  let activityError = null;
  let activitySeq = 0;
  const activityBox = h('div', {class: 'chart-box', 'data-testid': 'activity-chart'});
  const activityNote = h('p', {class: 'caption', 'data-testid': 'activity-caption'});
  const activityLegend = h('div');
  const activityTitle = h('h2', null, 'Connects and disconnects, last hour');
  const activityPeriod = h('select', {'aria-label': 'Activity period', 'data-testid': 'activity-period'},
    Object.entries(activityPeriods).map(([v, p]) => h('option', {value: v}, p.label)));
  const links = linksCard(ctx);

  const periodSelect = h('select', {'aria-label': 'Period', 'data-testid': 'reasons-period'},
    h('option', {value: 'last_hour'}, 'last hour'),
    h('option', {value: 'last_day'}, 'last 24 hours'));
  const reasonsBox = h('div', {class: 'chart-box', 'data-testid': 'reasons-chart'});
  const reasonsLegend = h('div');
  const reasonsTable = h('div', {'data-testid': 'reasons-table'});
  const incompatBox = h('div', {'data-testid': 'incompatible'});
  const flaggedBox = h('div', {'data-testid': 'flagged-firmware'});
  const flappingBox = h('div', {'data-testid': 'flapping'});

  root.append(
    h('div', {class: 'page-head'}, h('h1', null, 'Fleet overview'), updated),
    problem,
    h('div', {class: 'stats'}, online.el, offline.el, total.el, incompatible.el, flagged.el, flapping.el),
    h('div', {class: 'grid-2'},
      h('section', {class: 'card'},
        h('div', {class: 'card-head'}, activityTitle, activityPeriod),
        activityBox, activityLegend, activityNote),
      h('section', {class: 'card'},
        h('div', {class: 'card-head'}, h('h2', null, 'Disconnect reasons by firmware × protocol'), periodSelect),
        reasonsBox, reasonsLegend, reasonsTable)),
    h('div', {class: 'grid-3'},
      card('Incompatible devices by reason', incompatBox),
      card('Flagged firmware', flaggedBox),
      card('Flapping devices', flappingBox)),
    links.el,
  );

  function drawCounts() {
    const c = live.counts || (health && health.devices);
    if (!c) return;
    online.value.textContent = String(c.online);
    offline.value.textContent = String(c.offline);
    total.value.textContent = String(c.total);
    online.sub.textContent = c.total ? `${Math.round((c.online / c.total) * 100)} % of the fleet` : '';
  }

  function drawActivity() {
    const p = activityPeriods[activityPeriod.value];
    activityTitle.textContent = `Connects and disconnects, ${p.label}`;
    if (activityError) {
      activityBox.replaceChildren(errorBox(activityError));
      activityLegend.replaceChildren();
      activityNote.textContent = '';
      return;
    }
    if (!activity) {
      activityBox.replaceChildren(h('p', {class: 'muted small'}, 'Loading the history…'));
      return;
    }
    activityBox.replaceChildren(historyChart(activity, activityBox.clientWidth || 600));
    const t = historyTotals(activity);
    const reasons = Object.entries(t.disconnectsBy).sort((a, b) => b[1] - a[1]);
    const refused = Object.entries(t.refusedBy).sort((a, b) => b[1] - a[1]);
    activityLegend.replaceChildren(legend([['online', 'connect'],
      ...reasons.map(([r]) => [r, r]),
      ...refused.filter(([r]) => !t.disconnectsBy[r]).map(([r]) => [r, `${r} (refused)`])]));
    const from = new Date(activity.from);
    activityNote.textContent = `From fleetd's history, ${p.per} since ${fmtTime(from)}: ${plural(t.connects, 'connect')}, ` +
      `${plural(t.disconnects, 'disconnect')}` +
      (reasons.length ? ` (${reasons.map(([r, n]) => `${r} ${n}`).join(', ')})` : '') +
      (t.refused ? `, ${plural(t.refused, 'refused attempt')} (${refused.map(([r, n]) => `${r} ${n}`).join(', ')})` : '') +
      '. Hover a bar for its numbers.';
  }

  // loadActivity reads the period's history; an answer to an earlier
  // request (another period) is dropped.
  async function loadActivity() {
    const my = ++activitySeq;
    const p = activityPeriods[activityPeriod.value];
    const now = Date.now();
    try {
      const hist = await api('GET', '/fleet/history' + qs({from: new Date(now - p.ms).toISOString(), to: new Date(now).toISOString(), step: p.step}),
        undefined, {signal: ctx.signal});
      if (!ctx.alive() || my !== activitySeq) return;
      activity = hist;
      activityError = null;
    } catch (err) {
      if (!ctx.alive() || my !== activitySeq || err.name === 'AbortError') return;
      activityError = err;
    }
    drawActivity();
  }

  function drawReasons() {
    const cells = health ? health.disconnects[period] || [] : [];
    const groups = groupDisconnects(cells);
    if (!groups.length) {
      reasonsBox.replaceChildren(h('p', {class: 'empty'}, `No disconnects in the ${period === 'last_hour' ? 'last hour' : 'last 24 hours'}.`));
      reasonsLegend.replaceChildren();
      reasonsTable.replaceChildren();
      return;
    }
    reasonsBox.replaceChildren(reasonsChart(groups, reasonsBox.clientWidth || 600));
    const reasons = [...new Set(cells.map((c) => c.reason))].sort();
    reasonsLegend.replaceChildren(legend(reasons.map((r) => [r, r])));
    reasonsTable.replaceChildren(table(['Firmware', 'Protocol', 'Reason', 'Disconnects'],
      cells.map((c) => h('tr', {'data-testid': 'reason-row'},
        h('td', null, c.firmware ? link(uiPath('devices') + `?firmware=${encodeURIComponent(c.firmware)}`, c.firmware) : 'unknown'),
        h('td', null, protoName(c.protocol_version)),
        h('td', null, reasonLabel(c.reason)),
        h('td', {class: 'num'}, String(c.count)))),
      {class: 'compact'}));
  }

  function drawLists() {
    const inc = health.incompatible || {devices: 0, by_reason: {}};
    incompatible.value.textContent = String(inc.devices);
    incompatible.sub.textContent = '';
    const byReason = Object.entries(inc.by_reason || {}).sort((a, b) => b[1] - a[1]);
    incompatBox.replaceChildren(byReason.length ?
      h('div', null,
        h('ul', {class: 'plain'}, byReason.map(([r, n]) => h('li', {'data-testid': 'incompat-reason', 'data-reason': r},
          h('strong', null, String(n)), ' ', h('code', null, r), incompatExplained[r] ? h('span', {class: 'muted'}, ` — ${incompatExplained[r]}`) : null))),
        h('p', null, link(uiPath('devices') + '?compat=incompatible', 'List the incompatible devices'),
          h('span', NEEDS_OPERATOR, ' · ', link(uiPath('campaigns', 'new') + '?compat=incompatible', 'Upgrade them with a campaign')))) :
      h('p', {class: 'empty'}, 'Every device is compatible.'));

    const fl = health.flagged_firmware || [];
    flagged.value.textContent = String(fl.length);
    flaggedBox.replaceChildren(fl.length ?
      h('ul', {class: 'cards-list'}, fl.map((v) => {
        const ev = v.evidence || {};
        return h('li', {'data-testid': 'flagged-row'},
          h('div', {class: 'row-head'},
            h('strong', null, `${v.model} ${v.firmware}`), ' ', h('span', {class: 'badge bad'}, v.flag),
            v.decision ? h('span', {class: 'badge'}, v.decision) : h('span', {class: 'badge'}, 'learned')),
          ev.evidence ? h('p', {class: 'evidence'}, ev.evidence) : null,
          !ev.evidence && ev.devices !== undefined ? h('p', {class: 'muted small'},
            `${fmtNum(ev.rate)} ping-related disconnects per device-hour against a baseline of ${fmtNum(ev.fleet_rate)} (the other firmware); ` +
            `${ev.ping_disconnects} disconnects over ${fmtNum(ev.device_hours)} device-hours on ${ev.devices} devices.`) : null,
          h('p', {class: 'small'},
            link(uiPath('devices') + `?model=${encodeURIComponent(v.model)}&firmware=${encodeURIComponent(v.firmware)}`, 'Devices'),
            h('span', NEEDS_OPERATOR, ' · ', link(uiPath('campaigns', 'new') + `?model=${encodeURIComponent(v.model)}&compat=incompatible`, 'Upgrade them'))));
      })) :
      h('p', {class: 'empty'}, 'No firmware is flagged.'));

    const fp = health.flapping || [];
    flapping.value.textContent = String(fp.length);
    flappingBox.replaceChildren(fp.length ?
      table(['Device', 'Sessions', 'Mostly ends with'], fp.map((d) => h('tr', {'data-testid': 'flapping-row'},
        h('td', null, link(devicePath(d.id), d.id)),
        h('td', {class: 'num'}, String(d.sessions)),
        h('td', null, reasonLabel(d.dominant_reason)))), {class: 'compact'}) :
      h('p', {class: 'empty'}, 'No device is flapping.'));
  }

  async function load() {
    const hl = await api('GET', '/fleet/health', undefined, {signal: ctx.signal});
    if (!ctx.alive()) return;
    health = hl;
    setCounts(hl.devices);
    problem.replaceChildren();
    updated.textContent = `Fleet health as of ${fmtTime(new Date())}`;
    drawCounts();
    drawReasons();
    drawLists();
  }

  const reload = () => {
    loadActivity();
    return load().catch((err) => {
      if (ctx.alive() && err.name !== 'AbortError') problem.replaceChildren(errorBox(err));
    });
  };

  drawActivity();
  loadActivity();
  links.load();
  await load();

  // A presence event moves the counts at once; fleet health is read again
  // after a burst (at most once per 2 s while events keep coming) to
  // correct the estimate and refresh the tables.
  // The history is read again with it (the numbers always come from
  // fleetd), and every minute so that the chart moves on.
  const resync = settle(reload, 2000);
  ctx.onDispose(resync.cancel);
  ctx.on('presence', () => {
    drawCounts();
    resync();
    links.soon();
  });
  ctx.on('open', () => {
    reload();
    links.load();
  });
  ctx.every(60_000, loadActivity);
  ctx.refresh = () => {
    reload();
    links.load();
  };
  periodSelect.addEventListener('change', () => {
    period = periodSelect.value;
    drawReasons();
  });
  activityPeriod.addEventListener('change', () => {
    activity = null;
    activityError = null;
    drawActivity();
    loadActivity();
  });
  const ro = new ResizeObserver(debounce(() => ctx.alive() && (drawActivity(), drawReasons(), links.draw()), 150));
  ro.observe(root);
  ctx.onDispose(() => ro.disconnect());
}
