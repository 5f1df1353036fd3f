// Roles in the page. fleetd's roles are ordered (viewer < operator <
// admin) and every API route declares the one it needs; a call beyond the
// principal's role is refused with 403, which is the real guard. The
// console only stops offering what would be refused:
//
//   - a control that changes something carries data-needs="operator" (or
//     "admin"); app.js sets <body data-role> to the principal's role, and
//     app.css hides every control whose role is above it (an unknown role
//     sees none of them);
//   - a page declares its role in app.js's routes (the admin pages), and
//     the router says what it needs instead of showing it;
//   - can() is for what a view decides in code.
//
// So a view marks its controls as it builds them, with NEEDS_OPERATOR or
// NEEDS_ADMIN among their attributes, and never looks at the role itself.

import {principal} from './api.js';

const rank = {viewer: 1, operator: 2, admin: 3};

export const NEEDS_OPERATOR = {'data-needs': 'operator'};
export const NEEDS_ADMIN = {'data-needs': 'admin'};

// can reports whether the signed-in principal has the role need (or one
// above it).
export function can(need) {
  const p = principal();
  return !!p && (rank[p.role] || 0) >= (rank[need] || Infinity);
}

// applyRole puts the principal's role on <body> for the CSS rules.
export function applyRole() {
  const p = principal();
  if (p && rank[p.role]) document.body.dataset.role = p.role;
  else delete document.body.dataset.role;
}

// principalLabel names a principal for the header and tables: "alice (admin)",
// "break-glass admin token".
export function principalLabel(p) {
  if (!p) return '';
  if (p.kind === 'bootstrap') return 'break-glass admin token';
  return `${p.kind === 'key' ? 'key ' : ''}${p.name || p.id}`;
}
