package main

import (
	"context"
	"fmt"
	"net"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/fleetdtest"
	"github.com/fleetd/fleetd/web/client"
)

func needMosquitto(t *testing.T) {
	t.Helper()
	for _, tool := range []string{"mosquitto_pub", "mosquitto_sub"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not installed (Debian: apt-get install mosquitto-clients; .ci/run installs it)", tool)
		}
	}
}

func waitDevice(t *testing.T, c *client.Client, id string, within time.Duration, pred func(fleet.Device) bool) fleet.Device {
	t.Helper()
	deadline := time.Now().Add(within)
	var d fleet.Device
	var err error
	for time.Now().Before(deadline) {
		if d, err = c.Device(context.Background(), id); err == nil && pred(d) {
			return d
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("device %s did not reach the expected state within %s: %+v (err %v)", id, within, d, err)
	return d
}

func waitEvent(t *testing.T, c *client.Client, id string, within time.Duration, pred func(fleet.Event) bool) fleet.Event {
	t.Helper()
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		page, err := c.Events(context.Background(), id, "", 100)
		if err == nil {
			for _, ev := range page.Events {
				if pred(ev) {
					return ev
				}
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	page, _ := c.Events(context.Background(), id, "", 100)
	t.Fatalf("no matching event for %s within %s: %+v", id, within, page.Events)
	return fleet.Event{}
}

// TestMosquittoClients connects Mosquitto's own clients to a running fleetd
// with MQTT 3.1, 3.1.1 and 5: each publishes its birth and telemetry and stays
// subscribed, and the API shows it online with the right protocol and
// firmware. Then a wrong token is refused and a decommission ends a session.
func TestMosquittoClients(t *testing.T) {
	needMosquitto(t)
	p := fleetdtest.Start(t, fleetdtest.DataDir(t))
	p.WaitReady(15 * time.Second)
	api := client.New(p.HTTPURL, p.Token())
	host, port, _ := net.SplitHostPort(p.Addr("mqtt-tcp"))
	ctx := context.Background()
	outer := t

	mosq := func(tool, version, id, token string, args ...string) *exec.Cmd {
		base := []string{"-h", host, "-p", port, "-V", version, "-i", id, "-u", id, "-P", token}
		return exec.Command(tool, append(base, args...)...)
	}
	for _, tc := range []struct {
		version, id, firmware string
		protocol              fleet.Protocol
	}{
		{"mqttv31", "mq31", "1.0.3", 3},
		{"mqttv311", "mq311", "1.2.0", 4},
		{"mqttv5", "mq5", "2.0.1", 5},
	} {
		t.Run(tc.version, func(t *testing.T) {
			reg, err := api.RegisterDevice(ctx, fleet.NewDevice{ID: tc.id, Model: "gw-100"})
			if err != nil {
				t.Fatal(err)
			}
			birth := fmt.Sprintf(`{"online":true,"firmware":%q,"model":"gw-100"}`, tc.firmware)
			if out, err := mosq("mosquitto_pub", tc.version, tc.id, reg.Token, "-t", "devices/"+tc.id+"/status", "-r", "-q", "1", "-m", birth).CombinedOutput(); err != nil {
				t.Fatalf("mosquitto_pub birth: %v\n%s", err, out)
			}
			if out, err := mosq("mosquitto_pub", tc.version, tc.id, reg.Token, "-t", "devices/"+tc.id+"/telemetry", "-m", `{"rssi_dbm":-67,"channel":6}`).CombinedOutput(); err != nil {
				t.Fatalf("mosquitto_pub telemetry: %v\n%s", err, out)
			}
			sub := mosq("mosquitto_sub", tc.version, tc.id, reg.Token, "-t", "devices/"+tc.id+"/ota/job", "-k", "30")
			if err := sub.Start(); err != nil {
				t.Fatal(err)
			}
			outer.Cleanup(func() { sub.Process.Kill(); sub.Wait() })
			// The telemetry publish's own session (keepalive 60) may still be
			// the one on record for a moment: wait for the subscriber's.
			d := waitDevice(t, api, tc.id, 5*time.Second, func(d fleet.Device) bool { return d.Online && d.KeepaliveRequested == 30 })
			if d.ProtocolVersion != tc.protocol || d.Firmware != tc.firmware {
				t.Fatalf("device %+v: want protocol %s, firmware %s", d, tc.protocol, tc.firmware)
			}
			out, err := mosq("mosquitto_pub", tc.version, tc.id, reg.Token+"x", "-t", "devices/"+tc.id+"/telemetry", "-m", "{}").CombinedOutput()
			if err == nil {
				t.Fatalf("mosquitto_pub with a wrong token succeeded: %s", out)
			}
			waitEvent(t, api, tc.id, 5*time.Second, func(ev fleet.Event) bool {
				return ev.Kind == fleet.KindRefused && ev.Reason == fleet.ReasonAuthFailed
			})
			t.Logf("%s with a wrong token: %s", tc.version, strings.TrimSpace(string(out)))
		})
	}

	// Decommission through the API: the session ends within a second.
	start := time.Now()
	if _, err := api.Decommission(ctx, "mq5"); err != nil {
		t.Fatal(err)
	}
	ev := waitEvent(t, api, "mq5", 5*time.Second, func(ev fleet.Event) bool {
		return ev.Kind == fleet.KindDisconnect && ev.Reason == fleet.ReasonDecommissioned
	})
	if lag := ev.At.Sub(start); lag > time.Second {
		t.Fatalf("session ended %s after the decommission, want within 1s", lag)
	}
	d, err := api.Device(ctx, "mq5")
	if err != nil || d.State != fleet.StateDecommissioned || d.Online {
		t.Fatalf("after decommission: %+v, %v", d, err)
	}
}
