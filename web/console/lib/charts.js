// Charts drawn as inline SVG: the last hour's connects and disconnects, the
// disconnect reasons by firmware × protocol, a device's connection timeline,
// and campaign progress bars. Each is sized to its container's width when
// drawn (the views redraw on resize).

import {h, svg, fmtClock, fmtDuration, fmtTime, protoName} from './dom.js';
import {live} from './live.js';

// Disconnect reasons keep one colour everywhere (charts, legends, tables).
export const reasonColors = {
  online: '#2e9d55',
  client_disconnect: '#8a94a6',
  keepalive_timeout: '#e39b1b',
  protocol_error: '#d64545',
  connection_lost: '#7d5bd0',
  session_takeover: '#d6509b',
  auth_failed: '#9b2c2c',
  tls_handshake_failed: '#a259d9',
  decommissioned: '#3b3f46',
  throttled: '#1d9bb5',
  packet_too_large: '#e06a2b',
  server_shutdown: '#3a78d4',
  acl_denied: '#b7791f',
  rejected: '#c05621',
  unknown: '#b9c0cc',
};

const extraColors = ['#5b8def', '#c2410c', '#0f766e', '#a16207', '#be185d', '#4d7c0f'];

export function reasonColor(r) {
  if (reasonColors[r]) return reasonColors[r];
  let n = 0;
  for (const c of String(r)) n = (n * 31 + c.charCodeAt(0)) >>> 0;
  return extraColors[n % extraColors.length];
}

export function swatch(color) {
  const s = h('span', {class: 'swatch', 'aria-hidden': 'true'});
  s.style.background = color;
  return s;
}

export function reasonLabel(r) {
  return h('span', {class: 'reason', 'data-reason': r}, swatch(reasonColor(r)), r || 'unknown');
}

// legend lists reasons with their colours.
export function legend(reasons, attrs = {}) {
  return h('ul', {class: 'legend', ...attrs}, reasons.map(([key, label]) =>
    h('li', {'data-reason': key}, swatch(reasonColor(key)), label || key)));
}

