package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/fleetdtest"
	"github.com/fleetd/fleetd/sim"
	"github.com/fleetd/fleetd/web/client"
)

// The console's history views: a device's telemetry on the time axis of its
// connection timeline, the overview's activity chart from fleetd's history,
// and the disconnects by radio link.

// chartAxis is what a chart drawn over time says of its x scale.
type chartAxis struct {
	From  float64 `json:"from"`
	To    float64 `json:"to"`
	ML    float64 `json:"ml"`
	PW    float64 `json:"pw"`
	Width string  `json:"width"`
}

func (a chartAxis) x(t float64) float64 { return a.ML + (t-a.From)/(a.To-a.From)*a.PW }

// deviceCharts is the device page's two charts, as drawn.
type deviceCharts struct {
	Timeline  chartAxis `json:"timeline"`
	Telemetry chartAxis `json:"telemetry"`
	Step      string    `json:"step"`
	Metric    string    `json:"metric"`
	Points    []struct {
		T, V, X float64
	} `json:"points"`
	Bars []struct {
		Start, End, X1, X2 float64
		Reason             string
		Ongoing            bool
	} `json:"bars"`
	Lines []struct {
		T, X   float64
		Reason string
	} `json:"lines"`
}

const deviceChartsJS = `(() => {
	const tl = document.querySelector('[data-testid=timeline-svg]');
	const tel = document.querySelector('[data-testid=telemetry-svg]');
	const axis = (s) => ({from: +s.dataset.from, to: +s.dataset.to, ml: +s.dataset.ml, pw: +s.dataset.pw, width: s.getAttribute('width')});
	return {
		timeline: axis(tl), telemetry: axis(tel), step: tel.dataset.step, metric: tel.dataset.metric,
		points: [...tel.querySelectorAll('[data-testid=telemetry-point]')].map((c) => ({T: +c.dataset.t, V: +c.dataset.value, X: +c.getAttribute('cx')})),
		bars: [...tl.querySelectorAll('[data-testid=timeline-bar]')].map((b) => ({Start: +b.dataset.start, End: +b.dataset.end,
			X1: +b.getAttribute('x'), X2: +b.getAttribute('x') + +b.getAttribute('width'), Reason: b.dataset.reason, Ongoing: b.dataset.ongoing === 'true'})),
		lines: [...tel.querySelectorAll('[data-testid=telemetry-disconnect]')].map((l) => ({T: +l.dataset.t, X: +l.getAttribute('x1'), Reason: l.dataset.reason})),
	};
})()`

func (b *browser) deviceCharts() deviceCharts {
	b.t.Helper()
	c, err := eval[deviceCharts](b, deviceChartsJS)
	if err != nil {
		b.t.Fatalf("read the device charts: %v", err)
	}
	return c
}

// checkSameAxis fails unless both charts map time to x alike and every
// telemetry point sits where the timeline's mapping puts its instant.
func checkSameAxis(t *testing.T, c deviceCharts) {
	t.Helper()
	if c.Timeline != c.Telemetry {
		t.Fatalf("the telemetry chart's axis %+v differs from the timeline's %+v", c.Telemetry, c.Timeline)
	}
	for _, p := range c.Points {
		if want := c.Timeline.x(p.T); math.Abs(p.X-want) > 0.02 {
			t.Errorf("point at %d (%v) drawn at x=%.2f; the timeline puts that instant at x=%.2f", int64(p.T), p.V, p.X, want)
		}
	}
	for _, bar := range c.Bars {
		if want := c.Timeline.x(bar.Start); math.Abs(bar.X1-want) > 0.02 && bar.Start >= c.Timeline.From {
			t.Errorf("session bar starting at %d drawn from x=%.2f, want %.2f", int64(bar.Start), bar.X1, want)
		}
	}
}

