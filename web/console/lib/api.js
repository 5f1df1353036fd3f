// The REST API client, the one place the console's calls go through. It
// holds the credential:
//
//   - a console session (the normal way): POST /session sets the HttpOnly
//     cookie fleetd_session, which the browser sends with every same-origin
//     request; the session's CSRF token is kept in memory only (GET /me
//     gives it again after a reload) and goes with every state-changing
//     call as X-CSRF-Token;
//   - or the break-glass admin token: kept in this tab's sessionStorage
//     (never in a URL, never in localStorage) and sent as
//     "Authorization: Bearer <token>".
//
// principal() is who is signed in ({kind, id, name, role}), null before.

const TOKEN_KEY = 'fleetd.adminToken';
export const API = '/api/v1';
export const CSRF_HEADER = 'X-CSRF-Token';

let csrf = '';
let who = null;

export function token() {
  try {
    return sessionStorage.getItem(TOKEN_KEY) || '';
  } catch {
    return '';
  }
}

function setToken(t) {
  sessionStorage.setItem(TOKEN_KEY, t);
}

function clearToken() {
  try {
    sessionStorage.removeItem(TOKEN_KEY);
  } catch {
    // storage disabled: nothing to clear
  }
}

// principal is who is signed in, or null.
export function principal() {
  return who;
}

// viaToken is whether the break-glass token is the credential (not a
// session cookie).
export function viaToken() {
  return !!token();
}

const safeMethod = (m) => m === 'GET' || m === 'HEAD';

// authHeaders are the credential headers of a call: the bearer token
// (tok, or the stored one), else the session's CSRF token on a
// state-changing call (the cookie goes by itself).
export function authHeaders(method, tok) {
  const t = tok ?? token();
  if (t) return {Authorization: 'Bearer ' + t};
  if (csrf && !safeMethod(method)) return {[CSRF_HEADER]: csrf};
  return {};
}

// APIError is an error answer of the API, {"error":{"code","message","field"}},
// or a network failure (code "network", status 0).
export class APIError extends Error {
  constructor(status, code, message, field) {
    super(message);
    this.name = 'APIError';
    this.status = status;
    this.code = code;
    this.field = field || '';
  }
}

// unauthorized is called when the API refuses the credential (401): the
// session expired or was ended, the token changed. app.js returns to the
// sign-in page.
let unauthorized = () => {};
export function onUnauthorized(f) {
  unauthorized = f;
}

export function reportUnauthorized(e) {
  unauthorized(e);
}

// forbidden is called when the API refuses a call for the principal's role
// (403 forbidden): the role may have changed since sign-in, and app.js
// reads it again.
let forbidden = () => {};
export function onForbidden(f) {
  forbidden = f;
}

export function errorFromBody(status, text, statusText) {
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    // not JSON: a proxy's page, say
  }
  const e = (data && data.error) || {};
  const msg = e.message || (text && text.length < 300 ? text.trim() : '') || statusText || `HTTP ${status}`;
  return new APIError(status, e.code || `http_${status}`, msg, e.field);
}

// api calls an endpoint under /api/v1 and returns the decoded JSON answer
// (null for 204). It throws an APIError. With {auth: tok} it tries that token
// instead of the stored credential; with {auth} or {quiet: true} a 401 does
// not sign out (the sign-in page, the check at start).
export async function api(method, path, body, {signal, auth, quiet = false} = {}) {
  const headers = {...authHeaders(method, auth), Accept: 'application/json'};
  const init = {method, headers, signal, cache: 'no-store', credentials: 'same-origin'};
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(API + path, init);
  } catch (err) {
    if (err && err.name === 'AbortError') throw err;
    throw new APIError(0, 'network', `${method} ${API}${path.split('?')[0]} failed (${err && err.message ? err.message : err}): check that fleetd is running and reachable.`);
  }
  const text = await res.text();
  if (!res.ok) {
    const e = errorFromBody(res.status, text, res.statusText);
    e.retryAfter = Number(res.headers.get('Retry-After')) || 0; // seconds, on a 429
    if (res.status === 401 && auth === undefined && !quiet) unauthorized(e);
    if (res.status === 403 && e.code === 'forbidden' && auth === undefined && !quiet) forbidden(e);
    throw e;
  }
  if (res.status === 204 || !text) return null;
  try {
    return JSON.parse(text);
  } catch {
    throw new APIError(res.status, 'bad_response', `fleetd answered ${method} ${path} with something that is not JSON`);
  }
}