function niceMax(v) {
  if (v <= 5) return Math.max(1, Math.ceil(v));
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

// activityChart: connects (up) and disconnects (down, coloured by reason)
// per minute over the last hour, as counted from the live stream. Minutes
// before the stream opened, or while it was down, are shaded as "no live
// data": fleetd's API has no per-minute history to fill them with.
export function activityChart(width, now = Date.now()) {
  const W = Math.max(280, Math.floor(width));
  const H = 200;
  const ml = 44;
  const mr = 10;
  const mt = 12;
  const mb = 26;
  const pw = W - ml - mr;
  const ph = H - mt - mb;
  const mid = mt + ph / 2;
  const nowMin = Math.floor(now / 60_000);
  const first = nowMin - 59;
  const winStart = first * 60_000;
  const bw = pw / 60;
  let max = 1;
  for (let m = first; m <= nowMin; m++) {
    const b = live.bins.get(m);
    if (b) max = Math.max(max, b.connect, b.disconnect);
  }
  max = niceMax(max);
  const scale = (ph / 2 - 2) / max;
  const xOf = (t) => ml + ((t - winStart) / 60_000) * bw;
  const root = svg('svg', {width: W, height: H, viewBox: `0 0 ${W} ${H}`, class: 'chart', role: 'img',
    'aria-label': 'Connects and disconnects per minute over the last hour, from the live stream'});

  const noData = [];
  const since = live.since || now;
  if (since > winStart) noData.push([winStart, Math.min(since, now)]);
  for (const g of live.gaps) noData.push([Math.max(g.from, winStart), g.to || now]);
  for (const [a, b] of noData) {
    if (b <= a) continue;
    const x = xOf(a);
    const w = Math.max(1, xOf(b) - x);
    root.append(svg('rect', {x, y: mt, width: w, height: ph, class: 'nodata'},
      svg('title', null, `${fmtClock(a, false)}–${fmtClock(b, false)}: no live data (the page was not listening)`)));
    if (w > 110) {
      root.append(svg('text', {x: x + w / 2, y: mt + 14, class: 'nodata-label', 'text-anchor': 'middle'}, 'no live data'));
    }
  }

  for (const f of [1, 0.5]) {
    for (const s of [-1, 1]) {
      const y = mid + s * f * max * scale;
      root.append(svg('line', {x1: ml, x2: W - mr, y1: y, y2: y, class: 'grid'}));
    }
  }
  root.append(svg('text', {x: ml - 6, y: mid - max * scale + 4, class: 'axis', 'text-anchor': 'end'}, String(max)));
  root.append(svg('text', {x: ml - 6, y: mid + 4, class: 'axis', 'text-anchor': 'end'}, '0'));
  root.append(svg('text', {x: ml - 6, y: mid + max * scale + 4, class: 'axis', 'text-anchor': 'end'}, String(max)));
  root.append(svg('text', {x: ml + 4, y: mt + 10, class: 'axis-note'}, '▲ connects'));
  root.append(svg('text', {x: ml + 4, y: H - mb - 4, class: 'axis-note'}, '▼ disconnects'));

  for (let m = first; m <= nowMin; m++) {
    const b = live.bins.get(m);
    if (!b || (!b.connect && !b.disconnect)) continue;
    const x = xOf(m * 60_000) + 0.5;
    const w = Math.max(1, bw - 1);
    const parts = Object.entries(b.reasons).sort((a, c) => c[1] - a[1]);
    const g = svg('g', {class: 'minute'}, svg('title', null,
      `${fmtClock(m * 60_000, false)}: ${b.connect} connect${b.connect === 1 ? '' : 's'}, ${b.disconnect} disconnect${b.disconnect === 1 ? '' : 's'}` +
      (parts.length ? ' (' + parts.map(([r, n]) => `${r} ${n}`).join(', ') + ')' : '')));
    if (b.connect) {
      const hgt = b.connect * scale;
      g.append(svg('rect', {x, y: mid - hgt, width: w, height: hgt, fill: reasonColors.online}));
    }
    let y = mid;
    for (const [r, n] of parts) {
      const hgt = n * scale;
      g.append(svg('rect', {x, y, width: w, height: hgt, fill: reasonColor(r)}));
      y += hgt;
    }
    root.append(g);
  }
  root.append(svg('line', {x1: ml, x2: W - mr, y1: mid, y2: mid, class: 'zero'}));
  const every = pw < 420 ? 20 : 10;
  for (let m = first; m <= nowMin + 1; m++) {
    if (m % every !== 0) continue;
    const x = xOf(m * 60_000);
    root.append(svg('line', {x1: x, x2: x, y1: H - mb, y2: H - mb + 4, class: 'tick'}));
    root.append(svg('text', {x, y: H - 8, class: 'axis', 'text-anchor': 'middle'}, fmtClock(m * 60_000, false)));
  }
  return root;
}

// groupDisconnects turns fleet/health's cells into one row per firmware ×
// protocol, most disconnects first.
export function groupDisconnects(cells) {
  const groups = new Map();
  for (const c of cells || []) {
    const key = `${c.firmware}\u0000${c.protocol_version}`;
    let g = groups.get(key);
    if (!g) {
      g = {firmware: c.firmware, protocol: c.protocol_version, total: 0, reasons: []};
      groups.set(key, g);
    }
    g.total += c.count;
    g.reasons.push([c.reason, c.count]);
  }
  const out = [...groups.values()].sort((a, b) => b.total - a.total || String(a.firmware).localeCompare(String(b.firmware)));
  for (const g of out) g.reasons.sort((a, b) => b[1] - a[1]);
  return out;
}

// reasonsChart draws one horizontal bar per firmware × protocol, split by
// disconnect reason.
export function reasonsChart(groups, width) {
  const W = Math.max(280, Math.floor(width));
  const label = W < 480 ? 110 : 170;
  const row = 26;
  const top = 4;
  const right = 48;
  const H = top + groups.length * row + 4;
  const max = Math.max(1, ...groups.map((g) => g.total));
  const pw = W - label - right;
  const root = svg('svg', {width: W, height: H, viewBox: `0 0 ${W} ${H}`, class: 'chart', role: 'img',
    'aria-label': 'Disconnects by firmware and protocol version, split by reason'});
  groups.forEach((g, i) => {
    const y = top + i * row;
    const name = `${g.firmware || 'unknown'} · ${g.protocol ? 'v' + g.protocol : '?'}`;
    root.append(svg('text', {x: label - 8, y: y + row / 2 + 4, class: 'bar-label', 'text-anchor': 'end'},
      name, svg('title', null, `firmware ${g.firmware || 'unknown'}, ${protoName(g.protocol)}`)));
    let x = label;
    for (const [r, n] of g.reasons) {
      const w = (n / max) * pw;
      root.append(svg('rect', {x, y: y + 4, width: Math.max(1, w), height: row - 8, fill: reasonColor(r), 'data-reason': r},
        svg('title', null, `firmware ${g.firmware || 'unknown'}, ${protoName(g.protocol)}: ${r} × ${n}`)));
      x += w;
    }
    root.append(svg('text', {x: x + 6, y: y + row / 2 + 4, class: 'bar-value'}, String(g.total)));
  });
  return root;
}

const tickSteps = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 172800, 604800]
  .map((s) => s * 1000);

