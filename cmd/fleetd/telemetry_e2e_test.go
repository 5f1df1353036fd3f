package main

import (
	"context"
	"strings"
	"testing"
	"time"

	pahov3 "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/fleetdtest"
	"github.com/fleetd/fleetd/internal/pgtest"
	"github.com/fleetd/fleetd/web/client"
)

// TestTelemetryEndToEnd runs fleetd as a user would: a paho device publishes
// telemetry, and each message is readable through the API within 2 s of
// being sent, at every step; the fleet view shows the device's latest value
// by channel once the rollup job has copied it, and
// a malformed message is one rejected event.
func TestTelemetryEndToEnd(t *testing.T) {
	p := fleetdtest.Start(t, fleetdtest.DataDir(t), "FLEETD_DATABASE_URL="+pgtest.EmptyURL(t))
	p.WaitReady(30 * time.Second)
	api := client.New(p.HTTPURL, p.Token())
	ctx := context.Background()
	reg, err := api.RegisterDevice(ctx, fleet.NewDevice{ID: "tele-1", Model: "gw-100"})
	if err != nil {
		t.Fatal(err)
	}
	opts := pahov3.NewClientOptions().AddBroker("tcp://" + p.Addr("mqtt-tcp")).SetClientID("tele-1").SetUsername("tele-1").
		SetPassword(reg.Token).SetProtocolVersion(4).SetAutoReconnect(false).SetConnectRetry(false)
	dev := pahov3.NewClient(opts)
	if tk := dev.Connect(); !tk.WaitTimeout(5*time.Second) || tk.Error() != nil {
		t.Fatalf("connect: %v", tk.Error())
	}
	t.Cleanup(func() { dev.Disconnect(100) })

	for i, payload := range []string{
		`{"rssi_dbm":-67,"channel":6,"uptime_s":1234,"bssid":"aa:bb:cc:dd:ee:ff","ssid":"shop","band":"2.4"}`,
		`{"rssi_dbm":-71,"uptime_s":1244}`,
	} {
		sent := time.Now()
		if tk := dev.Publish("devices/tele-1/telemetry", 1, false, payload); !tk.WaitTimeout(5*time.Second) || tk.Error() != nil {
			t.Fatalf("publish: %v", tk.Error())
		}
		for {
			s, err := api.Telemetry(ctx, "tele-1", client.TelemetryQuery{Metric: "uptime_s"})
			if err != nil {
				t.Fatal(err)
			}
			if len(s.Points) == i+1 {
				break
			}
			if time.Since(sent) > 2*time.Second {
				t.Fatalf("message %d not queryable within 2 s: %+v", i, s.Points)
			}
			time.Sleep(20 * time.Millisecond)
		}
		t.Logf("message %d queryable %s after it was sent", i, time.Since(sent).Round(time.Millisecond))
	}
	s, err := api.Telemetry(ctx, "tele-1", client.TelemetryQuery{Metric: "rssi_dbm", Step: "1m"})
	if err != nil || len(s.Points) == 0 || s.Points[len(s.Points)-1].Last != -71 {
		t.Errorf("minute rollup %+v, %v; want the last value -71", s.Points, err)
	}
	// The fleet view reads the latest values and links, which the rollup
	// job copies from the stored messages every 10 s.
	for deadline := time.Now().Add(25 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		sum, err := api.FleetTelemetry(ctx, "rssi_dbm", "channel")
		if err != nil {
			t.Fatal(err)
		}
		if len(sum.Groups) == 1 && sum.Groups[0].Key == "6" && sum.Groups[0].Mean == -71 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("fleet telemetry by channel %+v; want channel 6 at -71 within 25 s", sum)
		}
	}

	for range 8 { // within the burst: none is sampled away
		dev.Publish("devices/tele-1/telemetry", 1, false, `{"rssi_dbm":`).WaitTimeout(5 * time.Second)
	}
	waitEvent(t, api, "tele-1", 5*time.Second, func(e fleet.Event) bool {
		return e.Kind == fleet.KindRejected && strings.Contains(e.Detail, "telemetry message not kept")
	})
	page, err := api.Events(ctx, "tele-1", "", 100)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range page.Events {
		if e.Kind == fleet.KindRejected && strings.Contains(e.Detail, "telemetry") {
			n++
		}
	}
	if n != 1 {
		t.Errorf("%d rejected events for 8 malformed messages; want 1 for the session", n)
	}
	if !dev.IsConnected() {
		t.Error("malformed telemetry ended the session")
	}
}
