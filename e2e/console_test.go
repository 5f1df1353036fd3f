package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/fleetd/fleetd/firmware"
	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/fleetdtest"
	"github.com/fleetd/fleetd/sim"
	"github.com/fleetd/fleetd/web"
	"github.com/fleetd/fleetd/web/client"
)

// The console tests drive the web console in a real headless Chromium
// against the real fleetd binary and fleetsim devices, as an operator would.

const chromiumPath = "/usr/bin/chromium"

// browser is one headless Chromium on one fleetd, bounded by a deadline.
type browser struct {
	t     *testing.T
	ctx   context.Context
	base  string
	shots string
	n     int

	mu         sync.Mutex
	console    []string
	exceptions []string
}

func newBrowser(t *testing.T, base string, timeout time.Duration) *browser {
	t.Helper()
	if _, err := os.Stat(chromiumPath); err != nil {
		t.Fatalf("the console tests need Chromium at %s (Debian's chromium package; .ci/run installs it): %v", chromiumPath, err)
	}
	shots := os.Getenv("FLEETD_SCREENSHOT_DIR")
	if shots == "" {
		shots = filepath.Join(t.TempDir(), "screenshots")
	}
	if err := os.MkdirAll(shots, 0o755); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	actx, acancel := chromedp.NewExecAllocator(ctx,
		chromedp.ExecPath(chromiumPath),
		chromedp.Headless,
		chromedp.NoSandbox, // the tests run as root
		chromedp.DisableGPU,
		chromedp.NoFirstRun,
		chromedp.NoDefaultBrowserCheck,
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("disable-background-timer-throttling", true),
		chromedp.Flag("disable-backgrounding-occluded-windows", true),
		chromedp.Flag("disable-renderer-backgrounding", true),
		chromedp.Flag("disable-dev-shm-usage", true),
		chromedp.UserDataDir(filepath.Join(t.TempDir(), "chromium")),
		chromedp.WindowSize(1280, 900),
	)
	bctx, bcancel := chromedp.NewContext(actx)
	b := &browser{t: t, ctx: bctx, base: base, shots: shots}
	// Console starts the browser; its messages are kept for the report.
	messages := chromedp.Console(bctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for m, err := range messages {
			if err != nil {
				return
			}
			b.mu.Lock()
			b.console = append(b.console, m.String())
			if m.IsException() {
				b.exceptions = append(b.exceptions, m.String())
			}
			b.mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		bcancel()
		acancel()
		cancel()
		<-done
		b.mu.Lock()
		defer b.mu.Unlock()
		for _, e := range b.exceptions {
			t.Errorf("uncaught exception in the console: %s", e)
		}
		if t.Failed() && len(b.console) > 0 {
			t.Logf("browser console:\n%s", strings.Join(b.console, "\n"))
		}
	})
	if err := chromedp.Do(bctx); err != nil {
		t.Fatalf("start chromium: %v", err)
	}
	return b
}

func (b *browser) do(what string, actions ...chromedp.Action[chromedp.Void]) {
	b.t.Helper()
	if err := chromedp.Do(b.ctx, actions...); err != nil {
		b.shot("failed")
		b.t.Fatalf("%s: %v\npage: %s", what, err, b.pageText())
	}
}

func (b *browser) navigate(path string) {
	b.t.Helper()
	b.do("open "+path, chromedp.Navigate(b.base+path))
}

// eval evaluates a JavaScript expression into T.
func eval[T any](b *browser, expr string) (T, error) {
	return chromedp.Run(b.ctx, chromedp.Evaluate[T](expr))
}