// buildSessions turns a device's events into sessions, connect to
// disconnect, matched by session epoch so that a takeover's late disconnect
// closes the old session, not the new one. It also returns the refused
// attempts and the firmware changes (births) as marks.
export function buildSessions(events, device, now = Date.now()) {
  const asc = [...events].sort((a, b) => Date.parse(a.at) - Date.parse(b.at));
  const open = new Map();
  const sessions = [];
  const marks = [];
  let lastFirmware = '';
  for (const e of asc) {
    const t = Date.parse(e.at);
    const epoch = e.session_epoch || 0;
    switch (e.kind) {
      case 'connect': {
        const s = {start: t, end: null, epoch, connect: e, reason: null, detail: ''};
        open.set(epoch, s);
        sessions.push(s);
        break;
      }
      case 'disconnect': {
        let s = open.get(epoch);
        if (!s) {
          s = {start: null, end: t, epoch, connect: null};
          sessions.push(s);
        }
        open.delete(epoch);
        s.end = t;
        s.reason = e.reason || 'unknown';
        s.detail = e.detail || '';
        s.disconnect = e;
        break;
      }
      case 'refused':
      case 'acl_denied':
      case 'rejected':
        marks.push({t, kind: e.kind, reason: e.kind === 'refused' ? e.reason || 'unknown' : e.kind, e});
        break;
      case 'birth':
        if (e.firmware && e.firmware !== lastFirmware) {
          if (lastFirmware) marks.push({t, kind: 'firmware', reason: 'firmware', e, from: lastFirmware});
          lastFirmware = e.firmware;
        }
        break;
    }
  }
  const byStart = sessions.filter((s) => s.start !== null).sort((a, b) => a.start - b.start);
  for (const s of open.values()) {
    if (device && device.online && s.epoch === device.session_epoch) {
      s.end = now;
      s.reason = 'online';
      s.ongoing = true;
    } else {
      const next = byStart.find((o) => o.start > s.start);
      s.end = next ? next.start : s.start;
      s.reason = 'unknown';
      s.unknownEnd = true;
    }
  }
  return {sessions, marks};
}

