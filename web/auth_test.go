package web

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/go-chi/chi/v5"
	"github.com/google/go-cmp/cmp"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/fleetd/fleetd/auth"
	"github.com/fleetd/fleetd/internal/pgtest"
)

// cheap argon2 parameters keep the tests fast; the production ones are
// DefaultParams.
var cheap = auth.Params{Memory: 64, Time: 1, Threads: 1}

// mountAll mounts every component, as fleetd does, with no dependencies:
// the tests that use it stop requests before any handler runs (401, 403)
// or call only the account endpoints.
func mountAll(s *Server, a Accounts) {
	s.MountDevices(nil)
	s.MountDiagnosis(nil)
	s.MountFirmware(nil, nil, FirmwareOptions{})
	s.MountStream(NewHub())
	s.MountTelemetry(nil)
	s.MountCommands(nil)
	s.MountBulkCommands(nil)
	s.MountFixes(nil)
	s.MountConfig(nil)
	s.MountWebhooks(nil)
	s.MountOpenAPI()
	if a != nil {
		s.MountAccounts(a)
	}
}

type authEnv struct {
	t     *testing.T
	pool  *pgxpool.Pool
	store *auth.Store
	s     *Server
	srv   *httptest.Server
}

func newAuthEnv(t *testing.T, pool *pgxpool.Pool) *authEnv {
	t.Helper()
	if pool == nil {
		pool = pgtest.New(t)
	}
	store := auth.NewStore(pool, auth.Options{Params: cheap})
	s := New(Options{AdminToken: token})
	mountAll(s, store)
	srv := httptest.NewServer(s)
	t.Cleanup(srv.Close)
	return &authEnv{t: t, pool: pool, store: store, s: s, srv: srv}
}

