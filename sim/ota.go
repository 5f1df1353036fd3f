package sim

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"time"

	"github.com/Masterminds/semver/v3"

	"github.com/fleetd/fleetd/firmware/manifest"
)

// otaJob is the payload of devices/{id}/ota/job (DESIGN: device protocol).
// The device acts on Manifest, once ManifestSignature verifies with a key it
// trusts; the flat fields beside it are not trusted.
type otaJob struct {
	JobID             string       `json:"job_id"`
	CampaignID        string       `json:"campaign_id"`
	URL               string       `json:"url"`
	Signature         string       `json:"signature"` // the image's: over Manifest.Image
	Manifest          manifest.Job `json:"manifest"`
	ManifestSignature string       `json:"manifest_signature"`
	DeltaURL          string       `json:"delta_url"` // for Manifest.Delta
}

// otaStatus is the payload of devices/{id}/ota/status.
type otaStatus struct {
	JobID    string `json:"job_id"`
	State    string `json:"state"` // downloading, verifying, installing, rebooting, succeeded, failed
	Progress int    `json:"progress"`
	Error    string `json:"error,omitempty"`
}

// maxDownloadAttempts bounds the resumes of one download.
const maxDownloadAttempts = 10 // with backoff: about 45 s for a server that is restarting

// errCut is a transfer that stopped before the end; it is resumed at once.
var errCut = errors.New("connection dropped")