func waitEvents(t *testing.T, api *client.Client, id string, within time.Duration, what string, cond func([]fleet.Event) bool) []fleet.Event {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		page, err := api.Events(context.Background(), id, "", 100)
		if err == nil && cond(page.Events) {
			return page.Events
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %s not seen within %s (err %v): %+v", id, what, within, err, page.Events)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestConsoleDeviceTelemetry: a device publishes its RSSI over MQTT, loses
// its link as the signal falls, and comes back. Its page draws the RSSI on
// the connection timeline's time axis: the same from, to and pixel mapping,
// so that the last, weakest point sits just left of the disconnect, which
// is drawn at the x where the timeline's session ends. A longer period is
// read as per-minute rollups, the metric can be changed, and a device that
// never reported telemetry says so.
func TestConsoleDeviceTelemetry(t *testing.T) {
	p, api := consoleFleetd(t)
	ctx := context.Background()
	reg, err := api.RegisterDevice(ctx, fleet.NewDevice{ID: "radio-1", Model: "gw-100"})
	if err != nil {
		t.Fatal(err)
	}
	quiet, err := api.RegisterDevice(ctx, fleet.NewDevice{ID: "quiet-1", Model: "gw-100"})
	if err != nil {
		t.Fatal(err)
	}
	addr := p.Addr("mqtt-tcp")
	const topic = "devices/radio-1/telemetry"
	dev, code := mqttConnect(t, addr, "radio-1", reg.Token)
	if code != 0 {
		t.Fatalf("radio-1 refused: %d", code)
	}
	fading := []int{-52, -56, -61, -67, -74, -83}
	for i, rssi := range fading {
		dev.publish(t, topic, fmt.Sprintf(`{"rssi_dbm":%d,"uptime_s":%d,"channel":6,"bssid":"02:00:aa:bb:cc:dd"}`, rssi, 100+i))
		time.Sleep(250 * time.Millisecond) // pacing: one message each 250 ms, within the per-device burst
	}
	dev.conn.Close() // the link is lost: no DISCONNECT
	evs := waitEvents(t, api, "radio-1", 10*time.Second, "the disconnect", func(evs []fleet.Event) bool {
		return slices.ContainsFunc(evs, func(e fleet.Event) bool { return e.Kind == fleet.KindDisconnect })
	})
	var lost fleet.Event
	for _, e := range evs {
		if e.Kind == fleet.KindDisconnect {
			lost = e
		}
	}
	time.Sleep(1500 * time.Millisecond) // offline for a moment, visibly
	dev, code = mqttConnect(t, addr, "radio-1", reg.Token)
	if code != 0 {
		t.Fatalf("radio-1 refused on reconnect: %d", code)
	}
	for i, rssi := range []int{-60, -57} {
		dev.publish(t, topic, fmt.Sprintf(`{"rssi_dbm":%d,"uptime_s":%d}`, rssi, i))
		time.Sleep(250 * time.Millisecond)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		s, err := api.Telemetry(ctx, "radio-1", client.TelemetryQuery{Metric: "rssi_dbm"})
		if err == nil && len(s.Points) == len(fading)+2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("radio-1's rssi_dbm: %+v (%v), want %d points", s.Points, err, len(fading)+2)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if _, code := mqttConnect(t, addr, "quiet-1", quiet.Token); code != 0 {
		t.Fatalf("quiet-1 refused: %d", code)
	}

	b := newBrowser(t, p.HTTPURL, 90*time.Second)
	b.signIn(p.Token())
	b.navigate("/ui/devices/radio-1")
	b.waitJS("the RSSI chart with every point", `(() => { const s = document.querySelector('[data-testid=telemetry-svg]');
		return s && s.dataset.metric === 'rssi_dbm' && s.dataset.step === 'raw' && s.querySelectorAll('[data-testid=telemetry-point]').length === 8 &&
			document.querySelector('[data-testid=timeline-svg]'); })()`, 15*time.Second)
	checkSameAxis(t, b.deviceCharts())

	b.setValue(`[data-testid=timeline-window]`, "900000")
	b.waitJS("the last 15 minutes", `(() => { const s = document.querySelector('[data-testid=timeline-svg]');
		return s && Number(s.dataset.to) - Number(s.dataset.from) === 900000 &&
			document.querySelector('[data-testid=telemetry-svg]').dataset.from === s.dataset.from &&
			document.querySelectorAll('[data-testid=telemetry-point]').length === 8; })()`, 15*time.Second)
	c := b.deviceCharts()
	checkSameAxis(t, c)
	if c.Step != "raw" {
		t.Errorf("15 minutes read at step %q, want raw points", c.Step)
	}
	// The lost session's bar ends at the disconnect, and the telemetry
	// chart's disconnect line is at that very x.
	lostAt := float64(lost.At.UnixMilli())
	bar := -1
	for i, b := range c.Bars {
		if !b.Ongoing && math.Abs(b.End-lostAt) <= 1 {
			bar = i
		}
	}
	if bar < 0 {
		t.Fatalf("no session bar ends at the disconnect (%d): %+v", int64(lostAt), c.Bars)
	}
	end := c.Bars[bar]
	endX := c.Timeline.x(end.End)
	// A bar is at least 2 px wide: only a wider one ends exactly there.
	if math.Abs(end.X2-endX) > 0.02 && end.X2-end.X1 > 2.001 {
		t.Errorf("the lost session's bar ends at x=%.2f, want %.2f", end.X2, endX)
	}
	line := -1
	for i, l := range c.Lines {
		if math.Abs(l.T-end.End) <= 1 {
			line = i
		}
	}
	if line < 0 {
		t.Fatalf("no disconnect line on the telemetry chart at %d: %+v", int64(end.End), c.Lines)
	}
	if l := c.Lines[line]; math.Abs(l.X-endX) > 0.02 || l.Reason != end.Reason {
		t.Errorf("disconnect line at x=%.2f (%s), the timeline's session ends at x=%.2f (%s)", l.X, l.Reason, endX, end.Reason)
	}
	// The dip: the weakest point is the last one before the disconnect,
	// drawn within a pixel or two to its left.
	var dip struct{ T, V, X float64 }
	for _, pt := range c.Points {
		if pt.T < end.End && pt.T > dip.T {
			dip = pt
		}
	}
	if dip.V != -83 || dip.X > endX || endX-dip.X > 2 {
		t.Errorf("the last point before the disconnect is %v at x=%.2f; want -83 just left of x=%.2f", dip.V, dip.X, endX)
	}
	for _, pt := range c.Points {
		if pt.T > end.End && pt.V < -60 {
			t.Errorf("point %v after the reconnect: the fading points belong before the disconnect", pt.V)
		}
	}

	// The pointer over the disconnect shows one cursor in both charts and
	// the RSSI there.
	// (The page redraws its charts when the device's records change, which
	// takes the cursor away: the pointer moves again on each try.)
	b.waitJS("the readout and both cursors", fmt.Sprintf(`(() => { const s = document.querySelector('[data-testid=telemetry-svg]'); const r = s.getBoundingClientRect();
		s.dispatchEvent(new PointerEvent('pointermove', {bubbles: true, clientX: r.left + %f * r.width / Number(s.getAttribute('width')) - 0.3, clientY: r.top + 20}));
		const c = [...document.querySelectorAll('[data-testid=timeline-card] line.cursor')];
		return c.length === 2 && c[0].getAttribute('x1') === c[1].getAttribute('x1') &&
			document.querySelector('[data-testid=chart-readout]').textContent.includes('rssi_dbm -83'); })()`, endX), 5*time.Second)
	b.shot("rssi-and-timeline")
	b.tablet("rssi-and-timeline-tablet")

	b.setValue(`[data-testid=timeline-window]`, "86400000")
	b.waitJS("the day as per-minute rollups", `(() => { const s = document.querySelector('[data-testid=telemetry-svg]');
		return s && s.dataset.step === '1m' && Number(s.dataset.to) - Number(s.dataset.from) === 86400000 && Number(s.dataset.points) >= 1; })()`, 15*time.Second)
	checkSameAxis(t, b.deviceCharts())

	b.waitJS("uptime_s among the metrics", `[...document.querySelectorAll('[data-testid=telemetry-metric] option')].map((o) => o.value).includes('uptime_s')`, 5*time.Second)
	b.setValue(`[data-testid=telemetry-metric]`, "uptime_s")
	b.waitJS("the uptime chart", `(() => { const s = document.querySelector('[data-testid=telemetry-svg]');
		return s && s.dataset.metric === 'uptime_s' && location.search.includes('metric=uptime_s'); })()`, 15*time.Second)

	b.navigate("/ui/devices/quiet-1")
	b.waitJS("the empty telemetry", `document.querySelector('[data-testid=telemetry-empty]') && document.querySelector('[data-testid=timeline-svg]') &&
		!document.querySelector('[data-testid=telemetry-svg]')`, 15*time.Second)
	b.shot("no-telemetry")
}

func evalVoid(js string) chromedp.Action[chromedp.Void] { return chromedp.Evaluate[chromedp.Void](js) }

// historySums is what the activity chart drew.
type historySums struct {
	Step        string `json:"step"`
	Buckets     int    `json:"buckets"`
	Connects    int64  `json:"connects"`
	Disconnects int64  `json:"disconnects"`
	Refused     int64  `json:"refused"`
}

const historySumsJS = `(() => { const s = document.querySelector('[data-testid=history-svg]'); if (!s) return {step: ''};
	const g = [...s.querySelectorAll('[data-testid=history-bucket]')];
	const n = (k) => g.reduce((a, e) => a + Number(e.dataset[k]), 0);
	return {step: s.dataset.step, buckets: Number(s.dataset.buckets), connects: n('connects'), disconnects: n('disconnects'), refused: n('refused')}; })()`

func historyTotals(h fleet.FleetHistory) (connects, disconnects, refused int64) {
	for _, b := range h.Buckets {
		connects += b.Connects
		for _, n := range b.Disconnects {
			disconnects += n
		}
		for _, n := range b.Refused {
			refused += n
		}
	}
	return
}

// TestConsoleOverviewHistory: sessions and a refused attempt made before the
// console is opened are in the overview's activity chart, which reads
// fleetd's history; the hour, day and week each ask for their own step.
func TestConsoleOverviewHistory(t *testing.T) {
	p, api := consoleFleetd(t)
	ctx := context.Background()
	addr := p.Addr("mqtt-tcp")
	for i := range 3 {
		id := fmt.Sprintf("hist-%d", i)
		reg, err := api.RegisterDevice(ctx, fleet.NewDevice{ID: id, Model: "gw-100"})
		if err != nil {
			t.Fatal(err)
		}
		d, code := mqttConnect(t, addr, id, reg.Token)
		if code != 0 {
			t.Fatalf("%s refused: %d", id, code)
		}
		d.conn.Close()
		waitEvents(t, api, id, 10*time.Second, "the disconnect", func(evs []fleet.Event) bool {
			return slices.ContainsFunc(evs, func(e fleet.Event) bool { return e.Kind == fleet.KindDisconnect })
		})
	}
	if _, code := mqttConnect(t, addr, "hist-0", "not-its-token"); code == 0 {
		t.Fatal("a wrong token was accepted")
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		h, err := api.FleetHistory(ctx, time.Time{}, time.Time{}, "1m")
		c, d, r := historyTotals(h)
		if err == nil && c == 3 && d == 3 && r == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("fleet history: %d connects, %d disconnects, %d refused (%v); want 3, 3, 1", c, d, r, err)
		}
		time.Sleep(100 * time.Millisecond)
	}

	b := newBrowser(t, p.HTTPURL, 90*time.Second)
	b.signIn(p.Token())
	for _, tc := range []struct {
		period, step string
		buckets      [2]int
	}{
		{"hour", "1m", [2]int{60, 61}},
		{"day", "5m", [2]int{288, 289}},
		{"week", "1h", [2]int{168, 169}},
		{"hour", "1m", [2]int{60, 61}},
	} {
		b.do("forget the requests", evalVoid(`performance.clearResourceTimings()`))
		b.setValue(`[data-testid=activity-period]`, tc.period)
		b.waitJS("the "+tc.period+"'s history", fmt.Sprintf(`(() => { const s = %s; return s.step === %q && s.connects === 3 && s.disconnects === 3 && s.refused === 1; })()`,
			historySumsJS, tc.step), 15*time.Second)
		got, err := eval[historySums](b, historySumsJS)
		if err != nil {
			t.Fatal(err)
		}
		if got.Buckets < tc.buckets[0] || got.Buckets > tc.buckets[1] {
			t.Errorf("%s: %d buckets of %s, want %d or %d", tc.period, got.Buckets, tc.step, tc.buckets[0], tc.buckets[1])
		}
		// The choice asked fleetd again, with the period's step (a request
		// is listed once its answer is in).
		b.waitJS("GET /fleet/history with step="+tc.step, fmt.Sprintf(`performance.getEntriesByType('resource').map((e) => new URL(e.name))
			.some((u) => u.pathname === '/api/v1/fleet/history' && u.searchParams.get('step') === %q && u.searchParams.get('from'))`, tc.step), 10*time.Second)
		caption := b.text(`[data-testid=activity-caption]`)
		for _, want := range []string{"From fleetd's history", "3 connects", "3 disconnects", "1 refused attempt"} {
			if !strings.Contains(caption, want) {
				t.Errorf("%s: caption %q lacks %q", tc.period, caption, want)
			}
		}
		for _, gone := range []string{"live stream", "no per-minute history", "no live data"} {
			if strings.Contains(b.pageText(), gone) {
				t.Errorf("%s: the overview still says %q", tc.period, gone)
			}
		}
		b.shot("history-" + tc.period)
	}
}

// cannedLinks is a GET /fleet/links answer in the order the API need not
// keep: the console sorts by ratio.
const cannedLinks = `{"window_seconds":86400,"weak_rssi_dbm":-75,
 "channels":[
  {"channel":1,"band":"2.4","devices":10,"device_hours":28,"disconnects":5,"per_device_hour":0.18,"ratio":0.3},
  {"channel":6,"band":"2.4","devices":12,"device_hours":30.5,"disconnects":40,"per_device_hour":1.31,"ratio":4.2,"congested":true},
  {"channel":36,"band":"5","devices":4,"device_hours":9,"disconnects":3,"per_device_hour":0.33,"ratio":0.6}],
 "access_points":[
  {"bssid":"02:00:aa:bb:cc:01","ssid":"fleet","model":"gw-100","devices":4,"device_hours":10,"disconnects":2,"per_device_hour":0.2,"ratio":0.4},
  {"bssid":"02:00:aa:bb:cc:dd","ssid":"fleet","model":"gw-100","devices":8,"device_hours":20,"disconnects":30,"per_device_hour":1.5,"ratio":5.0,"bad":true}],
 "causes":{"weak_signal":3,"roaming":4,"congested_channel":40,"bad_access_point":30,"firmware":2},
 "dominant":"link"}`

// linkRows is the links card as drawn: its rows in order, flagged or not.
type linkRows struct {
	Channels []string `json:"channels"`
	APs      []string `json:"aps"`
	Flagged  []string `json:"flagged"`
	Dominant string   `json:"dominant"`
	Text     string   `json:"text"`
}

const linkRowsJS = `(() => { const card = document.querySelector('[data-testid=links-card]');
	const dom = card.querySelector('[data-testid=links-dominant]');
	const flag = (r) => r.dataset.flagged === 'true' && r.classList.contains('flagged');
	return {
		channels: [...card.querySelectorAll('[data-testid=link-channel-row]')].map((r) => r.dataset.channel),
		aps: [...card.querySelectorAll('[data-testid=link-ap-row]')].map((r) => r.dataset.bssid),
		flagged: [...card.querySelectorAll('[data-testid=link-channel-row], [data-testid=link-ap-row]')].filter(flag).map((r) => r.dataset.channel || r.dataset.bssid),
		dominant: dom ? dom.dataset.dominant : '', text: dom ? dom.textContent : ''}; })()`

// TestConsoleLinks: the overview's links card shows GET /fleet/links:
// channels and access points sorted by their ratio to the rest of the
// fleet, the flagged ones highlighted, and which cause dominates.
func TestConsoleLinks(t *testing.T) {
	p, api := consoleFleetd(t)

	t.Run("canned", func(t *testing.T) {
		// A proxy in front of fleetd answers /fleet/links with a fixed
		// document, so that every part of the card is checked exactly.
		target, err := url.Parse(p.HTTPURL)
		if err != nil {
			t.Fatal(err)
		}
		rp := httputil.NewSingleHostReverseProxy(target)
		rp.FlushInterval = -1 // the live stream
		var mu sync.Mutex
		var windows []string
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path != "/api/v1/fleet/links" {
				rp.ServeHTTP(w, r)
				return
			}
			if r.Header.Get("Authorization") != "Bearer "+p.Token() {
				http.Error(w, `{"error":{"code":"unauthorized","message":"no token"}}`, http.StatusUnauthorized)
				return
			}
			mu.Lock()
			windows = append(windows, r.URL.Query().Get("window"))
			mu.Unlock()
			w.Header().Set("Content-Type", "application/json")
			w.Write([]byte(cannedLinks))
		}))
		t.Cleanup(srv.Close)

		b := newBrowser(t, srv.URL, 60*time.Second)
		b.signIn(p.Token())
		b.waitJS("the links card's rows", `document.querySelectorAll('[data-testid=link-channel-row]').length === 3`, 10*time.Second)
		got, err := eval[linkRows](b, linkRowsJS)
		if err != nil {
			t.Fatal(err)
		}
		if want := []string{"6", "36", "1"}; !slices.Equal(got.Channels, want) {
			t.Errorf("channels in order %q, want %q (by ratio)", got.Channels, want)
		}
		if want := []string{"02:00:aa:bb:cc:dd", "02:00:aa:bb:cc:01"}; !slices.Equal(got.APs, want) {
			t.Errorf("access points in order %q, want %q (by ratio)", got.APs, want)
		}
		if want := []string{"6", "02:00:aa:bb:cc:dd"}; !slices.Equal(got.Flagged, want) {
			t.Errorf("highlighted rows %q, want %q (congested, bad)", got.Flagged, want)
		}
		if got.Dominant != "link" || !strings.Contains(got.Text, "congested channel 40") || !strings.Contains(got.Text, "bad access point 30") ||
			!strings.Contains(got.Text, "against 2 for firmware") {
			t.Errorf("dominant %q: %q; want the link, with its causes against firmware's 2", got.Dominant, got.Text)
		}
		b.shot("links")
		b.setValue(`[data-testid=links-window]`, "3600")
		deadline := time.Now().Add(10 * time.Second)
		for {
			mu.Lock()
			ws := slices.Clone(windows)
			mu.Unlock()
			if len(ws) > 0 && ws[0] == "86400" && ws[len(ws)-1] == "3600" {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("links requests with windows %q; want 86400 first, then 3600", ws)
			}
			time.Sleep(100 * time.Millisecond)
		}
		b.waitJS("the card after the new window", `document.querySelectorAll('[data-testid=link-channel-row]').length === 3 &&
			document.querySelector('[data-testid=links-dominant]').textContent.includes('last hour')`, 10*time.Second)
	})

	t.Run("fleetd", func(t *testing.T) {
		if _, err := api.FleetLinks(context.Background(), 0); err != nil {
			var apiErr *client.Error
			if errors.As(err, &apiErr) && apiErr.Status == http.StatusNotFound {
				t.Skip("this fleetd does not serve GET /api/v1/fleet/links yet")
			}
			t.Fatal(err)
		}
		linksFleetd(t, p, api)
	})
}

