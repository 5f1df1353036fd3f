package sim_test

import (
	"context"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/devcert"
	"github.com/fleetd/fleetd/internal/fleetdtest"
	"github.com/fleetd/fleetd/sim"
	"github.com/fleetd/fleetd/web/client"
)

// idleCutProxy forwards TCP to target and closes both sides of a connection
// that carried nothing, either way, for longer than idle: a NAT or load
// balancer with an idle timeout.
func idleCutProxy(t *testing.T, target string, idle time.Duration) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			in, err := ln.Accept()
			if err != nil {
				return
			}
			out, err := net.Dial("tcp", target)
			if err != nil {
				in.Close()
				continue
			}
			var last atomic.Int64
			last.Store(time.Now().UnixNano())
			var once sync.Once
			closeBoth := func() { once.Do(func() { in.Close(); out.Close() }) }
			pipe := func(dst, src net.Conn) {
				buf := make([]byte, 4096)
				for {
					n, err := src.Read(buf)
					if n > 0 {
						last.Store(time.Now().UnixNano())
						if _, werr := dst.Write(buf[:n]); werr != nil {
							break
						}
					}
					if err != nil {
						break
					}
				}
				closeBoth()
			}
			go pipe(out, in)
			go pipe(in, out)
			go func() {
				for range time.Tick(100 * time.Millisecond) {
					if time.Since(time.Unix(0, last.Load())) > idle {
						closeBoth()
						return
					}
				}
			}()
		}
	}()
	return ln.Addr().String()
}

