package manifest

import (
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"strings"
	"testing"
	"time"
)

func TestDeviceCheck(t *testing.T) {
	pub, key, _ := ed25519.GenerateKey(rand.Reader)
	_, stranger, _ := ed25519.GenerateKey(rand.Reader)
	now := time.Date(2026, 6, 1, 12, 0, 0, 0, time.UTC)
	older := func(a, b string) bool { return a < b } // enough for these versions
	dev := Device{ID: "gw-1", Model: "gw-100", Version: "1.5.0", Older: older}
	base := Job{Image: Image{SHA256: strings.Repeat("ab", 32), Size: 1024, Version: "2.0.0", Models: []string{"gw-200", "gw-100"}},
		JobID: "job_1", DeviceID: "gw-1", Expires: now.Add(time.Hour)}
	for _, tc := range []struct {
		name string
		edit func(*Job)
		key  ed25519.PrivateKey
		want string // "" = accepted
	}{
		{"valid", nil, key, ""},
		{"another model", func(m *Job) { m.Models = []string{"gw-200"} }, key, "for models"},
		{"another device", func(m *Job) { m.DeviceID = "gw-2" }, key, "for device"},
		{"older version without rollback", func(m *Job) { m.Version = "1.0.0" }, key, "not a rollback"},
		{"older version as a rollback", func(m *Job) { m.Version, m.Rollback = "1.0.0", true }, key, ""},
		{"expired", func(m *Job) { m.Expires = now.Add(-time.Second) }, key, "expired"},
		{"signed by a key the device does not trust", nil, stranger, "trusted key"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := base
			m.Models = append([]string(nil), base.Models...)
			if tc.edit != nil {
				tc.edit(&m)
			}
			err := dev.Check([]ed25519.PublicKey{pub}, m, SignJob(tc.key, m), now)
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("refused: %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("error %v, want one saying %q", err, tc.want)
			}
		})
	}
}

// Any field changed after signing breaks the signature: a job cannot be
// re-aimed at another device, version, model or image.
func TestSignatureCoversEveryField(t *testing.T) {
	pub, key, _ := ed25519.GenerateKey(rand.Reader)
	m := Job{Image: Image{SHA256: "aa", Size: 1, Version: "2.0.0", Models: []string{"gw-100"}}, JobID: "job_1", DeviceID: "gw-1",
		Expires: time.Date(2026, 6, 1, 13, 0, 0, 0, time.UTC)}
	sig := SignJob(key, m)
	for name, edit := range map[string]func(*Job){
		"sha256": func(m *Job) { m.SHA256 = "bb" }, "size": func(m *Job) { m.Size = 2 }, "version": func(m *Job) { m.Version = "9.0.0" },
		"models": func(m *Job) { m.Models = []string{"gw-200"} }, "job": func(m *Job) { m.JobID = "job_2" },
		"device": func(m *Job) { m.DeviceID = "gw-2" }, "rollback": func(m *Job) { m.Rollback = true },
		"expiry": func(m *Job) { m.Expires = m.Expires.Add(time.Hour) },
	} {
		c := m
		edit(&c)
		if _, err := VerifyJob([]ed25519.PublicKey{pub}, c, sig); !errors.Is(err, ErrSignature) {
			t.Errorf("changed %s still verifies", name)
		}
	}
	// An image signature is not a job signature.
	if _, err := VerifyJob([]ed25519.PublicKey{pub}, m, SignImage(key, m.Image)); !errors.Is(err, ErrSignature) {
		t.Error("an image signature verifies as a job manifest")
	}
	// Model order does not matter.
	c := m
	c.Models = []string{"gw-100"}
	if _, err := VerifyJob([]ed25519.PublicKey{pub}, c, sig); err != nil {
		t.Errorf("same manifest: %v", err)
	}
}

// TestDeltaSigned: every field of a job's delta is covered by the job's
// signature, a delta added to or removed from a signed job breaks it, and a
// job without a delta is signed over the same bytes as before deltas.
func TestDeltaSigned(t *testing.T) {
	pub, key, _ := ed25519.GenerateKey(rand.Reader)
	m := Job{Image: Image{SHA256: "aa", Size: 1, Version: "2.0.0", Models: []string{"gw-100"}}, JobID: "job_1", DeviceID: "gw-1",
		Expires: time.Date(2026, 6, 1, 13, 0, 0, 0, time.UTC)}
	const before = "fleetd ota job manifest v1\n" +
		`{"sha256":"aa","size":1,"version":"2.0.0","models":["gw-100"],"job_id":"job_1","device_id":"gw-1","rollback":false,"expires":"2026-06-01T13:00:00Z"}`
	if got := string(m.Canonical()); got != before {
		t.Errorf("a job without a delta signs\n%s\nwant, as before deltas,\n%s", got, before)
	}
	plain := SignJob(key, m)
	d := Delta{BaseVersion: "1.0.0", BaseSHA256: "cc", SHA256: "dd", Size: 10, Encoding: EncodingZstdPatch, WindowSize: 1 << 20}
	m.Delta = &d
	sig := SignJob(key, m)
	if _, err := VerifyJob([]ed25519.PublicKey{pub}, m, plain); !errors.Is(err, ErrSignature) {
		t.Error("a delta added to a signed job verifies")
	}
	for name, edit := range map[string]func(*Delta){
		"base_version": func(d *Delta) { d.BaseVersion = "0.9.0" }, "base_sha256": func(d *Delta) { d.BaseSHA256 = "ee" },
		"sha256": func(d *Delta) { d.SHA256 = "ff" }, "size": func(d *Delta) { d.Size = 11 },
		"encoding": func(d *Delta) { d.Encoding = "bsdiff" }, "window_size": func(d *Delta) { d.WindowSize = 1 << 30 },
	} {
		c, cd := m, d
		edit(&cd)
		c.Delta = &cd
		if _, err := VerifyJob([]ed25519.PublicKey{pub}, c, sig); !errors.Is(err, ErrSignature) {
			t.Errorf("changed delta %s still verifies", name)
		}
	}
	c := m
	c.Delta = nil
	if _, err := VerifyJob([]ed25519.PublicKey{pub}, c, sig); !errors.Is(err, ErrSignature) {
		t.Error("a delta removed from a signed job verifies")
	}
}
