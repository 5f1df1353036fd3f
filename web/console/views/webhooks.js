// Webhooks (admin): subscriptions of a URL to notification types. The list
// with each one's state and failures in a row, a new subscription (its
// signing secret shown once), enable or disable, a test notification, and a
// subscription's page with its delivery log: each notification's state and
// every attempt's HTTP status.

import {h, card, table, link, uiPath, dl, fmtTime, badge, errorBox, confirmDialog, orNotFound} from '../lib/dom.js';
import {api, enc} from '../lib/api.js';
import {input, field, localError, onSubmit} from '../lib/form.js';
import {secretDialog} from '../lib/secret.js';

const DELIVERIES = 50;

function stateBadge(w) {
  return w.enabled ? badge('enabled', 'ok', {'data-testid': 'webhook-state', 'data-state': 'enabled'}) :
    badge('disabled', 'off', {'data-testid': 'webhook-state', 'data-state': 'disabled', title: w.disabled_reason || ''});
}

// actions are the buttons of a subscription: enable or disable, send a
// test notification, delete; done(message, err) reports, after which the
// caller reloads.
function actions(w, done, {onDelete} = {}) {
  const toggle = h('button', {type: 'button', class: 'btn small', 'data-testid': w.enabled ? 'webhook-disable' : 'webhook-enable'},
    w.enabled ? 'Disable' : 'Enable');
  toggle.addEventListener('click', async () => {
    toggle.disabled = true;
    try {
      await api('PATCH', '/webhooks/' + enc(w.id), {enabled: !w.enabled});
      done(w.enabled ? `Disabled ${w.url}: nothing is sent to it until it is enabled.` : `Enabled ${w.url}; its failure count starts again.`);
    } catch (err) {
      done('', err);
    }
  });
  const test = h('button', {type: 'button', class: 'btn small', 'data-testid': 'webhook-test', disabled: !w.enabled,
    title: w.enabled ? 'Send a webhook.test notification to this URL only' : 'Enable it first'}, 'Send test');
  test.addEventListener('click', async () => {
    test.disabled = true;
    try {
      const d = await api('POST', `/webhooks/${enc(w.id)}/test`);
      done(`Test notification queued (delivery ${d.id}); its attempts appear in the delivery log.`);
    } catch (err) {
      done('', err);
    }
  });
  const del = h('button', {type: 'button', class: 'btn small ghost danger-text', 'data-testid': 'webhook-delete'}, 'Delete');
  del.addEventListener('click', async () => {
    const ok = await confirmDialog({title: 'Delete this webhook?', danger: true, confirm: 'Delete',
      message: `${w.url} gets no more notifications; its delivery log is removed with it.`});
    if (!ok) return;
    try {
      await api('DELETE', '/webhooks/' + enc(w.id));
      if (onDelete) onDelete();
      else done(`Deleted the webhook to ${w.url}.`);
    } catch (err) {
      done('', err);
    }
  });
  return [toggle, test, del];
}

