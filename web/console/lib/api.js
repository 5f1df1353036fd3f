// The REST API client. The admin token lives in this tab's sessionStorage
// only (never in a URL, never in localStorage) and goes with every call as
// "Authorization: Bearer <token>".

const TOKEN_KEY = 'fleetd.adminToken';
export const API = '/api/v1';

export function token() {
  try {
    return sessionStorage.getItem(TOKEN_KEY) || '';
  } catch {
    return '';
  }
}

export function setToken(t) {
  sessionStorage.setItem(TOKEN_KEY, t);
}

export function clearToken() {
  try {
    sessionStorage.removeItem(TOKEN_KEY);
  } catch {
    // storage disabled: nothing to clear
  }
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

// unauthorized is called when the API refuses the token (401): app.js signs
// the operator out.
let unauthorized = () => {};
export function onUnauthorized(f) {
  unauthorized = f;
}

export function reportUnauthorized(e) {
  unauthorized(e);
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
// instead of the stored one and does not sign out on 401 (the sign-in page).
export async function api(method, path, body, {signal, auth} = {}) {
  const headers = {Authorization: 'Bearer ' + (auth ?? token()), Accept: 'application/json'};
  const init = {method, headers, signal, cache: 'no-store', credentials: 'omit'};
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
    if (res.status === 401 && auth === undefined) unauthorized(e);
    throw e;
  }
  if (res.status === 204 || !text) return null;
  try {
    return JSON.parse(text);
  } catch {
    throw new APIError(res.status, 'bad_response', `fleetd answered ${method} ${path} with something that is not JSON`);
  }
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
    xhr.setRequestHeader('Authorization', 'Bearer ' + token());
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
      reject(e);
    };
    xhr.onerror = () => reject(new APIError(0, 'network', 'the upload was cut off: cannot reach fleetd'));
    xhr.onabort = () => reject(new APIError(0, 'aborted', 'upload cancelled'));
    xhr.send(file);
  });
  return {done, abort: () => xhr.abort()};
}