// waitJS polls a JavaScript condition until it holds or within passes.
func (b *browser) waitJS(what, cond string, within time.Duration) {
	b.t.Helper()
	deadline := time.Now().Add(within)
	var err error
	for {
		var ok bool
		ok, err = eval[bool](b, "!!("+cond+")")
		if err == nil && ok {
			return
		}
		if time.Now().After(deadline) || b.ctx.Err() != nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	b.shot("timeout")
	b.t.Fatalf("%s: not seen within %s (last error: %v)\npage: %s", what, within, err, b.pageText())
}

func (b *browser) text(sel string) string {
	s, _ := eval[string](b, fmt.Sprintf(`(document.querySelector(%s) || {}).textContent || ''`, jsString(sel)))
	return strings.TrimSpace(s)
}

func (b *browser) pageText() string {
	s, _ := eval[string](b, `(document.body && document.body.innerText) || ''`)
	if len(s) > 3000 {
		s = s[:3000] + "…"
	}
	return s
}

func (b *browser) click(sel string) {
	b.t.Helper()
	b.do("click "+sel, chromedp.Click(chromedp.CSS(sel), chromedp.NodeVisible))
}

// setValue sets an input's or select's value and fires input and change, as
// typing or choosing does.
func (b *browser) setValue(sel, value string) {
	b.t.Helper()
	js := fmt.Sprintf(`(() => { const el = document.querySelector(%s); if (!el) return false;
		el.value = %s; el.dispatchEvent(new Event('input', {bubbles: true})); el.dispatchEvent(new Event('change', {bubbles: true})); return true; })()`,
		jsString(sel), jsString(value))
	ok, err := eval[bool](b, js)
	if err != nil || !ok {
		b.shot("failed")
		b.t.Fatalf("set %s to %q: element missing (%v)\npage: %s", sel, value, err, b.pageText())
	}
}

var unsafeName = regexp.MustCompile(`[^A-Za-z0-9_.-]+`)

// shot saves a full-page screenshot as PNG (scrolled to the top, so that
// the sticky header is where it belongs).
func (b *browser) shot(label string) {
	b.t.Helper()
	_, _ = eval[chromedp.Void](b, `window.scrollTo(0, 0)`)
	png, err := chromedp.Run(b.ctx, chromedp.FullScreenshot(100))
	if err != nil {
		b.t.Logf("screenshot %s: %v", label, err)
		return
	}
	b.n++
	path := filepath.Join(b.shots, fmt.Sprintf("%s-%02d-%s.png", unsafeName.ReplaceAllString(b.t.Name(), "_"), b.n, label))
	if err := os.WriteFile(path, png, 0o644); err != nil {
		b.t.Logf("screenshot %s: %v", label, err)
		return
	}
	b.t.Logf("screenshot: %s", path)
}

// tablet shows the page at a tablet's size (portrait), checks that nothing
// overflows sideways, takes a screenshot, and returns to the laptop size.
func (b *browser) tablet(label string) {
	b.t.Helper()
	b.do("tablet viewport", chromedp.EmulateViewport(820, 1180, chromedp.EmulateScale(1)))
	b.waitJS("the page at tablet width, charts redrawn to fit", `window.innerWidth === 820 && document.documentElement.scrollWidth <= 820 &&
		[...document.querySelectorAll('.chart-box')].every((box) => { const s = box.querySelector('svg');
			return !s || Math.abs(Number(s.getAttribute('width')) - box.clientWidth) <= 2 || box.clientWidth < 280; })`, 5*time.Second)
	b.shot(label)
	b.do("laptop viewport", chromedp.EmulateViewport(1280, 900, chromedp.EmulateScale(1)))
}

// signIn opens the console and signs in with the break-glass admin token
// (folded away below the user name and password).
func (b *browser) signIn(token string) {
	b.t.Helper()
	b.navigate("/")
	b.waitJS("the sign-in form", `document.querySelector('[data-testid=signin-use-token]')`, 10*time.Second)
	b.click(`[data-testid=signin-use-token]`)
	b.do("type the token", chromedp.SendKeys(chromedp.CSS(`[data-testid=signin-token]`), token))
	b.click(`[data-testid=signin-token-submit]`)
	b.waitJS("the console after sign-in", `!document.getElementById('top').hidden && document.querySelector('[data-testid=online-count]')`, 10*time.Second)
}

// waitLive waits until the console's live stream is open.
func (b *browser) waitLive() {
	b.t.Helper()
	b.waitJS("the live stream (GET /api/v1/stream)", `document.querySelector('[data-testid=live-status]').dataset.state === 'live'`, 20*time.Second)
}

func jsString(s string) string {
	q, _ := json.Marshal(s)
	return string(q)
}

// consoleFleetd starts fleetd for a console test and stops it gracefully
// when the test ends (after the browser and the simulated devices), so that
// its embedded PostgreSQL stops with it.
func consoleFleetd(t *testing.T) (*fleetdtest.Process, *client.Client) {
	t.Helper()
	p, api := fastFleetd(t, fleetdtest.DataDir(t))
	t.Cleanup(func() {
		if !p.Exited() {
			p.Signal(syscall.SIGTERM)
			_ = p.Wait(30 * time.Second)
		}
	})
	return p, api
}

func waitOnline(t *testing.T, api *client.Client, n int, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		h, err := api.FleetHealth(context.Background())
		if err == nil && h.Devices.Online == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("fleet: %d online (err %v), want %d", h.Devices.Online, err, n)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func simFleet(p *fleetdtest.Process, cohorts ...sim.Cohort) *sim.Fleet {
	return &sim.Fleet{
		Server:  sim.Server{MQTT: "tcp://" + p.Addr("mqtt-tcp"), API: p.HTTPURL},
		Run:     sim.RunOptions{Duration: secs(180), Register: true, Ramp: 100},
		Cohorts: cohorts,
	}
}

// TestConsoleSignIn: the break-glass admin token signs in from its own,
// labelled part of the sign-in page. A wrong token keeps the operator on
// the sign-in page with "invalid token"; the right one opens the deep link
// asked for, and the header says it is the break-glass token, an admin.
// The token is kept in sessionStorage only, never in the address or
// localStorage.
func TestConsoleSignIn(t *testing.T) {
	p, _ := consoleFleetd(t)
	b := newBrowser(t, p.HTTPURL, 60*time.Second)

	b.navigate("/ui/devices")
	b.waitJS("the sign-in form", `document.querySelector('[data-testid=signin-name]')`, 10*time.Second)
	if got := b.text(`[data-testid=signin-use-token]`); !strings.Contains(strings.ToLower(got), "break-glass") {
		t.Errorf("the token's part of the sign-in page is labelled %q, want break-glass", got)
	}
	b.click(`[data-testid=signin-use-token]`)
	b.do("type a wrong token", chromedp.SendKeys(chromedp.CSS(`[data-testid=signin-token]`), "not-the-admin-token-at-all"))
	b.click(`[data-testid=signin-token-submit]`)
	b.waitJS("the invalid-token message", `document.querySelector('[data-testid=signin-token-error]').textContent.includes('invalid token')`, 10*time.Second)
	b.shot("wrong-token")
	if n, _ := eval[int](b, `sessionStorage.length + localStorage.length`); n != 0 {
		t.Errorf("a refused token was stored (%d storage entries)", n)
	}

	b.setValue(`[data-testid=signin-token]`, "")
	b.do("type the right token", chromedp.SendKeys(chromedp.CSS(`[data-testid=signin-token]`), p.Token()))
	b.click(`[data-testid=signin-token-submit]`)
	// The deep link the operator opened survives the sign-in.
	b.waitJS("the devices page", `document.querySelector('[data-testid=device-table]')`, 10*time.Second)
	b.waitJS("the break-glass admin in the header", `document.querySelector('[data-testid=whoami]').dataset.kind === 'bootstrap' &&
		document.querySelector('[data-testid=whoami-role]').textContent === 'admin' &&
		document.querySelector('[data-testid=whoami-name]').textContent.includes('break-glass')`, 5*time.Second)
	b.click(`a[data-nav=overview]`)
	b.waitJS("the overview's online count", `/^\d+$/.test(document.querySelector('[data-testid=online-count]').textContent)`, 10*time.Second)
	b.shot("overview")
	checks, err := eval[map[string]any](b, `({href: location.href, local: localStorage.length, session: sessionStorage.getItem('fleetd.adminToken')})`)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(fmt.Sprint(checks["href"]), p.Token()) || checks["local"] != float64(0) || checks["session"] != p.Token() {
		t.Errorf("token storage: %v; want the token in sessionStorage only", checks)
	}
}

// TestConsoleOverviewLive: the overview counts a running fleet's online
// devices and follows connects and disconnects live, without a reload.
func TestConsoleOverviewLive(t *testing.T) {
	p, api := consoleFleetd(t)
	runFleet(t, api, simFleet(p, sim.Cohort{Name: "steady", Count: 6, Model: "gw-100", Firmware: "1.0.0", Keepalive: secs(30)}), p.Token())
	waitOnline(t, api, 6, 20*time.Second)

	b := newBrowser(t, p.HTTPURL, 90*time.Second)
	b.signIn(p.Token())
	b.waitJS("6 online", `document.querySelector('[data-testid=online-count]').textContent === '6'`, 10*time.Second)
	b.waitLive()
	b.do("mark the page", chromedp.Evaluate[chromedp.Void](`window.__noReload = true`))

	_, stop := runFleet(t, api, simFleet(p, sim.Cohort{Name: "extra", Count: 2, Model: "gw-100", Firmware: "1.0.0", Keepalive: secs(30)}), p.Token())
	b.waitJS("8 online after two devices connect", `document.querySelector('[data-testid=online-count]').textContent === '8'`, 20*time.Second)
	b.shot("eight-online")
	stop()
	b.waitJS("6 online after they disconnect", `document.querySelector('[data-testid=online-count]').textContent === '6'`, 20*time.Second)
	b.waitJS("the disconnects in the activity chart", `document.querySelector('[data-testid=activity-caption]').textContent.includes('2 disconnects')`, 10*time.Second)
	if ok, _ := eval[bool](b, `window.__noReload === true`); !ok {
		t.Error("the page reloaded; the counts must change live")
	}
	b.shot("six-online")
	b.tablet("six-online-tablet")
}

// TestConsoleDeviceFilter: the device list filters by firmware.
func TestConsoleDeviceFilter(t *testing.T) {
	p, api := consoleFleetd(t)
	runFleet(t, api, simFleet(p,
		sim.Cohort{Name: "old", Count: 3, Model: "gw-100", Firmware: "1.0.0", Keepalive: secs(30)},
		sim.Cohort{Name: "new", Count: 2, Model: "gw-100", Firmware: "1.1.0", Keepalive: secs(30)}), p.Token())
	waitOnline(t, api, 5, 20*time.Second)

	b := newBrowser(t, p.HTTPURL, 60*time.Second)
	b.signIn(p.Token())
	b.click(`a[data-nav=devices]`)
	b.waitJS("5 device rows", `document.querySelectorAll('[data-testid=device-row]').length === 5`, 10*time.Second)
	b.shot("all-devices")
	b.setValue(`[data-testid=filter-firmware]`, "1.1.0")
	b.waitJS("only the 1.1.0 rows", `(() => { const rows = [...document.querySelectorAll('[data-testid=device-row]')];
		return rows.length === 2 && rows.every((r) => r.dataset.firmware === '1.1.0' && r.dataset.deviceId.startsWith('new-')); })()`, 10*time.Second)
	if loc, _ := eval[string](b, `location.search`); !strings.Contains(loc, "firmware=1.1.0") {
		t.Errorf("the filter is not in the address (%q): a reload would lose it", loc)
	}
	b.shot("firmware-1.1.0")
	b.setValue(`[data-testid=filter-firmware]`, "")
	b.setValue(`[data-testid=filter-search]`, "old-")
	b.waitJS("the id prefix search", `(() => { const rows = [...document.querySelectorAll('[data-testid=device-row]')];
		return rows.length === 3 && rows.every((r) => r.dataset.deviceId.startsWith('old-')); })()`, 10*time.Second)
}

// TestConsoleDeviceTimeline: a device whose firmware sends malformed
// PINGREQs shows protocol_error disconnects on its timeline, with a legend.
func TestConsoleDeviceTimeline(t *testing.T) {
	p, api := consoleFleetd(t)
	runFleet(t, api, simFleet(p,
		sim.Cohort{Name: "bad", Count: 1, Model: "gw-100", Firmware: "1.0.3", Keepalive: secs(2), Pings: "malformed"},
		sim.Cohort{Name: "good", Count: 1, Model: "gw-100", Firmware: "1.2.0", Keepalive: secs(30)}), p.Token())
	ctx := context.Background()
	deadline := time.Now().Add(30 * time.Second)
	for {
		evs, err := api.Events(ctx, "bad-0", "", 100)
		n := 0
		for _, e := range evs.Events {
			if e.Reason == "protocol_error" {
				n++
			}
		}
		if err == nil && n >= 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("bad-0 has %d protocol_error disconnects (err %v), want 2", n, err)
		}
		time.Sleep(200 * time.Millisecond)
	}

	b := newBrowser(t, p.HTTPURL, 60*time.Second)
	b.signIn(p.Token())
	b.navigate("/ui/devices/bad-0")
	b.waitJS("protocol_error bars on the timeline", `document.querySelectorAll('[data-testid=timeline-bar][data-reason=protocol_error]').length >= 2`, 10*time.Second)
	b.waitJS("protocol_error in the legend", `document.querySelector('[data-testid=timeline-legend]').textContent.includes('protocol_error')`, 5*time.Second)
	if got := b.text(`[data-testid=device-fw]`); got != "1.0.3" {
		t.Errorf("device page firmware %q, want 1.0.3", got)
	}
	b.waitJS("the malformed-pings diagnosis", `document.querySelector('[data-testid=problem][data-code=malformed_pings]')`, 20*time.Second)
	b.shot("timeline")
	b.tablet("timeline-tablet")
}

// TestConsoleCampaign: a campaign created in the console starts, and its
// stage progress follows the devices to completion.
func TestConsoleCampaign(t *testing.T) {
	p, api := consoleFleetd(t)
	target := upload(t, api, "2.0.0", 64<<10)
	runFleet(t, api, simFleet(p, sim.Cohort{Name: "ota", Count: 4, Model: "gw-100", Firmware: "1.0.0", Keepalive: secs(5)}), p.Token())
	waitOnline(t, api, 4, 20*time.Second)

	b := newBrowser(t, p.HTTPURL, 120*time.Second)
	b.signIn(p.Token())
	b.click(`a[data-nav=campaigns]`)
	b.click(`[data-testid=new-campaign]`)
	b.waitJS("the campaign form", `document.querySelector('[data-testid=cf-firmware] option[value="`+target.ID+`"]')`, 10*time.Second)
	b.setValue(`[data-testid=cf-name]`, "console rollout")
	b.setValue(`[data-testid=cf-firmware]`, target.ID)
	b.setValue(`[data-testid=cf-models]`, "gw-100")
	b.waitJS("4 matching devices", `document.querySelector('[data-testid=match-count]').dataset.count === '4'`, 10*time.Second)
	b.setValue(`[data-testid=stage-mnbo]`, "0")
	b.setValue(`[data-testid=cf-dpm]`, "0")
	b.setValue(`[data-testid=cf-concurrent]`, "0")
	b.setValue(`[data-testid=cf-timeout]`, "60s")
	b.shot("form")
	b.click(`[data-testid=cf-submit]`)
	b.waitJS("the draft campaign", `document.querySelector('[data-testid=campaign-state]') && document.querySelector('[data-testid=campaign-state]').dataset.state === 'draft'`, 10*time.Second)
	b.click(`[data-testid=action-start]`)
	b.click(`[data-testid=confirm-ok]`)
	b.waitJS("the campaign running", `['running', 'completed'].includes(document.querySelector('[data-testid=campaign-state]').dataset.state)`, 10*time.Second)
	b.shot("started")
	b.waitJS("every device upgraded", `(() => { const bar = document.querySelector('[data-testid=stage-progress][data-stage="0"]');
		return bar && bar.dataset.targets === '4' && bar.dataset.succeeded === '4' &&
			document.querySelector('[data-testid=campaign-state]').dataset.state === 'completed'; })()`, 90*time.Second)
	b.waitJS("the completion in the history", `document.querySelector('[data-testid=history-entry][data-action=complete]')`, 10*time.Second)
	b.shot("completed")
	b.tablet("completed-tablet")

	camps, err := api.Campaigns(context.Background())
	if err != nil || len(camps) != 1 || camps[0].State != firmware.StateCompleted || camps[0].Name != "console rollout" {
		t.Fatalf("campaigns %+v (%v), want one completed \"console rollout\"", camps, err)
	}
}

// TestConsoleAPIError: a refused request shows fleetd's message and the
// field it names, not a blank page.
func TestConsoleAPIError(t *testing.T) {
	p, api := consoleFleetd(t)
	target := upload(t, api, "2.0.0", 4<<10)
	b := newBrowser(t, p.HTTPURL, 60*time.Second)
	b.signIn(p.Token())
	b.navigate("/ui/campaigns/new")
	b.waitJS("the campaign form", `document.querySelector('[data-testid=cf-firmware] option[value="`+target.ID+`"]')`, 10*time.Second)
	b.setValue(`[data-testid=cf-name]`, "too far")
	b.setValue(`[data-testid=cf-firmware]`, target.ID)
	b.setValue(`[data-testid=stage-value]`, "150")
	b.click(`[data-testid=cf-submit]`)
	b.waitJS("the percent error", `(() => { const e = document.querySelector('[data-testid=cf-error] [data-testid=error]');
		return e && e.querySelector('[data-testid=error-field]').textContent.includes('stages[0].percent') &&
			e.querySelector('[data-testid=error-message]').textContent.includes('must be in (0, 100]'); })()`, 10*time.Second)
	if ok, _ := eval[bool](b, `document.querySelector('[data-testid=stage-value]').classList.contains('invalid')`); !ok {
		t.Error("the stage's percent input is not marked invalid")
	}
	b.shot("percent-error")

	b.setValue(`[data-testid=stage-value]`, "100")
	b.setValue(`[data-testid=cf-models]`, "gw-999")
	b.click(`[data-testid=cf-submit]`)
	b.waitJS("the model error", `(() => { const e = document.querySelector('[data-testid=cf-error] [data-testid=error]');
		return e && e.querySelector('[data-testid=error-field]').textContent.includes('selector.models[0]') &&
			e.querySelector('[data-testid=error-message]').textContent.includes('not built for model gw-999'); })()`, 10*time.Second)

	b.navigate("/ui/devices/no-such-device")
	b.waitJS("the not-found message", `document.querySelector('[data-testid=error]') && document.querySelector('[data-testid=error]').textContent.includes('not found')`, 10*time.Second)
	b.shot("not-found")

	// Without fleetd the console says that live updates stopped, and a
	// page that cannot load says why.
	b.waitLive()
	p.Signal(syscall.SIGTERM)
	if err := p.Wait(30 * time.Second); err != nil {
		t.Fatalf("fleetd exit: %v", err)
	}
	b.waitJS("the stream outage", `(() => { const s = document.querySelector('[data-testid=live-status]');
		return s.dataset.state === 'down' && s.textContent.includes('live updates unavailable, retrying'); })()`, 15*time.Second)
	b.click(`a[data-nav=devices]`)
	b.waitJS("a readable network error", `document.querySelector('[data-testid=error]') &&
		document.querySelector('[data-testid=error]').textContent.includes('Cannot reach fleetd')`, 10*time.Second)
	b.shot("fleetd-gone")
}

// TestConsoleFirmwareUpload: an image uploaded from the console is listed
// with its version, models and signature; a second upload of the same
// version is refused with fleetd's message.
func TestConsoleFirmwareUpload(t *testing.T) {
	p, _ := consoleFleetd(t)
	image := filepath.Join(t.TempDir(), "gw-3.0.0.bin")
	if err := os.WriteFile(image, []byte(strings.Repeat("fleetd firmware image\n", 100_000)), 0o644); err != nil {
		t.Fatal(err)
	}
	b := newBrowser(t, p.HTTPURL, 60*time.Second)
	b.signIn(p.Token())
	b.click(`a[data-nav=firmware]`)
	b.waitJS("the upload form", `document.querySelector('[data-testid=upload-form]')`, 10*time.Second)
	upload := func() {
		b.do("choose the image", chromedp.SetUploadFiles(chromedp.CSS(`[data-testid=upload-file]`), []string{image}))
		b.setValue(`[data-testid=upload-version]`, "3.0.0")
		b.setValue(`[data-testid=upload-models]`, "gw-100, gw-200")
		b.setValue(`[data-testid=upload-notes]`, "uploaded from the console")
		b.click(`[data-testid=upload-submit]`)
	}
	upload()
	b.waitJS("the uploaded image", `document.querySelector('[data-testid=upload-result]') &&
		document.querySelector('[data-testid=firmware-row][data-version="3.0.0"]')`, 20*time.Second)
	row := b.text(`[data-testid=firmware-row][data-version="3.0.0"]`)
	for _, want := range []string{"gw-100", "gw-200", "2.1 MiB", "server", "uploaded from the console"} {
		if !strings.Contains(row, want) {
			t.Errorf("firmware row %q lacks %q", row, want)
		}
	}
	if now, _ := eval[string](b, `document.querySelector('[data-testid=upload-progress]').getAttribute('aria-valuenow')`); now != "100" {
		t.Errorf("upload progress ended at %s%%, want 100", now)
	}
	b.shot("uploaded")
	upload()
	b.waitJS("the conflict", `(() => { const e = document.querySelector('[data-testid=upload-status] [data-testid=error]');
		return e && e.textContent.includes('conflict') || e && e.textContent.includes('already'); })()`, 20*time.Second)
	b.shot("conflict")
}

// TestConsoleDeviceActions: rotating a device's token shows the new token
// once, and decommissioning ends the device's session; both ask first.
func TestConsoleDeviceActions(t *testing.T) {
	p, api := consoleFleetd(t)
	runFleet(t, api, simFleet(p, sim.Cohort{Name: "gw", Count: 2, Model: "gw-100", Firmware: "1.0.0", Keepalive: secs(30)}), p.Token())
	waitOnline(t, api, 2, 20*time.Second)

	b := newBrowser(t, p.HTTPURL, 60*time.Second)
	b.signIn(p.Token())
	b.navigate("/ui/devices/gw-1")
	b.waitJS("the device page", `document.querySelector('[data-testid=device-online]')`, 10*time.Second)

	b.click(`[data-testid=btn-rotate]`)
	b.waitJS("the confirmation", `document.querySelector('[data-testid=confirm-dialog]')`, 5*time.Second)
	b.click(`[data-testid=confirm-cancel]`)
	b.click(`[data-testid=btn-rotate]`)
	b.click(`[data-testid=confirm-ok]`)
	b.waitJS("the new token", `/^\S{20,}$/.test(document.querySelector('[data-testid=new-token]').textContent)`, 10*time.Second)
	b.shot("new-token")
	b.click(`[data-testid=token-done]`)

	b.click(`[data-testid=btn-decommission]`)
	b.click(`[data-testid=confirm-ok]`)
	b.waitJS("the decommissioned device", `document.querySelector('[data-testid=decommissioned-notice]') && document.querySelector('[data-testid=device-state]')`, 10*time.Second)
	b.shot("decommissioned")
	d, err := api.Device(context.Background(), "gw-1")
	if err != nil || d.State != "decommissioned" {
		t.Fatalf("gw-1: %+v (%v), want decommissioned", d, err)
	}
	waitOnline(t, api, 1, 10*time.Second)
}

// TestConsoleHandler: the console's files are served with their types and
// revalidated on every load; client-side routes get index.html; a missing
// file or API path is a JSON 404, not the page.
func TestConsoleHandler(t *testing.T) {
	h := web.ConsoleHandler()
	get := func(method, path string, header ...string) *httptest.ResponseRecorder {
		req := httptest.NewRequest(method, path, nil)
		for i := 0; i+1 < len(header); i += 2 {
			req.Header.Set(header[i], header[i+1])
		}
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		return rec
	}
	for _, tc := range []struct {
		name, method, path string
		status             int
		ctype, body        string
	}{
		{"root", "GET", "/", 200, "text/html", `src="/ui/app.js"`},
		{"console root", "GET", "/ui/", 200, "text/html", `src="/ui/app.js"`},
		{"device route with dots", "GET", "/ui/devices/gw-1.2", 200, "text/html", `src="/ui/app.js"`},
		{"campaign route", "GET", "/ui/campaigns/camp_1", 200, "text/html", `src="/ui/app.js"`},
		{"script", "GET", "/ui/app.js", 200, "text/javascript", "import"},
		{"module", "GET", "/ui/lib/live.js", 200, "text/javascript", "text/event-stream"},
		{"style", "GET", "/ui/app.css", 200, "text/css", ":root"},
		{"icon", "GET", "/ui/favicon.svg", 200, "image/svg+xml", "<svg"},
		{"missing asset", "GET", "/ui/nope.js", 404, "application/json", `"not_found"`},
		{"api path", "GET", "/api/v2/devices", 404, "application/json", `"not_found"`},
		{"post", "POST", "/ui/", 405, "application/json", `"method_not_allowed"`},
		{"head", "HEAD", "/ui/app.css", 200, "text/css", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := get(tc.method, tc.path)
			if rec.Code != tc.status || !strings.HasPrefix(rec.Header().Get("Content-Type"), tc.ctype) || !strings.Contains(rec.Body.String(), tc.body) {
				t.Fatalf("%s %s: %d %q %.80q; want %d %s containing %q", tc.method, tc.path, rec.Code, rec.Header().Get("Content-Type"), rec.Body.String(), tc.status, tc.ctype, tc.body)
			}
			if tc.status == 200 && rec.Header().Get("Cache-Control") != "no-cache" {
				t.Errorf("Cache-Control %q, want no-cache", rec.Header().Get("Cache-Control"))
			}
			if tc.method == "HEAD" && rec.Body.Len() != 0 {
				t.Errorf("HEAD answered with a body")
			}
		})
	}
	page := get("GET", "/ui/")
	if csp := page.Header().Get("Content-Security-Policy"); !strings.Contains(csp, "script-src 'self'") || !strings.Contains(csp, "frame-ancestors 'none'") {
		t.Errorf("index.html CSP %q", csp)
	}
	etag := get("GET", "/ui/app.js").Header().Get("ETag")
	if rec := get("GET", "/ui/app.js", "If-None-Match", etag); etag == "" || rec.Code != http.StatusNotModified {
		t.Errorf("revalidation with ETag %q: %d, want 304", etag, rec.Code)
	}
}