export async function webhooksView(ctx) {
  ctx.title('Webhooks');
  const listBox = h('div', {'data-testid': 'webhook-list'});
  const problem = h('div');
  const status = h('div', {'data-testid': 'webhook-status'});
  const types = ((await api('GET', '/webhooks/events', undefined, {signal: ctx.signal})) || {}).events || [];
  if (!ctx.alive()) return;

  const url = input('webhook-url', 'url', {type: 'url', placeholder: 'https://hooks.example.com/fleetd'});
  const description = input('webhook-description', 'description', {placeholder: 'on-call channel'});
  const boxes = types.map((t) => h('input', {type: 'checkbox', value: t.type, 'data-testid': 'webhook-event', 'data-type': t.type}));
  const events = h('div', {class: 'events-pick', 'data-field': 'events', tabindex: -1},
    types.map((t, i) => h('label', {class: 'check', title: t.description}, boxes[i], ' ', h('code', null, t.type))));
  const errBox = h('div', {'data-testid': 'webhook-error'});
  const submit = h('button', {type: 'submit', class: 'btn primary', 'data-testid': 'webhook-create'}, 'Add webhook');
  const form = h('form', {class: 'form-grid', 'data-testid': 'webhook-form', novalidate: true},
    field('URL', url, 'http:// or https://, without credentials; fleetd POSTs JSON there'),
    field('Description', description),
    h('div', {class: 'field wide'}, h('span', {class: 'label'}, 'Notifications'), events,
      h('small', null, 'hover a type for what it tells of and what its body carries')),
    h('div', {class: 'form-actions wide'}, submit), h('div', {class: 'wide'}, errBox));

  ctx.root.append(
    h('div', {class: 'page-head'}, h('h1', null, 'Webhooks')),
    card('Add a webhook', h('p', {class: 'muted small'}, 'Each delivery is signed: ', h('code', null, 'X-Fleetd-Signature: t=<unix>,v1=<hex>'),
      ', HMAC-SHA256 with the subscription\'s secret over the timestamp, a dot and the body. The secret is shown once, when the webhook is added.'), form),
    problem, status,
    card('Webhooks', listBox));

  onSubmit(ctx, form, {errBox, button: submit, title: 'fleetd refused the webhook',
    spec: () => {
      if (!url.value.trim()) throw localError('url', 'give the URL to POST to');
      const evs = boxes.filter((b) => b.checked).map((b) => b.value);
      if (!evs.length) throw localError('events', 'choose at least one notification type');
      return {url: url.value.trim(), description: description.value.trim(), events: evs};
    },
    send: async (body) => {
      const w = await api('POST', '/webhooks', body);
      form.reset();
      status.replaceChildren(h('p', {class: 'notice', 'data-testid': 'webhook-created'}, `Added the webhook to ${w.url}.`));
      secretDialog({title: 'Signing secret of the webhook', testid: 'webhook-secret-dialog', valueTestid: 'new-webhook-secret', value: w.secret,
        intro: `The receiver at ${w.url} checks X-Fleetd-Signature with it.`});
      await load();
    }});

  const done = (message, err) => {
    status.replaceChildren(err ? errorBox(err) : h('p', {class: 'notice', 'data-testid': 'webhook-done'}, message));
    reload();
  };

  function row(w) {
    return h('tr', {'data-testid': 'webhook-row', 'data-webhook-id': w.id, 'data-enabled': String(!!w.enabled)},
      h('td', {class: 'detail'}, link(uiPath('webhooks', w.id), w.url), w.description ? h('div', {class: 'muted small'}, w.description) : null),
      h('td', null, (w.events || []).map((t) => h('code', {class: 'tag'}, t))),
      h('td', null, stateBadge(w), w.disabled_reason ? h('div', {class: 'muted small'}, w.disabled_reason) : null),
      h('td', {class: 'num', 'data-testid': 'webhook-failures'}, String(w.consecutive_failures || 0)),
      h('td', {class: 'nowrap'}, fmtTime(w.created_at)),
      h('td', {class: 'nowrap'}, actions(w, done), ' ', link(uiPath('webhooks', w.id), 'Deliveries')));
  }

  async function load() {
    const r = await api('GET', '/webhooks', undefined, {signal: ctx.signal});
    if (!ctx.alive()) return;
    problem.replaceChildren();
    const ws = (r && r.webhooks) || [];
    listBox.replaceChildren(ws.length ? table(['URL', 'Notifications', 'State', 'Failures in a row', 'Created', ''], ws.map(row),
      {'data-testid': 'webhook-table'}) : h('p', {class: 'empty'}, 'No webhook yet.'));
  }
  const reload = () => load().catch((err) => ctx.alive() && err.name !== 'AbortError' && problem.replaceChildren(errorBox(err)));
  ctx.refresh = reload;
  ctx.every(10_000, reload);
  await load();
}

function attemptText(a) {
  return `${a.status ? `HTTP ${a.status}` : 'no answer'}${a.error ? ` (${a.error})` : ''}, ${a.duration_ms} ms, ${fmtTime(a.at)}${a.node ? ` on ${a.node}` : ''}`;
}

const deliveryKind = {delivered: 'ok', failed: 'bad', pending: 'busy'};

