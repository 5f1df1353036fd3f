package sim

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"sync"

	"github.com/klauspost/compress/zstd"

	"github.com/fleetd/fleetd/firmware/manifest"
)

// images holds the bytes of the firmware images the simulated devices run,
// one copy per digest for the whole fleet: a thousand devices on one
// version share one image, read only. A device knows the digest of the
// image it runs (device.image); it learns it from ota.images for its
// cohort's version, and from the manifest of the job it installed.
type images struct {
	mu       sync.Mutex
	byDigest map[string][]byte
}

func (s *images) get(sum string) ([]byte, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	b, ok := s.byDigest[sum]
	return b, ok
}

func (s *images) has(sum string) bool { _, ok := s.get(sum); return ok }

// put keeps b as the image of sum unless one is kept already.
func (s *images) put(sum string, b []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.byDigest[sum]; !ok {
		s.byDigest[sum] = b
	}
}

// loadImages reads ota.images (version → file) and returns the digest of
// each version's image.
func (s *Simulator) loadImages() (map[string]string, error) {
	s.images = &images{byDigest: map[string][]byte{}}
	digests := map[string]string{}
	for v, path := range s.fleet.OTA.Images {
		b, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("ota.images.%s: %w", v, err)
		}
		sum := sha256.Sum256(b)
		digests[v] = hex.EncodeToString(sum[:])
		s.images.put(digests[v], b)
	}
	return digests, nil
}

// maxDeltaWindow is the largest zstd window a simulated device accepts for
// a delta: what the decoder may have to hold besides the base.
const maxDeltaWindow = 1 << 29

// applyDelta obtains the job's image through the delta its signed manifest
// names, when the device runs that delta's base and holds its bytes:
// download (Range resume, no more than the manifest's size), check the
// delta's SHA-256 against the manifest, apply it with the base, and check
// the result's size and SHA-256 against the manifest's image. It returns
// the image as a temporary file, or why the delta could not be used; the
// caller then downloads the full image in the same job. With corrupt (the
// cohort's bad_delta failure) the delta's bytes are damaged after the
// download, as a bad flash write would.
func (d *device) applyDelta(ctx context.Context, sess session, job otaJob, corruptDelta bool) (*os.File, error) {
	m, dm := job.Manifest, job.Manifest.Delta
	switch {
	case d.image != dm.BaseSHA256:
		return nil, fmt.Errorf("this device runs image %.12s, the delta is from %.12s", d.image, dm.BaseSHA256)
	case dm.Encoding != manifest.EncodingZstdPatch:
		return nil, fmt.Errorf("unknown delta encoding %q", dm.Encoding)
	case dm.WindowSize <= 0 || dm.WindowSize > maxDeltaWindow:
		return nil, fmt.Errorf("delta window of %d bytes is not in (0, %d]", dm.WindowSize, maxDeltaWindow)
	case dm.Size <= 0:
		return nil, fmt.Errorf("delta size %d", dm.Size)
	}
	base, ok := d.sim.images.get(dm.BaseSHA256)
	if !ok {
		return nil, fmt.Errorf("the bytes of image %.12s are not kept", dm.BaseSHA256)
	}
	if err := d.sim.fleet.checkURL("delta url", job.DeltaURL); err != nil {
		return nil, err
	}
	delta, err := d.download(ctx, sess, job.JobID, job.DeltaURL, dm.Size, false)
	if err != nil {
		return nil, fmt.Errorf("download: %w", err)
	}
	defer func() { delta.Close(); os.Remove(delta.Name()) }()
	d.sim.stats.count("ota delta downloads")
	if corruptDelta {
		corrupt(delta, dm.Size/2)
	}
	h := sha256.New()
	if _, err := delta.Seek(0, io.SeekStart); err != nil {
		return nil, err
	}
	if _, err := io.Copy(h, delta); err != nil {
		return nil, err
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != dm.SHA256 {
		return nil, fmt.Errorf("delta sha256 mismatch: the delta is %s, the manifest says %s", got, dm.SHA256)
	}
	if _, err := delta.Seek(0, io.SeekStart); err != nil {
		return nil, err
	}
	dec, err := zstd.NewReader(delta, zstd.WithDecoderDictRaw(1, base), zstd.WithDecoderMaxWindow(uint64(dm.WindowSize)),
		zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true))
	if err != nil {
		return nil, err
	}
	defer dec.Close()
	out, err := os.CreateTemp("", "fleetsim-image-*")
	if err != nil {
		return nil, err
	}
	ok = false
	defer func() {
		if !ok {
			out.Close()
			os.Remove(out.Name())
		}
	}()
	h = sha256.New()
	n, err := io.Copy(io.MultiWriter(out, h), io.LimitReader(dec, m.Size+1))
	if err != nil {
		return nil, fmt.Errorf("apply: %w", err)
	}
	if n != m.Size {
		return nil, fmt.Errorf("applied delta gives %d bytes, the manifest says %d", n, m.Size)
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != m.SHA256 {
		return nil, fmt.Errorf("applied delta gives sha256 %s, the manifest says %s", got, m.SHA256)
	}
	ok = true
	d.sim.stats.count("ota delta applied")
	return out, nil
}

// keepImage records that the device now runs the image of sum, whose bytes
// are in f, sharing one copy per digest.
func (d *device) keepImage(sum string, f *os.File) {
	d.image = sum
	if len(d.sim.fleet.OTA.Images) == 0 || d.sim.images.has(sum) {
		return // a fleet that keeps no images applies no deltas
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return
	}
	b, err := io.ReadAll(f)
	if err == nil {
		d.sim.images.put(sum, b)
	}
}