// handleJob runs one OTA job as firmware would: check the job's signed
// manifest (a key it trusts, its own id and model, not expired, no downgrade
// unless it is a rollback), download the image from an allowed host without
// credentials (resuming with Range after a break, never past the manifest's
// size), verify the digest and the image signature, install, reboot into the
// manifest's version. Failures are reported with their reason.
func (d *device) handleJob(ctx context.Context, sess session, raw []byte) sessionEnd {
	var job otaJob
	if err := json.Unmarshal(raw, &job); err != nil || job.JobID == "" || job.URL == "" {
		d.sim.logger.Warn("ignoring malformed OTA job", "device_id", d.id, "payload", truncate(raw, 200))
		return endContinue
	}
	if d.jobsSeen[job.JobID] {
		// The server sent a job this device already has: firmware ignores it.
		d.sim.stats.count("ota duplicate jobs")
		return endContinue
	}
	d.jobsSeen[job.JobID] = true
	d.sim.stats.count("ota jobs")
	failing := ""
	if f := d.cohort.OTAFailure; f.Mode != "" && d.sim.failsNext(d.cohort, f.Rate) {
		failing = f.Mode
	}
	fail := func(msg string) sessionEnd {
		d.sim.stats.count("ota failed")
		d.report(ctx, sess, otaStatus{JobID: job.JobID, State: "failed", Error: msg})
		return endContinue
	}
	m := job.Manifest
	if len(d.sim.trusted) == 0 {
		return fail("no trusted firmware signing key configured (ota.public_key)")
	}
	self := manifest.Device{ID: d.id, Model: d.cohort.Model, Version: d.firmware, Older: olderVersion}
	if err := self.Check(d.sim.trusted, m, job.ManifestSignature, time.Now()); err != nil {
		d.sim.stats.count("ota refused")
		return fail("refused: " + err.Error())
	}
	if m.JobID != job.JobID {
		d.sim.stats.count("ota refused")
		return fail(fmt.Sprintf("refused: the manifest is for job %q", m.JobID))
	}
	if _, err := manifest.VerifyImage(d.sim.trusted, m.Image, job.Signature); err != nil {
		d.sim.stats.count("ota refused")
		return fail("refused: image " + err.Error())
	}
	if err := d.sim.fleet.checkURL("job url", job.URL); err != nil {
		d.sim.stats.count("ota refused")
		return fail("refused: " + err.Error())
	}

	var image *os.File
	if m.Delta != nil && job.DeltaURL != "" {
		d.report(ctx, sess, otaStatus{JobID: job.JobID, State: "downloading", Error: "delta from " + m.Delta.BaseVersion})
		img, err := d.applyDelta(ctx, sess, job, failing == "bad_delta")
		if ctx.Err() != nil {
			return endShutdown
		}
		if err != nil {
			// Any failure of the delta falls back to the full image, in the
			// same job, and says so.
			d.sim.stats.count("ota delta fallbacks")
			d.report(ctx, sess, otaStatus{JobID: job.JobID, State: "downloading", Error: "delta not used (" + err.Error() + "); downloading the full image"})
		}
		image = img
	} else {
		d.report(ctx, sess, otaStatus{JobID: job.JobID, State: "downloading"})
	}
	if image == nil {
		img, err := d.download(ctx, sess, job.JobID, job.URL, m.Size, failing == "download_fails")
		if err != nil {
			if ctx.Err() != nil {
				return endShutdown
			}
			return fail("download failed: " + err.Error())
		}
		image = img
	}
	defer func() { image.Close(); os.Remove(image.Name()) }()
	d.report(ctx, sess, otaStatus{JobID: job.JobID, State: "verifying", Progress: 100})
	if failing == "checksum_mismatch" {
		corrupt(image, m.Size/2) // a corrupted flash read
	}
	h := sha256.New()
	if _, err := image.Seek(0, io.SeekStart); err != nil {
		return fail("read image: " + err.Error())
	}
	if _, err := io.Copy(h, image); err != nil {
		return fail("read image: " + err.Error())
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != m.SHA256 {
		return fail(fmt.Sprintf("sha256 mismatch: image is %s, manifest says %s", got, m.SHA256))
	}
	d.report(ctx, sess, otaStatus{JobID: job.JobID, State: "installing", Progress: 100})
	if !sleep(ctx, d.sim.fleet.OTA.InstallTime.D()) {
		return endShutdown
	}
	if failing == "install_fails" {
		return fail("install failed: flash write error")
	}
	d.report(ctx, sess, otaStatus{JobID: job.JobID, State: "rebooting", Progress: 100})
	if failing == "never_returns" {
		d.sim.stats.count("ota bricked")
		return endNeverReturn
	}
	d.sim.stats.count("ota installed")
	d.keepImage(m.SHA256, image)
	d.firmware = m.Version
	d.pendingJob = job.JobID
	d.booted = time.Now()
	return endReboot
}

// olderVersion orders firmware versions by semver; a version that does not
// parse is never "older" (the manifest's signature already vouches for it).
func olderVersion(a, b string) bool {
	va, errA := semver.NewVersion(a)
	vb, errB := semver.NewVersion(b)
	return errA == nil && errB == nil && va.LessThan(vb)
}

func corrupt(f *os.File, at int64) {
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, at); err == nil {
		b[0] ^= 0xff
		_, _ = f.WriteAt(b, at)
	}
}

func truncate(b []byte, n int) string {
	if len(b) > n {
		return strconv.Quote(string(b[:n])) + "…"
	}
	return strconv.Quote(string(b))
}

func (d *device) report(ctx context.Context, sess session, st otaStatus) {
	b, _ := json.Marshal(st)
	if err := d.publish(ctx, sess, "ota/status", b, 1, false); err != nil {
		d.sim.logger.Debug("ota status not sent", "device_id", d.id, "state", st.State, "err", err)
	}
}

// download streams the image to a temporary file, resuming with
// Range/If-Range after a broken transfer, and never takes more than size
// bytes. It sends no credentials: the job's URL is signed for this device,
// and a URL (or a redirect) to a host the fleet does not allow is refused.
// With the fleet's ota.interrupt_downloads, the first attempt is cut half way
// on purpose, to exercise the resume; with brokenNetwork every attempt is cut
// and the download fails.
func (d *device) download(ctx context.Context, sess session, jobID, url string, size int64, brokenNetwork bool) (*os.File, error) {
	f, err := os.CreateTemp("", "fleetsim-image-*")
	if err != nil {
		return nil, err
	}
	img, err := d.fetch(ctx, sess, f, jobID, url, size, brokenNetwork)
	if err != nil {
		f.Close()
		os.Remove(f.Name())
		return nil, err
	}
	return img, nil
}

