// fleetd web console: a single page application over the REST API, with
// history routing under /ui/ (fleetd serves index.html for every route).

import {h, errorBox} from './lib/dom.js';
import {api, principal, viaToken, signInWithPassword, signInWithToken, resume, forget, signOut as endSession, onUnauthorized,
  onForbidden} from './lib/api.js';
import {applyRole, can, principalLabel} from './lib/role.js';
import {live, subscribe, startLive, stopLive, reconnectNow} from './lib/live.js';
import {navigate, setRenderer} from './lib/nav.js';
import {overviewView} from './views/overview.js';
import {devicesView, deviceView} from './views/devices.js';
import {firmwareView} from './views/firmware.js';
import {campaignsView, campaignNewView, campaignView} from './views/campaigns.js';
import {bulksView, bulkNewView, bulkView} from './views/bulk.js';
import {usersView} from './views/users.js';
import {keysView} from './views/keys.js';
import {webhooksView, webhookView} from './views/webhooks.js';
import {auditView} from './views/audit.js';

// routes: the nav entry, the path, the view and the role the page needs
// (the API refuses a lower one; the page says so instead of failing).
const routes = [
  ['overview', /^\/$/, overviewView, 'viewer'],
  ['devices', /^\/devices\/?$/, devicesView, 'viewer'],
  ['devices', /^\/devices\/([^/]+)\/?$/, deviceView, 'viewer'],
  ['firmware', /^\/firmware\/?$/, firmwareView, 'viewer'],
  ['campaigns', /^\/campaigns\/?$/, campaignsView, 'viewer'],
  ['campaigns', /^\/campaigns\/new\/?$/, campaignNewView, 'operator'],
  ['campaigns', /^\/campaigns\/([^/]+)\/?$/, campaignView, 'viewer'],
  ['commands', /^\/commands\/?$/, bulksView, 'viewer'],
  ['commands', /^\/commands\/new\/?$/, bulkNewView, 'operator'],
  ['commands', /^\/commands\/([^/]+)\/?$/, bulkView, 'viewer'],
  ['users', /^\/users\/?$/, usersView, 'admin'],
  ['keys', /^\/keys\/?$/, keysView, 'admin'],
  ['webhooks', /^\/webhooks\/?$/, webhooksView, 'admin'],
  ['webhooks', /^\/webhooks\/([^/]+)\/?$/, webhookView, 'admin'],
  ['audit', /^\/audit\/?$/, auditView, 'admin'],
];

