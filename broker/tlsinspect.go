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

// serverHandshake runs one connection's TLS handshake under ctx. When the
// listener requires client certificates it asks for any certificate and
// verifies it itself, so that a certificate that fails verification is still
// seen and can be named.
func serverHandshake(ctx context.Context, raw net.Conn, base *tls.Config) (*tls.Conn, *handshakeFailure) {
	f := &handshakeFailure{}
	var verifyErr error
	presented := false
	cfg := base.Clone()
	cfg.GetConfigForClient = func(h *tls.ClientHelloInfo) (*tls.Config, error) {
		f.SNI = h.ServerName
		for _, v := range h.SupportedVersions {
			f.Offered = append(f.Offered, tls.VersionName(v))
		}
		return nil, nil
	}
	if base.ClientAuth == tls.RequireAndVerifyClientCert {
		cfg.ClientAuth = tls.RequireAnyClientCert
		cfg.VerifyPeerCertificate = func(rawCerts [][]byte, _ [][]*x509.Certificate) error {
			presented = len(rawCerts) > 0
			certs := make([]*x509.Certificate, 0, len(rawCerts))
			for _, rc := range rawCerts {
				c, err := x509.ParseCertificate(rc)
				if err != nil {
					verifyErr = fmt.Errorf("unreadable certificate: %w", err)
					return verifyErr
				}
				certs = append(certs, c)
			}
			if len(certs) == 0 {
				return nil // RequireAnyClientCert has already refused
			}
			leaf := certs[0]
			sum := sha256.Sum256(leaf.Raw)
			f.CN, f.Subject, f.Fingerprint = leaf.Subject.CommonName, leaf.Subject.String(), hex.EncodeToString(sum[:])
			inter := x509.NewCertPool()
			for _, c := range certs[1:] {
				inter.AddCert(c)
			}
			_, verifyErr = leaf.Verify(x509.VerifyOptions{Roots: base.ClientCAs, Intermediates: inter,
				KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, CurrentTime: time.Now()})
			return verifyErr
		}
	}
	tc := tls.Server(raw, cfg)
	err := tc.HandshakeContext(ctx)
	if err == nil {
		return tc, nil
	}
	f.Err = err
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