func (d *device) fetch(ctx context.Context, sess session, f *os.File, jobID, url string, size int64, brokenNetwork bool) (*os.File, error) {
	var have int64
	etag := ""
	lastReported := 0
	var lastErr error
	for attempt := 1; attempt <= maxDownloadAttempts; attempt++ {
		if attempt > 1 && lastErr != nil && !errors.Is(lastErr, errCut) {
			// The server is away (restarting) or refused: back off before
			// resuming, as firmware does.
			if !sleep(ctx, min(8*time.Second, 500*time.Millisecond<<(attempt-2))) {
				return nil, ctx.Err()
			}
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return nil, err
		}
		if have > 0 {
			req.Header.Set("Range", "bytes="+strconv.FormatInt(have, 10)+"-")
			if etag != "" {
				req.Header.Set("If-Range", etag)
			}
		}
		resp, err := d.sim.http.Do(req)
		if err != nil {
			lastErr = err
			continue
		}
		switch resp.StatusCode {
		case http.StatusOK:
			// A full body: the server could not (or would not) resume.
			have = 0
			if err := f.Truncate(0); err != nil {
				resp.Body.Close()
				return nil, err
			}
		case http.StatusPartialContent:
		default:
			resp.Body.Close()
			lastErr = fmt.Errorf("HTTP %s", resp.Status)
			if resp.StatusCode == http.StatusServiceUnavailable || resp.StatusCode == http.StatusTooManyRequests {
				if !sleep(ctx, retryAfter(resp)) {
					return nil, ctx.Err()
				}
				continue
			}
			return nil, lastErr
		}
		if e := resp.Header.Get("ETag"); e != "" {
			etag = e
		}
		limit := size - have + 1 // one byte more than the manifest allows shows an oversized image
		if brokenNetwork || (d.sim.fleet.OTA.InterruptDownloads && attempt == 1) {
			limit = max(1, (size-have)/2)
		}
		n, err := copyAt(f, have, io.LimitReader(resp.Body, limit), func(total int64) {
			if size > 0 {
				if pct := int(total * 100 / size); pct >= lastReported+25 && pct < 100 {
					lastReported = pct
					d.report(ctx, sess, otaStatus{JobID: jobID, State: "downloading", Progress: pct})
				}
			}
		})
		resp.Body.Close()
		have += n
		if have > size {
			return nil, fmt.Errorf("the server sent more than the manifest's %d bytes", size)
		}
		if err == nil && have == size {
			d.sim.stats.count("ota downloads")
			return f, nil
		}
		if err == nil {
			err = fmt.Errorf("%w after %d of %d bytes", errCut, have, size)
		}
		lastErr = err
		d.sim.stats.count("ota download resumes")
	}
	return nil, fmt.Errorf("%w (gave up after %d attempts)", lastErr, maxDownloadAttempts)
}

// copyAt writes src into f from offset off, reporting the running total.
func copyAt(f *os.File, off int64, src io.Reader, progress func(total int64)) (int64, error) {
	chunk := make([]byte, 32*1024)
	var n int64
	for {
		k, err := src.Read(chunk)
		if k > 0 {
			if _, werr := f.WriteAt(chunk[:k], off+n); werr != nil {
				return n, werr
			}
			n += int64(k)
			progress(off + n)
		}
		if errors.Is(err, io.EOF) {
			return n, nil
		}
		if err != nil {
			return n, err
		}
	}
}

func retryAfter(resp *http.Response) time.Duration {
	if s, err := strconv.Atoi(resp.Header.Get("Retry-After")); err == nil && s > 0 {
		return time.Duration(min(s, 60)) * time.Second
	}
	return time.Second
}
