package e2e

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/fleetd/fleetd/sim"
)

// TestConsoleDeviceCommands: from a device's page an operator sends a
// command to a simulated device and sees it answered without reloading (the
// live stream's command events), params that are not a JSON object are
// refused in the page naming the field (nothing is sent), a name fleetd
// refuses comes back as its error naming the field, and a command the
// firmware does not know shows as failed with its answer.
func TestConsoleDeviceCommands(t *testing.T) {
	p, api := consoleFleetd(t)
	runFleet(t, api, simFleet(p, sim.Cohort{Name: "gw", Count: 1, Model: "gw-100", Firmware: "1.0.0", Keepalive: secs(30)}), p.Token())
	waitOnline(t, api, 1, 20*time.Second)

	b := newBrowser(t, p.HTTPURL, 90*time.Second)
	b.signIn(p.Token())
	b.navigate("/ui/devices/gw-0")
	b.waitLive()
	b.waitJS("the commands card", `document.querySelector('[data-testid=cmd-empty]')`, 10*time.Second)

	b.setValue(`[data-testid=cmd-name]`, "get_logs")
	b.setValue(`[data-testid=cmd-params]`, `{"lines": 3}`)
	b.click(`[data-testid=cmd-send]`)
	b.waitJS("get_logs answered", `(() => { const r = document.querySelector('[data-testid=cmd-row]');
		return r && r.dataset.state === 'succeeded' && r.querySelector('[data-testid=cmd-result]').textContent.includes('line 3'); })()`, 15*time.Second)
	b.shot("answered")

	b.setValue(`[data-testid=cmd-params]`, `[1, 2]`)
	b.click(`[data-testid=cmd-send]`)
	b.waitJS("params refused in the page", `(() => { const e = document.querySelector('[data-testid=cmd-status] [data-testid=error]');
		return e && e.dataset.field === 'params' && document.querySelector('[data-testid=cmd-params]').classList.contains('invalid'); })()`, 5*time.Second)

	b.setValue(`[data-testid=cmd-name]`, "no spaces allowed")
	b.setValue(`[data-testid=cmd-params]`, ``)
	b.click(`[data-testid=cmd-send]`)
	b.waitJS("the name refused by fleetd", `(() => { const e = document.querySelector('[data-testid=cmd-status] [data-testid=error]');
		return e && e.dataset.field === 'name' && document.querySelector('[data-testid=cmd-name]').classList.contains('invalid'); })()`, 5*time.Second)

	b.setValue(`[data-testid=cmd-name]`, "self_destruct")
	b.click(`[data-testid=cmd-send]`)
	b.waitJS("the unknown command failed", `(() => { const r = document.querySelector('[data-testid=cmd-row]');
		return r && r.querySelector('code').textContent === 'self_destruct' && r.dataset.state === 'failed'
			&& r.querySelector('[data-testid=cmd-result]').textContent.includes('unknown command'); })()`, 15*time.Second)
	b.shot("failed")

	page, err := api.Commands(context.Background(), "gw-0", "", 10)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, c := range page.Commands {
		names = append(names, c.Name+" "+string(c.State))
	}
	if got := strings.Join(names, ", "); got != "self_destruct failed, get_logs succeeded" {
		t.Errorf("gw-0's commands: %s; want the two the page sent, and only those", got)
	}
}
