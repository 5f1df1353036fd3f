package firmware

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"net/url"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/fleetd/fleetd/firmware/manifest"
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
	if _, err := manifest.VerifyImage([]ed25519.PublicKey{a.PublicKey()}, own.Manifest(), own.Signature); own.SignedBy != "server" || err != nil {
		t.Fatalf("server signature over the image manifest: %+v %v", own, err)
	}
	if _, err := os.Stat(filepath.Join(dir, own.SHA256[:2], own.SHA256)); err != nil {
		t.Fatalf("image not stored by its SHA-256: %v", err)
	}

	// An operator's key signs what the image is: digest, size, version, models.
	img := manifest.Image{SHA256: hex.EncodeToString(sum[:]), Size: int64(len(image)), Version: "1.0.1", Models: []string{"gw-100"}}
	vendorSig := manifest.SignImage(vendor, img)
	signed, err := a.Create(ctx, NewArtifact{Version: "1.0.1", Models: []string{"gw-100"}, Signature: vendorSig}, bytes.NewReader(image))
	if err != nil || signed.SignedBy != Fingerprint(vendorPub) || signed.Signature != vendorSig {
		t.Fatalf("trusted signature: %+v %v", signed, err)
	}
	// The same signature does not make the image another version, another
	// model's, or (signed over the bare digest) anything at all.
	for name, n := range map[string]NewArtifact{
		"another version": {Version: "1.0.9", Models: []string{"gw-100"}, Signature: vendorSig},
		"another model":   {Version: "1.0.1", Models: []string{"gw-200"}, Signature: vendorSig},
		"bare digest":     {Version: "1.0.3", Models: []string{"gw-100"}, Signature: base64.StdEncoding.EncodeToString(ed25519.Sign(vendor, sum[:]))},
		"untrusted key":   {Version: "1.0.2", Models: []string{"gw-100"}, Signature: manifest.SignImage(stranger, img)},
	} {
		_, err := a.Create(ctx, n, bytes.NewReader(image))
		var ve *ValidationError
		if !errors.As(err, &ve) || ve.Field != "signature" {
			t.Fatalf("%s: %v, want a signature error", name, err)
		}
	}
	strangerSig := manifest.SignImage(stranger, img)
	_, err = a.Create(ctx, NewArtifact{Version: "1.0.2", Models: []string{"gw-100"}, Signature: strangerSig}, bytes.NewReader(image))
	var ve *ValidationError
	if !errors.As(err, &ve) || ve.Field != "signature" {
		t.Fatalf("untrusted signature: %v", err)
	}
	if _, err := a.Create(ctx, NewArtifact{Version: "1.0.0", Models: []string{"gw-100"}}, bytes.NewReader(image)); !errors.Is(err, ErrConflict) {
		t.Fatalf("same version twice: %v", err)
	}

	now := time.Now()
	q := a.SignURL(own.ID, "gw:1", "job_1", now.Add(time.Minute))
	parse := func(q string) (dev, job, exp, sig string) {
		v, _ := url.ParseQuery(q)
		return v.Get("device"), v.Get("job"), v.Get("expires"), v.Get("sig")
	}
	dev, job, exp, s := parse(q)
	if err := a.CheckURL(own.ID, dev, job, exp, s, now); err != nil || dev != "gw:1" {
		t.Fatalf("valid URL refused: %v (device %q)", err, dev)
	}
	if err := a.CheckURL(own.ID, "gw-2", job, exp, s, now); err == nil {
		t.Fatal("URL of another device accepted")
	}
	if err := a.CheckURL(own.ID, dev, "job_2", exp, s, now); err == nil {
		t.Fatal("URL of another job accepted")
	}
	if err := a.CheckURL(signed.ID, dev, job, exp, s, now); err == nil {
		t.Fatal("URL of another image accepted")
	}
	if err := a.CheckURL(own.ID, dev, job, exp, s, now.Add(2*time.Minute)); err == nil {
		t.Fatal("expired URL accepted")
	}
}
