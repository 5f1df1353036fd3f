package e2e

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/fleetd/fleetd/command"
	"github.com/fleetd/fleetd/sim"
)

// TestConsoleBulkCommands: with 20 simulated devices of two models online,
// an operator sends a bulk ping to one model through the console's form and
// sees it complete without reloading (the live stream's bulk_command
// events), with the counts of the API's summary; the per-device results
// filter by state and link to each device. Params that are not a JSON
// object are refused in the page naming params, a selector that matches no
// device is refused by fleetd naming selector, and cancelling a slow bulk
// from its page stops it.
func TestConsoleBulkCommands(t *testing.T) {
	p, api := consoleFleetd(t)
	runFleet(t, api, simFleet(p,
		sim.Cohort{Name: "gw", Count: 12, Model: "gw-100", Firmware: "1.0.0", Keepalive: secs(30)},
		sim.Cohort{Name: "ap", Count: 8, Model: "ap-7", Firmware: "2.0.0", Keepalive: secs(30)}), p.Token())
	waitOnline(t, api, 20, 30*time.Second)
	ctx := context.Background()

	b := newBrowser(t, p.HTTPURL, 150*time.Second)
	b.signIn(p.Token())
	b.click(`a[data-nav=commands]`)
	b.waitJS("the empty list of bulk commands", `document.querySelector('[data-testid=bulk-table] .empty-row')`, 10*time.Second)
	b.click(`[data-testid=new-bulk]`)
	b.waitJS("the bulk form", `document.querySelector('[data-testid=bulk-form]')`, 10*time.Second)
	// The page must not reload from here on: the marker would be lost.
	if _, err := eval[bool](b, `window.__sameDocument = true`); err != nil {
		t.Fatal(err)
	}
	b.setValue(`[data-testid=bf-name]`, "ping")
	b.setValue(`[data-testid=bf-models]`, "gw-100")
	b.waitJS("12 matching devices", `document.querySelector('[data-testid=match-count]').dataset.count === '12'`, 10*time.Second)

	b.setValue(`[data-testid=bf-params]`, `[1, 2]`)
	b.click(`[data-testid=bf-submit]`)
	b.waitJS("params refused in the page", `(() => { const e = document.querySelector('[data-testid=bf-error] [data-testid=error]');
		return e && e.dataset.field === 'params' && document.querySelector('[data-testid=bf-params]').classList.contains('invalid'); })()`, 5*time.Second)

	b.setValue(`[data-testid=bf-params]`, ``)
	b.setValue(`[data-testid=bf-models]`, "no-such-model")
	b.waitJS("no matching device", `document.querySelector('[data-testid=match-count]').dataset.count === '0'`, 10*time.Second)
	b.click(`[data-testid=bf-submit]`)
	b.waitJS("the selector refused by fleetd", `(() => { const e = document.querySelector('[data-testid=bf-error] [data-testid=error]');
		return e && e.dataset.field === 'selector' && document.querySelector('[data-testid=bf-selector]').classList.contains('invalid'); })()`, 5*time.Second)
	b.shot("refused")
	if page, err := api.Bulks(ctx, "", 0); err != nil || len(page.Bulks) != 0 {
		t.Fatalf("bulks after two refusals: %+v (%v), want none", page.Bulks, err)
	}

	b.setValue(`[data-testid=bf-models]`, "gw-100")
	b.setValue(`[data-testid=bf-params]`, `{"hello": "<b>world</b>"}`)
	b.click(`[data-testid=bf-submit]`)
	b.waitJS("the bulk's page", `document.querySelector('[data-testid=bulk-state]')`, 10*time.Second)
	b.waitJS("the bulk completed, live", `(() => { const bar = document.querySelector('[data-testid=bulk-bar]');
		return window.__sameDocument && document.querySelector('[data-testid=bulk-state]').dataset.state === 'completed'
			&& bar.dataset.targets === '12' && bar.dataset.succeeded === '12'; })()`, 30*time.Second)
	b.shot("completed")
	id := strings.TrimPrefix(mustEval[string](t, b, `location.pathname`), "/ui/commands/")
	sum, err := api.Bulk(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if sum.State != command.BulkCompleted || sum.Total != 12 || sum.Counts.Succeeded != 12 || len(sum.Selector.Models) != 1 {
		t.Fatalf("the API's summary: %+v, want completed, 12 of gw-100 succeeded", sum)
	}
	checkCounts(t, b, sum.Counts)
	if got := b.text(`[data-testid=bulk-facts] code`); got != `{"hello":"<b>world</b>"}` {
		t.Errorf("params shown as %q, want the JSON as text", got)
	}

	b.waitJS("12 device rows, linked to the devices", `(() => { const rows = [...document.querySelectorAll('[data-testid=bulk-device]')];
		return rows.length === 12 && rows.every((r) => r.dataset.state === 'succeeded' && r.dataset.deviceId.startsWith('gw-')
			&& r.querySelector('a').getAttribute('href') === '/ui/devices/' + r.dataset.deviceId
			&& r.querySelector('[data-testid=bulk-result]').textContent.includes('pong')); })()`, 10*time.Second)
	b.setValue(`[data-testid=bd-state]`, "failed")
	b.waitJS("no failed device", `document.querySelector('[data-testid=bulk-devices-empty]') && !document.querySelector('[data-testid=bulk-device]')`, 10*time.Second)
	b.setValue(`[data-testid=bd-state]`, "succeeded")
	b.waitJS("the succeeded devices", `document.querySelectorAll('[data-testid=bulk-device][data-state=succeeded]').length === 12`, 10*time.Second)
	b.waitJS("a finished bulk cannot be cancelled", `document.querySelector('[data-testid=bulk-cancel]').disabled`, 5*time.Second)

	// A slow one: one device a minute to the ap-7, cancelled from its page.
	b.click(`a[data-nav=commands]`)
	b.waitJS("the completed bulk in the list", fmt.Sprintf(`(() => { const r = document.querySelector('[data-testid=bulk-row][data-bulk-id=%s]');
		return r && r.dataset.state === 'completed' && r.querySelector('[data-testid=bulk-done]').textContent === '12/12'; })()`, jsString(id)), 10*time.Second)
	b.click(`[data-testid=new-bulk]`)
	b.waitJS("the bulk form", `document.querySelector('[data-testid=bulk-form]')`, 10*time.Second)
	b.setValue(`[data-testid=bf-name]`, "ping")
	b.setValue(`[data-testid=bf-models]`, "ap-7")
	b.setValue(`[data-testid=bf-dpm]`, "1")
	b.click(`[data-testid=bf-submit]`)
	b.waitJS("the slow bulk running", `(() => { const s = document.querySelector('[data-testid=bulk-state]');
		return s && s.dataset.state === 'running' && !document.querySelector('[data-testid=bulk-cancel]').disabled; })()`, 10*time.Second)
	slow := strings.TrimPrefix(mustEval[string](t, b, `location.pathname`), "/ui/commands/")
	if slow == id || !strings.HasPrefix(slow, "bulk_") {
		t.Fatalf("the slow bulk's page is %s", slow)
	}
	b.click(`[data-testid=bulk-cancel]`)
	b.waitJS("the confirmation", `document.querySelector('[data-testid=confirm-dialog]')`, 5*time.Second)
	b.shot("confirm-cancel")
	b.click(`[data-testid=confirm-ok]`)
	b.waitJS("the bulk cancelled", `document.querySelector('[data-testid=bulk-state]').dataset.state === 'cancelled'
		&& document.querySelector('[data-testid=bulk-cancel]').disabled && window.__sameDocument`, 10*time.Second)
	sum, err = api.Bulk(ctx, slow)
	if err != nil {
		t.Fatal(err)
	}
	if sum.State != command.BulkCancelled || sum.Total != 8 || sum.Counts.Cancelled < 6 {
		t.Fatalf("the API's summary of the cancelled bulk: %+v, want cancelled, most of its 8 devices never sent", sum)
	}
	b.setValue(`[data-testid=bd-state]`, "cancelled")
	b.waitJS("the cancelled devices", fmt.Sprintf(`(() => { const rows = [...document.querySelectorAll('[data-testid=bulk-device]')];
		return rows.length === %d && rows.every((r) => r.dataset.state === 'cancelled' && r.dataset.deviceId.startsWith('ap-')); })()`, sum.Counts.Cancelled), 10*time.Second)
	b.shot("cancelled")
	// Answers may still change the counts of what was sent before the cancel.
	waitUntil(t, 10*time.Second, "the cancelled bulk's counts settled", func() bool {
		sum, err = api.Bulk(ctx, slow)
		return err == nil && sum.Counts.InFlight() == 0
	})
	b.waitJS("the page's counts as the API's", countsJS(sum.Counts), 10*time.Second)
	if page := allBulkDevices(t, api, slow, "cancelled"); len(page) != sum.Counts.Cancelled {
		t.Errorf("cancelled devices listed: %d, want %d", len(page), sum.Counts.Cancelled)
	}
}

func mustEval[T any](t *testing.T, b *browser, expr string) T {
	t.Helper()
	v, err := eval[T](b, expr)
	if err != nil {
		t.Fatalf("evaluate %s: %v", expr, err)
	}
	return v
}

// countsJS is a condition: the page shows the counts, state by state.
func countsJS(c command.Counts) string {
	want := map[string]int{"pending": c.Pending, "queued": c.Queued, "delivered": c.Delivered, "succeeded": c.Succeeded, "failed": c.Failed,
		"timed_out": c.TimedOut, "expired": c.Expired, "skipped": c.Skipped, "cancelled": c.Cancelled}
	var conds []string
	for s, n := range want {
		conds = append(conds, fmt.Sprintf(`(document.querySelector('[data-testid=bulk-count][data-state=%s]') || {dataset: {}}).dataset.count === '%d'`, s, n))
	}
	return strings.Join(conds, " && ")
}

func checkCounts(t *testing.T, b *browser, c command.Counts) {
	t.Helper()
	b.waitJS(fmt.Sprintf("the page's counts as the API's %+v", c), countsJS(c), 5*time.Second)
}
