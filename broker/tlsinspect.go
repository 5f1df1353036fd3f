package broker

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"syscall"
	"time"
)

// handshakeFailure explains a failed TLS handshake: who tried (address,
// server name, certificate subject and fingerprint, even when the
// certificate did not verify), with what (offered versions), and why, in
// one class from a fixed vocabulary.
type handshakeFailure struct {
	Class       string // expired_certificate, unknown_ca, bad_certificate, no_certificate, protocol_version, handshake_timeout, aborted
	Err         error
	SNI         string
	Offered     []string
	CN          string
	Subject     string
	Fingerprint string // SHA-256 of the leaf certificate, hex
}

// Detail renders the failure for the event log, class first so that it can
// be counted.
func (f *handshakeFailure) Detail() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s: %v", f.Class, f.Err)
	if f.SNI != "" {
		fmt.Fprintf(&b, "; sni=%s", f.SNI)
	}
	if len(f.Offered) > 0 {
		fmt.Fprintf(&b, "; offered=%s", strings.Join(f.Offered, ","))
	}
	if f.Subject != "" {
		fmt.Fprintf(&b, "; subject=%s; sha256=%s", f.Subject, f.Fingerprint)
	}
	return b.String()
}

// serverTLSConfig builds the configuration a TLS listener shares between all
// its connections, once, from the listener's settings. Per-connection state
// never lives in it: what the handshake learns reaches serverHandshake
// through the handshake's context (SNI, offered versions), the error the
// certificate check returns (why the certificate did not verify) and the
// connection's own state (the certificate presented).
//
// When the listener requires client certificates it asks for any
// certificate and verifies it itself, so that a certificate that fails
// verification is still seen and can be named. Session tickets are off:
// resumption would skip that check (crypto/tls does not call
// VerifyPeerCertificate on resumed connections), and fleetd never resumed a
// session anyway (each connection used to get its own copy of the config,
// with its own ticket keys).
func serverTLSConfig(base *tls.Config) *tls.Config {
	cfg := base.Clone()
	cfg.SessionTicketsDisabled = true
	cfg.GetConfigForClient = func(h *tls.ClientHelloInfo) (*tls.Config, error) {
		if r, ok := h.Context().Value(helloKey{}).(*hello); ok {
			r.sni, r.versions = h.ServerName, h.SupportedVersions
		}
		return nil, nil
	}
	if base.ClientAuth == tls.RequireAndVerifyClientCert {
		roots := base.ClientCAs
		cfg.ClientAuth = tls.RequireAnyClientCert
		cfg.VerifyPeerCertificate = func(rawCerts [][]byte, _ [][]*x509.Certificate) error {
			return verifyClientCertificate(rawCerts, roots, time.Now())
		}
	}
	return cfg
}

// helloKey is the context key of the handshake's *hello.
type helloKey struct{}

// hello is what the ClientHello said, kept only for the handshake.
type hello struct {
	sni      string
	versions []uint16
}

// certificateError is the verification error of a client certificate, as
// returned through crypto/tls to serverHandshake. It reads exactly as the
// error it carries.
type certificateError struct{ err error }

func (e *certificateError) Error() string { return e.err.Error() }
func (e *certificateError) Unwrap() error { return e.err }

// verifyClientCertificate verifies a presented chain against the device CA.
// It returns a *certificateError, or nil for a good certificate or none
// (RequireAnyClientCert has then already refused).
func verifyClientCertificate(rawCerts [][]byte, roots *x509.CertPool, now time.Time) error {
	certs := make([]*x509.Certificate, 0, len(rawCerts))
	for _, rc := range rawCerts {
		c, err := x509.ParseCertificate(rc)
		if err != nil {
			return &certificateError{fmt.Errorf("unreadable certificate: %w", err)}
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	if _, err := certs[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, CurrentTime: now}); err != nil {
		return &certificateError{err}
	}
	return nil
}

// serverHandshake runs one connection's TLS handshake under ctx, with the
// listener's shared configuration (serverTLSConfig). Nothing of the
// handshake's own bookkeeping outlives it: the returned connection holds only
// what crypto/tls keeps.
func serverHandshake(ctx context.Context, raw net.Conn, cfg *tls.Config) (*tls.Conn, *handshakeFailure) {
	h := &hello{}
	tc := tls.Server(raw, cfg)
	err := tc.HandshakeContext(context.WithValue(ctx, helloKey{}, h))
	if err == nil {
		return tc, nil
	}
	var verifyErr error
	var ce *certificateError
	if errors.As(err, &ce) {
		verifyErr = ce.err
	} else if ctx.Err() != nil && errors.As(tc.Handshake(), &ce) {
		// The deadline passed as the certificate was refused, and crypto/tls
		// returned the context's error: the handshake's own is kept.
		verifyErr = ce.err
	}
	f := &handshakeFailure{Err: err, SNI: h.sni}
	for _, v := range h.versions {
		f.Offered = append(f.Offered, tls.VersionName(v))
	}
	// crypto/tls keeps the presented chain even when the handshake failed,
	// from the moment it parsed it (before the certificate is verified).
	presented := false
	if certs := tc.ConnectionState().PeerCertificates; len(certs) > 0 {
		leaf := certs[0]
		sum := sha256.Sum256(leaf.Raw)
		presented = true
		f.CN, f.Subject, f.Fingerprint = leaf.Subject.CommonName, leaf.Subject.String(), hex.EncodeToString(sum[:])
	}
	f.Class = classifyHandshake(err, verifyErr, presented, ctx.Err())
	return nil, f
}

// classifyHandshake names why a handshake failed. It is pure so that each
// class has a table row.
func classifyHandshake(err, verifyErr error, presented bool, ctxErr error) string {
	var invalid x509.CertificateInvalidError
	var unknown x509.UnknownAuthorityError
	switch {
	case verifyErr != nil && errors.As(verifyErr, &invalid) && invalid.Reason == x509.Expired:
		return "expired_certificate"
	case verifyErr != nil && errors.As(verifyErr, &unknown):
		return "unknown_ca"
	case verifyErr != nil:
		return "bad_certificate"
	case ctxErr != nil || errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, context.DeadlineExceeded):
		return "handshake_timeout"
	}
	msg := err.Error()
	switch {
	case strings.Contains(msg, "didn't provide a certificate") || (!presented && strings.Contains(msg, "certificate required")):
		return "no_certificate"
	case strings.Contains(msg, "protocol version"), strings.Contains(msg, "unsupported versions"),
		strings.Contains(msg, "does not look like a TLS handshake"):
		return "protocol_version"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, syscall.ECONNRESET):
		return "aborted"
	}
	return "bad_certificate"
}

// handshake runs serverHandshake on a goroutine of its own and waits for it.
// The connection's goroutine goes on to be mochi's reader, parked for the
// connection's life; a handshake run on it (key exchange, signatures,
// certificate checks: deep frames) would leave it a stack that Go does not
// shrink while the parked reader uses more than a quarter of it. A goroutine
// that ends gives its stack back.
func handshake(ctx context.Context, raw net.Conn, cfg *tls.Config) (*tls.Conn, *handshakeFailure) {
	type result struct {
		tc *tls.Conn
		f  *handshakeFailure
	}
	done := make(chan result, 1)
	go func() {
		tc, f := serverHandshake(ctx, raw, cfg)
		done <- result{tc, f}
	}()
	r := <-done
	return r.tc, r.f
}
