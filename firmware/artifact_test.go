package firmware

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/fleetd/fleetd/internal/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

func TestArtifactSignatures(t *testing.T) {
	_, server, _ := ed25519.GenerateKey(rand.Reader)
	vendorPub, vendor, _ := ed25519.GenerateKey(rand.Reader)
	_, stranger, _ := ed25519.GenerateKey(rand.Reader)
	dir := t.TempDir()
	a, err := NewArtifacts(pgtest.New(t), dir, Keys{Signing: server, Trusted: []ed25519.PublicKey{vendorPub}}, []byte("url-key"))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	image := []byte("an image")
	sum := sha256.Sum256(image)

	own, err := a.Create(ctx, NewArtifact{Version: "1.0.0", Models: []string{"gw-100"}}, bytes.NewReader(image))
	if err != nil {
		t.Fatal(err)
	}
	sig, _ := base64.StdEncoding.DecodeString(own.Signature)
	if own.SignedBy != "server" || !ed25519.Verify(a.PublicKey(), sum[:], sig) {
		t.Fatalf("server signature: %+v", own)
	}
	if _, err := os.Stat(filepath.Join(dir, own.SHA256[:2], own.SHA256)); err != nil {
		t.Fatalf("image not stored by its SHA-256: %v", err)
	}

	vendorSig := base64.StdEncoding.EncodeToString(ed25519.Sign(vendor, sum[:]))
	signed, err := a.Create(ctx, NewArtifact{Version: "1.0.1", Models: []string{"gw-100"}, Signature: vendorSig}, bytes.NewReader(image))
	if err != nil || signed.SignedBy != Fingerprint(vendorPub) || signed.Signature != vendorSig {
		t.Fatalf("trusted signature: %+v %v", signed, err)
	}
	strangerSig := base64.StdEncoding.EncodeToString(ed25519.Sign(stranger, sum[:]))
	_, err = a.Create(ctx, NewArtifact{Version: "1.0.2", Models: []string{"gw-100"}, Signature: strangerSig}, bytes.NewReader(image))
	var ve *ValidationError
	if !errors.As(err, &ve) || ve.Field != "signature" {
		t.Fatalf("untrusted signature: %v", err)
	}
	if _, err := a.Create(ctx, NewArtifact{Version: "1.0.0", Models: []string{"gw-100"}}, bytes.NewReader(image)); !errors.Is(err, ErrConflict) {
		t.Fatalf("same version twice: %v", err)
	}

	now := time.Now()
	q := a.SignURL(own.ID, "gw-1", now.Add(time.Minute))
	parse := func(q string) (dev, exp, sig string) {
		for _, kv := range bytes.Split([]byte(q), []byte("&")) {
			k, v, _ := bytes.Cut(kv, []byte("="))
			switch string(k) {
			case "device":
				dev = string(v)
			case "expires":
				exp = string(v)
			case "sig":
				sig = string(v)
			}
		}
		return
	}
	dev, exp, s := parse(q)
	if err := a.CheckURL(own.ID, dev, exp, s, now); err != nil {
		t.Fatalf("valid URL refused: %v", err)
	}
	if err := a.CheckURL(own.ID, "gw-2", exp, s, now); err == nil {
		t.Fatal("URL of another device accepted")
	}
	if err := a.CheckURL(signed.ID, dev, exp, s, now); err == nil {
		t.Fatal("URL of another image accepted")
	}
	if err := a.CheckURL(own.ID, dev, exp, s, now.Add(2*time.Minute)); err == nil {
		t.Fatal("expired URL accepted")
	}
}
