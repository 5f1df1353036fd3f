// The fleet's disconnects by radio link, a card of the overview: per WiFi
// channel and per access point, each one's disconnects per device-hour
// against the rest of the fleet's (GET /fleet/links), the ones the policy
// flags highlighted, and whether link or firmware problems dominate.

import {h, table, fmtNum, errorBox, badge, settle} from '../lib/dom.js';
import {api, qs} from '../lib/api.js';

const windows = [['3600', 'last hour'], ['86400', 'last 24 hours'], ['604800', 'last 7 days']];

// Rows shown before "Show all".
const SHOWN = 10;

const causeLabels = {
  weak_signal: 'weak signal',
  roaming: 'roaming',
  congested_channel: 'congested channel',
  bad_access_point: 'bad access point',
  firmware: 'firmware',
  unexplained: 'unexplained',
};

// Causes that are not the radio link's.
const notLink = new Set(['firmware', 'unexplained']);

// rank is what rows are sorted by: the ratio to the rest of the fleet; a row
// with disconnects whose rest has none (no finite ratio) comes first.
function rank(r) {
  if (typeof r.ratio === 'number' && isFinite(r.ratio)) return r.ratio;
  return r.disconnects > 0 ? Infinity : 0;
}

export function sortByRatio(rows) {
  return [...(rows || [])].sort((a, b) => rank(b) - rank(a) || (b.disconnects || 0) - (a.disconnects || 0));
}

function ratioCell(r, max) {
  const v = rank(r);
  const bar = h('span', {class: 'ratio-bar'});
  bar.style.width = `${Math.round((isFinite(v) ? Math.min(1, v / max) : 1) * 100)}%`;
  return h('td', {class: 'num ratio', title: 'disconnects per device-hour against the rest of the fleet'},
    h('span', {class: 'ratio-track', 'aria-hidden': 'true'}, bar),
    isFinite(v) ? `× ${fmtNum(v, 1)}` : r.disconnects > 0 ? 'only here' : '—');
}

function fmtHours(v) {
  if (typeof v !== 'number' || !isFinite(v)) return '—';
  return v.toFixed(v < 0.1 ? 3 : v < 10 ? 2 : 1);
}

function maxRatio(rows) {
  return Math.max(1, ...rows.map(rank).filter(isFinite));
}

function causeList(causes) {
  return Object.entries(causes).filter(([, n]) => n > 0)
    .sort((a, b) => b[1] - a[1]).map(([k, n]) => `${causeLabels[k] || k.replaceAll('_', ' ')} ${n}`);
}

// dominantText says which explains more of the window's lost sessions:
// the radio link (weak signal, roaming, a congested channel, a bad access
// point) or the firmware.
function dominantText(d, period) {
  const c = d.causes || {};
  const fw = c.firmware || 0;
  const linkCauses = Object.fromEntries(Object.entries(c).filter(([k]) => !notLink.has(k)));
  const link = Object.values(linkCauses).reduce((n, v) => n + (v || 0), 0);
  const links = causeList(linkCauses);
  const rest = c.unexplained ? ` ${c.unexplained} lost session${c.unexplained === 1 ? '' : 's'} have neither explanation.` : '';
  switch (d.dominant) {
    case 'link':
      return `The radio link explains most lost sessions over the ${period}: ${links.join(', ')}, against ${fw} for firmware. ` +
        'Look at the flagged channels and access points before the firmware.' + rest;
    case 'firmware':
      return `Firmware explains most lost sessions over the ${period}: ${fw}, against ${link} for the radio link` +
        (links.length ? ` (${links.join(', ')})` : '') + '. See the flagged firmware and the devices\' diagnoses.' + rest;
    default:
      return `Neither the radio link nor firmware explains the lost sessions over the ${period}` +
        (link ? ` (${links.join(', ')})` : '') + '.' + rest;
  }
}