// waitFor polls cond until it holds, failing the test after within.
func waitFor(t *testing.T, what string, within time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", within, what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestDiagnosisScenario plays a mixed fleet and checks that fleetd says, per
// device and per firmware, why each one drops, flags the firmware that
// rejects pings with evidence, marks their devices incompatible, and leaves
// every healthy device and firmware alone.
func TestDiagnosisScenario(t *testing.T) {
	if testing.Short() {
		t.Skip("70 s scenario")
	}
	dir := t.TempDir()
	ca, _ := devcert.NewCA("devices")
	ca.WriteCA(filepath.Join(dir, "ca.crt"))
	ca.WriteKey(filepath.Join(dir, "ca.key"))
	srv, _ := ca.Server(devcert.Options{IPs: []net.IP{net.ParseIP("127.0.0.1")}})
	certFile, keyFile, _ := devcert.WritePair(dir, "server", srv)
	p := fleetdtest.Start(t, fleetdtest.DataDir(t), "FLEETD_MQTT_TLS_ADDR=127.0.0.1:0", "FLEETD_TLS_CERT_FILE="+certFile,
		"FLEETD_TLS_KEY_FILE="+keyFile, "FLEETD_TLS_CLIENT_CA_FILE="+filepath.Join(dir, "ca.crt"), "FLEETD_ANALYSIS_INTERVAL=1s")
	p.WaitReady(15 * time.Second)
	api := client.New(p.HTTPURL, p.Token())
	ctx := context.Background()
	// Small-fleet thresholds: a minute of a few devices. Two firmware that
	// reject pings share this fleet; each is compared with the median of the
	// other firmware, which the other bad one cannot raise: the production
	// ratio of 5 flags both.
	if _, err := api.SetPolicy(ctx, fleet.Policy{Verdicts: fleet.VerdictPolicy{MinDevices: 3, MinDeviceHours: 0.005, MinEvents: 5, MinRate: 1, RateRatio: 5}}); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"expired-0", "foreign-0"} {
		if _, err := api.RegisterDevice(ctx, fleet.NewDevice{ID: id, Model: "gw-100"}); err != nil {
			t.Fatal(err)
		}
	}
	mqtt := p.Addr("mqtt-tcp")
	proxy := idleCutProxy(t, mqtt, 20*time.Second)
	f := &sim.Fleet{
		Server: sim.Server{MQTT: "tcp://" + mqtt, API: p.HTTPURL, CAFile: filepath.Join(dir, "ca.crt")},
		TLS:    sim.TLSFiles{DeviceCACert: filepath.Join(dir, "ca.crt"), DeviceCAKey: filepath.Join(dir, "ca.key")},
		Run:    sim.RunOptions{Duration: secs(70), Register: true, Ramp: 100},
		Firmware: map[string]sim.FirmwareProfile{
			"1.0.3": {Pings: "malformed"},
			"0.9.0": {Pings: "none"},
		},
		Cohorts: []sim.Cohort{
			{Name: "ok311", Count: 4, Model: "gw-100", Firmware: "1.2.0", Protocol: "3.1.1", Telemetry: secs(1)},
			{Name: "ok5", Count: 4, Model: "gw-200", Firmware: "2.0.1", Protocol: "5", Telemetry: secs(1)},
			{Name: "buggy", Count: 3, Model: "gw-100", Firmware: "1.0.3", Keepalive: secs(2)},
			{Name: "mute", Count: 3, Model: "th-10", Firmware: "0.9.0", Keepalive: secs(2)},
			{Name: "twins", Count: 2, Model: "gw-100", Firmware: "1.2.0", DuplicateIDs: true},
			{Name: "natted", Count: 1, Model: "gw-100", Firmware: "1.2.0", Keepalive: secs(30), URL: "tcp://" + proxy},
			{Name: "expired", Count: 1, Model: "gw-100", Credentials: "expired_cert", URL: "tls://" + p.Addr("mqtt-tls")},
			{Name: "foreign", Count: 1, Model: "gw-100", Credentials: "unknown_ca_cert", URL: "tls://" + p.Addr("mqtt-tls")},
		},
	}
	if err := f.Validate(); err != nil {
		t.Fatal(err)
	}
	s, err := sim.New(ctx, f, sim.Options{AdminToken: p.Token()})
	if err != nil {
		t.Fatal(err)
	}
	summary := s.Run(ctx)
	t.Logf("fleet summary: connects %d, errors %v", summary.Connects, summary.Errors)
	// Every session has ended and every event is stored; then two analysis
	// rounds, as the first may have read the events before the last ones.
	waitFor(t, "every device offline and every event stored", 20*time.Second, func() bool {
		h, err := api.FleetHealth(ctx)
		unwritten, merr := p.Metric("fleetd_event_oldest_unwritten_seconds")
		return err == nil && h.Devices.Online == 0 && merr == nil && unwritten == 0
	})
	lastRound := func() time.Time {
		var last time.Time
		vs, _ := api.Verdicts(ctx)
		for _, v := range vs {
			if v.Learned && v.UpdatedAt.After(last) {
				last = v.UpdatedAt
			}
		}
		return last
	}
	stored := time.Now()
	waitFor(t, "an analysis round after the events were stored to update a learned verdict", 10*time.Second, func() bool { return lastRound().After(stored) })
	first := lastRound()
	waitFor(t, "a second analysis round", 10*time.Second, func() bool { return lastRound().After(first) })

	problems := func(id string) map[string]fleet.Problem {
		t.Helper()
		d, err := api.Diagnosis(ctx, id)
		if err != nil {
			t.Fatalf("diagnosis of %s: %v", id, err)
		}
		out := map[string]fleet.Problem{}
		for _, pr := range d.Problems {
			out[pr.Code] = pr
		}
		return out
	}
	expect := func(id, code, causeContains string) {
		t.Helper()
		pr, ok := problems(id)[code]
		if !ok {
			t.Errorf("%s: no %s in its diagnosis: %+v", id, code, problems(id))
			return
		}
		if !strings.Contains(pr.Cause+" "+pr.Fix, causeContains) {
			t.Errorf("%s: %s says %q / %q, want it to mention %q", id, code, pr.Cause, pr.Fix, causeContains)
		}
	}
	for _, id := range []string{"buggy-0", "buggy-1", "buggy-2"} {
		expect(id, fleet.ProblemMalformedPings, "PINGREQ")
		expect(id, fleet.ProblemIncompatibleFirmware, "rejects pings")
	}
	for _, id := range []string{"mute-0", "mute-1", "mute-2"} {
		expect(id, fleet.ProblemNoPings, "never sends PINGREQ")
		expect(id, fleet.ProblemIncompatibleFirmware, "rejects pings")
	}
	expect("twins-0", fleet.ProblemDuplicateClientID, "share")
	expect("natted-0", fleet.ProblemKeepaliveMismatch, "idle")
	if pr := problems("natted-0")[fleet.ProblemKeepaliveMismatch]; pr.Evidence != nil {
		if n, _ := pr.Evidence["idle_seconds"].(float64); n < 19 || n > 23 {
			t.Errorf("natted-0: idle cut measured at %v s, want about 20", pr.Evidence["idle_seconds"])
		}
	}
	expect("expired-0", fleet.ProblemTLSHandshakeFailures, "expired")
	expect("foreign-0", fleet.ProblemTLSHandshakeFailures, "unknown_ca")
	for _, id := range []string{"ok311-0", "ok311-3", "ok5-0", "ok5-3"} {
		if pr := problems(id); len(pr) != 0 {
			t.Errorf("healthy %s has problems: %+v", id, pr)
		}
	}

	health, err := api.FleetHealth(ctx)
	if err != nil {
		t.Fatal(err)
	}
	flagged := map[string]fleet.FirmwareVerdict{}
	for _, v := range health.FlaggedFirmware {
		flagged[v.Firmware] = v
	}
	if len(flagged) != 2 || flagged["1.0.3"].Evidence == nil || flagged["0.9.0"].Evidence == nil {
		t.Fatalf("flagged firmware: %+v; want exactly 1.0.3 and 0.9.0, with evidence", health.FlaggedFirmware)
	}
	t.Logf("1.0.3: %s", flagged["1.0.3"].Evidence.Evidence)
	t.Logf("0.9.0: %s", flagged["0.9.0"].Evidence.Evidence)
	if n := health.Incompatible.ByReason[fleet.IncompatRejectsPings]; n != 6 || health.Incompatible.Devices != 6 {
		t.Errorf("incompatible devices: %+v, want the 6 devices of the two flagged firmware", health.Incompatible)
	}
	page, err := api.Devices(ctx, client.DeviceQuery{Compat: "incompatible", Limit: 100})
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range page.Devices {
		if d.Firmware != "1.0.3" && d.Firmware != "0.9.0" {
			t.Errorf("healthy device %s (%s) listed as incompatible", d.ID, d.Firmware)
		}
	}
	reasons := map[string]bool{}
	for _, c := range health.Disconnects.LastHour {
		reasons[c.Firmware+"/"+c.Protocol.String()+"/"+string(c.Reason)] = true
	}
	for _, want := range []string{"1.0.3/3.1.1/protocol_error", "0.9.0/3.1.1/keepalive_timeout", "1.2.0/3.1.1/session_takeover", "1.2.0/3.1.1/connection_lost"} {
		if !reasons[want] {
			t.Errorf("fleet health has no %s disconnects: %+v", want, health.Disconnects.LastHour)
		}
	}

	// Rules changed through the API apply without a restart: MQTT 5 is
	// declared unsupported on 2.0.x, and the gw-200 devices become
	// incompatible; the rule removed, they are compatible again.
	if _, err := api.SetPolicy(ctx, fleet.Policy{Verdicts: fleet.VerdictPolicy{MinDevices: 3, MinDeviceHours: 0.005, MinEvents: 5, MinRate: 1, RateRatio: 5},
		Models: map[string]fleet.ModelRules{"gw-200": {Firmware: []fleet.FirmwareRange{{Versions: ">=2.0.0, <2.1.0", Protocols: []string{"3.1.1"}}}}}}); err != nil {
		t.Fatal(err)
	}
	waitIncompatible := func(id string, want bool) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			d, err := api.Device(ctx, id)
			if err == nil && d.Incompatible == want {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s incompatible=%v, want %v: %+v", id, d.Incompatible, want, d.Incompatibilities)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	waitIncompatible("ok5-0", true)
	if _, err := api.SetPolicy(ctx, fleet.Policy{Verdicts: fleet.VerdictPolicy{MinDevices: 3, MinDeviceHours: 0.005, MinEvents: 5, MinRate: 1, RateRatio: 5}}); err != nil {
		t.Fatal(err)
	}
	waitIncompatible("ok5-0", false)
}
