package sim_test

import (
	"context"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/devcert"
	"github.com/fleetd/fleetd/internal/fleetdtest"
	"github.com/fleetd/fleetd/sim"
	"github.com/fleetd/fleetd/web/client"
)

// TestCertificateCohorts: devices with a certificate from the fleet's CA
// connect without a token; expired and foreign certificates are refused in
// the handshake, which fleetd counts.
func TestCertificateCohorts(t *testing.T) {
	dir := t.TempDir()
	ca, _ := devcert.NewCA("devices")
	ca.WriteCA(filepath.Join(dir, "ca.crt"))
	ca.WriteKey(filepath.Join(dir, "ca.key"))
	srv, _ := ca.Server(devcert.Options{IPs: []net.IP{net.ParseIP("127.0.0.1")}})
	certFile, keyFile, _ := devcert.WritePair(dir, "server", srv)
	p := fleetdtest.Start(t, fleetdtest.DataDir(t), "FLEETD_MQTT_TLS_ADDR=127.0.0.1:0", "FLEETD_TLS_CERT_FILE="+certFile,
		"FLEETD_TLS_KEY_FILE="+keyFile, "FLEETD_TLS_CLIENT_CA_FILE="+filepath.Join(dir, "ca.crt"))
	p.WaitReady(15 * time.Second)
	api := client.New(p.HTTPURL, p.Token())
	for _, id := range []string{"certified-0", "expired-0", "foreign-0"} {
		if _, err := api.RegisterDevice(context.Background(), fleet.NewDevice{ID: id}); err != nil {
			t.Fatal(err)
		}
	}
	tlsURL := "tls://" + p.Addr("mqtt-tls")
	f := &sim.Fleet{
		Server: sim.Server{MQTT: tlsURL, CAFile: filepath.Join(dir, "ca.crt")},
		TLS:    sim.TLSFiles{DeviceCACert: filepath.Join(dir, "ca.crt"), DeviceCAKey: filepath.Join(dir, "ca.key")},
		Run:    sim.RunOptions{Duration: secs(3)},
		Cohorts: []sim.Cohort{
			{Name: "certified", Count: 1, Credentials: "cert", Firmware: "3.0.0"},
			{Name: "expired", Count: 1, Credentials: "expired_cert"},
			{Name: "foreign", Count: 1, Credentials: "unknown_ca_cert"},
		},
	}
	if err := f.Validate(); err != nil {
		t.Fatal(err)
	}
	s, err := sim.New(context.Background(), f, sim.Options{})
	if err != nil {
		t.Fatal(err)
	}
	summary := s.Run(context.Background())
	t.Logf("summary errors: %v", summary.Errors)

	d, err := api.Device(context.Background(), "certified-0")
	if err != nil || d.Firmware != "3.0.0" || d.Listener != "tls" {
		t.Fatalf("certified device: %+v %v", d, err)
	}
	tlsErrors := 0
	for kind, n := range summary.Errors {
		if strings.HasPrefix(kind, "tls") {
			tlsErrors += int(n)
		}
	}
	if tlsErrors < 2 {
		t.Fatalf("expired and foreign certificates were not refused in TLS: %v", summary.Errors)
	}
	resp, err := http.Get(p.HTTPURL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, class := range []string{"expired_certificate", "unknown_ca"} {
		if !strings.Contains(string(body), `fleetd_mqtt_tls_handshake_failures_total{class="`+class+`"}`) {
			t.Errorf("fleetd did not count %s handshake failures", class)
		}
	}
	// Both failures name the device, whose certificate fleetd saw.
	for _, id := range []string{"expired-0", "foreign-0"} {
		d, err := api.Diagnosis(context.Background(), id)
		if err != nil {
			t.Fatal(err)
		}
		found := false
		for _, p := range d.Problems {
			found = found || p.Code == fleet.ProblemTLSHandshakeFailures
		}
		if !found {
			t.Errorf("%s: diagnosis does not show the TLS failures: %+v", id, d.Problems)
		}
	}
}

// TestNaiveReconnectStorm compares the two reconnect policies on devices that
// cannot get in (a revoked token): naive firmware hammers the broker, backoff
// with jitter does not.
func TestNaiveReconnectStorm(t *testing.T) {
	p := fleetdtest.Start(t, fleetdtest.DataDir(t))
	p.WaitReady(15 * time.Second)
	attempts := map[string]int64{}
	for _, policy := range []string{"naive", "backoff"} {
		f := &sim.Fleet{
			Server:  sim.Server{MQTT: "tcp://" + p.Addr("mqtt-tcp"), API: p.HTTPURL},
			Run:     sim.RunOptions{Duration: secs(4), Register: true, Ramp: 1000},
			Cohorts: []sim.Cohort{{Name: "storm-" + policy, Count: 3, Credentials: "bad_token", Reconnect: policy}},
		}
		if err := f.Validate(); err != nil {
			t.Fatal(err)
		}
		s, err := sim.New(context.Background(), f, sim.Options{AdminToken: p.Token()})
		if err != nil {
			t.Fatal(err)
		}
		attempts[policy] = s.Run(context.Background()).ConnectAttempts
	}
	t.Logf("connect attempts in 4 s by 3 devices: %v", attempts)
	if attempts["naive"] < 10*attempts["backoff"] {
		t.Fatalf("naive reconnects (%d attempts) are not a storm next to backoff (%d)", attempts["naive"], attempts["backoff"])
	}
	// fleetd defends itself: the per-device connect rate throttles the storm.
	page, _ := client.New(p.HTTPURL, p.Token()).Events(context.Background(), "storm-naive-0", "", 1000)
	throttled := 0
	for _, e := range page.Events {
		if e.Reason == fleet.ReasonThrottled {
			throttled++
		}
	}
	if throttled == 0 {
		t.Fatal("the naive storm was never throttled")
	}
}