// signInWithPassword opens a console session (POST /session): fleetd sets
// the cookie and answers with the principal and the CSRF token. A
// break-glass token left in the tab is dropped.
export async function signInWithPassword(name, password) {
  const r = await api('POST', '/session', {name, password}, {auth: ''});
  clearToken();
  who = r.principal;
  csrf = r.csrf_token || '';
  return who;
}

// signInWithToken checks the break-glass token (GET /me with it) and keeps
// it for this tab.
export async function signInWithToken(t) {
  const r = await api('GET', '/me', undefined, {auth: t});
  setToken(t);
  who = r.principal;
  csrf = '';
  return who;
}

// resume finds the credential a reload left: the tab's token, or the
// session cookie (GET /me answers with the session's CSRF token). It
// resolves to the principal, or null when there is none (401); other
// errors are thrown.
export async function resume() {
  try {
    const r = await api('GET', '/me', undefined, {quiet: true});
    who = r.principal;
    csrf = viaToken() ? '' : r.csrf_token || '';
    return who;
  } catch (err) {
    if (err.status === 401) {
      forget();
      return null;
    }
    throw err;
  }
}

// forget drops the credential held in the page (after a 401: the server
// has already refused it).
export function forget() {
  clearToken();
  who = null;
  csrf = '';
}

// signOut ends the console session (DELETE /session: fleetd forgets it and
// clears the cookie) and forgets the credential. The break-glass token is
// only dropped from the tab. A failure to reach fleetd is returned, not
// thrown: the page forgets the credential anyway.
export async function signOut() {
  let err = null;
  if (!viaToken() && who) {
    try {
      await api('DELETE', '/session', undefined, {quiet: true});
    } catch (e) {
      if (e.status !== 401) err = e;
    }
  }
  forget();
  return err;
}

// qs builds a query string from the non-empty values of params.
export function qs(params) {
  const u = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== '' && v !== null && v !== undefined) u.set(k, String(v));
  }
  const s = u.toString();
  return s ? '?' + s : '';
}

export const enc = encodeURIComponent;

// upload sends a file as the raw body of POST path with XMLHttpRequest,
// whose upload events give a progress bar (fetch has none). onProgress gets
// (sent, total). It resolves to the decoded answer; abort() cancels.
export function upload(path, file, onProgress) {
  const xhr = new XMLHttpRequest();
  const done = new Promise((resolve, reject) => {
    xhr.open('POST', API + path);
    for (const [k, v] of Object.entries(authHeaders('POST'))) xhr.setRequestHeader(k, v);
    xhr.setRequestHeader('Content-Type', 'application/octet-stream');
    xhr.setRequestHeader('Accept', 'application/json');
    xhr.upload.onprogress = (e) => onProgress(e.loaded, e.lengthComputable ? e.total : file.size);
    xhr.onload = () => {
      if (xhr.status >= 200 && xhr.status < 300) {
        try {
          resolve(JSON.parse(xhr.responseText));
        } catch {
          resolve(null);
        }
        return;
      }
      const e = errorFromBody(xhr.status, xhr.responseText, xhr.statusText);
      if (xhr.status === 401) unauthorized(e);
      if (xhr.status === 403 && e.code === 'forbidden') forbidden(e);
      reject(e);
    };
    xhr.onerror = () => reject(new APIError(0, 'network', 'the upload was cut off: cannot reach fleetd'));
    xhr.onabort = () => reject(new APIError(0, 'aborted', 'upload cancelled'));
    xhr.send(file);
  });
  return {done, abort: () => xhr.abort()};
}