const main = document.getElementById('main');
const top = document.getElementById('top');
const banner = document.getElementById('banner');
const liveEl = document.getElementById('live');
const whoEl = document.getElementById('whoami');
const signoutButton = document.getElementById('signout');

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
  if (!principal()) {
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
  let need = 'viewer';
  let params = [];
  for (const [n, re, v, role] of routes) {
    const m = re.exec(path);
    if (m) {
      name = n;
      view = v;
      need = role;
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
  if (!can(need)) {
    const p = principal();
    ctx.title('Not allowed');
    ctx.root.append(h('h1', null, 'Not allowed'),
      h('p', {'data-testid': 'needs-role', 'data-needs-role': need}, 'This page needs the ', h('strong', null, need),
        ' role; you are signed in as ', principalLabel(p), ' (', p.role, '). ',
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

// renderSignIn shows the sign-in page: a user's name and password (a
// console session), or, folded away, the break-glass admin token.
function renderSignIn(message = '') {
  if (current) {
    current.dispose();
    current = null;
  }
  top.hidden = true;
  applyRole();
  document.title = 'Sign in · fleetd';

  const name = h('input', {type: 'text', id: 'signin-name', name: 'username', autocomplete: 'username', spellcheck: 'false',
    autocapitalize: 'none', required: true, 'data-testid': 'signin-name'});
  const password = h('input', {type: 'password', id: 'signin-password', name: 'password', autocomplete: 'current-password',
    required: true, 'data-testid': 'signin-password'});
  const err = h('p', {class: 'signin-error', role: 'alert', 'data-testid': 'signin-error', hidden: !message}, message);
  const button = h('button', {type: 'submit', class: 'btn primary', 'data-testid': 'signin-submit'}, 'Sign in');
  const form = h('form', {class: 'signin-form', 'data-testid': 'signin', novalidate: true},
    h('label', {for: 'signin-name'}, 'User name'), name,
    h('label', {for: 'signin-password'}, 'Password'), password,
    err, button);
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    err.hidden = false;
    if (!name.value.trim() || !password.value) {
      err.textContent = 'Enter your user name and password.';
      (name.value.trim() ? password : name).focus();
      return;
    }
    button.disabled = true;
    err.textContent = 'Signing in…';
    try {
      await signInWithPassword(name.value.trim(), password.value);
      password.value = '';
      signedIn();
    } catch (ex) {
      err.textContent = ex.status === 401 ? 'Wrong user name or password.' :
        ex.status === 429 ? `Too many failed sign-ins: ${ex.message}${ex.retryAfter ? ` (in ${ex.retryAfter} s)` : ''}.` : `Cannot sign in: ${ex.message}`;
      button.disabled = false;
      password.select();
    }
  });

  const tokenInput = h('input', {type: 'password', id: 'signin-token', name: 'token', autocomplete: 'off', spellcheck: 'false',
    required: true, 'data-testid': 'signin-token', 'aria-describedby': 'signin-token-help'});
  const tokenErr = h('p', {class: 'signin-error', role: 'alert', 'data-testid': 'signin-token-error', hidden: true});
  const tokenButton = h('button', {type: 'submit', class: 'btn', 'data-testid': 'signin-token-submit'}, 'Sign in with the token');
  const tokenForm = h('form', {class: 'signin-form', 'data-testid': 'signin-token-form', novalidate: true},
    h('label', {for: 'signin-token'}, 'Break-glass admin token'),
    tokenInput,
    h('p', {class: 'help', id: 'signin-token-help'}, 'For recovery when no admin can sign in: the token is in ',
      h('code', null, 'DATA_DIR/admin-token'), ' (or FLEETD_ADMIN_TOKEN) and has every right. It is kept in this browser tab only and sent with every request.'),
    tokenErr, tokenButton);
  tokenForm.addEventListener('submit', async (e) => {
    e.preventDefault();
    const t = tokenInput.value.trim();
    tokenErr.hidden = false;
    if (!t) {
      tokenErr.textContent = 'Enter the admin token.';
      return;
    }
    tokenButton.disabled = true;
    tokenErr.textContent = 'Checking…';
    try {
      await signInWithToken(t);
      tokenInput.value = '';
      signedIn();
    } catch (ex) {
      tokenErr.textContent = ex.status === 401 ? `invalid token: fleetd refused it (${ex.message}).` :
        ex.status === 429 ? `Too many failed attempts: ${ex.message}${ex.retryAfter ? ` (in ${ex.retryAfter} s)` : ''}.` : `Cannot sign in: ${ex.message}`;
      tokenButton.disabled = false;
      tokenInput.select();
    }
  });
  const breakGlass = h('details', {class: 'breakglass', 'data-testid': 'signin-breakglass'},
    h('summary', {'data-testid': 'signin-use-token'}, 'Sign in with the break-glass admin token instead'), tokenForm);
  breakGlass.addEventListener('toggle', () => breakGlass.open && tokenInput.focus());

  main.replaceChildren(h('div', {class: 'signin-wrap'},
    h('div', {class: 'signin card'}, h('h1', null, h('span', {class: 'brand'}, 'fleetd'), ' console'), form, breakGlass)));
  name.focus();
}

function showServer(info) {
  const el = document.getElementById('server-info');
  el.textContent = info ? `${info.node || ''}${info.version ? ' · ' + info.version : ''}` : '';
  el.title = info && info.started_at ? `fleetd ${info.version || ''} on ${info.node || '?'}, started ${info.started_at}` : '';
}

// showWho says in the header who is signed in, with their role.
function showWho() {
  const p = principal();
  if (!p) {
    whoEl.replaceChildren();
    whoEl.removeAttribute('data-role');
    return;
  }
  whoEl.dataset.role = p.role;
  whoEl.dataset.kind = p.kind;
  whoEl.replaceChildren(h('span', {class: 'who-name', 'data-testid': 'whoami-name'}, p.kind === 'bootstrap' ? 'break-glass token' : principalLabel(p)), ' ',
    h('span', {class: 'badge role', 'data-testid': 'whoami-role'}, p.role));
  whoEl.title = p.kind === 'bootstrap' ? 'Signed in with the break-glass admin token' :
    `Signed in as ${p.kind} ${p.name} (${p.id}), role ${p.role}`;
}

function signedIn() {
  applyRole();
  showWho();
  startLive();
  render();
  api('GET', '/server').then(showServer, (err) => {
    if (err.status !== 401) showBanner(`Cannot read the server information: ${err.message}`);
  });
}

function leave(message) {
  stopLive();
  showServer(null);
  showWho();
  renderSignIn(message);
}

// signOut ends the session on fleetd (DELETE /session) and returns to the
// sign-in page.
async function signOut() {
  signoutButton.disabled = true;
  try {
    const err = await endSession();
    leave(err ? `Signed out in this browser, but fleetd could not be told (${err.message}); the session ends when it expires.` : 'Signed out.');
  } finally {
    signoutButton.disabled = false;
  }
}

// A refused credential (401) returns to the sign-in page: the session
// expired or was signed out elsewhere, the token changed.
onUnauthorized((e) => {
  if (!principal()) return;
  const tokenUsed = viaToken();
  forget();
  leave(tokenUsed ? `invalid token: fleetd refused the token (${e.message}). Sign in again.` :
    `Your session has ended (${e.message}). Sign in again.`);
});

// A call refused for the role (403) reads the principal again: an admin
// may have changed it since sign-in. The controls follow the new role at
// once; the page is drawn again when it changed.
let checkingRole = false;
onForbidden(async () => {
  const before = principal();
  if (!before || checkingRole) return;
  checkingRole = true;
  try {
    const p = await resume();
    if (!p) {
      leave('Your session has ended. Sign in again.');
      return;
    }
    if (p.role !== before.role) {
      applyRole();
      showWho();
      showBanner(`Your role is now ${p.role}: the console shows what it may do.`);
      render({scroll: false});
    }
  } catch (err) {
    console.warn('re-read the principal after a 403', err);
  } finally {
    checkingRole = false;
  }
});

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
signoutButton.addEventListener('click', signOut);
setRenderer(render);

// start finds the credential a reload left (the session cookie or the
// tab's token, with GET /me); without one it shows the sign-in page.
async function start() {
  let p;
  try {
    p = await resume();
  } catch (err) {
    renderSignIn(`Cannot reach fleetd: ${err.message}`);
    return;
  }
  if (!p) {
    renderSignIn();
    return;
  }
  signedIn();
}

start();