// linksFleetd plays devices on two channels, one of them dropping often,
// and checks that the card shows the rows fleetd computed, in ratio order,
// flagged as fleetd flags them.
func linksFleetd(t *testing.T, p *fleetdtest.Process, api *client.Client) {
	link := func(channel int, bssids []string, drops float64) *sim.Link {
		return &sim.Link{RSSI: -55, Spread: 2, Channel: channel, BSSIDs: bssids, DropsPerHour: drops}
	}
	_, stop := runFleet(t, api, simFleet(p,
		sim.Cohort{Name: "calm", Count: 3, Model: "gw-100", Firmware: "1.0.0", Keepalive: secs(30), Telemetry: secs(1),
			Link: link(1, []string{"02:00:00:00:01:01"}, 0)},
		sim.Cohort{Name: "busy", Count: 3, Model: "gw-100", Firmware: "1.0.0", Keepalive: secs(30), Telemetry: secs(1), Reconnect: "naive",
			Link: link(6, []string{"02:00:00:00:06:01", "02:00:00:00:06:02"}, 900)}), p.Token())
	ctx := context.Background()
	deadline := time.Now().Add(60 * time.Second)
	for {
		st, err := api.FleetLinks(ctx, 0)
		if err == nil && slices.ContainsFunc(st.Channels, func(c fleet.LinkRate) bool { return c.Channel == 6 && c.Disconnects >= 3 }) &&
			slices.ContainsFunc(st.Channels, func(c fleet.LinkRate) bool { return c.Channel == 1 }) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("fleet links %+v (%v): want channel 6 with 3 disconnects and channel 1", st, err)
		}
		time.Sleep(500 * time.Millisecond)
	}
	stop()

	b := newBrowser(t, p.HTTPURL, 90*time.Second)
	b.signIn(p.Token())
	// The card and the API may read the links a moment apart: compare them
	// until they agree (the page is reloaded between tries).
	deadline = time.Now().Add(30 * time.Second)
	for {
		b.waitJS("the links card's rows", `document.querySelectorAll('[data-testid=link-channel-row]').length >= 2`, 15*time.Second)
		got, err := eval[linkRows](b, linkRowsJS)
		if err != nil {
			t.Fatal(err)
		}
		st, err := api.FleetLinks(ctx, 0)
		if err != nil {
			t.Fatal(err)
		}
		want := linkRows{Dominant: st.Dominant, Flagged: []string{}}
		for _, c := range sortedLinks(st.Channels) {
			want.Channels = append(want.Channels, fmt.Sprint(c.Channel))
			if c.Congested {
				want.Flagged = append(want.Flagged, fmt.Sprint(c.Channel))
			}
		}
		for _, a := range sortedLinks(st.AccessPoints) {
			want.APs = append(want.APs, a.BSSID)
			if a.Bad {
				want.Flagged = append(want.Flagged, a.BSSID)
			}
		}
		got.Text = ""
		if got.Flagged == nil {
			got.Flagged = []string{}
		}
		if fmt.Sprint(got) == fmt.Sprint(want) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("links card %+v; fleetd says %+v (%s)", got, want, mustJSON(st))
		}
		b.navigate("/ui/")
	}
	b.shot("links-fleetd")
}

// sortedLinks orders rows as the console does: by ratio, then disconnects.
func sortedLinks(rows []fleet.LinkRate) []fleet.LinkRate {
	out := slices.Clone(rows)
	slices.SortStableFunc(out, func(a, b fleet.LinkRate) int {
		if a.Ratio != b.Ratio {
			if a.Ratio > b.Ratio {
				return -1
			}
			return 1
		}
		return int(b.Disconnects - a.Disconnects)
	})
	return out
}

func mustJSON(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}
