package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/cdproto/cdp"
	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/chromedp"

	"github.com/fleetd/fleetd/firmware"
	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/fleetdtest"
	"github.com/fleetd/fleetd/notify"
)

// The console's operators: users sign in with a name and a password (a
// session cookie with CSRF protection), see only the controls their role
// may use, and an admin manages API keys in the console.

// call sends a request to fleetd's API as a client outside the browser
// would: with a bearer token, or with a session cookie when cookie is set.
// It decodes a JSON answer into out (when not nil) and returns the status.
func call(t *testing.T, base, method, path, bearer, cookie string, body, out any) int {
	t.Helper()
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			t.Fatal(err)
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, base+"/api/v1"+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if bearer != "" {
		req.Header.Set("Authorization", "Bearer "+bearer)
	}
	if cookie != "" {
		req.AddCookie(&http.Cookie{Name: "fleetd_session", Value: cookie})
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer res.Body.Close()
	data, _ := io.ReadAll(res.Body)
	if out != nil && res.StatusCode < 300 && len(data) > 0 {
		if err := json.Unmarshal(data, out); err != nil {
			t.Fatalf("%s %s: %v in %s", method, path, err, data)
		}
	}
	return res.StatusCode
}

// createUser adds a user through the API with the bootstrap token.
func createUser(t *testing.T, p *fleetdtest.Process, name, password, role string) {
	t.Helper()
	if st := call(t, p.HTTPURL, "POST", "/users", p.Token(), "", map[string]string{"name": name, "password": password, "role": role}, nil); st != http.StatusCreated {
		t.Fatalf("create user %s (%s): status %d, want 201", name, role, st)
	}
}

// signInUser opens the console and signs in with a user's name and
// password, and waits for the header to name them.
func (b *browser) signInUser(name, password string) {
	b.t.Helper()
	b.navigate("/")
	b.waitJS("the sign-in form", `document.querySelector('[data-testid=signin-name]')`, 10*time.Second)
	b.do("type the name and password",
		chromedp.SendKeys(chromedp.CSS(`[data-testid=signin-name]`), name),
		chromedp.SendKeys(chromedp.CSS(`[data-testid=signin-password]`), password))
	b.click(`[data-testid=signin-submit]`)
	b.waitJS("the console after sign-in", `!document.getElementById('top').hidden &&
		document.querySelector('[data-testid=whoami-name]') && document.querySelector('[data-testid=whoami-name]').textContent === `+jsString(name), 10*time.Second)
}

// sessionCookie is the browser's fleetd_session cookie (HttpOnly, so read
// over the DevTools protocol), or nil.
func (b *browser) sessionCookie() *network.Cookie {
	b.t.Helper()
	res, err := chromedp.Run(b.ctx, func(ctx context.Context, t *chromedp.Target) (network.GetCookiesResult, error) {
		return cdp.Call(ctx, t, network.GetCookies, network.GetCookiesParams{URLs: []string{b.base + "/"}})
	})
	if err != nil {
		b.t.Fatalf("read cookies: %v", err)
	}
	for _, c := range res.Cookies {
		if c.Name == "fleetd_session" {
			return c
		}
	}
	return nil
}

// mutatingControlsJS lists the visible controls in the page that could
// change something: buttons, forms, button-styled links, editors, file
// inputs and anything marked data-needs, except the filters (forms with
// role=search) and the buttons that only page or load more of a list.
const mutatingControlsJS = `(() => {
	const readOnly = new Set(['page-prev', 'page-next', 'events-older', 'bulk-more', 'deliveries-older']);
	const visible = (el) => el.getClientRects().length > 0 && getComputedStyle(el).visibility !== 'hidden';
	const found = [];
	for (const el of document.querySelectorAll('#main button, #main form, #main a.btn, #main textarea, #main input[type=file], #main [data-needs]')) {
		if (!visible(el) || el.closest('form[role=search]')) continue;
		const id = el.dataset.testid || '';
		if (readOnly.has(id) || id.startsWith('links-more-')) continue;
		found.push(el.tagName.toLowerCase() + (id ? '[' + id + ']' : '') + ' "' + el.textContent.trim().replace(/\s+/g, ' ').slice(0, 30) + '"');
	}
	return found;
})()`

// TestConsoleViewerSeesNoControls: a viewer signed in with a name and a
// password reads the overview, the devices, a device's page, the firmware,
// the campaigns, a campaign's page and the bulk commands, and sees no
// control that changes anything on any of them, nor the admin pages. An
// operator on the same pages sees the controls (so the check finds them
// when they are there) but not the admin pages.
func TestConsoleViewerSeesNoControls(t *testing.T) {
	p, api := consoleFleetd(t)
	ctx := context.Background()
	if _, err := api.RegisterDevice(ctx, fleet.NewDevice{ID: "gw-v1", Model: "gw-100"}); err != nil {
		t.Fatal(err)
	}
	target := upload(t, api, "2.0.0", 4<<10)
	camp, err := api.CreateCampaign(ctx, firmware.Spec{Name: "to read", FirmwareID: target.ID,
		Stages:        []firmware.Stage{{Name: "all", Percent: 100, MaxFailureRate: 1, MaxNotBackOnline: -1}},
		DeviceTimeout: firmware.Duration(10 * time.Minute)})
	if err != nil {
		t.Fatal(err)
	}
	createUser(t, p, "vera", "viewer-password-1", "viewer")
	createUser(t, p, "otto", "operator-password-1", "operator")

	// Each page, and what shows that it has finished drawing.
	pages := []struct{ name, path, ready string }{
		{"overview", "/ui/", `/^\d+$/.test(document.querySelector('[data-testid=online-count]').textContent) &&
			document.querySelector('[data-testid=flagged-firmware] .empty, [data-testid=flagged-row]')`},
		{"devices", "/ui/devices", `document.querySelector('[data-testid=device-row][data-device-id="gw-v1"]')`},
		{"device", "/ui/devices/gw-v1", `document.querySelector('[data-testid=device-title]') &&
			document.querySelector('[data-testid=diagnosis] [data-testid=no-problems], [data-testid=diagnosis] [data-testid=problem]') &&
			document.querySelector('[data-testid=config-sync]') && document.querySelector('[data-testid=cmd-empty], [data-testid=cmd-table]')`},
		{"firmware", "/ui/firmware", `document.querySelector('[data-testid=firmware-row][data-version="2.0.0"]')`},
		{"campaigns", "/ui/campaigns", `document.querySelector('[data-testid=campaign-row][data-campaign-id="` + camp.ID + `"]')`},
		{"campaign", "/ui/campaigns/" + camp.ID, `document.querySelector('[data-testid=campaign-state]') && document.querySelector('[data-testid=history-entry]')`},
		{"commands", "/ui/commands", `document.querySelector('[data-testid=bulk-table] tbody tr')`},
	}
	adminNav := `[...document.querySelectorAll('a[data-nav=users], a[data-nav=keys], a[data-nav=webhooks], a[data-nav=audit]')].filter((a) => a.getClientRects().length).length`
	visit := func(b *browser, role string) map[string][]string {
		t.Helper()
		got := map[string][]string{}
		for _, pg := range pages {
			// Through the nav or a link, as a user would: no reload.
			b.do("open "+pg.path, evalVoid(`window.history.pushState(null, '', `+jsString(pg.path)+`); window.dispatchEvent(new PopStateEvent('popstate'))`))
			b.waitJS(role+" on the "+pg.name+" page", pg.ready, 15*time.Second)
			if msg := b.text(`#main [data-testid=error]`); msg != "" {
				t.Errorf("%s on the %s page: an error is shown: %s", role, pg.name, msg)
			}
			got[pg.name] = mustEval[[]string](t, b, mutatingControlsJS)
			if n := mustEval[int](t, b, `[...document.querySelectorAll('#main [data-needs=admin]')].filter((e) => e.getClientRects().length).length`); n != 0 {
				t.Errorf("%s on the %s page sees %d admin-only controls or links", role, pg.name, n)
			}
			// The campaign's history links to the audit log (for admins):
			// there is an admin-only link to hide.
			if pg.name == "campaign" && mustEval[int](t, b, `document.querySelectorAll('[data-testid=history-audit]').length`) == 0 {
				t.Error("the campaign's history has no audit link: the admin-only check proves nothing there")
			}
			b.shot(role + "-" + pg.name)
		}
		return got
	}

	b := newBrowser(t, p.HTTPURL, 120*time.Second)
	b.signInUser("otto", "operator-password-1")
	if got := b.text(`[data-testid=whoami-role]`); got != "operator" {
		t.Errorf("the header shows the role %q, want operator", got)
	}
	controls := visit(b, "operator")
	for page, want := range map[string][]string{
		"device":    {"btn-rotate", "btn-decommission", "cmd-form", "config-form"},
		"firmware":  {"upload-form", "firmware-delete"},
		"campaigns": {"new-campaign"},
		"campaign":  {"action-start"},
		"commands":  {"new-bulk"},
	} {
		for _, id := range want {
			if !strings.Contains(strings.Join(controls[page], " "), "["+id+"]") {
				t.Errorf("an operator on the %s page does not see %s; visible controls: %q", page, id, controls[page])
			}
		}
	}
	if n := mustEval[int](t, b, adminNav); n != 0 {
		t.Errorf("an operator sees %d admin pages in the nav, want none", n)
	}

	b.navigate("/ui/keys")
	b.waitJS("the operator refused the API keys page", `document.querySelector('[data-testid=needs-role][data-needs-role=admin]')`, 10*time.Second)
	b.click(`[data-testid=signout]`)
	b.waitJS("the sign-in page", `document.querySelector('[data-testid=signin-name]') && document.getElementById('top').hidden`, 10*time.Second)

	b.signInUser("vera", "viewer-password-1")
	if got := b.text(`[data-testid=whoami-role]`); got != "viewer" {
		t.Errorf("the header shows the role %q, want viewer", got)
	}
	for page, found := range visit(b, "viewer") {
		if len(found) > 0 {
			t.Errorf("a viewer sees controls that change things on the %s page: %q", page, found)
		}
	}
	if n := mustEval[int](t, b, adminNav); n != 0 {
		t.Errorf("a viewer sees %d admin pages in the nav, want none", n)
	}
	b.navigate("/ui/campaigns/new")
	b.waitJS("the viewer refused the campaign form", `document.querySelector('[data-testid=needs-role][data-needs-role=operator]')`, 10*time.Second)
	if n := mustEval[int](t, b, `document.querySelectorAll('[data-testid=campaign-form]').length`); n != 0 {
		t.Error("the campaign form is drawn for a viewer")
	}
}

// TestConsoleAdminCreatesKey: an admin signed in with a name and a
// password creates an API key in the console; its token is shown once,
// works against the API with the key's role, the key is listed with its
// role, expiry and last use, its creation is in the audit log, and once
// revoked in the console the token is refused at once.
func TestConsoleAdminCreatesKey(t *testing.T) {
	p, _ := consoleFleetd(t)
	createUser(t, p, "ada", "admin-password-1", "admin")
	b := newBrowser(t, p.HTTPURL, 90*time.Second)
	b.signInUser("ada", "admin-password-1")
	if got := b.text(`[data-testid=whoami-role]`); got != "admin" {
		t.Errorf("the header shows the role %q, want admin", got)
	}
	b.click(`a[data-nav=keys]`)
	b.waitJS("the API keys page", `document.querySelector('[data-testid=key-form]') && document.querySelector('[data-testid=key-list] .empty, [data-testid=key-table]')`, 10*time.Second)
	b.setValue(`[data-testid=key-name]`, "ci-upload")
	b.setValue(`[data-testid=key-role]`, "operator")
	b.setValue(`[data-testid=key-expiry]`, "30d")
	b.click(`[data-testid=key-create]`)
	b.waitJS("the token dialog", `document.querySelector('[data-testid=key-token-dialog] [data-testid=new-key-token]')`, 10*time.Second)
	b.shot("token-shown")
	token := b.text(`[data-testid=new-key-token]`)
	if len(token) < 20 {
		t.Fatalf("the token shown is %q", token)
	}
	b.waitJS("the key in the list", `(() => { const r = document.querySelector('[data-testid=key-row][data-name="ci-upload"]');
		return r && r.dataset.role === 'operator' && r.dataset.state === 'active' && r.querySelector('[data-testid=key-last-used]').textContent === 'never'; })()`, 10*time.Second)
	b.click(`[data-testid=secret-done]`)
	b.waitJS("the dialog closed", `!document.querySelector('[data-testid=key-token-dialog]')`, 5*time.Second)
	if strings.Contains(b.pageText(), token) {
		t.Error("the token is still on the page after the dialog closed")
	}

	// The key works, with its role.
	var me struct {
		Principal struct{ Kind, Name, Role string }
	}
	if st := call(t, p.HTTPURL, "GET", "/me", token, "", nil, &me); st != http.StatusOK || me.Principal.Kind != "key" || me.Principal.Name != "ci-upload" || me.Principal.Role != "operator" {
		t.Errorf("GET /me with the key: %d %+v, want 200 the operator key ci-upload", st, me.Principal)
	}
	var devs struct{ Devices []fleet.Device }
	if st := call(t, p.HTTPURL, "GET", "/devices", token, "", nil, &devs); st != http.StatusOK {
		t.Errorf("GET /devices with the key: %d, want 200", st)
	}
	if st := call(t, p.HTTPURL, "GET", "/keys", token, "", nil, nil); st != http.StatusForbidden {
		t.Errorf("GET /keys with the operator key: %d, want 403", st)
	}

	// A reload shows the key used, and never the token again.
	b.do("reload", chromedp.Reload())
	b.waitJS("the key used", `(() => { const r = document.querySelector('[data-testid=key-row][data-name="ci-upload"]');
		return r && r.querySelector('[data-testid=key-last-used]').textContent !== 'never'; })()`, 10*time.Second)
	if strings.Contains(b.pageText(), token) {
		t.Error("the token is shown again after a reload")
	}
	b.shot("key-listed")

	// The creation is in the audit log, by ada, with its request id.
	b.click(`a[data-nav=audit]`)
	b.waitJS("the key's creation in the audit log", `[...document.querySelectorAll('[data-testid=audit-row]')].some((r) =>
		r.dataset.method === 'POST' && r.dataset.route === '/api/v1/keys' && r.dataset.principal === 'ada' && r.dataset.status === '201' && r.dataset.requestId)`, 10*time.Second)
	b.shot("audit")

	// Revoked in the console, the token is refused at once.
	b.click(`a[data-nav=keys]`)
	b.waitJS("the key row", `document.querySelector('[data-testid=key-row][data-name="ci-upload"] [data-testid=key-revoke]')`, 10*time.Second)
	b.click(`[data-testid=key-row][data-name="ci-upload"] [data-testid=key-revoke]`)
	b.click(`[data-testid=confirm-ok]`)
	b.waitJS("the key revoked", `document.querySelector('[data-testid=key-row][data-name="ci-upload"]').dataset.state === 'revoked'`, 10*time.Second)
	if st := call(t, p.HTTPURL, "GET", "/devices", token, "", nil, nil); st != http.StatusUnauthorized {
		t.Errorf("GET /devices with the revoked key: %d, want 401", st)
	}
}

// TestConsoleSessionReloadAndSignOut: a console session is a cookie that
// the page cannot read; it survives a reload (live updates and changes,
// with the CSRF token GET /me gives back, still work), and dies at
// sign-out: the console is on the sign-in page and fleetd refuses the old
// cookie. A role changed meanwhile is taken at the first 403; a session
// ended elsewhere returns to the sign-in page.
func TestConsoleSessionReloadAndSignOut(t *testing.T) {
	p, api := consoleFleetd(t)
	if _, err := api.RegisterDevice(context.Background(), fleet.NewDevice{ID: "gw-s1", Model: "gw-100"}); err != nil {
		t.Fatal(err)
	}
	createUser(t, p, "otto", "operator-password-1", "operator")
	b := newBrowser(t, p.HTTPURL, 90*time.Second)

	b.navigate("/")
	b.waitJS("the sign-in form", `document.querySelector('[data-testid=signin-name]')`, 10*time.Second)
	b.do("type a wrong password",
		chromedp.SendKeys(chromedp.CSS(`[data-testid=signin-name]`), "otto"),
		chromedp.SendKeys(chromedp.CSS(`[data-testid=signin-password]`), "not-the-password"))
	b.click(`[data-testid=signin-submit]`)
	b.waitJS("the refusal", `document.querySelector('[data-testid=signin-error]').textContent.includes('Wrong user name or password')`, 10*time.Second)
	if c := b.sessionCookie(); c != nil {
		t.Errorf("a refused sign-in left a session cookie: %+v", c)
	}

	b.signInUser("otto", "operator-password-1")
	b.waitLive()
	c := b.sessionCookie()
	if c == nil || !c.HTTPOnly || c.SameSite != network.CookieSameSiteStrict {
		t.Fatalf("session cookie %+v, want fleetd_session, HttpOnly, SameSite=Strict", c)
	}
	if js := mustEval[string](t, b, `document.cookie + '|' + sessionStorage.length + '|' + localStorage.length`); js != "|0|0" {
		t.Errorf("the page can read a credential (document.cookie|sessionStorage|localStorage): %q", js)
	}

	b.do("reload", chromedp.Reload())
	b.waitJS("still signed in after the reload", `!document.getElementById('top').hidden && !document.querySelector('[data-testid=signin-name]') &&
		document.querySelector('[data-testid=whoami-name]').textContent === 'otto' && document.querySelector('[data-testid=online-count]')`, 10*time.Second)
	b.waitLive()
	// A change after the reload carries the CSRF token again.
	b.navigate("/ui/devices/gw-s1")
	b.waitJS("the command form", `document.querySelector('[data-testid=cmd-name]')`, 10*time.Second)
	b.setValue(`[data-testid=cmd-name]`, "ping")
	b.click(`[data-testid=cmd-send]`)
	b.waitJS("the command queued", `document.querySelector('[data-testid=cmd-sent]')`, 10*time.Second)
	b.shot("after-reload")
	if st := call(t, p.HTTPURL, "GET", "/me", "", c.Value, nil, nil); st != http.StatusOK {
		t.Fatalf("GET /me with the session cookie before sign-out: %d, want 200", st)
	}

	b.click(`[data-testid=signout]`)
	b.waitJS("the sign-in page after sign-out", `document.querySelector('[data-testid=signin-name]') && document.getElementById('top').hidden &&
		document.querySelector('[data-testid=signin-error]').textContent.includes('Signed out')`, 10*time.Second)
	b.shot("signed-out")
	if st := call(t, p.HTTPURL, "GET", "/me", "", c.Value, nil, nil); st != http.StatusUnauthorized {
		t.Errorf("GET /me with the old session cookie after sign-out: %d, want 401", st)
	}
	b.do("reload", chromedp.Reload())
	b.waitJS("the sign-in page after a reload", `document.querySelector('[data-testid=signin-name]') && document.getElementById('top').hidden`, 10*time.Second)

	// Demoted by an admin while signed in, the next change is refused (403)
	// and the console takes the new role: the controls go.
	b.signInUser("otto", "operator-password-1")
	var users struct{ Users []struct{ ID, Name string } }
	if st := call(t, p.HTTPURL, "GET", "/users", p.Token(), "", nil, &users); st != http.StatusOK || len(users.Users) != 1 {
		t.Fatalf("GET /users: %d %+v", st, users.Users)
	}
	otto := "/users/" + users.Users[0].ID
	b.navigate("/ui/devices/gw-s1")
	b.waitJS("the command form", `document.querySelector('[data-testid=cmd-name]')`, 10*time.Second)
	if st := call(t, p.HTTPURL, "PATCH", otto, p.Token(), "", map[string]string{"role": "viewer"}, nil); st != http.StatusOK {
		t.Fatalf("demote otto: %d", st)
	}
	b.setValue(`[data-testid=cmd-name]`, "ping")
	b.click(`[data-testid=cmd-send]`)
	b.waitJS("the refusal and the new role", `document.querySelector('[data-testid=global-error]').textContent.includes('Your role is now viewer') &&
		document.querySelector('[data-testid=whoami-role]').textContent === 'viewer' &&
		document.querySelector('[data-testid=cmd-form]').getClientRects().length === 0`, 10*time.Second)
	b.shot("demoted")

	// A session ended elsewhere (the user disabled by an admin) returns the
	// console to the sign-in page at its next request.
	if st := call(t, p.HTTPURL, "PATCH", otto, p.Token(), "", map[string]bool{"disabled": true}, nil); st != http.StatusOK {
		t.Fatalf("disable otto: %d", st)
	}
	b.click(`a[data-nav=devices]`)
	b.waitJS("the sign-in page once the session is refused", `document.querySelector('[data-testid=signin-name]') && document.getElementById('top').hidden &&
		document.querySelector('[data-testid=signin-error]').textContent.includes('session has ended')`, 10*time.Second)
}

// TestConsoleAdminPages: an admin (here with the break-glass token) adds a
// user with a role, changes the role, disables and deletes the user;
// subscribes a webhook receiver, sees its signing secret once, sends a
// test notification that the receiver can verify with that secret, and
// finds the attempt with its HTTP status in the delivery log; and follows
// a campaign's history entry to its audit entry.
func TestConsoleAdminPages(t *testing.T) {
	type hit struct {
		header http.Header
		body   []byte
	}
	hits := make(chan hit, 10)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		hits <- hit{r.Header.Clone(), body}
	}))
	defer srv.Close()
	p, api := consoleFleetd(t)
	ctx := context.Background()
	target := upload(t, api, "2.0.0", 4<<10)
	camp, err := api.CreateCampaign(ctx, firmware.Spec{Name: "audited", FirmwareID: target.ID,
		Stages:        []firmware.Stage{{Name: "all", Percent: 100, MaxFailureRate: 1, MaxNotBackOnline: -1}},
		DeviceTimeout: firmware.Duration(10 * time.Minute)})
	if err != nil {
		t.Fatal(err)
	}
	b := newBrowser(t, p.HTTPURL, 120*time.Second)
	b.signIn(p.Token())

	// Users.
	b.click(`a[data-nav=users]`)
	b.waitJS("the users page", `document.querySelector('[data-testid=user-form]') && document.querySelector('[data-testid=user-list] .empty, [data-testid=user-table]')`, 10*time.Second)
	b.setValue(`[data-testid=user-name]`, "uma")
	b.setValue(`[data-testid=user-password]`, "uma-password-123")
	b.setValue(`[data-testid=user-role]`, "operator")
	b.click(`[data-testid=user-create]`)
	row := `[data-testid=user-row][data-name="uma"]`
	b.waitJS("uma, an operator", `document.querySelector('`+row+`[data-role=operator][data-disabled=false]')`, 10*time.Second)
	b.setValue(row+` [data-testid=user-row-role]`, "viewer")
	b.waitJS("uma, a viewer", `document.querySelector('`+row+`[data-role=viewer]')`, 10*time.Second)
	var users struct {
		Users []struct {
			Name, Role string
			Disabled   bool
		}
	}
	if st := call(t, p.HTTPURL, "GET", "/users", p.Token(), "", nil, &users); st != http.StatusOK || len(users.Users) != 1 || users.Users[0].Role != "viewer" {
		t.Errorf("GET /users: %d %+v, want uma a viewer", st, users.Users)
	}
	b.click(row + ` [data-testid=user-disable]`)
	b.waitJS("uma disabled", `document.querySelector('`+row+`[data-disabled=true]')`, 10*time.Second)
	if st := call(t, p.HTTPURL, "POST", "/session", "", "", map[string]string{"name": "uma", "password": "uma-password-123"}, nil); st != http.StatusUnauthorized {
		t.Errorf("a disabled user signs in: %d, want 401", st)
	}
	b.shot("users")
	b.click(row + ` [data-testid=user-delete]`)
	b.click(`[data-testid=confirm-ok]`)
	b.waitJS("uma deleted", `!document.querySelector('`+row+`') && document.querySelector('[data-testid=user-deleted]')`, 10*time.Second)

	// Webhooks.
	b.click(`a[data-nav=webhooks]`)
	b.waitJS("the webhook form", `document.querySelector('[data-testid=webhook-event][data-type="campaign.completed"]')`, 10*time.Second)
	b.setValue(`[data-testid=webhook-url]`, srv.URL+"/fleetd")
	b.setValue(`[data-testid=webhook-description]`, "on-call")
	b.click(`[data-testid=webhook-event][data-type="campaign.completed"]`)
	b.click(`[data-testid=webhook-create]`)
	b.waitJS("the secret dialog", `document.querySelector('[data-testid=webhook-secret-dialog] [data-testid=new-webhook-secret]')`, 10*time.Second)
	secret := b.text(`[data-testid=new-webhook-secret]`)
	b.click(`[data-testid=secret-done]`)
	b.waitJS("the webhook listed, enabled", `document.querySelector('[data-testid=webhook-row][data-enabled=true]')`, 10*time.Second)
	if strings.Contains(b.pageText(), secret) {
		t.Error("the secret is still on the page after the dialog closed")
	}
	b.click(`[data-testid=webhook-row] a`)
	b.waitJS("the webhook's page", `document.querySelector('[data-testid=webhook-title]') && document.querySelector('[data-testid=delivery-log] .empty')`, 10*time.Second)
	b.click(`[data-testid=webhook-test]`)
	select {
	case h := <-hits:
		if err := notify.Verify(secret, h.header.Get("X-Fleetd-Signature"), h.body, time.Minute, time.Now()); err != nil {
			t.Errorf("the test notification does not verify with the secret shown: %v", err)
		}
		if got := h.header.Get("X-Fleetd-Event"); got != "webhook.test" {
			t.Errorf("X-Fleetd-Event %q, want webhook.test", got)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("the receiver got no test notification within 15 s")
	}
	b.waitJS("the delivered attempt in the log", `document.querySelector('[data-testid=delivery-row][data-type="webhook.test"][data-state=delivered] [data-testid=delivery-attempt][data-status="200"]')`, 15*time.Second)
	b.shot("deliveries")
	b.click(`[data-testid=webhook-disable]`)
	b.waitJS("the webhook disabled", `document.querySelector('[data-testid=webhook-state][data-state=disabled]')`, 10*time.Second)

	// A campaign's history entry links to its audit entry.
	b.navigate("/ui/campaigns/" + camp.ID)
	b.waitJS("the audit link of the creation", `document.querySelector('[data-testid=history-entry][data-action=created] [data-testid=history-audit]')`, 10*time.Second)
	rid := mustEval[string](t, b, `document.querySelector('[data-testid=history-entry][data-action=created] [data-testid=history-audit]').dataset.requestId`)
	b.click(`[data-testid=history-entry][data-action=created] [data-testid=history-audit]`)
	b.waitJS("the campaign's creation in the audit log", `(() => { const rows = [...document.querySelectorAll('[data-testid=audit-row]')];
		return rows.length === 1 && rows[0].dataset.requestId === `+jsString(rid)+` && rows[0].dataset.route === '/api/v1/campaigns' &&
			rows[0].dataset.method === 'POST' && document.querySelector('[data-testid=audit-request-id]').value === `+jsString(rid)+`; })()`, 10*time.Second)
	b.shot("audit-entry")
	b.tablet("audit-entry-tablet")
}

