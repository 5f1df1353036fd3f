// Charts drawn as inline SVG: the fleet's connects and disconnects over time
// (from fleetd's history), the disconnect reasons by firmware × protocol, a
// device's connection timeline and a metric of its telemetry on the same
// time axis, and campaign progress bars. Each is sized to its container's
// width when drawn (the views redraw on resize).

import {h, svg, fmtClock, fmtDuration, fmtTime, fmtNum, protoName} from './dom.js';

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

// Bucket sizes of the series fleetd returns, by name.
export const stepMs = {'1m': 60_000, '5m': 300_000, '1h': 3_600_000, '1d': 86_400_000};

const tickSteps = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 172800, 604800]
  .map((s) => s * 1000);

// timeAxis maps [from, to] onto the plot area of a chart width pixels wide.
// A device's telemetry chart and its connection timeline are drawn on one
// axis, so that an instant has the same x in both. Each chart built on it
// carries the mapping as data-from, data-to (ms), data-ml and data-pw (px).
export function timeAxis(from, to, width, {ml = 46, mr = 10} = {}) {
  const W = Math.max(280, Math.floor(width));
  const pw = W - ml - mr;
  const span = Math.max(1, to - from);
  const xOf = (t) => ml + ((Math.min(Math.max(t, from), to) - from) / span) * pw;
  const tOf = (x) => from + ((Math.min(Math.max(x, ml), ml + pw) - ml) / pw) * span;
  return {W, ml, mr, pw, from, to, span, xOf, tOf};
}

function axisAttrs(a) {
  return {'data-from': a.from, 'data-to': a.to, 'data-ml': a.ml, 'data-pw': a.pw};
}

// timeTicks picks round instants over the axis, at most one per 90 px.
function timeTicks(a) {
  const maxTicks = Math.max(2, Math.floor(a.pw / 90));
  const step = tickSteps.find((s) => a.span / s <= maxTicks) || tickSteps[tickSteps.length - 1];
  const ticks = [];
  for (let t = Math.ceil(a.from / step) * step; t <= a.to; t += step) ticks.push(t);
  return {step, ticks};
}

function fmtTick(t, step, span) {
  const d = new Date(t);
  if (span > 86_400_000) return `${d.getMonth() + 1}/${d.getDate()} ${fmtClock(d, false)}`;
  return fmtClock(d, step < 60_000);
}

// drawTimeAxis draws the time ticks and their labels along y.
function drawTimeAxis(root, a, y) {
  root.append(svg('line', {x1: a.ml, x2: a.W - a.mr, y1: y, y2: y, class: 'tick'}));
  const {step, ticks} = timeTicks(a);
  for (const t of ticks) {
    const x = a.xOf(t);
    root.append(svg('line', {x1: x, x2: x, y1: y, y2: y + 4, class: 'tick'}));
    // Labels at the edges are anchored inward so that they are not cut.
    const anchor = x < a.ml + 30 ? 'start' : x > a.W - a.mr - 30 ? 'end' : 'middle';
    root.append(svg('text', {x: anchor === 'start' ? Math.max(x, 1) : anchor === 'end' ? Math.min(x, a.W - 1) : x, y: y + 16,
      class: 'axis', 'text-anchor': anchor}, fmtTick(t, step, a.span)));
  }
}

function sum(counts) {
  let n = 0;
  for (const v of Object.values(counts || {})) n += v;
  return n;
}

// historyTotals adds up a fleet history: connects, disconnects and refused
// attempts, and each by reason.
export function historyTotals(hist) {
  const t = {connects: 0, disconnects: 0, refused: 0, disconnectsBy: {}, refusedBy: {}};
  for (const b of (hist && hist.buckets) || []) {
    t.connects += b.connects || 0;
    for (const [r, n] of Object.entries(b.disconnects || {})) {
      t.disconnects += n;
      t.disconnectsBy[r] = (t.disconnectsBy[r] || 0) + n;
    }
    for (const [r, n] of Object.entries(b.refused || {})) {
      t.refused += n;
      t.refusedBy[r] = (t.refusedBy[r] || 0) + n;
    }
  }
  return t;
}

function bucketLabel(t, step) {
  const end = t + step;
  if (step >= 3_600_000) {
    const d = new Date(t);
    return `${d.getMonth() + 1}/${d.getDate()} ${fmtClock(d, false)}–${fmtClock(end, false)}`;
  }
  return `${fmtClock(t, false)}–${fmtClock(end, false)}`;
}

const byCount = (a, b) => b[1] - a[1] || String(a[0]).localeCompare(String(b[0]));

