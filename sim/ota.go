package sim

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"time"
)

// otaJob is the payload of devices/{id}/ota/job (DESIGN: device protocol).
type otaJob struct {
	JobID      string `json:"job_id"`
	CampaignID string `json:"campaign_id"`
	Version    string `json:"version"`
	URL        string `json:"url"`
	SHA256     string `json:"sha256"`
	Size       int64  `json:"size"`
	Signature  string `json:"signature"` // base64 ed25519 signature of the image's SHA-256 digest
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

// handleJob runs one OTA job as firmware would: download (resuming with
// Range after a break), verify the checksum and the signature, install,
// reboot into the new version. Failures are reported with their reason.
func (d *device) handleJob(ctx context.Context, sess session, raw []byte) sessionEnd {
	var job otaJob
	if err := json.Unmarshal(raw, &job); err != nil || job.JobID == "" || job.URL == "" {
		d.sim.logger.Warn("ignoring malformed OTA job", "device_id", d.id, "payload", string(raw))
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

	d.report(ctx, sess, otaStatus{JobID: job.JobID, State: "downloading"})
	image, err := d.download(ctx, sess, job, failing == "download_fails")
	if err != nil {
		if ctx.Err() != nil {
			return endShutdown
		}
		return fail("download failed: " + err.Error())
	}
	d.report(ctx, sess, otaStatus{JobID: job.JobID, State: "verifying", Progress: 100})
	if failing == "checksum_mismatch" {
		image[len(image)/2] ^= 0xff // a corrupted flash read
	}
	sum := sha256.Sum256(image)
	if got := hex.EncodeToString(sum[:]); got != job.SHA256 {
		return fail(fmt.Sprintf("sha256 mismatch: image is %s, job says %s", got, job.SHA256))
	}
	if d.sim.signingKey == nil {
		return fail("no trusted firmware signing key configured (ota.public_key)")
	}
	sig, err := base64.StdEncoding.DecodeString(job.Signature)
	if err != nil || !ed25519.Verify(d.sim.signingKey, sum[:], sig) {
		return fail("signature does not verify with the trusted key")
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
	d.firmware = job.Version
	d.pendingJob = job.JobID
	d.booted = time.Now()
	return endReboot
}

func (d *device) report(ctx context.Context, sess session, st otaStatus) {
	b, _ := json.Marshal(st)
	if err := d.publish(ctx, sess, "ota/status", b, 1, false); err != nil {
		d.sim.logger.Debug("ota status not sent", "device_id", d.id, "state", st.State, "err", err)
	}
}

// download fetches the image, resuming with Range/If-Range after a broken
// transfer. With the fleet's ota.interrupt_downloads, the first attempt is cut
// half way on purpose, to exercise the resume; with brokenNetwork every
// attempt is cut and the download fails.
func (d *device) download(ctx context.Context, sess session, job otaJob, brokenNetwork bool) ([]byte, error) {
	var buf bytes.Buffer
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
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, job.URL, nil)
		if err != nil {
			return nil, err
		}
		if d.token != "" {
			req.Header.Set("Authorization", "Bearer "+d.token)
		}
		if buf.Len() > 0 {
			req.Header.Set("Range", "bytes="+strconv.Itoa(buf.Len())+"-")
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
			buf.Reset() // a full body: the server could not (or would not) resume
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
		limit := int64(-1)
		if brokenNetwork || (d.sim.fleet.OTA.InterruptDownloads && attempt == 1) {
			limit = max(1, (job.Size-int64(buf.Len()))/2)
		}
		err = copyProgress(&buf, resp.Body, limit, func(n int) {
			if job.Size > 0 {
				if pct := n * 100 / int(job.Size); pct >= lastReported+25 && pct < 100 {
					lastReported = pct
					d.report(ctx, sess, otaStatus{JobID: job.JobID, State: "downloading", Progress: pct})
				}
			}
		})
		resp.Body.Close()
		if err == nil && (job.Size == 0 || int64(buf.Len()) == job.Size) {
			d.sim.stats.count("ota downloads")
			return buf.Bytes(), nil
		}
		if err == nil {
			err = fmt.Errorf("%w after %d of %d bytes", errCut, buf.Len(), job.Size)
		}
		lastErr = err
		d.sim.stats.count("ota download resumes")
	}
	return nil, fmt.Errorf("%w (gave up after %d attempts)", lastErr, maxDownloadAttempts)
}

// copyProgress copies up to limit bytes (all when limit < 0).
func copyProgress(dst *bytes.Buffer, src io.Reader, limit int64, progress func(total int)) error {
	if limit >= 0 {
		src = io.LimitReader(src, limit)
	}
	chunk := make([]byte, 32*1024)
	for {
		n, err := src.Read(chunk)
		dst.Write(chunk[:n])
		if n > 0 {
			progress(dst.Len())
		}
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

func retryAfter(resp *http.Response) time.Duration {
	if s, err := strconv.Atoi(resp.Header.Get("Retry-After")); err == nil && s > 0 {
		return time.Duration(min(s, 60)) * time.Second
	}
	return time.Second
}
