package broker

import (
	"context"
	"crypto/tls"
	"net"
	"strings"
	"testing"
	"time"

	pahov3 "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/devcert"
)

// TestTLSClientCertificates: with a device CA configured, the certificate
// names the device (no token needed), a certificate for another id is
// refused, and a handshake without a certificate is recorded.
func TestTLSClientCertificates(t *testing.T) {
	dir := t.TempDir()
	ca, err := devcert.NewCA("devices")
	if err != nil {
		t.Fatal(err)
	}
	caFile := dir + "/ca.pem"
	if err := ca.WriteCA(caFile); err != nil {
		t.Fatal(err)
	}
	srvCert, _ := ca.Server(devcert.Options{IPs: []net.IP{net.ParseIP("127.0.0.1")}})
	certFile, keyFile, err := devcert.WritePair(dir, "server", srvCert)
	if err != nil {
		t.Fatal(err)
	}
	e := newEnv(t, func(c *Config) {
		c.TLSAddr, c.TLSCertFile, c.TLSKeyFile, c.TLSClientCAFile = "127.0.0.1:0", certFile, keyFile, caFile
	})
	e.register("cert-dev")

	connect := func(id string, certs []tls.Certificate) error {
		opts := pahov3.NewClientOptions().AddBroker("ssl://" + e.addr("tls")).SetClientID(id).SetProtocolVersion(4).
			SetAutoReconnect(false).SetConnectTimeout(3 * time.Second).
			SetTLSConfig(&tls.Config{RootCAs: ca.Pool(), Certificates: certs})
		c := pahov3.NewClient(opts)
		t.Cleanup(func() { c.Disconnect(100) })
		tk := c.Connect()
		if !tk.WaitTimeout(5 * time.Second) {
			return context.DeadlineExceeded
		}
		if tk.Error() == nil {
			c.Publish("devices/"+id+"/status", 1, true, birthPayload("4.0.0")).Wait()
		}
		return tk.Error()
	}

	good, _ := ca.Device("cert-dev", devcert.Options{})
	if err := connect("cert-dev", []tls.Certificate{good}); err != nil {
		t.Fatalf("device with its certificate: %v", err)
	}
	d := e.waitDevice("cert-dev", 5*time.Second, func(d fleet.Device) bool { return d.Online && d.Firmware == "4.0.0" })
	if d.Listener != "tls" || !strings.HasPrefix(d.TLSVersion, "TLS 1.") {
		t.Fatalf("listener %q tls %q", d.Listener, d.TLSVersion)
	}

	other, _ := ca.Device("someone-else", devcert.Options{})
	if err := connect("cert-dev", []tls.Certificate{other}); err == nil || !strings.Contains(err.Error(), "not Authorized") {
		t.Fatalf("certificate naming another device: got %v, want not authorized (0x05)", err)
	}
	e.waitEvent("cert-dev", 5*time.Second, func(ev fleet.Event) bool {
		return ev.Kind == fleet.KindRefused && strings.Contains(ev.Detail, "does not match the certificate")
	})

	if err := connect("cert-dev", nil); err == nil {
		t.Fatal("connected without a client certificate")
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		var n int
		e.pool.QueryRow(context.Background(), `SELECT count(*) FROM device_events WHERE reason = 'tls_handshake_failed'`).Scan(&n)
		if n > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("failed handshake not recorded")
		}
		time.Sleep(20 * time.Millisecond)
	}
}