// call sends a request with a bearer token (or none) and decodes the JSON
// answer into out when given.
func (e *authEnv) call(c *http.Client, method, path, bearer string, hdr map[string]string, body any, out any) int {
	e.t.Helper()
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, e.srv.URL+path, rd)
	if err != nil {
		e.t.Fatal(err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if bearer != "" {
		req.Header.Set("Authorization", "Bearer "+bearer)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	if c == nil {
		c = e.srv.Client()
	}
	res, err := c.Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	if out != nil && len(b) > 0 {
		if err := json.Unmarshal(b, out); err != nil {
			e.t.Fatalf("%s %s: %d %q is not JSON: %v", method, path, res.StatusCode, b, err)
		}
	}
	return res.StatusCode
}

// key makes an API key with a role (by the bootstrap token) and returns its
// token.
func (e *authEnv) key(role auth.Role) string {
	e.t.Helper()
	var k struct {
		ID    string `json:"id"`
		Token string `json:"token"`
	}
	if code := e.call(nil, http.MethodPost, "/api/v1/keys", token, nil, map[string]any{"name": string(role) + "-key", "role": role}, &k); code != http.StatusCreated {
		e.t.Fatalf("create %s key: %d", role, code)
	}
	return k.Token
}

// user makes a user (by the bootstrap token) and returns its id.
func (e *authEnv) user(name string, role auth.Role, password string) string {
	e.t.Helper()
	var u auth.User
	if code := e.call(nil, http.MethodPost, "/api/v1/users", token, nil, auth.NewUser{Name: name, Role: role, Password: password}, &u); code != http.StatusCreated {
		e.t.Fatalf("create user %s: %d", name, code)
	}
	return u.ID
}

type walked struct{ method, route, path string }

// apiRoutes walks the router and returns every /api/v1 route with a path
// that matches it (parameters filled in).
func apiRoutes(t *testing.T, s *Server) []walked {
	t.Helper()
	param := regexp.MustCompile(`\{(\w+)(:[^}]*)?\}`)
	var out []walked
	err := chi.Walk(s.router.Load(), func(method, route string, _ http.Handler, _ ...func(http.Handler) http.Handler) error {
		route = strings.TrimSuffix(route, "/")
		if rest, ok := strings.CutPrefix(route, "/api/v1"); ok && rest != "" {
			path := param.ReplaceAllStringFunc(rest, func(p string) string {
				if m := param.FindStringSubmatch(p); m[2] != "" {
					return strings.Split(m[2][1:], "|")[0]
				}
				return "x1"
			})
			out = append(out, walked{method, rest, "/api/v1" + path})
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].method+out[i].route < out[j].method+out[j].route })
	return out
}

// TestEveryRouteDeclaresARole walks the router with every component
// mounted: each /api/v1 route must be in routeRoles (or be one of the few
// public ones), openapi.json must state the same role in x-fleetd-role,
// and routeRoles must name no route that does not exist.
func TestEveryRouteDeclaresARole(t *testing.T) {
	s := New(Options{AdminToken: token})
	mountAll(s, auth.NewStore(nil, auth.Options{Params: cheap}))
	var doc struct {
		Paths map[string]map[string]struct {
			Role string `json:"x-fleetd-role"`
		}
	}
	if err := json.Unmarshal(openAPI, &doc); err != nil {
		t.Fatal(err)
	}
	param := regexp.MustCompile(`\{(\w+):[^}]*\}`)
	seen := map[string]bool{}
	for _, r := range apiRoutes(t, s) {
		key := r.method + " " + r.route
		seen[key] = true
		role, declared := routeRoles[key]
		if publicRoutes[key] {
			if declared {
				t.Errorf("%s is public and has a role too", key)
			}
			continue
		}
		if !declared {
			t.Errorf("%s declares no role: add it to routeRoles (web/roles.go) and x-fleetd-role to openapi.json", key)
			continue
		}
		op := doc.Paths[param.ReplaceAllString(r.route, "{$1}")][strings.ToLower(r.method)]
		if op.Role != string(role) {
			t.Errorf("%s needs %s but openapi.json says x-fleetd-role %q", key, role, op.Role)
		}
	}
	for key := range routeRoles {
		if !seen[key] {
			t.Errorf("routeRoles names %s, which is not served", key)
		}
	}
}

// TestUndeclaredRouteRefused: a route added without a role is refused at
// runtime, even to the bootstrap admin.
func TestUndeclaredRouteRefused(t *testing.T) {
	s := New(Options{AdminToken: token})
	s.mount(func(_, api chi.Router) {
		api.Post("/undeclared", func(w http.ResponseWriter, r *http.Request) { writeJSON(w, http.StatusOK, map[string]any{}) })
	})
	rec, body := do(t, s, http.MethodPost, "/api/v1/undeclared", map[string]string{"Authorization": "Bearer " + token})
	if rec.Code != http.StatusForbidden {
		t.Fatalf("undeclared route: %d %v, want 403", rec.Code, body)
	}
}

// TestViewerCannotChangeAnything walks the router: every state-changing
// route answers 403 forbidden to a viewer key and to a viewer's console
// session (with its CSRF token), and each refusal is in the audit log with
// the viewer as principal. Every GET route is open to the viewer but the
// admin ones.
func TestViewerCannotChangeAnything(t *testing.T) {
	e := newAuthEnv(t, nil)
	viewerKey := e.key(auth.Viewer)
	e.user("vera", auth.Viewer, "vera-password-1")
	jar, _ := cookiejar.New(nil)
	browser := &http.Client{Jar: jar}
	var sess sessionResponse
	if code := e.call(browser, http.MethodPost, "/api/v1/session", "", nil, signInRequest{"vera", "vera-password-1"}, &sess); code != http.StatusOK {
		t.Fatalf("sign in: %d", code)
	}
	n := 0
	for _, r := range apiRoutes(t, e.s) {
		key := r.method + " " + r.route
		if publicRoutes[key] || r.method == http.MethodGet || r.method == http.MethodHead || key == "DELETE /session" {
			continue
		}
		n++
		var errBody errorBody
		if code := e.call(nil, r.method, r.path, viewerKey, nil, map[string]any{}, &errBody); code != http.StatusForbidden || errBody.Error.Code != "forbidden" ||
			!strings.Contains(errBody.Error.Message, "needs the") {
			t.Errorf("viewer key: %s %s: %d %+v, want 403 forbidden", r.method, r.path, code, errBody)
		}
		if code := e.call(browser, r.method, r.path, "", map[string]string{CSRFHeader: sess.CSRFToken}, map[string]any{}, &errBody); code != http.StatusForbidden || errBody.Error.Code != "forbidden" {
			t.Errorf("viewer session: %s %s: %d %+v, want 403 forbidden", r.method, r.path, code, errBody)
		}
		for _, who := range []string{"viewer-key", "vera"} {
			entries, _, err := e.store.Audit(context.Background(), auth.AuditQuery{Principal: who, Route: "/api/v1" + r.route, Method: r.method})
			if err != nil {
				t.Fatal(err)
			}
			if len(entries) != 1 || entries[0].Status != http.StatusForbidden || entries[0].Path != r.path {
				t.Errorf("audit of %s by %s: %+v, want one 403 entry", key, who, entries)
			}
		}
	}
	if n < 25 {
		t.Fatalf("only %d state-changing routes walked", n)
	}
	if code := e.call(nil, http.MethodGet, "/api/v1/devices/x1/diagnosis", viewerKey, nil, nil, nil); code == http.StatusForbidden || code == http.StatusUnauthorized {
		t.Fatalf("viewer reading: %d", code)
	}
	for _, path := range []string{"/api/v1/users", "/api/v1/keys", "/api/v1/audit", "/api/v1/webhooks"} {
		if code := e.call(nil, http.MethodGet, path, viewerKey, nil, nil, nil); code != http.StatusForbidden {
			t.Errorf("viewer GET %s: %d, want 403", path, code)
		}
	}
}

// TestOperatorCannotChangePolicyUsersOrKeys: an operator key is refused
// the admin routes (policy, verdicts, users, keys, webhooks) and admitted
// to an operator one.
func TestOperatorCannotChangePolicyUsersOrKeys(t *testing.T) {
	e := newAuthEnv(t, nil)
	op := e.key(auth.Operator)
	uid := e.user("olga", auth.Operator, "olga-password-1")
	for _, c := range []struct{ method, path string }{
		{http.MethodPut, "/api/v1/compat/rules"},
		{http.MethodPut, "/api/v1/compat/verdicts"},
		{http.MethodPost, "/api/v1/users"},
		{http.MethodPatch, "/api/v1/users/" + uid},
		{http.MethodDelete, "/api/v1/users/" + uid},
		{http.MethodPost, "/api/v1/keys"},
		{http.MethodDelete, "/api/v1/keys/abc"},
		{http.MethodPost, "/api/v1/webhooks"},
		{http.MethodGet, "/api/v1/audit"},
	} {
		var errBody errorBody
		body := map[string]any{"role": "admin", "name": "x", "password": "escalate-me-123"}
		if code := e.call(nil, c.method, c.path, op, nil, body, &errBody); code != http.StatusForbidden || !strings.Contains(errBody.Error.Message, "needs the admin role") {
			t.Errorf("operator %s %s: %d %+v, want 403 needs the admin role", c.method, c.path, code, errBody)
		}
	}
	u, err := e.store.User(context.Background(), uid)
	if err != nil || u.Role != auth.Operator {
		t.Fatalf("user after the refused changes: %+v %v", u, err)
	}
	// Admitted past authorisation: the handler answers (400 for the empty
	// selector), not 403.
	if code := e.call(nil, http.MethodPost, "/api/v1/fixes", op, nil, map[string]any{"unknown": 1}, nil); code == http.StatusForbidden {
		t.Fatalf("operator POST /fixes: 403")
	}
}

// TestKeyRevokedOnEveryReplica runs two API servers on one database: a
// key revoked through one is refused by the other at once, and an expired
// key is refused by both.
func TestKeyRevokedOnEveryReplica(t *testing.T) {
	url := pgtest.URL(t)
	open := func() *pgxpool.Pool {
		p, err := pgxpool.New(context.Background(), url)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(p.Close)
		return p
	}
	a, b := newAuthEnv(t, open()), newAuthEnv(t, open())
	var k struct {
		ID    string `json:"id"`
		Token string `json:"token"`
	}
	if code := a.call(nil, http.MethodPost, "/api/v1/keys", token, nil, map[string]any{"name": "ci", "role": "operator", "expires_in": "30d"}, &k); code != http.StatusCreated {
		t.Fatalf("create key: %d", code)
	}
	for _, e := range []*authEnv{a, b} {
		var me sessionResponse
		if code := e.call(nil, http.MethodGet, "/api/v1/me", k.Token, nil, nil, &me); code != http.StatusOK || me.Principal != (auth.Principal{Kind: "key", ID: k.ID, Name: "ci", Role: auth.Operator}) {
			t.Fatalf("GET /me with the key: %d %+v", code, me)
		}
	}
	if code := a.call(nil, http.MethodDelete, "/api/v1/keys/"+k.ID, token, nil, nil, nil); code != http.StatusOK {
		t.Fatalf("revoke: %d", code)
	}
	if code := b.call(nil, http.MethodGet, "/api/v1/me", k.Token, nil, nil, nil); code != http.StatusUnauthorized {
		t.Fatalf("revoked key on the other replica: %d, want 401", code)
	}
	var keys struct{ Keys []auth.Key }
	b.call(nil, http.MethodGet, "/api/v1/keys", token, nil, nil, &keys)
	if len(keys.Keys) != 1 || keys.Keys[0].RevokedAt == nil || keys.Keys[0].LastUsedAt == nil || keys.Keys[0].CreatedBy != "break-glass" {
		t.Fatalf("listed keys: %+v", keys.Keys)
	}

	exp := a.key(auth.Viewer)
	if code := b.call(nil, http.MethodGet, "/api/v1/me", exp, nil, nil, nil); code != http.StatusOK {
		t.Fatalf("fresh key: %d", code)
	}
	if _, err := a.pool.Exec(context.Background(), `UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE name = 'viewer-key'`); err != nil {
		t.Fatal(err)
	}
	for _, e := range []*authEnv{a, b} {
		if code := e.call(nil, http.MethodGet, "/api/v1/me", exp, nil, nil, nil); code != http.StatusUnauthorized {
			t.Fatalf("expired key: %d, want 401", code)
		}
	}
	// A key cannot exceed its creator's role.
	if code := a.call(nil, http.MethodPost, "/api/v1/keys", a.key(auth.Admin), nil, map[string]any{"name": "x", "role": "root"}, nil); code != http.StatusBadRequest {
		t.Fatalf("key with role root: %d, want 400", code)
	}
	ctx := context.Background()
	lower := auth.Principal{Kind: auth.KindUser, ID: "u", Name: "u", Role: auth.Operator}
	if _, _, err := a.store.CreateKey(ctx, auth.NewKey{Name: "up", Role: auth.Admin}, lower); err == nil {
		t.Fatal("an operator made an admin key")
	}
	// Keys revoked longer ago than the retention are forgotten.
	if _, err := a.pool.Exec(ctx, `UPDATE api_keys SET revoked_at = now() - interval '2 hours' WHERE id = $1`, k.ID); err != nil {
		t.Fatal(err)
	}
	if err := a.store.PruneSessions(ctx, time.Hour); err != nil {
		t.Fatal(err)
	}
	ks, err := a.store.Keys(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, key := range ks {
		if key.ID == k.ID {
			t.Fatalf("key revoked two hours ago kept past a retention of one hour: %+v", key)
		}
	}
}

// TestConsoleSession signs in with a cookie jar: the session survives a
// reload (GET /me returns the principal and the CSRF token), a change
// without the CSRF token or with a wrong one is refused, one with it goes
// through, and after sign-out the cookie is refused.
func TestConsoleSession(t *testing.T) {
	e := newAuthEnv(t, nil)
	e.user("ada", auth.Admin, "ada-password-12")
	jar, _ := cookiejar.New(nil)
	browser := &http.Client{Jar: jar}

	req, _ := http.NewRequest(http.MethodPost, e.srv.URL+"/api/v1/session", strings.NewReader(`{"name":"Ada","password":"ada-password-12"}`))
	res, err := browser.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var signed sessionResponse
	_ = json.NewDecoder(res.Body).Decode(&signed)
	res.Body.Close()
	cookie := res.Header.Get("Set-Cookie")
	if res.StatusCode != http.StatusOK || signed.CSRFToken == "" || signed.Principal.Name != "ada" || signed.Principal.Role != auth.Admin || signed.ExpiresAt == nil {
		t.Fatalf("sign in: %d %+v", res.StatusCode, signed)
	}
	for _, want := range []string{SessionCookie + "=", "HttpOnly", "SameSite=Strict", "Path=/"} {
		if !strings.Contains(cookie, want) {
			t.Errorf("Set-Cookie %q lacks %s", cookie, want)
		}
	}
	if strings.Contains(cookie, "Secure") {
		t.Errorf("Set-Cookie %q is Secure over plain HTTP without an https public URL", cookie)
	}

	var me sessionResponse
	if code := e.call(browser, http.MethodGet, "/api/v1/me", "", nil, nil, &me); code != http.StatusOK || me.CSRFToken != signed.CSRFToken ||
		me.Principal != signed.Principal {
		t.Fatalf("GET /me after a reload: %d %+v, want %+v", code, me, signed)
	}
	newKey := map[string]any{"name": "from-console", "role": "viewer"}
	for name, hdr := range map[string]map[string]string{"no token": nil, "wrong token": {CSRFHeader: "x" + signed.CSRFToken}} {
		var errBody errorBody
		if code := e.call(browser, http.MethodPost, "/api/v1/keys", "", hdr, newKey, &errBody); code != http.StatusForbidden || errBody.Error.Code != "csrf" {
			t.Errorf("cross-site POST, %s: %d %+v, want 403 csrf", name, code, errBody)
		}
	}
	if code := e.call(browser, http.MethodPost, "/api/v1/keys", "", map[string]string{CSRFHeader: signed.CSRFToken}, newKey, nil); code != http.StatusCreated {
		t.Fatalf("POST with the CSRF token: %d, want 201", code)
	}
	if code := e.call(browser, http.MethodDelete, "/api/v1/session", "", nil, nil, nil); code != http.StatusForbidden {
		t.Fatalf("sign-out without the CSRF token: %d, want 403", code)
	}
	stolen := jar.Cookies(req.URL)
	if code := e.call(browser, http.MethodDelete, "/api/v1/session", "", map[string]string{CSRFHeader: signed.CSRFToken}, nil, nil); code != http.StatusNoContent {
		t.Fatalf("sign-out: %d", code)
	}
	if code := e.call(browser, http.MethodGet, "/api/v1/me", "", nil, nil, nil); code != http.StatusUnauthorized {
		t.Fatalf("GET /me after sign-out: %d, want 401", code)
	}
	// The cookie itself (kept by an attacker, or another tab) is dead too.
	replay := &http.Client{}
	r2, _ := http.NewRequest(http.MethodGet, e.srv.URL+"/api/v1/me", nil)
	for _, c := range stolen {
		r2.AddCookie(c)
	}
	if res, err := replay.Do(r2); err != nil || res.StatusCode != http.StatusUnauthorized {
		t.Fatalf("replayed cookie after sign-out: %v %v", res.StatusCode, err)
	}

	entries, _, err := e.store.Audit(context.Background(), auth.AuditQuery{Principal: "ada"})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, en := range entries {
		got = append(got, fmt.Sprintf("%s %s %d", en.Method, en.Route, en.Status))
	}
	want := []string{"DELETE /api/v1/session 204", "DELETE /api/v1/session 403", "POST /api/v1/keys 201", "POST /api/v1/keys 403", "POST /api/v1/keys 403", "POST /api/v1/session 200"}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Fatalf("audit of the session mismatch (-want +got):\n%s", diff)
	}
}

// TestSignInBruteForce: a wrong password and an unknown name answer the
// same 401; past the per-name limit a name gets 429 with Retry-After
// before its password is checked, even the right one; failed sign-ins are
// audited with the name tried and never the password.
func TestSignInBruteForce(t *testing.T) {
	e := newAuthEnv(t, nil)
	e.user("bob", auth.Operator, "bob-password-12")
	var unknown, wrong errorBody
	if code := e.call(nil, http.MethodPost, "/api/v1/session", "", nil, signInRequest{"nobody", "whatever-password"}, &unknown); code != http.StatusUnauthorized {
		t.Fatalf("unknown name: %d", code)
	}
	if code := e.call(nil, http.MethodPost, "/api/v1/session", "", nil, signInRequest{"bob", "wrong-password-1"}, &wrong); code != http.StatusUnauthorized {
		t.Fatalf("wrong password: %d", code)
	}
	if diff := cmp.Diff(unknown, wrong); diff != "" {
		t.Fatalf("unknown name and wrong password answer differently (-unknown +wrong):\n%s", diff)
	}
	for i := 0; i < signInNameBurst-1; i++ {
		e.call(nil, http.MethodPost, "/api/v1/session", "", nil, signInRequest{"bob", "wrong-password-1"}, nil)
	}
	req, _ := http.NewRequest(http.MethodPost, e.srv.URL+"/api/v1/session", strings.NewReader(`{"name":"bob","password":"bob-password-12"}`))
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusTooManyRequests || res.Header.Get("Retry-After") == "" {
		t.Fatalf("right password past the limit: %d Retry-After %q, want 429 with Retry-After", res.StatusCode, res.Header.Get("Retry-After"))
	}
	if code := e.call(nil, http.MethodPost, "/api/v1/session", "", nil, signInRequest{"bob", strings.Repeat("x", auth.MaxPassword+1)}, nil); code != http.StatusBadRequest {
		t.Fatalf("oversized password: %d, want 400", code)
	}
	entries, _, err := e.store.Audit(context.Background(), auth.AuditQuery{Principal: "bob", Route: "/api/v1/session"})
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != signInNameBurst+2 || entries[0].Principal.Kind != auth.KindAnonymous {
		t.Fatalf("audited sign-ins: %+v", entries)
	}
	for _, en := range entries {
		if strings.Contains(string(en.Summary), "password-1") || !strings.Contains(string(en.Summary), "[redacted]") {
			t.Fatalf("summary of a sign-in: %s", en.Summary)
		}
	}
}

// TestUsersAndLastAdmin: users are managed by admins; disabling a user
// ends their sessions; without a bootstrap token the last admin cannot be
// demoted, disabled or deleted.
func TestUsersAndLastAdmin(t *testing.T) {
	e := newAuthEnv(t, nil)
	ctx := context.Background()
	uid := e.user("carol", auth.Admin, "carol-password-1")
	if code := e.call(nil, http.MethodPost, "/api/v1/users", token, nil, auth.NewUser{Name: "CAROL", Role: auth.Viewer, Password: "another-password"}, nil); code != http.StatusConflict {
		t.Fatalf("duplicate name: %d, want 409", code)
	}
	var bad errorBody
	if code := e.call(nil, http.MethodPost, "/api/v1/users", token, nil, auth.NewUser{Name: "dan", Role: auth.Viewer, Password: "short"}, &bad); code != http.StatusBadRequest || bad.Error.Field != "password" {
		t.Fatalf("short password: %d %+v", code, bad)
	}
	sess, err := e.store.SignIn(ctx, "carol", "carol-password-1", "test")
	if err != nil {
		t.Fatal(err)
	}
	disabled := true
	if _, err := e.store.UpdateUser(ctx, uid, auth.UserPatch{Disabled: &disabled}, true); err != nil {
		t.Fatal(err)
	}
	if _, err := e.store.SessionByToken(ctx, sess.Token); err == nil {
		t.Fatal("a disabled user's session still works")
	}
	enable := false
	if _, err := e.store.UpdateUser(ctx, uid, auth.UserPatch{Disabled: &enable}, true); err != nil {
		t.Fatal(err)
	}
	viewer := auth.Viewer
	if _, err := e.store.UpdateUser(ctx, uid, auth.UserPatch{Role: &viewer}, false); err == nil || !strings.Contains(err.Error(), "last admin") {
		t.Fatalf("demoting the last admin without a bootstrap token: %v", err)
	}
	if err := e.store.DeleteUser(ctx, uid, false); err == nil {
		t.Fatal("deleted the last admin without a bootstrap token")
	}
	if _, err := e.store.UpdateUser(ctx, uid, auth.UserPatch{Role: &viewer}, true); err != nil {
		t.Fatalf("demoting with a bootstrap token to recover: %v", err)
	}
	if code := e.call(nil, http.MethodDelete, "/api/v1/users/"+uid, token, nil, nil, nil); code != http.StatusNoContent {
		t.Fatalf("delete: %d", code)
	}
	if code := e.call(nil, http.MethodGet, "/api/v1/users/"+uid, token, nil, nil, nil); code != http.StatusNotFound {
		t.Fatalf("deleted user: %d", code)
	}
}

// TestAuditQueryAndExport: the audit log filters by principal, target and
// outcome, pages with a cursor, streams JSON lines, and never holds a
// secret from a body.
func TestAuditQueryAndExport(t *testing.T) {
	e := newAuthEnv(t, nil)
	for i := 0; i < 3; i++ {
		e.user(fmt.Sprintf("user%d", i), auth.Viewer, "a-long-password-"+fmt.Sprint(i))
	}
	e.call(nil, http.MethodPatch, "/api/v1/users/nope", token, nil, map[string]any{"password": "secret-password-9"}, nil)
	var page struct {
		Entries    []auth.Entry `json:"entries"`
		NextCursor string       `json:"next_cursor"`
	}
	if code := e.call(nil, http.MethodGet, "/api/v1/audit?limit=2&principal=bootstrap", token, nil, nil, &page); code != http.StatusOK || len(page.Entries) != 2 || page.NextCursor == "" {
		t.Fatalf("first page: %d %+v", code, page)
	}
	first := page.Entries[0]
	if first.Status != http.StatusNotFound || first.Targets["id"] != "nope" || first.Principal != auth.Bootstrap || first.RequestID == "" ||
		strings.Contains(string(first.Summary), "secret-password-9") {
		t.Fatalf("newest entry: %+v %s", first, first.Summary)
	}
	e.call(nil, http.MethodGet, "/api/v1/audit?limit=2&principal=bootstrap&cursor="+page.NextCursor, token, nil, nil, &page)
	if len(page.Entries) != 2 || page.NextCursor != "" {
		t.Fatalf("second page: %+v", page)
	}
	e.call(nil, http.MethodGet, "/api/v1/audit?target=nope&outcome=failure", token, nil, nil, &page)
	if len(page.Entries) != 1 {
		t.Fatalf("by target: %+v", page)
	}
	var bad errorBody
	if code := e.call(nil, http.MethodGet, "/api/v1/audit?from=yesterday", token, nil, nil, &bad); code != http.StatusBadRequest || bad.Error.Field != "from" {
		t.Fatalf("bad from: %d %+v", code, bad)
	}
	req, _ := http.NewRequest(http.MethodGet, e.srv.URL+"/api/v1/audit?format=jsonl&from="+time.Now().Add(-time.Hour).UTC().Format(time.RFC3339), nil)
	req.Header.Set("Authorization", "Bearer "+token)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if res.Header.Get("Content-Type") != "application/x-ndjson" || len(lines) != 4 {
		t.Fatalf("jsonl export: %s %q", res.Header.Get("Content-Type"), b)
	}
	if n, err := e.store.PruneAudit(context.Background(), -time.Hour); err != nil || n != 4 {
		t.Fatalf("prune: %d %v", n, err)
	}
}
