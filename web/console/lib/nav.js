// Client-side navigation: history.pushState and a re-render, no reload.

let renderer = () => {};

export function setRenderer(f) {
  renderer = f;
}

// navigate shows url (a path under /ui/) without reloading the page.
export function navigate(url, {replace = false} = {}) {
  if (replace) history.replaceState(null, '', url);
  else history.pushState(null, '', url);
  renderer({scroll: !replace});
}

// setQuery records a view's state (filters) in the address bar without a
// re-render, so that reload and back keep it.
export function setQuery(params) {
  const u = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v) u.set(k, v);
  const s = u.toString();
  history.replaceState(null, '', location.pathname + (s ? '?' + s : ''));
}
