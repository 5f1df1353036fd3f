package firmware

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/fleetd/fleetd/firmware/manifest"
)

// deltaFixture is a dispatcher whose target (3.1.0) is a small change of an
// image whose base (3.0.0) is stored: devices a1 and a2 run 3.0.0, b1 runs
// 0.9.0, of which no image is stored.
type deltaFixture struct {
	*dispatcher
	base, target     Artifact
	baseBytes, image []byte
}

func newDeltaFixture(t *testing.T) *deltaFixture {
	t.Helper()
	ctx := context.Background()
	d := newDispatcher(t, "a1", "a2", "b1")
	base := make([]byte, 256<<10)
	rand.Read(base)
	image := append([]byte(nil), base...)
	copy(image[1000:], "a small change in the new firmware")
	image = append(image, []byte("and a few bytes more at the end")...)
	f := &deltaFixture{dispatcher: d, baseBytes: base, image: image}
	var err error
	if f.base, err = d.c.artifacts.Create(ctx, NewArtifact{Version: "3.0.0", Models: []string{"gw-100"}}, bytes.NewReader(base)); err != nil {
		t.Fatal(err)
	}
	if f.target, err = d.c.artifacts.Create(ctx, NewArtifact{Version: "3.1.0", Models: []string{"gw-100"}}, bytes.NewReader(image)); err != nil {
		t.Fatal(err)
	}
	d.target = f.target
	if _, err := d.pool.Exec(ctx, `UPDATE devices SET firmware = CASE WHEN id = 'b1' THEN '0.9.0' ELSE '3.0.0' END`); err != nil {
		t.Fatal(err)
	}
	return f
}

func (f *deltaFixture) sentTo(device string) []Job {
	var out []Job
	for _, j := range f.send.jobs() {
		if j.Manifest.DeviceID == device {
			out = append(out, j)
		}
	}
	return out
}