// historyChart draws GET /fleet/history, one bar per bucket: connection
// attempts up (accepted in green, refused ones in their reason's colour,
// lighter) and disconnects down, stacked by reason. Each bucket with events
// is a group carrying its counts (data-at, data-connects, data-disconnects,
// data-refused).
export function historyChart(hist, width) {
  const from = Date.parse(hist.from);
  const to = Date.parse(hist.to);
  const a = timeAxis(from, to, width, {ml: 44, mr: 10});
  const H = 200;
  const mt = 12;
  const mb = 26;
  const ph = H - mt - mb;
  const mid = mt + ph / 2;
  const buckets = hist.buckets || [];
  const step = stepMs[hist.step] || (buckets.length ? (to - from) / buckets.length : 60_000);
  let max = 1;
  for (const b of buckets) max = Math.max(max, (b.connects || 0) + sum(b.refused), sum(b.disconnects));
  max = niceMax(max);
  const scale = (ph / 2 - 2) / max;
  const root = svg('svg', {width: a.W, height: H, viewBox: `0 0 ${a.W} ${H}`, class: 'chart', role: 'img',
    'data-testid': 'history-svg', 'data-step': hist.step, 'data-buckets': buckets.length, ...axisAttrs(a),
    'aria-label': `Connects, refused attempts and disconnects per ${hist.step} bucket, from fleetd's history`});

  for (const f of [1, 0.5]) {
    for (const s of [-1, 1]) {
      const y = mid + s * f * max * scale;
      root.append(svg('line', {x1: a.ml, x2: a.W - a.mr, y1: y, y2: y, class: 'grid'}));
    }
  }
  root.append(svg('text', {x: a.ml - 6, y: mid - max * scale + 4, class: 'axis', 'text-anchor': 'end'}, String(max)));
  root.append(svg('text', {x: a.ml - 6, y: mid + 4, class: 'axis', 'text-anchor': 'end'}, '0'));
  root.append(svg('text', {x: a.ml - 6, y: mid + max * scale + 4, class: 'axis', 'text-anchor': 'end'}, String(max)));
  root.append(svg('text', {x: a.ml + 4, y: mt + 10, class: 'axis-note'}, '▲ connects (and refused attempts)'));
  root.append(svg('text', {x: a.ml + 4, y: H - mb - 4, class: 'axis-note'}, '▼ disconnects'));

  for (const b of buckets) {
    const t = Date.parse(b.at);
    const connects = b.connects || 0;
    const dis = Object.entries(b.disconnects || {}).filter(([, n]) => n > 0).sort(byCount);
    const ref = Object.entries(b.refused || {}).filter(([, n]) => n > 0).sort(byCount);
    const nd = dis.reduce((n, [, c]) => n + c, 0);
    const nr = ref.reduce((n, [, c]) => n + c, 0);
    if (!connects && !nd && !nr) continue;
    const x1 = a.xOf(t);
    const bw = a.xOf(t + step) - x1;
    // Narrow bars touch; wider ones keep a pixel between them.
    const x = bw >= 3 ? x1 + 0.5 : x1;
    const w = Math.max(1, bw >= 3 ? bw - 1 : bw);
    const lines = [`${bucketLabel(t, step)}: ${connects} connect${connects === 1 ? '' : 's'}, ${nd} disconnect${nd === 1 ? '' : 's'}` +
      (dis.length ? ' (' + dis.map(([r, n]) => `${r} ${n}`).join(', ') + ')' : '')];
    if (nr) lines.push(`${nr} refused (${ref.map(([r, n]) => `${r} ${n}`).join(', ')})`);
    const g = svg('g', {class: 'bucket', 'data-testid': 'history-bucket', 'data-at': t,
      'data-connects': connects, 'data-disconnects': nd, 'data-refused': nr}, svg('title', null, lines.join('\n')));
    let y = mid;
    if (connects) {
      const hgt = connects * scale;
      y -= hgt;
      g.append(svg('rect', {x, y, width: w, height: hgt, fill: reasonColors.online}));
    }
    for (const [r, n] of ref) {
      const hgt = n * scale;
      y -= hgt;
      g.append(svg('rect', {x, y, width: w, height: hgt, fill: reasonColor(r), class: 'refused', 'data-reason': r}));
    }
    y = mid;
    for (const [r, n] of dis) {
      const hgt = n * scale;
      g.append(svg('rect', {x, y, width: w, height: hgt, fill: reasonColor(r), 'data-reason': r}));
      y += hgt;
    }
    root.append(g);
  }
  root.append(svg('line', {x1: a.ml, x2: a.W - a.mr, y1: mid, y2: mid, class: 'zero'}));
  drawTimeAxis(root, a, H - mb);
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
// how they ended, on the axis a; refused attempts are marks below. Each bar
// carries its session's instants (data-start, data-end, ms).
export function timeline({sessions, marks}, a) {
  const {W, from, to, xOf} = a;
  const laneY = 10;
  const laneH = 26;
  const markY = laneY + laneH + 10;
  const hasMarks = marks.some((m) => m.t >= from && m.t <= to);
  const axisY = hasMarks ? markY + 18 : laneY + laneH + 8;
  const H = axisY + 22;
  const root = svg('svg', {width: W, height: H, viewBox: `0 0 ${W} ${H}`, class: 'chart timeline', role: 'img',
    'data-testid': 'timeline-svg', ...axisAttrs(a),
    'aria-label': 'Connection timeline: sessions from connect to disconnect, coloured by disconnect reason'});
  root.append(svg('rect', {x: a.ml, y: laneY, width: a.pw, height: laneH, class: 'lane'}));
  root.append(svg('text', {x: a.ml - 6, y: laneY + laneH / 2 + 4, class: 'axis-note', 'text-anchor': 'end'}, 'link'));
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
      class: 'tl-bar', 'data-testid': 'timeline-bar', 'data-reason': s.reason, 'data-start': start, 'data-end': s.end,
      'data-ongoing': s.ongoing ? 'true' : null},
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
      root.append(svg('g', {class: 'tl-mark', 'data-testid': 'timeline-mark', 'data-reason': m.reason, 'data-t': m.t}, shape, svg('title', null, title)));
    }
  }
  drawTimeAxis(root, a, axisY);
  return root;
}