// timeline draws sessions as bars from connect to disconnect, coloured by
// how they ended, over [from, to]; refused attempts are marks below.
export function timeline({sessions, marks}, from, to, width) {
  const W = Math.max(280, Math.floor(width));
  const ml = 8;
  const mr = 8;
  const pw = W - ml - mr;
  const laneY = 10;
  const laneH = 26;
  const markY = laneY + laneH + 10;
  const hasMarks = marks.some((m) => m.t >= from && m.t <= to);
  const axisY = hasMarks ? markY + 18 : laneY + laneH + 8;
  const H = axisY + 22;
  const span = Math.max(1, to - from);
  const xOf = (t) => ml + ((Math.min(Math.max(t, from), to) - from) / span) * pw;
  const root = svg('svg', {width: W, height: H, viewBox: `0 0 ${W} ${H}`, class: 'chart timeline', role: 'img',
    'aria-label': 'Connection timeline: sessions from connect to disconnect, coloured by disconnect reason'});
  root.append(svg('rect', {x: ml, y: laneY, width: pw, height: laneH, class: 'lane'}));
  for (const s of sessions) {
    const start = s.start === null ? from : s.start;
    if (s.end < from || start > to) continue;
    const x1 = xOf(start);
    const x2 = xOf(s.end);
    const w = Math.max(2, x2 - x1);
    const c = s.connect || {};
    const lines = [
      s.start === null ? `connected before ${fmtTime(from)}` : `connected ${fmtTime(s.start)}`,
      s.ongoing ? `still online (${fmtDuration(s.end - s.start)})` :
        s.unknownEnd ? 'end not recorded' :
          `disconnected ${fmtTime(s.end)}${s.start !== null ? ` after ${fmtDuration(s.end - s.start)}` : ''}: ${s.reason}${s.detail ? ' — ' + s.detail : ''}`,
    ];
    if (c.protocol_version) lines.push(`${protoName(c.protocol_version)}, keepalive ${c.keepalive_effective || c.keepalive_requested || '?'} s`);
    if (c.firmware) lines.push(`firmware ${c.firmware}`);
    if (s.disconnect && s.disconnect.pings !== undefined) lines.push(`${s.disconnect.pings} PINGREQ in the session`);
    root.append(svg('rect', {x: x1, y: laneY + 2, width: w, height: laneH - 4, rx: 2, fill: reasonColor(s.reason),
      class: 'tl-bar', 'data-testid': 'timeline-bar', 'data-reason': s.reason},
    svg('title', null, lines.join('\n'))));
    if (!s.ongoing && !s.unknownEnd && x2 - x1 > 4) {
      root.append(svg('line', {x1: x2 - 0.5, x2: x2 - 0.5, y1: laneY, y2: laneY + laneH, class: 'tl-end'}));
    }
  }
  if (hasMarks) {
    for (const m of marks) {
      if (m.t < from || m.t > to) continue;
      const x = xOf(m.t);
      const title = m.kind === 'firmware' ? `${fmtTime(m.t)}: firmware ${m.from} → ${m.e.firmware}` :
        `${fmtTime(m.t)}: ${m.kind} ${m.reason}${m.e.detail ? ' — ' + m.e.detail : ''}`;
      const shape = m.kind === 'firmware' ?
        svg('rect', {x: x - 4, y: markY, width: 8, height: 8, transform: `rotate(45 ${x} ${markY + 4})`, class: 'mark-firmware'}) :
        svg('path', {d: `M${x - 5},${markY + 9} L${x},${markY} L${x + 5},${markY + 9} Z`, fill: reasonColor(m.reason)});
      root.append(svg('g', {class: 'tl-mark', 'data-testid': 'timeline-mark', 'data-reason': m.reason}, shape, svg('title', null, title)));
    }
  }
  root.append(svg('line', {x1: ml, x2: W - mr, y1: axisY, y2: axisY, class: 'tick'}));
  const maxTicks = Math.max(2, Math.floor(pw / 90));
  const step = tickSteps.find((s) => span / s <= maxTicks) || tickSteps[tickSteps.length - 1];
  const withSeconds = step < 60_000;
  const withDate = span > 86_400_000;
  for (let t = Math.ceil(from / step) * step; t <= to; t += step) {
    const x = xOf(t);
    root.append(svg('line', {x1: x, x2: x, y1: axisY, y2: axisY + 4, class: 'tick'}));
    const d = new Date(t);
    const label = withDate ? `${d.getMonth() + 1}/${d.getDate()} ${fmtClock(d, false)}` : fmtClock(d, withSeconds);
    // Labels at the edges are anchored inward so that they are not cut.
    const anchor = x < ml + 30 ? 'start' : x > W - mr - 30 ? 'end' : 'middle';
    root.append(svg('text', {x: anchor === 'start' ? Math.max(x, 1) : anchor === 'end' ? Math.min(x, W - 1) : x, y: axisY + 16, class: 'axis', 'text-anchor': anchor}, label));
  }
  return root;
}

// jobSplit splits a stage's by_state counts for a progress bar.
export function jobSplit(count) {
  const bs = (count && count.by_state) || {};
  const inflight = ['dispatched', 'downloading', 'verifying', 'installing', 'rebooting'].reduce((n, k) => n + (bs[k] || 0), 0);
  return {
    targets: (count && count.targets) || 0,
    succeeded: bs.succeeded || 0,
    failed: bs.failed || 0,
    timedOut: bs.timed_out || 0,
    inflight,
    pending: bs.pending || 0,
  };
}

// progressBar shows a stage's jobs: succeeded, failed, timed out, in flight,
// pending, out of its targets.
export function progressBar(count, attrs = {}) {
  const s = jobSplit(count);
  const bar = h('div', {class: 'progress', role: 'img', ...attrs,
    'data-targets': s.targets, 'data-succeeded': s.succeeded, 'data-failed': s.failed + s.timedOut, 'data-inflight': s.inflight});
  const seg = (n, cls, label) => {
    if (!n || !s.targets) return;
    const el = h('div', {class: `seg ${cls}`, title: `${n} ${label}`});
    el.style.width = `${(n / s.targets) * 100}%`;
    bar.append(el);
  };
  seg(s.succeeded, 'ok', 'succeeded');
  seg(s.failed, 'bad', 'failed');
  seg(s.timedOut, 'late', 'timed out');
  seg(s.inflight, 'busy', 'in flight');
  const parts = [`${s.succeeded}/${s.targets} succeeded`];
  if (s.failed) parts.push(`${s.failed} failed`);
  if (s.timedOut) parts.push(`${s.timedOut} timed out`);
  if (s.inflight) parts.push(`${s.inflight} in flight`);
  if (s.pending) parts.push(`${s.pending} pending`);
  bar.setAttribute('aria-label', parts.join(', '));
  return {bar, text: parts.join(' · '), split: s};
}