// TestDeltaDispatchWaitsForBuild: a delta campaign asks for the delta of
// the base its devices run; the device without a stored base gets the full
// image at once, the devices on the base wait until the delta is built, and
// then get a manifest naming it (base version and digest, delta digest and
// size, the image's digest as the result), signed, with a delta URL signed
// for the job; the delta applied to the base gives the image.
func TestDeltaDispatchWaitsForBuild(t *testing.T) {
	f := newDeltaFixture(t)
	ctx := context.Background()
	v := f.start(Spec{Name: "delta", Stages: oneStage(Stage{MaxNotBackOnline: -1}), Delta: true})
	f.step(time.Second)
	if got := f.sentTo("b1"); len(got) != 1 || got[0].Manifest.Delta != nil || got[0].DeltaURL != "" {
		t.Fatalf("b1 (0.9.0, no stored image): got %+v, want one full-image job", got)
	}
	if n := len(f.sentTo("a1")) + len(f.sentTo("a2")); n != 0 {
		t.Fatalf("%d jobs sent to devices whose delta is not built yet", n)
	}
	f.step(time.Second)
	if n := len(f.sentTo("a1")); n != 0 {
		t.Fatalf("a1 got a job while its delta is pending")
	}

	built, err := f.c.artifacts.BuildDelta(ctx, DeltaOptions{})
	if err != nil || !built {
		t.Fatalf("BuildDelta = %v, %v; want one built", built, err)
	}
	if built, err := f.c.artifacts.BuildDelta(ctx, DeltaOptions{}); err != nil || built {
		t.Fatalf("second BuildDelta = %v, %v; want nothing left", built, err)
	}
	f.step(time.Second)
	for _, id := range []string{"a1", "a2"} {
		jobs := f.sentTo(id)
		if len(jobs) != 1 {
			t.Fatalf("%s: %d jobs, want 1", id, len(jobs))
		}
		j := jobs[0]
		dm := j.Manifest.Delta
		if dm == nil {
			t.Fatalf("%s: no delta in the manifest: %+v", id, j.Manifest)
		}
		if dm.BaseVersion != "3.0.0" || dm.BaseSHA256 != f.base.SHA256 || dm.Encoding != manifest.EncodingZstdPatch ||
			j.Manifest.SHA256 != f.target.SHA256 || j.Manifest.Size != f.target.Size {
			t.Errorf("%s: manifest %+v delta %+v; want base 3.0.0 %s to %s", id, j.Manifest, dm, f.base.SHA256, f.target.SHA256)
		}
		if dm.Size >= f.target.Size/4 {
			t.Errorf("%s: delta of %d bytes for a %d-byte change of a %d-byte image", id, dm.Size, 70, f.target.Size)
		}
		if _, err := manifest.VerifyJob([]ed25519.PublicKey{f.c.artifacts.PublicKey()}, j.Manifest, j.ManifestSignature); err != nil {
			t.Errorf("%s: manifest signature: %v", id, err)
		}
		forged := j.Manifest
		fd := *dm
		fd.SHA256 = strings.Repeat("0", 64)
		forged.Delta = &fd
		if _, err := manifest.VerifyJob([]ed25519.PublicKey{f.c.artifacts.PublicKey()}, forged, j.ManifestSignature); err == nil {
			t.Errorf("%s: a manifest whose delta digest was altered still verifies", id)
		}
		wantPath := DeltaPath(f.target.ID, f.base.SHA256) + "?device=" + id + "&job=" + j.JobID
		if !strings.Contains(j.DeltaURL, wantPath) {
			t.Errorf("%s: delta URL %s, want it to hold %s", id, j.DeltaURL, wantPath)
		}
	}
	dl, file, err := f.c.artifacts.OpenDelta(ctx, f.target.ID, f.base.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	defer file.Close()
	raw, _ := io.ReadAll(file)
	if sum := sha256.Sum256(raw); hex.EncodeToString(sum[:]) != dl.SHA256 || int64(len(raw)) != dl.Size {
		t.Fatalf("served delta is not what its row says")
	}
	dec, err := zstd.NewReader(bytes.NewReader(raw), zstd.WithDecoderDictRaw(1, f.baseBytes), zstd.WithDecoderMaxWindow(1<<20))
	if err != nil {
		t.Fatal(err)
	}
	out, err := io.ReadAll(dec)
	dec.Close()
	if err != nil || !bytes.Equal(out, f.image) {
		t.Fatalf("the delta applied to the base does not give the image (err %v, %d bytes)", err, len(out))
	}

	// Bytes served are counted per job; saved is counted on success.
	a1 := f.sentTo("a1")[0]
	b1 := f.sentTo("b1")[0]
	if err := f.c.artifacts.Served(ctx, a1.JobID, "a1", dl.Size, false); err != nil {
		t.Fatal(err)
	}
	if err := f.c.artifacts.Served(ctx, b1.JobID, "b1", f.target.Size, true); err != nil {
		t.Fatal(err)
	}
	if err := f.c.artifacts.Served(ctx, a1.JobID, "b1", 1000, true); err != nil { // another device's job: not counted
		t.Fatal(err)
	}
	f.c.birth(ctx, "a1", "3.1.0")
	f.c.birth(ctx, "b1", "3.1.0")
	got, err := f.c.Get(ctx, v.ID)
	if err != nil {
		t.Fatal(err)
	}
	want := DeltaStats{Sent: dl.Size + f.target.Size, Saved: f.target.Size - dl.Size, DeltaJobs: 2}
	if got.Bytes != want {
		t.Errorf("bytes %+v, want %+v", got.Bytes, want)
	}
	if dev := f.device(v.ID, "a1"); !dev.Delta || dev.FellBack || dev.BytesSent != dl.Size {
		t.Errorf("a1: %+v; want a delta job that sent %d bytes", dev, dl.Size)
	}
}

// TestDeltaWaitIsBounded: with no builder, devices on the base get the full
// image once the delta wait has passed.
func TestDeltaWaitIsBounded(t *testing.T) {
	f := newDeltaFixture(t)
	f.c.SetDeltaOptions(DeltaOptions{Wait: time.Minute})
	f.start(Spec{Name: "delta", Stages: oneStage(Stage{MaxNotBackOnline: -1}), Delta: true})
	f.step(30 * time.Second)
	if n := len(f.sentTo("a1")); n != 0 {
		t.Fatalf("a1 got %d jobs within the delta wait", n)
	}
	f.step(31 * time.Second)
	for _, id := range []string{"a1", "a2"} {
		if got := f.sentTo(id); len(got) != 1 || got[0].Manifest.Delta != nil {
			t.Fatalf("%s after the wait: %+v, want one full-image job", id, got)
		}
	}
}

// TestDeltaBuildOnceAcrossReplicas: replicas building at the same time
// build a pair once; an image above the limit fails the pair with the
// reason, and its devices get the full image without waiting; a campaign
// without deltas asks for none.
func TestDeltaBuildOnceAcrossReplicas(t *testing.T) {
	f := newDeltaFixture(t)
	ctx := context.Background()
	f.start(Spec{Name: "delta", Stages: oneStage(Stage{MaxNotBackOnline: -1}), Delta: true})
	other, err := NewArtifacts(f.pool, t.TempDir(), f.c.artifacts.keys, []byte("url-key"))
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	results := make([]bool, 2)
	for i, a := range []*Artifacts{f.c.artifacts, other} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			built, err := a.BuildDelta(ctx, DeltaOptions{})
			if err != nil {
				t.Error(err)
			}
			results[i] = built
		}()
	}
	wg.Wait()
	var n int
	if err := f.pool.QueryRow(ctx, `SELECT count(*) FROM firmware_deltas WHERE state = 'ready'`).Scan(&n); err != nil || n != 1 {
		t.Fatalf("%d ready deltas (%v), want 1", n, err)
	}
	if results[0] && results[1] {
		t.Errorf("both replicas built the delta")
	}
	// The replica that did not build it serves it from the database.
	if _, file, err := other.OpenDelta(ctx, f.target.ID, f.base.SHA256); err != nil {
		t.Fatalf("other replica: %v", err)
	} else {
		file.Close()
	}

	// Too large: failed, and the devices do not wait.
	if _, err := f.pool.Exec(ctx, `UPDATE firmware_deltas SET state = 'pending', sha256 = NULL, size = NULL`); err != nil {
		t.Fatal(err)
	}
	if built, err := f.c.artifacts.BuildDelta(ctx, DeltaOptions{MaxImage: 1 << 10}); err != nil || !built {
		t.Fatalf("BuildDelta = %v, %v", built, err)
	}
	var state, reason string
	if err := f.pool.QueryRow(ctx, `SELECT state, error FROM firmware_deltas`).Scan(&state, &reason); err != nil {
		t.Fatal(err)
	}
	if state != "failed" || !strings.Contains(reason, "larger than the delta limit") {
		t.Errorf("state %s (%s), want failed for the size", state, reason)
	}
	f.step(time.Second)
	if got := f.sentTo("a1"); len(got) != 1 || got[0].Manifest.Delta != nil {
		t.Errorf("a1 after a failed delta: %+v, want one full-image job", got)
	}
}