// TestConsoleSignInThrottled: past fleetd's limit of failed sign-ins for a
// name, the sign-in page says to wait, and for how long (Retry-After).
func TestConsoleSignInThrottled(t *testing.T) {
	p, _ := consoleFleetd(t)
	b := newBrowser(t, p.HTTPURL, 60*time.Second)
	b.navigate("/")
	b.waitJS("the sign-in form", `document.querySelector('[data-testid=signin-name]')`, 10*time.Second)
	b.setValue(`[data-testid=signin-name]`, "mallory")
	for i := 0; ; i++ {
		b.setValue(`[data-testid=signin-password]`, "guess-"+string(rune('a'+i)))
		b.click(`[data-testid=signin-submit]`)
		b.waitJS("the answer", `!document.querySelector('[data-testid=signin-submit]').disabled &&
			!document.querySelector('[data-testid=signin-error]').textContent.includes('Signing in')`, 10*time.Second)
		msg := b.text(`[data-testid=signin-error]`)
		if strings.Contains(msg, "Too many failed sign-ins") {
			if !regexp.MustCompile(`\(in \d+ s\)`).MatchString(msg) {
				t.Errorf("the throttled sign-in says %q, without how long to wait", msg)
			}
			break
		}
		if !strings.Contains(msg, "Wrong user name or password") {
			t.Fatalf("attempt %d: %q", i+1, msg)
		}
		if i == 20 {
			t.Fatal("20 wrong passwords for one name and no throttling")
		}
	}
	b.shot("throttled")
}
