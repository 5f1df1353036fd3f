package e2e

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/sim"
)

// TestConsoleDeviceConfig: a device's page shows its desired configuration
// with the layers it came from, what the simulated device reported and
// whether the two are in sync; the operator edits the device's own layer in
// the page, the device applies and reports it, and the page shows it in
// sync again; a layer that is not a JSON object is refused in the page.
func TestConsoleDeviceConfig(t *testing.T) {
	p, api := consoleFleetd(t)
	ctx := context.Background()
	if _, err := api.SetConfigLayer(ctx, "model:gw-100", json.RawMessage(`{"keepalive_s":30,"log":"info"}`)); err != nil {
		t.Fatal(err)
	}
	runFleet(t, api, simFleet(p, sim.Cohort{Name: "gw", Count: 1, Model: "gw-100", Firmware: "1.0.0", Keepalive: secs(30)}), p.Token())
	waitOnline(t, api, 1, 20*time.Second)

	b := newBrowser(t, p.HTTPURL, 90*time.Second)
	b.signIn(p.Token())
	b.navigate("/ui/devices/gw-0")
	b.waitJS("the model layer's document, reported in sync", `(() => {
		const s = document.querySelector('[data-testid=config-sync]');
		return s && s.dataset.sync === 'in_sync' && document.querySelector('[data-testid=config-desired]').textContent.includes('"log": "info"')
			&& document.querySelector('[data-testid=config-summary]').textContent.includes('model:gw-100');
	})()`, 25*time.Second)

	b.setValue(`[data-testid=config-layer]`, `[1]`)
	b.click(`[data-testid=config-save]`)
	b.waitJS("a layer that is not an object refused in the page", `(() => { const e = document.querySelector('[data-testid=config-status] [data-testid=error]');
		return e && e.dataset.field === 'config' && document.querySelector('[data-testid=config-layer]').classList.contains('invalid'); })()`, 5*time.Second)

	b.setValue(`[data-testid=config-layer]`, `{"log": "debug"}`)
	b.click(`[data-testid=config-save]`)
	b.waitJS("the saved layer", `document.querySelector('[data-testid=config-saved]')`, 10*time.Second)
	b.waitJS("the device's report of the new version, in sync", `(() => {
		const s = document.querySelector('[data-testid=config-sync]');
		return s && s.dataset.sync === 'in_sync' && document.querySelector('[data-testid=config-reported]').textContent.includes('"log": "debug"');
	})()`, 25*time.Second)
	b.shot("in-sync")

	v, err := api.DeviceConfig(ctx, "gw-0")
	if err != nil {
		t.Fatal(err)
	}
	if v.Desired.Config["log"] != "debug" || v.Desired.Config["keepalive_s"] != float64(30) || !v.InSync {
		t.Errorf("gw-0's configuration: %+v; want log debug over the model's keepalive 30, in sync", v)
	}
}

// TestConsoleDiagnosisFix: a device whose connections are cut after 2 s of
// silence (three times, well below its keepalive of 60 s) is diagnosed
// keepalive_mismatch; its page offers the remedy as a button, and the
// button puts keepalive_s 1 into the device's own configuration layer.
func TestConsoleDiagnosisFix(t *testing.T) {
	p, api := consoleFleetd(t)
	ctx := context.Background()
	reg, err := api.RegisterDevice(ctx, fleet.NewDevice{ID: "natted-1", Model: "gw-100"})
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		d, code := mqttConnect(t, p.Addr("mqtt-tcp"), "natted-1", reg.Token)
		if code != 0 {
			t.Fatalf("natted-1 refused: %d", code)
		}
		time.Sleep(2 * time.Second)
		d.conn.Close() // the path's idle cut: no DISCONNECT
		time.Sleep(300 * time.Millisecond)
	}
	waitEvents(t, api, "natted-1", 10*time.Second, "three lost connections", func(evs []fleet.Event) bool {
		n := 0
		for _, e := range evs {
			if e.Kind == fleet.KindDisconnect && e.Reason == fleet.ReasonConnectionLost {
				n++
			}
		}
		return n == 3
	})

	b := newBrowser(t, p.HTTPURL, 60*time.Second)
	b.signIn(p.Token())
	b.navigate("/ui/devices/natted-1")
	b.waitJS("the fix offered on the keepalive mismatch", `(() => {
		const pr = document.querySelector('[data-testid=problem][data-code=keepalive_mismatch]');
		return pr && pr.querySelector('[data-testid=fix-apply]') && pr.querySelector('[data-testid=fix-apply]').textContent.includes('keepalive_s = 1');
	})()`, 15*time.Second)
	b.click(`[data-testid=problem][data-code=keepalive_mismatch] [data-testid=fix-apply]`)
	b.waitJS("the fix applied", `document.querySelector('[data-testid=fix-applied]')`, 10*time.Second)
	b.shot("fix-applied")
	v, err := api.DeviceConfig(ctx, "natted-1")
	if err != nil {
		t.Fatal(err)
	}
	if v.Device["keepalive_s"] != float64(1) || v.Desired.Config["keepalive_s"] != float64(1) {
		t.Errorf("natted-1's configuration after the fix: own layer %v, desired %v; want keepalive_s 1", v.Device, v.Desired.Config)
	}
}