// TestDeltaDroppedWithItsImage: deleting the base image deletes its deltas
// and their chunks.
func TestDeltaDroppedWithItsImage(t *testing.T) {
	f := newDeltaFixture(t)
	ctx := context.Background()
	if _, err := f.pool.Exec(ctx, `INSERT INTO firmware_deltas (base_sha256, target_sha256) VALUES ($1, $2)`, f.base.SHA256, f.target.SHA256); err != nil {
		t.Fatal(err)
	}
	if built, err := f.c.artifacts.BuildDelta(ctx, DeltaOptions{}); err != nil || !built {
		t.Fatalf("BuildDelta = %v, %v", built, err)
	}
	var sum string
	if err := f.pool.QueryRow(ctx, `SELECT sha256 FROM firmware_deltas`).Scan(&sum); err != nil {
		t.Fatal(err)
	}
	if err := f.c.artifacts.Delete(ctx, f.base.ID); err != nil {
		t.Fatal(err)
	}
	var rows, chunks int
	if err := f.pool.QueryRow(ctx, `SELECT (SELECT count(*) FROM firmware_deltas), (SELECT count(*) FROM firmware_chunks WHERE sha256 = $1)`, sum).Scan(&rows, &chunks); err != nil {
		t.Fatal(err)
	}
	if rows != 0 || chunks != 0 {
		t.Errorf("after deleting the base: %d delta rows, %d delta chunks; want none", rows, chunks)
	}
}