// TestConsoleActionsFollowState: the campaign page shows the actions the API
// allows, and when another client changes the campaign's state, the live
// stream brings the new state and the buttons follow.
func TestConsoleActionsFollowState(t *testing.T) {
	p, api := consoleFleetd(t)
	ctx := context.Background()
	target := upload(t, api, "2.0.0", 4<<10)
	// A device that never connects keeps the campaign running: its job waits.
	if _, err := api.RegisterDevice(ctx, fleet.NewDevice{ID: "away-1", Model: "gw-100"}); err != nil {
		t.Fatal(err)
	}
	camp, err := api.CreateCampaign(ctx, firmware.Spec{Name: "buttons", FirmwareID: target.ID,
		Stages:        []firmware.Stage{{Name: "all", Percent: 100, MaxFailureRate: 1, MaxNotBackOnline: -1}},
		DeviceTimeout: firmware.Duration(10 * time.Minute)})
	if err != nil {
		t.Fatal(err)
	}
	b := newBrowser(t, p.HTTPURL, 60*time.Second)
	b.signIn(p.Token())
	b.navigate("/ui/campaigns/" + camp.ID)
	buttons := func(want string) {
		t.Helper()
		b.waitJS("the buttons "+want, `[...document.querySelectorAll('[data-testid=campaign-actions] button')]
			.map((e) => e.dataset.testid.replace('action-', '')).join(',') === '`+want+`'`, 15*time.Second)
	}
	buttons("start")
	b.waitLive()
	for _, step := range []struct{ action, want string }{
		{"start", "pause,abort,rollback"},
		{"pause", "resume,abort,rollback"},
		{"resume", "pause,abort,rollback"},
		{"abort", "rollback"},
	} {
		v, err := api.CampaignAction(ctx, camp.ID, step.action)
		if err != nil {
			t.Fatalf("%s: %v", step.action, err)
		}
		if got := strings.Join(v.Actions, ","); got != step.want {
			t.Fatalf("after %s the API allows %q, want %q", step.action, got, step.want)
		}
		buttons(step.want)
	}
	b.shot("aborted")
}