// linksCard returns the card, its load (GET /fleet/links), soon (a load at
// most every 10 s while presence events keep coming) and draw (on resize).
export function linksCard(ctx) {
  let data = null;
  let error = null;
  let seq = 0;
  const showAll = {channels: false, aps: false};
  const windowSelect = h('select', {'aria-label': 'Links period', 'data-testid': 'links-window', value: '86400'},
    windows.map(([v, t]) => h('option', {value: v}, t)));
  const body = h('div', {'data-testid': 'links'});
  const el = h('section', {class: 'card', 'data-testid': 'links-card'},
    h('div', {class: 'card-head'}, h('h2', null, 'Disconnects by radio link'), windowSelect),
    body);

  const period = () => (windows.find(([v]) => v === windowSelect.value) || windows[1])[1];

  function more(key, n) {
    if (n <= SHOWN) return null;
    return h('button', {type: 'button', class: 'btn small ghost', 'data-testid': `links-more-${key}`, onclick: () => {
      showAll[key] = !showAll[key];
      draw();
    }}, showAll[key] ? 'Show fewer' : `Show all ${n}`);
  }

  function channelsTable(rows) {
    const max = maxRatio(rows);
    const shown = showAll.channels ? rows : rows.slice(0, SHOWN);
    return h('div', null,
      h('h3', null, 'By channel'),
      rows.length ? table(['Channel', 'Against the rest', 'Disconnects', 'Per device-hour', 'Device-hours', 'Devices now'],
        shown.map((r) => h('tr', {'data-testid': 'link-channel-row', 'data-channel': r.channel, 'data-flagged': String(!!r.congested),
          class: r.congested ? 'flagged' : null},
        h('td', null, h('strong', null, String(r.channel)), r.band ? h('span', {class: 'muted small'}, ` ${r.band} GHz`) : null,
          r.access_points ? h('span', {class: 'muted small'}, ` · ${r.access_points} AP${r.access_points === 1 ? '' : 's'}`) : null,
          r.congested ? [' ', badge('congested', 'bad')] : null),
        ratioCell(r, max),
        h('td', {class: 'num'}, String(r.disconnects)),
        h('td', {class: 'num'}, fmtNum(r.per_device_hour)),
        h('td', {class: 'num'}, fmtHours(r.device_hours)),
        h('td', {class: 'num'}, String(r.devices)))), {class: 'compact', 'data-testid': 'links-channels'}) :
        h('p', {class: 'empty'}, 'No device reported its channel.'),
      more('channels', rows.length));
  }

  function apsTable(rows) {
    const max = maxRatio(rows);
    const shown = showAll.aps ? rows : rows.slice(0, SHOWN);
    return h('div', null,
      h('h3', null, 'By access point'),
      rows.length ? table(['Access point', 'Model', 'Against the same model', 'Disconnects', 'Per device-hour', 'Device-hours', 'Devices now'],
        shown.map((r) => h('tr', {'data-testid': 'link-ap-row', 'data-bssid': r.bssid, 'data-flagged': String(!!r.bad),
          class: r.bad ? 'flagged' : null},
        h('td', null, h('code', null, r.bssid), r.ssid || r.channel ? h('span', {class: 'muted small'},
          ' ' + [r.ssid, r.channel ? `channel ${r.channel}` : ''].filter(Boolean).join(' · ')) : null,
          r.bad ? [' ', badge('bad access point', 'bad')] : null),
        h('td', {class: 'nowrap'}, r.model || '—'),
        ratioCell(r, max),
        h('td', {class: 'num'}, String(r.disconnects)),
        h('td', {class: 'num'}, fmtNum(r.per_device_hour)),
        h('td', {class: 'num'}, fmtHours(r.device_hours)),
        h('td', {class: 'num'}, String(r.devices)))), {class: 'compact', 'data-testid': 'links-aps'}) :
        h('p', {class: 'empty'}, 'No device reported its access point.'),
      more('aps', rows.length));
  }

  function draw() {
    if (error) {
      body.replaceChildren(error.status === 404 ?
        h('p', {class: 'empty', 'data-testid': 'links-unavailable'}, 'This fleetd does not break disconnects down by link (GET /api/v1/fleet/links is not served).') :
        errorBox(error));
      return;
    }
    if (!data) {
      body.replaceChildren(h('p', {class: 'muted small'}, 'Loading…'));
      return;
    }
    const channels = sortByRatio(data.channels);
    const aps = sortByRatio(data.access_points);
    const weak = typeof data.weak_rssi_dbm === 'number' ? ` A signal below ${data.weak_rssi_dbm} dBm counts as weak.` : '';
    body.replaceChildren(
      h('p', {class: `links-dominant ${data.dominant || 'none'}`, 'data-testid': 'links-dominant', 'data-dominant': data.dominant || 'none'},
        dominantText(data, period())),
      !channels.length && !aps.length ?
        h('p', {class: 'empty', 'data-testid': 'links-empty'}, `No device reported its channel or access point over the ${period()}: ` +
          'devices report them in their telemetry (channel, bssid).') :
        h('div', {class: 'links-tables'}, channelsTable(channels), apsTable(aps)),
      h('p', {class: 'caption'}, `Devices that reported a channel or an access point in their telemetry, over the ${period()}, ` +
        'sorted by their lost sessions per device-hour against those of the rest of the fleet (for an access point, devices of the same model on other access points); ' +
        'sessions a weak signal or a roam explains do not count against the channel or access point. ' +
        'Highlighted rows are above the policy\'s thresholds.' + weak));
  }

  async function load() {
    const my = ++seq;
    try {
      const d = await api('GET', '/fleet/links' + qs({window: windowSelect.value}), undefined, {signal: ctx.signal});
      if (!ctx.alive() || my !== seq) return;
      data = d;
      error = null;
    } catch (err) {
      if (!ctx.alive() || my !== seq || err.name === 'AbortError') return;
      error = err;
    }
    draw();
  }

  windowSelect.addEventListener('change', () => {
    data = null;
    draw();
    load();
  });
  const soon = settle(load, 10_000);
  ctx.onDispose(soon.cancel);
  ctx.every(60_000, load);
  draw();
  return {el, load, soon, draw};
}