export async function webhookView(ctx, id) {
  const path = '/webhooks/' + enc(id);
  const head = h('div', {class: 'page-head'});
  const status = h('div', {'data-testid': 'webhook-status'});
  const facts = h('div');
  const logBox = h('div', {'data-testid': 'delivery-log'});
  const older = h('button', {type: 'button', class: 'btn small ghost', 'data-testid': 'deliveries-older', hidden: true}, 'Older deliveries');
  ctx.root.append(head, status, card('Subscription', facts),
    h('section', {class: 'card'}, h('div', {class: 'card-head'}, h('h2', null, 'Delivery log'), older), logBox));
  let w = null;
  let deliveries = [];

  function draw() {
    ctx.title(`Webhook ${w.url}`);
    head.replaceChildren(
      h('div', null,
        h('p', {class: 'crumbs'}, link(uiPath('webhooks'), 'Webhooks'), ' /'),
        h('h1', {'data-testid': 'webhook-title'}, h('span', {class: 'detail'}, w.url), ' ', stateBadge(w))),
      h('div', {class: 'actions'}, actions(w, done, {onDelete: () => {
        status.replaceChildren();
        ctx.root.replaceChildren(h('h1', null, 'Webhook deleted'), h('p', null, `The webhook to ${w.url} is deleted. `,
          link(uiPath('webhooks'), 'Back to the webhooks')));
      }})));
    facts.replaceChildren(dl([
      ['URL', h('code', null, w.url)],
      ['Description', w.description],
      ['Notifications', (w.events || []).map((t) => h('code', {class: 'tag'}, t))],
      ['State', w.enabled ? 'enabled' : `disabled${w.disabled_at ? ` ${fmtTime(w.disabled_at)}` : ''}${w.disabled_reason ? `: ${w.disabled_reason}` : ''}`],
      ['Failed attempts in a row', String(w.consecutive_failures || 0), 'webhook-failures'],
      ['Created', `${fmtTime(w.created_at)}${w.created_by ? ` by ${w.created_by}` : ''}`],
      ['Updated', fmtTime(w.updated_at)],
    ]));
  }

  function drawLog() {
    logBox.replaceChildren(deliveries.length ? table(['Delivery', 'Notification', 'State', 'Attempts', 'Created', 'Finished'],
      deliveries.map((d) => h('tr', {'data-testid': 'delivery-row', 'data-delivery-id': d.id, 'data-state': d.state, 'data-type': d.type},
        h('td', {class: 'num'}, String(d.id)),
        h('td', null, h('code', null, d.type), h('div', {class: 'muted small'}, `notification ${d.notification_id}`)),
        h('td', null, badge(d.state, deliveryKind[d.state] || '', {'data-testid': 'delivery-state'}),
          d.state === 'pending' && d.next_attempt_at ? h('div', {class: 'muted small'}, `next attempt ${fmtTime(d.next_attempt_at)}`) : null),
        h('td', null, (d.log || []).length ?
          h('ol', {class: 'attempts'}, d.log.map((a) => h('li', {'data-testid': 'delivery-attempt', 'data-status': a.status},
            h('span', {class: a.status >= 200 && a.status < 300 ? '' : 'bad-text'}, attemptText(a))))) :
          h('span', {class: 'muted small'}, d.attempts ? `${d.attempts}` : 'not tried yet')),
        h('td', {class: 'nowrap'}, fmtTime(d.created_at)),
        h('td', {class: 'nowrap'}, d.finished_at ? fmtTime(d.finished_at) : '—'))), {class: 'compact', 'data-testid': 'delivery-table'}) :
      h('p', {class: 'empty'}, 'Nothing delivered yet. "Send test" sends a webhook.test notification.'));
  }

  // loadLog reads the newest page again, keeping the older pages loaded.
  async function loadLog() {
    const r = await api('GET', `${path}/deliveries?limit=${DELIVERIES}`, undefined, {signal: ctx.signal});
    if (!ctx.alive()) return;
    const fresh = (r && r.deliveries) || [];
    const oldest = fresh.length ? fresh[fresh.length - 1].id : Infinity;
    deliveries = [...fresh, ...deliveries.filter((d) => d.id < oldest)];
    if (deliveries.length <= DELIVERIES) older.hidden = fresh.length < DELIVERIES;
    drawLog();
  }

  async function refresh() {
    try {
      w = await api('GET', path, undefined, {signal: ctx.signal});
      if (!ctx.alive()) return;
      draw();
      await loadLog();
    } catch (err) {
      if (ctx.alive() && err.name !== 'AbortError') status.replaceChildren(errorBox(err));
    }
  }

  function done(message, err) {
    status.replaceChildren(err ? errorBox(err) : h('p', {class: 'notice', 'data-testid': 'webhook-done'}, message));
    refresh();
  }

  w = await orNotFound(ctx, api('GET', path, undefined, {signal: ctx.signal}),
    {heading: 'Webhook', title: 'No such webhook', back: uiPath('webhooks'), backText: 'Back to the webhooks'});
  if (!w) return;
  draw();
  await loadLog();
  older.addEventListener('click', async () => {
    older.disabled = true;
    try {
      const before = deliveries[deliveries.length - 1].id;
      const r = await api('GET', `${path}/deliveries?limit=${DELIVERIES}&before=${before}`, undefined, {signal: ctx.signal});
      const more = (r && r.deliveries) || [];
      deliveries.push(...more);
      older.hidden = more.length < DELIVERIES;
      drawLog();
    } catch (err) {
      if (ctx.alive() && err.name !== 'AbortError') status.replaceChildren(errorBox(err));
    } finally {
      older.disabled = false;
    }
  });
  // Deliveries are retried in the background: the log is read again
  // every 3 s while one is pending, else every 15 s.
  let last = Date.now();
  ctx.every(3_000, () => {
    if (deliveries.some((d) => d.state === 'pending') || Date.now() - last >= 15_000) {
      last = Date.now();
      refresh();
    }
  });
  ctx.refresh = refresh;
}
