// Package manifest is what a device checks before it installs an image: a
// signed statement of what the image is (digest, size, version, models) and,
// for a job, which job and device it was issued to, whether it is a
// rollback, and until when it is valid. A device installs what a manifest
// signed by a key it trusts says, never what the rest of a job message
// claims.
//
// It has no dependency beyond the standard library, so that the server, the
// simulator and firmware written in Go share the exact encoding.
package manifest

import (
	"crypto/ed25519"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"
)

// Image is what an image is. Its signature (by the server's key or an
// operator's trusted key) is made once, at upload, and does not depend on
// any job.
type Image struct {
	SHA256  string   `json:"sha256"` // hex
	Size    int64    `json:"size"`
	Version string   `json:"version"`
	Models  []string `json:"models"` // sorted
}

// Job is the manifest of one OTA job: the image, and what the job is for.
type Job struct {
	Image
	JobID    string    `json:"job_id"`
	DeviceID string    `json:"device_id"`
	Rollback bool      `json:"rollback"` // a version older than the device runs is allowed only then
	Expires  time.Time `json:"expires"`
	// Delta, when set, offers a device that runs the base image a binary
	// delta to the job's image instead of the whole image. The result must
	// be the job's Image (its size and SHA-256), checked before it is
	// installed; a device that cannot use the delta downloads the image.
	// It is omitted from the signed bytes when nil, so that a job without
	// a delta is signed exactly as before deltas.
	Delta *Delta `json:"delta,omitempty"`
}

// Delta names a binary delta from a base image to a job's image.
type Delta struct {
	BaseVersion string `json:"base_version"`
	BaseSHA256  string `json:"base_sha256"` // hex; the device checks its own image against it first
	SHA256      string `json:"sha256"`      // hex, of the delta's bytes as downloaded
	Size        int64  `json:"size"`        // of the delta's bytes
	// Encoding says how to apply it: EncodingZstdPatch is a zstd frame
	// compressed with the base image as its raw dictionary (zstd's
	// "patch-from"), window WindowSize.
	Encoding   string `json:"encoding"`
	WindowSize int64  `json:"window_size"`
}

// EncodingZstdPatch is a delta made by zstd with the base image as raw
// dictionary (id 1): decompressing it with the base as dictionary gives the
// target image.
const EncodingZstdPatch = "zstd-patch-from"

// Domain separators: a signature over one kind of statement can never be
// taken for another (or for the bare digest older fleetd versions signed).
const (
	imageDomain = "fleetd firmware image manifest v1\n"
	jobDomain   = "fleetd ota job manifest v1\n"
)

// Canonical returns the bytes an image signature covers: the domain line and
// the manifest as JSON with its fields in a fixed order and models sorted.
func (m Image) Canonical() []byte {
	m.Models = slices.Sorted(slices.Values(m.Models))
	b, _ := json.Marshal(m) // a struct of strings and numbers cannot fail
	return append([]byte(imageDomain), b...)
}

// Canonical returns the bytes a job signature covers.
func (m Job) Canonical() []byte {
	m.Models = slices.Sorted(slices.Values(m.Models))
	m.Expires = m.Expires.UTC().Truncate(time.Second)
	b, _ := json.Marshal(m)
	return append([]byte(jobDomain), b...)
}

// SignImage signs an image manifest; the result is base64.
func SignImage(key ed25519.PrivateKey, m Image) string {
	return base64.StdEncoding.EncodeToString(ed25519.Sign(key, m.Canonical()))
}

// SignJob signs a job manifest; the result is base64.
func SignJob(key ed25519.PrivateKey, m Job) string {
	return base64.StdEncoding.EncodeToString(ed25519.Sign(key, m.Canonical()))
}

// ErrSignature is a signature that no trusted key made.
var ErrSignature = errors.New("signature does not verify with a trusted key")

// VerifyImage reports which trusted key signed the image manifest.
func VerifyImage(trusted []ed25519.PublicKey, m Image, sig string) (ed25519.PublicKey, error) {
	return verify(trusted, m.Canonical(), sig)
}

// VerifyJob reports which trusted key signed the job manifest.
func VerifyJob(trusted []ed25519.PublicKey, m Job, sig string) (ed25519.PublicKey, error) {
	return verify(trusted, m.Canonical(), sig)
}

func verify(trusted []ed25519.PublicKey, msg []byte, sig string) (ed25519.PublicKey, error) {
	raw, err := base64.StdEncoding.DecodeString(sig)
	if err != nil || len(raw) != ed25519.SignatureSize {
		return nil, fmt.Errorf("malformed signature: %w", ErrSignature)
	}
	for _, k := range trusted {
		if len(k) == ed25519.PublicKeySize && ed25519.Verify(k, msg, raw) {
			return k, nil
		}
	}
	return nil, ErrSignature
}

// Device is what a device knows about itself when it checks a job.
type Device struct {
	ID      string
	Model   string
	Version string // the firmware it runs now
	// Older reports whether version a is older than version b (semver
	// order for fleetd's simulator; firmware uses its own scheme).
	Older func(a, b string) bool
}

// Check verifies a job manifest for this device before anything is
// downloaded: signed by a trusted key, issued to this device for its model,
// not expired, and not a downgrade unless the manifest says it is a
// rollback. The image's digest and size are checked after the download,
// against the same manifest.
func (d Device) Check(trusted []ed25519.PublicKey, m Job, sig string, now time.Time) error {
	if _, err := VerifyJob(trusted, m, sig); err != nil {
		return fmt.Errorf("job manifest: %w", err)
	}
	switch {
	case m.DeviceID != d.ID:
		return fmt.Errorf("job manifest is for device %q, not %q", m.DeviceID, d.ID)
	case !slices.Contains(m.Models, d.Model):
		return fmt.Errorf("job manifest is for models %v, not %q", m.Models, d.Model)
	case !now.Before(m.Expires):
		return fmt.Errorf("job manifest expired at %s", m.Expires.UTC().Format(time.RFC3339))
	case !m.Rollback && d.Older != nil && d.Older(m.Version, d.Version):
		return fmt.Errorf("job manifest would install %s over %s, and it is not a rollback", m.Version, d.Version)
	}
	return nil
}
