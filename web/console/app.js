// fleetd web console: a single page application over the REST API, with
// history routing under /ui/ (fleetd serves index.html for every route).

import {h, errorBox} from './lib/dom.js';
import {api, token, setToken, clearToken, onUnauthorized} from './lib/api.js';
import {live, subscribe, startLive, stopLive, reconnectNow} from './lib/live.js';
import {navigate, setRenderer} from './lib/nav.js';
import {overviewView} from './views/overview.js';
import {devicesView, deviceView} from './views/devices.js';
import {firmwareView} from './views/firmware.js';
import {campaignsView, campaignNewView, campaignView} from './views/campaigns.js';
import {bulksView, bulkNewView, bulkView} from './views/bulk.js';

const routes = [
  ['overview', /^\/$/, overviewView],
  ['devices', /^\/devices\/?$/, devicesView],
  ['devices', /^\/devices\/([^/]+)\/?$/, deviceView],
  ['firmware', /^\/firmware\/?$/, firmwareView],
  ['campaigns', /^\/campaigns\/?$/, campaignsView],
  ['campaigns', /^\/campaigns\/new\/?$/, campaignNewView],
  ['campaigns', /^\/campaigns\/([^/]+)\/?$/, campaignView],
  ['commands', /^\/commands\/?$/, bulksView],
  ['commands', /^\/commands\/new\/?$/, bulkNewView],
  ['commands', /^\/commands\/([^/]+)\/?$/, bulkView],
];

const main = document.getElementById('main');
const top = document.getElementById('top');
const banner = document.getElementById('banner');
const liveEl = document.getElementById('live');

// current is the view on screen: leaving it aborts its requests and drops
// its live subscriptions and timers.
let current = null;

function routePath() {
  let p = location.pathname;
  if (p === '/ui' || p.startsWith('/ui/')) p = p.slice(3);
  return p || '/';
}

function newContext() {
  const ctrl = new AbortController();
  const disposers = [];
  const ctx = {
    root: h('div', {class: 'view'}),
    signal: ctrl.signal,
    refresh: null, // called every 15 s while the live stream is down
    alive: () => !ctrl.signal.aborted,
    on(type, f) {
      disposers.push(subscribe((ev) => {
        if (ev.type === type && ctx.alive()) f(ev.data);
      }));
    },
    every(ms, f) {
      const t = setInterval(() => ctx.alive() && f(), ms);
      disposers.push(() => clearInterval(t));
    },
    onDispose(f) {
      disposers.push(f);
    },
    title(t) {
      document.title = t ? `${t} · fleetd` : 'fleetd';
    },
    dispose() {
      ctrl.abort();
      for (const d of disposers.splice(0)) d();
    },
  };
  return ctx;
}

async function render({scroll = true} = {}) {
  if (!token()) {
    renderSignIn();
    return;
  }
  if (location.pathname === '/' || location.pathname === '/ui') {
    history.replaceState(null, '', '/ui/' + location.search);
  }
  if (current) current.dispose();
  const ctx = newContext();
  current = ctx;
  top.hidden = false;
  main.replaceChildren(ctx.root);
  if (scroll) window.scrollTo(0, 0);
  const path = routePath();
  let name = '';
  let view = null;
  let params = [];
  for (const [n, re, v] of routes) {
    const m = re.exec(path);
    if (m) {
      name = n;
      view = v;
      params = m.slice(1).map((p) => {
        try {
          return decodeURIComponent(p);
        } catch {
          return p;
        }
      });
      break;
    }
  }
  for (const a of document.querySelectorAll('[data-nav]')) {
    a.classList.toggle('active', a.dataset.nav === name);
    if (a.dataset.nav === name) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  if (!view) {
    ctx.title('Not found');
    ctx.root.append(h('h1', null, 'Page not found'),
      h('p', null, 'There is no console page at ', h('code', null, location.pathname), '. ',
        h('a', {href: '/ui/', 'data-link': true}, 'Go to the fleet overview'), '.'));
    return;
  }
  try {
    await view(ctx, ...params);
  } catch (err) {
    if (!ctx.alive() || (err && err.name === 'AbortError')) return;
    console.error(err);
    // Below the page's heading, so that it is seen first.
    const box = errorBox(err);
    const head = ctx.root.querySelector('.page-head');
    if (head) head.after(box);
    else ctx.root.prepend(box);
  }
}

function renderSignIn(message = '') {
  if (current) {
    current.dispose();
    current = null;
  }
  top.hidden = true;
  document.title = 'Sign in · fleetd';
  const input = h('input', {type: 'password', id: 'token', name: 'token', autocomplete: 'off', spellcheck: 'false',
    required: true, 'data-testid': 'signin-token', 'aria-describedby': 'signin-help'});
  const err = h('p', {class: 'signin-error', role: 'alert', 'data-testid': 'signin-error', hidden: !message}, message);
  const button = h('button', {type: 'submit', class: 'btn primary', 'data-testid': 'signin-submit'}, 'Sign in');
  const form = h('form', {class: 'signin card', 'data-testid': 'signin', novalidate: true},
    h('h1', null, h('span', {class: 'brand'}, 'fleetd'), ' console'),
    h('label', {for: 'token'}, 'Admin token'),
    input,
    h('p', {class: 'help', id: 'signin-help'}, 'The token is in ', h('code', null, 'DATA_DIR/admin-token'),
      ' (or FLEETD_ADMIN_TOKEN). It is kept in this browser tab only and sent with every request.'),
    err,
    button);
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    const t = input.value.trim();
    err.hidden = false;
    if (!t) {
      err.textContent = 'Enter the admin token.';
      return;
    }
    button.disabled = true;
    err.textContent = 'Checking…';
    try {
      const info = await api('GET', '/server', undefined, {auth: t});
      setToken(t);
      input.value = '';
      signedIn(info);
    } catch (ex) {
      err.textContent = ex.status === 401 ? `invalid token: fleetd refused it (${ex.message}).` : `Cannot sign in: ${ex.message}`;
      button.disabled = false;
      input.select();
    }
  });
  main.replaceChildren(h('div', {class: 'signin-wrap'}, form));
  input.focus();
}