// TestDeltaHeldJobsKeepTheirPace: under devices_per_minute, jobs held for
// their delta do not use up the pacing schedule: once the delta is built
// they go out at the rate they were owed.
func TestDeltaHeldJobsKeepTheirPace(t *testing.T) {
	f := newDeltaFixture(t)
	f.start(Spec{Name: "delta", Stages: oneStage(Stage{MaxNotBackOnline: -1}), Delta: true, Pacing: Pacing{DevicesPerMinute: 60}})
	f.step(time.Second) // two jobs due, only b1 sendable
	f.step(500 * time.Millisecond)
	if n := len(f.send.jobs()); n != 1 {
		t.Fatalf("%d jobs sent while the delta is pending, want b1's", n)
	}
	if built, err := f.c.artifacts.BuildDelta(context.Background(), DeltaOptions{}); err != nil || !built {
		t.Fatalf("BuildDelta = %v, %v", built, err)
	}
	f.step(500 * time.Millisecond) // 2 s in, at one a second: all three due
	if a1, a2 := f.sentTo("a1"), f.sentTo("a2"); len(a1) != 1 || len(a2) != 1 || a1[0].Manifest.Delta == nil || a2[0].Manifest.Delta == nil {
		t.Fatalf("after the build: a1 %d jobs, a2 %d; want both sent with their delta at the rate they were owed", len(a1), len(a2))
	}
}

// TestDeltaForJoiners: a following delta campaign asks for the delta of a
// device that joins it later, on a base whose image is stored (here a base
// no device ran at the start), holds its job until the delta is built, and
// names the delta in its manifest.
func TestDeltaForJoiners(t *testing.T) {
	f := newDeltaFixture(t)
	ctx := context.Background()
	f.c.SetFollowInterval(time.Second)
	older := append([]byte(nil), f.baseBytes...)
	copy(older[2000:], "the firmware before the base")
	old, err := f.c.artifacts.Create(ctx, NewArtifact{Version: "2.9.0", Models: []string{"gw-100"}}, bytes.NewReader(older))
	if err != nil {
		t.Fatal(err)
	}
	v := f.start(Spec{Name: "delta follow", Stages: oneStage(Stage{MaxNotBackOnline: -1}), Delta: true, Follow: true})
	for {
		built, err := f.c.artifacts.BuildDelta(ctx, DeltaOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if !built {
			break
		}
	}
	f.step(time.Second)
	f.register("late", "gw-100", "2.9.0")
	f.step(time.Second)
	if got := f.sentTo("late"); len(got) != 0 {
		t.Fatalf("the joiner got %d jobs before its delta was built", len(got))
	}
	var pending int
	if err := f.pool.QueryRow(ctx, `SELECT count(*) FROM firmware_deltas WHERE base_sha256 = $1 AND target_sha256 = $2 AND state = 'pending'`,
		old.SHA256, f.target.SHA256).Scan(&pending); err != nil || pending != 1 {
		t.Fatalf("%d pending deltas from the joiner's base (%v), want 1", pending, err)
	}
	if built, err := f.c.artifacts.BuildDelta(ctx, DeltaOptions{}); err != nil || !built {
		t.Fatalf("BuildDelta = %v, %v", built, err)
	}
	f.step(time.Second)
	jobs := f.sentTo("late")
	if len(jobs) != 1 || jobs[0].Manifest.Delta == nil || jobs[0].Manifest.Delta.BaseSHA256 != old.SHA256 {
		t.Fatalf("the joiner's jobs %+v: want one naming the delta from 2.9.0", jobs)
	}
	if view := f.view(v.ID); view.Joined != 1 {
		t.Fatalf("joined %d, want 1", view.Joined)
	}
}