// niceTicks covers [lo, hi] with about n round steps.
function niceTicks(lo, hi, n = 4) {
  const raw = (hi - lo) / n;
  const p = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * p).find((s) => s >= raw) || 10 * p;
  const a = Math.floor(lo / step) * step;
  const b = Math.ceil(hi / step) * step;
  const ticks = [];
  for (let v = a; v <= b + step / 1e6; v += step) ticks.push(Number(v.toFixed(10)));
  return {lo: a, hi: b, ticks};
}

// seriesPoints turns a telemetry series into what seriesChart draws: one
// point per raw value, or per bucket at its middle (t), with the bucket's
// min and max.
export function seriesPoints(series) {
  const step = stepMs[series.step] || 0;
  const out = [];
  for (const p of series.points || []) {
    const at = Date.parse(p.at);
    if (!isFinite(at) || typeof p.value !== 'number') continue;
    const rolled = typeof p.count === 'number';
    out.push({t: at + step / 2, at, v: p.value, lo: rolled ? p.min : p.value, hi: rolled ? p.max : p.value,
      n: rolled ? p.count : 1, last: rolled ? p.last : p.value});
  }
  return out;
}

// visiblePoints are the points of a series that fall on the axis: raw
// points inside it, buckets that overlap it, drawn at their middle or, for
// a bucket still filling up (or cut by the axis), at the axis's edge.
export function visiblePoints(series, a) {
  const step = stepMs[series.step] || 0;
  return seriesPoints(series)
    .filter((p) => (step ? p.at + step > a.from && p.at <= a.to : p.t >= a.from && p.t <= a.to))
    .map((p) => ({...p, t: Math.min(Math.max(p.t, a.from), a.to)}));
}

