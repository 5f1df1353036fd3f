package broker

import (
	"context"
	"crypto/tls"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fleetd/fleetd/internal/devcert"
)

// TestServerHandshakeShared: with one configuration shared by every
// connection, each failed handshake is still explained with its own
// ClientHello and certificate, also when many run at once, and no session
// is resumed (resumption would skip the certificate check).
func TestServerHandshakeShared(t *testing.T) {
	ca, err := devcert.NewCA("devices")
	if err != nil {
		t.Fatal(err)
	}
	srv, _ := ca.Server(devcert.Options{IPs: []net.IP{net.ParseIP("127.0.0.1")}})
	good, _ := ca.Device("dev-1", devcert.Options{})
	expired, _ := ca.Device("dev-1", devcert.Options{NotBefore: time.Now().Add(-48 * time.Hour), NotAfter: time.Now().Add(-time.Hour)})
	foreignCA, _ := devcert.NewCA("someone else's CA")
	foreign, _ := foreignCA.Device("dev-1", devcert.Options{})
	cfg := serverTLSConfig(&tls.Config{Certificates: []tls.Certificate{srv}, MinVersion: tls.VersionTLS12,
		ClientCAs: ca.Pool(), ClientAuth: tls.RequireAndVerifyClientCert})

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type result struct {
		tc *tls.Conn
		f  *handshakeFailure
	}
	results := make(chan result, 64)
	go func() {
		for {
			raw, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
				defer cancel()
				tc, f := serverHandshake(ctx, raw, cfg)
				if tc != nil {
					// Read once so that a TLS 1.3 handshake completes on both sides.
					_, _ = tc.Read(make([]byte, 1))
					tc.Close()
				}
				raw.Close()
				results <- result{tc, f}
			}()
		}
	}()
	client := func(sni string, c *tls.Certificate, maxVersion uint16, cache tls.ClientSessionCache) (tls.ConnectionState, error) {
		raw, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer raw.Close()
		cc := tls.Client(raw, &tls.Config{RootCAs: ca.Pool(), ServerName: sni, MaxVersion: maxVersion, ClientSessionCache: cache,
			MinVersion:         min(tls.VersionTLS12, max(maxVersion, tls.VersionTLS10)),
			InsecureSkipVerify: sni != "127.0.0.1", // the SNI names the device, not the server
			GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
				if c == nil {
					return &tls.Certificate{}, nil
				}
				return c, nil
			}})
		err = cc.Handshake()
		if err == nil {
			_, err = cc.Write([]byte{0xc0, 0})
			// With TLS 1.3 the server judges the certificate after the client's
			// handshake is done: a read shows the verdict.
			cc.SetReadDeadline(time.Now().Add(time.Second))
			if _, rerr := cc.Read(make([]byte, 1)); err == nil && rerr != nil && !strings.Contains(rerr.Error(), "EOF") && !strings.Contains(rerr.Error(), "timeout") {
				err = rerr
			}
		}
		return cc.ConnectionState(), err
	}

	for _, tc := range []struct {
		name  string
		cert  *tls.Certificate
		max   uint16
		class string
		subj  bool
	}{
		{"expired 1.3", &expired, 0, "expired_certificate", true},
		{"expired 1.2", &expired, tls.VersionTLS12, "expired_certificate", true},
		{"unknown ca", &foreign, 0, "unknown_ca", true},
		{"server certificate as a client's", &srv, 0, "bad_certificate", true},
		{"no certificate 1.3", nil, 0, "no_certificate", false},
		{"no certificate 1.2", nil, tls.VersionTLS12, "no_certificate", false},
		{"old TLS", &good, tls.VersionTLS11, "protocol_version", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// Concurrent handshakes, each with its own SNI: each failure must
			// carry its own.
			const n = 8
			var wg sync.WaitGroup
			for i := range n {
				wg.Add(1)
				go func() {
					defer wg.Done()
					client("dev-"+strings.Repeat("x", i+1)+".example", tc.cert, tc.max, nil)
				}()
			}
			wg.Wait()
			seen := map[string]bool{}
			for range n {
				r := <-results
				if r.f == nil {
					t.Fatal("handshake succeeded")
				}
				d := r.f.Detail()
				if r.f.Class != tc.class {
					t.Errorf("class %s, want %s (%s)", r.f.Class, tc.class, d)
				}
				if !strings.Contains(d, "offered=TLS 1.") {
					t.Errorf("no offered versions: %s", d)
				}
				if tc.subj != strings.Contains(d, "subject=CN=") || tc.subj && !strings.Contains(d, "sha256=") {
					t.Errorf("subject in the detail %v, want %v: %s", !tc.subj, tc.subj, d)
				}
				if tc.subj && r.f.CN != tc.cert.Leaf.Subject.CommonName {
					t.Errorf("CN %q, want %q", r.f.CN, tc.cert.Leaf.Subject.CommonName)
				}
				seen[r.f.SNI] = true
			}
			if len(seen) != n {
				t.Errorf("SNIs recorded: %v, want %d different ones", seen, n)
			}
		})
	}

	t.Run("no resumption", func(t *testing.T) {
		cache := tls.NewLRUClientSessionCache(4)
		for i := range 3 {
			st, err := client("127.0.0.1", &good, 0, cache)
			if err != nil {
				t.Fatalf("connection %d: %v", i, err)
			}
			if st.DidResume {
				t.Fatalf("connection %d resumed a session", i)
			}
			if r := <-results; r.f != nil {
				t.Fatalf("connection %d: %s", i, r.f.Detail())
			}
		}
	})

	t.Run("timeout", func(t *testing.T) {
		raw, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer raw.Close()
		r := <-results
		if r.f == nil || r.f.Class != "handshake_timeout" {
			t.Fatalf("got %+v, want handshake_timeout", r.f)
		}
	})
}
