// secretDialog shows a credential fleetd returns once (an API key's token,
// a webhook's signing secret) with a copy button, and says that it cannot
// be shown again: fleetd keeps only its hash (or keeps it to sign with,
// never to show).

import {h, modal} from './dom.js';

export function secretDialog({title, intro, value, testid, valueTestid}) {
  const code = h('code', {class: 'token', 'data-testid': valueTestid}, value);
  const copy = h('button', {type: 'button', class: 'btn small', 'data-testid': 'secret-copy'}, 'Copy');
  copy.addEventListener('click', async () => {
    try {
      await navigator.clipboard.writeText(value);
      copy.textContent = 'Copied';
    } catch {
      getSelection().selectAllChildren(code);
      copy.textContent = 'Selected: press Ctrl+C';
    }
  });
  const m = modal(h('div', null,
    h('h2', null, title),
    h('p', null, intro),
    h('div', {class: 'token-box'}, code, copy),
    h('p', {class: 'secret-note'}, 'This is shown once: copy it now. Closing this dialog forgets it.'),
    h('div', {class: 'dialog-actions'}, h('button', {type: 'button', class: 'btn primary', 'data-testid': 'secret-done', onclick: () => m.close()}, 'Done'))),
  {testid, label: title});
  return m;
}