// seriesChart draws one metric of a device on the axis of its connection
// timeline: raw values joined by a line, or per-bucket means with each
// bucket's min–max shaded. The line breaks where the device was silent and
// at each disconnect, drawn as a vertical line in its reason's colour, so
// that a drop in the metric and the disconnect it caused line up. Each
// point is a circle carrying its instant and value (data-t, data-value)
// while there are at most 600.
export function seriesChart(series, a, {sessions = []} = {}) {
  const step = stepMs[series.step] || 0;
  const pts = visiblePoints(series, a);
  const ends = sessions.filter((s) => !s.ongoing && !s.unknownEnd && s.end >= a.from && s.end <= a.to);
  const mt = 8;
  const ph = 112;
  const H = mt + ph + 8;
  let lo = pts.length ? Math.min(...pts.map((p) => p.lo)) : 0;
  let hi = pts.length ? Math.max(...pts.map((p) => p.hi)) : 1;
  if (lo === hi) {
    lo -= 1;
    hi += 1;
  }
  const yt = niceTicks(lo, hi, 4);
  const yOf = (v) => mt + ph - ((v - yt.lo) / (yt.hi - yt.lo)) * ph;
  const root = svg('svg', {width: a.W, height: H, viewBox: `0 0 ${a.W} ${H}`, class: 'chart series', role: 'img',
    'data-testid': 'telemetry-svg', 'data-metric': series.metric, 'data-step': series.step || 'raw', 'data-points': pts.length, ...axisAttrs(a),
    'aria-label': `${series.metric} over time, on the same time axis as the connection timeline`});
  for (const t of timeTicks(a).ticks) {
    const x = a.xOf(t);
    root.append(svg('line', {x1: x, x2: x, y1: mt, y2: mt + ph, class: 'grid'}));
  }
  for (const v of yt.ticks) {
    const y = yOf(v);
    root.append(svg('line', {x1: a.ml, x2: a.W - a.mr, y1: y, y2: y, class: 'grid'}));
    root.append(svg('text', {x: a.ml - 6, y: y + 4, class: 'axis', 'text-anchor': 'end'}, fmtNum(v, 1)));
  }
  root.append(svg('rect', {x: a.ml, y: mt, width: a.pw, height: ph, class: 'frame'}));

  // The line breaks at a silence longer than three typical intervals (raw)
  // or a missing bucket, and at a disconnect.
  let gap = step * 1.5;
  if (!step) {
    const d = [];
    for (let i = 1; i < pts.length; i++) d.push(pts[i].t - pts[i - 1].t);
    d.sort((x, y) => x - y);
    gap = Math.max(5_000, 3 * (d.length ? d[Math.floor(d.length / 2)] : 0));
  }
  const segments = [];
  let seg = [];
  for (const p of pts) {
    const prev = seg[seg.length - 1];
    if (prev && (p.t - prev.t > gap || ends.some((s) => s.end > prev.t && s.end <= p.t))) {
      segments.push(seg);
      seg = [];
    }
    seg.push(p);
  }
  if (seg.length) segments.push(seg);
  const xy = (p, v) => `${a.xOf(p.t).toFixed(2)},${yOf(v).toFixed(2)}`;
  for (const s of segments) {
    if (step && s.some((p) => p.hi !== p.lo)) {
      const band = [...s.map((p) => xy(p, p.hi)), ...[...s].reverse().map((p) => xy(p, p.lo))];
      root.append(svg('polygon', {points: band.join(' '), class: 'band'}));
    }
    if (s.length > 1) root.append(svg('path', {d: 'M' + s.map((p) => xy(p, p.v)).join(' L'), class: 'series-line'}));
  }
  for (const s of ends) {
    const x = a.xOf(s.end);
    root.append(svg('line', {x1: x, x2: x, y1: mt, y2: mt + ph, class: 'tel-disconnect', stroke: reasonColor(s.reason),
      'data-testid': 'telemetry-disconnect', 'data-t': s.end, 'data-reason': s.reason},
    svg('title', null, `${fmtTime(s.end)}: disconnected, ${s.reason}`)));
  }
  if (pts.length <= 600) {
    const r = pts.length > 200 ? 1.5 : 2.5;
    for (const p of pts) {
      const title = step ?
        `${fmtTime(p.at)} (${series.step}): mean ${fmtNum(p.v)}, min ${fmtNum(p.lo)}, max ${fmtNum(p.hi)}, last ${fmtNum(p.last)}, ${p.n} point${p.n === 1 ? '' : 's'}` :
        `${fmtTime(p.t)}: ${fmtNum(p.v)}`;
      root.append(svg('circle', {cx: a.xOf(p.t).toFixed(2), cy: yOf(p.v).toFixed(2), r, class: 'pt',
        'data-testid': 'telemetry-point', 'data-t': p.t, 'data-value': p.v}, svg('title', null, title)));
    }
  }
  return root;
}

// crosshair follows the pointer over the charts in container that are
// drawn on one time axis (axis() returns it): a vertical line at the same
// instant in each, and describe(t) written in readout.
export function crosshair(container, axis, readout, describe) {
  const hide = () => {
    for (const l of container.querySelectorAll('line.cursor')) l.remove();
    readout.textContent = '';
  };
  container.addEventListener('pointermove', (e) => {
    const a = axis();
    const s = e.target.closest && e.target.closest('svg.chart');
    if (!a || !s) return hide();
    const r = s.getBoundingClientRect();
    const x = (e.clientX - r.left) * (a.W / (r.width || a.W));
    if (x < a.ml || x > a.ml + a.pw) return hide();
    for (const c of container.querySelectorAll('svg.chart[data-from]')) {
      let line = c.querySelector('line.cursor');
      if (!line) {
        line = svg('line', {class: 'cursor', y1: 0, y2: c.getAttribute('height')});
        c.append(line);
      }
      line.setAttribute('x1', x);
      line.setAttribute('x2', x);
    }
    readout.textContent = describe(a.tOf(x));
  });
  container.addEventListener('pointerleave', hide);
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