function showServer(info) {
  const el = document.getElementById('server-info');
  el.textContent = info ? `${info.node || ''}${info.version ? ' · ' + info.version : ''}` : '';
  el.title = info && info.started_at ? `fleetd ${info.version || ''} on ${info.node || '?'}, started ${info.started_at}` : '';
}

function signedIn(info) {
  showServer(info);
  startLive();
  render();
}

function signOut(message) {
  stopLive();
  clearToken();
  showServer(null);
  renderSignIn(message);
}

onUnauthorized(() => signOut('invalid token: fleetd refused the token (it may have been changed). Sign in again.'));

// The live status: "live", "connecting", or "live updates unavailable,
// retrying in N s" while the stream is down (the console works without it).
function showLive() {
  const s = live.state;
  liveEl.dataset.state = s;
  if (s === 'live') {
    liveEl.textContent = 'live';
    liveEl.title = 'Receiving live updates from fleetd';
  } else if (s === 'connecting') {
    liveEl.textContent = 'connecting…';
    liveEl.title = 'Opening the live update stream';
  } else if (s === 'down') {
    const secs = Math.max(0, Math.ceil((live.retryAt - Date.now()) / 1000));
    liveEl.textContent = `live updates unavailable, retrying${secs ? ` in ${secs} s` : ''}`;
    liveEl.title = `${live.why}. Pages still work; click to retry now.`;
  } else {
    liveEl.textContent = 'offline';
    liveEl.title = '';
  }
}
subscribe((ev) => ev.type === 'state' && showLive());
liveEl.addEventListener('click', () => live.state === 'down' && reconnectNow());
setInterval(() => live.state === 'down' && showLive(), 1000);

// Without the stream, the view on screen refreshes itself now and then
// (one request per view every 15 s, never a storm).
setInterval(() => {
  if (current && current.refresh && live.state !== 'live' && live.state !== 'off' && document.visibilityState === 'visible') {
    current.refresh();
  }
}, 15_000);

function showBanner(message) {
  banner.replaceChildren(h('span', null, message),
    h('button', {type: 'button', class: 'btn small ghost', onclick: () => (banner.hidden = true)}, 'Dismiss'));
  banner.hidden = false;
}

window.addEventListener('error', (e) => showBanner(`The console hit an error: ${e.message}. Reload the page if it misbehaves.`));
window.addEventListener('unhandledrejection', (e) => {
  const r = e.reason;
  if (r && r.name === 'AbortError') return;
  showBanner(`The console hit an error: ${(r && r.message) || r}.`);
});

document.addEventListener('click', (e) => {
  const a = e.target.closest && e.target.closest('a[data-link]');
  if (!a || e.defaultPrevented || e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;
  const url = new URL(a.href, location.href);
  if (url.origin !== location.origin) return;
  e.preventDefault();
  if (url.pathname + url.search !== location.pathname + location.search) navigate(url.pathname + url.search);
});
window.addEventListener('popstate', () => render({scroll: false}));
document.getElementById('signout').addEventListener('click', () => signOut('Signed out.'));
setRenderer(render);

async function start() {
  if (!token()) {
    renderSignIn();
    return;
  }
  // The stored token is checked once; a refused one shows the sign-in page.
  try {
    signedIn(await api('GET', '/server'));
  } catch (err) {
    if (err.status === 401) return; // onUnauthorized signed out
    showBanner(`Cannot reach fleetd: ${err.message}`);
    startLive();
    render();
  }
}

start();
