// A small reading of semver constraints, the common subset of what fleetd
// accepts (Masterminds semver): comparisons (=, !=, >, >=, <, <=), tilde and
// caret ranges, x wildcards, "," or space for AND, "||" for OR. It is only
// used to estimate how many devices a campaign selects; fleetd decides.

function parseVersion(s) {
  const m = /^v?(\d+)(?:\.(\d+))?(?:\.(\d+))?(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$/.exec(String(s).trim());
  if (!m) return null;
  return {major: +m[1], minor: +(m[2] || 0), patch: +(m[3] || 0), pre: m[4] || ''};
}

function comparePre(a, b) {
  if (a === b) return 0;
  if (!a) return 1; // a release is above its prereleases
  if (!b) return -1;
  const x = a.split('.');
  const y = b.split('.');
  for (let i = 0; i < Math.max(x.length, y.length); i++) {
    if (x[i] === undefined) return -1;
    if (y[i] === undefined) return 1;
    const nx = /^\d+$/.test(x[i]);
    const ny = /^\d+$/.test(y[i]);
    if (nx && ny && +x[i] !== +y[i]) return +x[i] < +y[i] ? -1 : 1;
    if (nx !== ny) return nx ? -1 : 1;
    if (x[i] !== y[i]) return x[i] < y[i] ? -1 : 1;
  }
  return 0;
}

function compare(a, b) {
  for (const k of ['major', 'minor', 'patch']) if (a[k] !== b[k]) return a[k] < b[k] ? -1 : 1;
  return comparePre(a.pre, b.pre);
}

const wild = (p) => p === undefined || /^[xX*]$/.test(p);

// comparison turns one term into predicates on a parsed version.
function comparison(op, ver) {
  const bare = ver.replace(/^v/, '').split(/[-+]/)[0];
  const parts = bare.split('.');
  const pre = (/-([0-9A-Za-z.-]+)/.exec(ver.replace(/\+.*$/, '')) || [])[1] || '';
  if (parts.length > 3 || parts.some((p, i) => !wild(p) && !/^\d+$/.test(p)) || (wild(parts[0]) && parts.length > 1 && !parts.every(wild))) return null;
  const n = parts.map((p) => (wild(p) ? null : +p));
  while (n.length < 3) n.push(null);
  const fixed = n.findIndex((x) => x === null); // first missing or wildcard part (-1: all three given)
  const base = {major: n[0] || 0, minor: n[1] || 0, patch: n[2] || 0, pre};
  const ge = (v) => compare(v, base) >= 0;
  const bump = (i) => {
    const b = {major: base.major, minor: base.minor, patch: base.patch, pre: ''};
    if (i === 0) Object.assign(b, {major: b.major + 1, minor: 0, patch: 0});
    if (i === 1) Object.assign(b, {minor: b.minor + 1, patch: 0});
    if (i === 2) b.patch += 1;
    return (v) => compare(v, {...b, pre: ''}) < 0 && !(v.pre && compare({...v, pre: ''}, b) === 0);
  };
  if (fixed === 0) return {test: () => true, pre: !!pre}; // "*"
  switch (op) {
    case '':
    case '=':
    case '==':
      if (fixed < 0) return {test: (v) => compare(v, base) === 0, pre: !!pre};
      return {test: (v) => ge(v) && bump(fixed - 1)(v), pre: !!pre};
    case '!=':
      if (fixed < 0) return {test: (v) => compare(v, base) !== 0, pre: !!pre};
      return {test: (v) => !(ge(v) && bump(fixed - 1)(v)), pre: !!pre};
    case '>':
      if (fixed < 0) return {test: (v) => compare(v, base) > 0, pre: !!pre};
      return {test: (v) => !bump(fixed - 1)(v), pre: !!pre};
    case '>=':
      return {test: ge, pre: !!pre};
    case '<':
      return {test: (v) => compare(v, base) < 0, pre: !!pre};
    case '<=':
      if (fixed < 0) return {test: (v) => compare(v, base) <= 0, pre: !!pre};
      return {test: bump(fixed - 1), pre: !!pre};
    case '~':
    case '~>':
      return {test: (v) => ge(v) && bump(fixed === 1 ? 0 : 1)(v), pre: !!pre};
    case '^': {
      const i = base.major > 0 || fixed === 1 ? 0 : base.minor > 0 || fixed === 2 ? 1 : 2;
      return {test: (v) => ge(v) && bump(i)(v), pre: !!pre};
    }
  }
  return null;
}

// parseConstraint returns a function that reports whether a version string
// satisfies the constraint, or null when the constraint is beyond this
// subset (or invalid). A version that is not semver never matches.
export function parseConstraint(str) {
  const groups = String(str).split('||').map((g) => g.trim());
  const parsed = [];
  for (const g of groups) {
    if (!g) return null;
    const terms = [];
    const re = /\s*(==|=|!=|>=|<=|>|<|~>|~|\^)?\s*(v?[0-9xX*]+(?:\.[0-9xX*]+)*(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?)\s*,?/y;
    let m;
    while (re.lastIndex < g.length && (m = re.exec(g))) {
      const c = comparison(m[1] || '', m[2]);
      if (!c) return null;
      terms.push(c);
    }
    if (re.lastIndex < g.length || !terms.length) return null;
    parsed.push(terms);
  }
  return (s) => {
    const v = parseVersion(s);
    if (!v) return false;
    return parsed.some((terms) => (!v.pre || terms.some((t) => t.pre)) && terms.every((t) => t.test(v)));
  };
}
