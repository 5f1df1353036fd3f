package broker

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
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

	// Failed handshakes are classified, and tied to the device when the
	// certificate names a registered one, even though it did not verify.
	expired, _ := ca.Device("cert-dev", devcert.Options{NotBefore: time.Now().Add(-48 * time.Hour), NotAfter: time.Now().Add(-time.Hour)})
	foreignCA, _ := devcert.NewCA("someone else's CA")
	foreign, _ := foreignCA.Device("cert-dev", devcert.Options{})
	present := func(c tls.Certificate) []tls.Certificate { return []tls.Certificate{c} }
	for _, tc := range []struct {
		certs []tls.Certificate
		class string
	}{{present(expired), "expired_certificate"}, {present(foreign), "unknown_ca"}} {
		c := tc.certs[0]
		opts := pahov3.NewClientOptions().AddBroker("ssl://" + e.addr("tls")).SetClientID("cert-dev").SetProtocolVersion(4).
			SetAutoReconnect(false).SetConnectTimeout(3 * time.Second).
			SetTLSConfig(&tls.Config{RootCAs: ca.Pool(), GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &c, nil }})
		cl := pahov3.NewClient(opts)
		if tk := cl.Connect(); tk.WaitTimeout(5*time.Second) && tk.Error() == nil {
			t.Fatalf("%s: connected", tc.class)
		}
		ev := e.waitEvent("cert-dev", 5*time.Second, func(ev fleet.Event) bool {
			return ev.Reason == fleet.ReasonTLSHandshakeFailed && strings.HasPrefix(ev.Detail, tc.class+":")
		})
		if !strings.Contains(ev.Detail, "subject=CN=cert-dev") || !strings.Contains(ev.Detail, "sha256=") || !strings.Contains(ev.Detail, "offered=") {
			t.Errorf("%s: detail %q lacks the certificate's subject, fingerprint or offered versions", tc.class, ev.Detail)
		}
	}
	if err := connect("cert-dev", nil); err == nil {
		t.Fatal("connected without a client certificate")
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		var n int
		e.pool.QueryRow(context.Background(), `SELECT count(*) FROM device_events WHERE reason = 'tls_handshake_failed' AND device_id = '' AND detail LIKE 'no_certificate:%'`).Scan(&n)
		if n > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("handshake without a certificate not recorded as no_certificate")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestClassifyHandshake(t *testing.T) {
	expired := x509.CertificateInvalidError{Reason: x509.Expired}
	tests := []struct {
		name      string
		err       error
		verifyErr error
		presented bool
		ctxErr    error
		want      string
	}{
		{"expired", errors.New("tls: bad certificate"), expired, true, nil, "expired_certificate"},
		{"unknown ca", errors.New("tls: bad certificate"), x509.UnknownAuthorityError{}, true, nil, "unknown_ca"},
		{"wrong usage", errors.New("tls: bad certificate"), x509.CertificateInvalidError{Reason: x509.IncompatibleUsage}, true, nil, "bad_certificate"},
		{"no certificate", errors.New("tls: client didn't provide a certificate"), nil, false, nil, "no_certificate"},
		{"old TLS", errors.New("tls: client offered only unsupported versions: [301]"), nil, false, nil, "protocol_version"},
		{"plain MQTT on the TLS port", errors.New("tls: first record does not look like a TLS handshake"), nil, false, nil, "protocol_version"},
		{"slow client", errors.New("read: i/o timeout"), nil, false, context.DeadlineExceeded, "handshake_timeout"},
		{"gave up", io.EOF, nil, false, nil, "aborted"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := classifyHandshake(tt.err, tt.verifyErr, tt.presented, tt.ctxErr); got != tt.want {
				t.Fatalf("got %s, want %s", got, tt.want)
			}
		})
	}
}
