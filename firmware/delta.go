package firmware

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"math/bits"
	"os"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/klauspost/compress/zstd"

	"github.com/fleetd/fleetd/firmware/manifest"
)

// Deltas. A campaign created with "delta": true asks, when it starts, for
// one binary delta per (base image, target image) pair its devices need: the
// base is the stored image of the version each device reports (its
// registry record, from its birth message) for its model. The request is a
// firmware_deltas row (migration 00019), one per pair however many
// campaigns and replicas ask.
//
// A delta is built by BuildDeltas, a background loop of every replica,
// never in an HTTP request or a device's goroutine: it claims a pending row
// FOR UPDATE SKIP LOCKED, builds the delta in memory, stores its bytes in
// firmware_chunks under the delta's SHA-256 (content-addressed like an
// image, and cached in the same directory) and marks the row ready, all in
// the claiming transaction. One replica builds a pair; a crash rolls the
// transaction back and the row is pending again, to be built anew by the
// next claim (nothing half-built is ever read). Images above
// DeltaOptions.MaxImage, a delta no smaller than its image, or images whose
// bytes do not match their digest mark the row failed with the reason, and
// the devices get the full image.
//
// The delta is zstd's "patch-from": the target compressed at
// SpeedBestCompression with the whole base as raw dictionary and a window
// that covers it (deltaWindow). Measured on two builds of one Go program
// that differ by two strings (8.7 MB each): zstd best 2 052 469 bytes
// (23.7 %) in 0.73 s, apply 6 ms; zstd better 2 293 115 (26.4 %) in 0.15 s;
// Fossil delta (github.com/centrifugal/fdelta) 2 354 441 (27.1 %) in 0.58 s,
// 2 176 749 once compressed with zstd; zstd without the base 4 622 575.
// zstd best makes the smallest delta, applies fastest, streams its output,
// carries its own checksum, and github.com/klauspost/compress was already
// in the module graph. The cost is memory while building: about eight
// times the image size allocated at SpeedBestCompression, hence the
// MaxImage bound.

// DeltaOptions bound delta building and what dispatch waits for.
type DeltaOptions struct {
	// MaxImage is the largest image (base or target), in bytes, a delta is
	// built for; larger pairs get the full image. The builder holds both
	// images, the delta and zstd's tables in memory (about 8 × MaxImage at
	// the peak). At most MaxDeltaImage.
	MaxImage int64
	// Wait is how long dispatch holds the jobs of devices whose delta is
	// still pending (counted from when the campaign asked for it) before it
	// gives them the full image: a delta being built is worth waiting for,
	// a builder that never comes is not.
	Wait time.Duration
}

// Defaults of DeltaOptions.
const (
	DefaultDeltaMaxImage = 64 << 20
	DefaultDeltaWait     = 10 * time.Minute
	// MaxDeltaImage is the largest image a zstd window can cover.
	MaxDeltaImage = zstd.MaxWindowSize
)

// deltaBuildTimeout bounds one build: reading both images, encoding,
// storing the delta.
const deltaBuildTimeout = 10 * time.Minute

// DeltaStats is what the bytes on the wire of a campaign came to.
type DeltaStats struct {
	// Sent is every byte fleetd served for the campaign's jobs' signed
	// download URLs, images and deltas, resumes included.
	Sent int64 `json:"sent"`
	// Saved is, over the forward jobs that were offered a delta and
	// succeeded, their image's size minus what was sent for them: a job
	// that fell back to the full image adds what its delta cost as a
	// negative.
	Saved int64 `json:"saved"`
	// DeltaJobs counts the forward jobs whose manifest offered a delta;
	// FellBack those of them that downloaded the full image too.
	DeltaJobs int `json:"delta_jobs"`
	FellBack  int `json:"fell_back"`
}

// deltaWindow is the zstd window of a delta from a base to a target of
// these sizes: the smallest power of two that holds the larger, so that
// every match into the base is within reach.
func deltaWindow(base, target int64) int64 {
	n := max(base, target, zstd.MinWindowSize)
	return 1 << bits.Len64(uint64(n-1))
}

// makeDelta encodes target against base (manifest.EncodingZstdPatch).
func makeDelta(base, target []byte) ([]byte, int64, error) {
	w := deltaWindow(int64(len(base)), int64(len(target)))
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedBestCompression), zstd.WithEncoderDictRaw(1, base),
		zstd.WithWindowSize(int(w)), zstd.WithEncoderConcurrency(1), zstd.WithEncoderCRC(true))
	if err != nil {
		return nil, 0, err
	}
	defer enc.Close()
	return enc.EncodeAll(target, make([]byte, 0, len(target)/4)), w, nil
}

// BuildDeltas builds pending deltas until ctx ends, one at a time on this
// replica, looking for work every interval and at once after a build.
func (a *Artifacts) BuildDeltas(ctx context.Context, o DeltaOptions, interval time.Duration) {
	o = o.withDefaults()
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		built, err := a.BuildDelta(ctx, o)
		if err != nil && ctx.Err() == nil {
			a.log.Warn("delta build failed; retrying", "err", err)
		}
		if built && err == nil {
			continue
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (o DeltaOptions) withDefaults() DeltaOptions {
	if o.MaxImage <= 0 {
		o.MaxImage = DefaultDeltaMaxImage
	}
	o.MaxImage = min(o.MaxImage, MaxDeltaImage)
	if o.Wait <= 0 {
		o.Wait = DefaultDeltaWait
	}
	return o
}

// BuildDelta claims one pending delta, if there is one no other replica is
// building, and builds it (see Deltas above). It reports whether it
// settled one (ready, failed, or dropped because an image is gone). An
// error leaves the row pending.
func (a *Artifacts) BuildDelta(ctx context.Context, o DeltaOptions) (bool, error) {
	o = o.withDefaults()
	ctx, cancel := context.WithTimeout(ctx, deltaBuildTimeout)
	defer cancel()
	settled := false
	err := pgx.BeginFunc(ctx, a.pool, func(tx pgx.Tx) error {
		settled = false
		var base, target string
		err := tx.QueryRow(ctx, `SELECT base_sha256, target_sha256 FROM firmware_deltas WHERE state = 'pending'
			ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED`).Scan(&base, &target)
		if errors.Is(err, pgx.ErrNoRows) {
			return nil
		}
		if err != nil {
			return err
		}
		settled = true
		start := time.Now()
		fail := func(reason string) error {
			a.log.Info("delta not built; devices get the full image", "base", base, "target", target, "reason", reason)
			_, err := tx.Exec(ctx, `UPDATE firmware_deltas SET state = 'failed', error = $3, finished_at = now()
				WHERE base_sha256 = $1 AND target_sha256 = $2`, base, target, reason)
			return err
		}
		var baseSize, targetSize int64
		err = tx.QueryRow(ctx, `SELECT (SELECT max(size) FROM firmware WHERE sha256 = $1), (SELECT max(size) FROM firmware WHERE sha256 = $2)`,
			base, target).Scan(&baseSize, &targetSize)
		if err != nil { // NULL: an image was deleted since
			_, err := tx.Exec(ctx, `DELETE FROM firmware_deltas WHERE base_sha256 = $1 AND target_sha256 = $2`, base, target)
			return err
		}
		if big := max(baseSize, targetSize); big > o.MaxImage {
			return fail(fmt.Sprintf("image of %d bytes is larger than the delta limit of %d bytes (FLEETD_DELTA_MAX_IMAGE)", big, o.MaxImage))
		}
		baseBytes, err := a.readImage(ctx, base, baseSize)
		if errors.Is(err, ErrCorrupt) || errors.Is(err, ErrUnavailable) {
			return fail("base image: " + err.Error())
		}
		if err != nil {
			return err
		}
		targetBytes, err := a.readImage(ctx, target, targetSize)
		if errors.Is(err, ErrCorrupt) || errors.Is(err, ErrUnavailable) {
			return fail("target image: " + err.Error())
		}
		if err != nil {
			return err
		}
		delta, window, err := makeDelta(baseBytes, targetBytes)
		baseBytes, targetBytes = nil, nil
		if err != nil {
			return fail("encode: " + err.Error())
		}
		if int64(len(delta)) >= targetSize {
			return fail(fmt.Sprintf("the delta (%d bytes) is no smaller than the image (%d bytes)", len(delta), targetSize))
		}
		sumb := sha256.Sum256(delta)
		sum := hex.EncodeToString(sumb[:])
		tmp, err := os.CreateTemp(a.tmpDir(), cachePrefix)
		if err != nil {
			return err
		}
		defer os.Remove(tmp.Name())
		_, err = tmp.Write(delta)
		if err == nil {
			err = tmp.Sync()
		}
		if cerr := tmp.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fmt.Errorf("store delta: %w", err)
		}
		if err := lockDigest(ctx, tx, sum); err != nil {
			return err
		}
		if err := storeChunks(ctx, tx, sum, int64(len(delta)), tmp.Name()); err != nil {
			return err
		}
		// Cached before the commit, like an upload: a commit that fails
		// leaves a file no row names, which sweepCache removes.
		if err := a.place(tmp.Name(), sum); err != nil {
			return fmt.Errorf("store delta: %w", err)
		}
		took := time.Since(start)
		if _, err := tx.Exec(ctx, `UPDATE firmware_deltas SET state = 'ready', sha256 = $3, size = $4, encoding = $5, window_size = $6,
				finished_at = now(), build_ms = $7, error = '' WHERE base_sha256 = $1 AND target_sha256 = $2`,
			base, target, sum, len(delta), manifest.EncodingZstdPatch, window, took.Milliseconds()); err != nil {
			return err
		}
		a.log.Info("built firmware delta", "base", base, "target", target, "sha256", sum, "size", len(delta), "image_size", targetSize,
			"duration", took.Round(time.Millisecond).String())
		return nil
	})
	return settled, err
}

// readImage reads a stored image whole from the database and checks it
// against its digest and size: ErrCorrupt when it does not match,
// ErrUnavailable when it is not there.
func (a *Artifacts) readImage(ctx context.Context, sum string, size int64) ([]byte, error) {
	var buf bytes.Buffer
	buf.Grow(int(size))
	h := sha256.New()
	n, chunks, err := a.readChunks(ctx, sum, &hashWriter{w: &buf, h: h})
	switch {
	case err != nil:
		return nil, err
	case chunks == 0:
		return nil, fmt.Errorf("image %s is not in the database: %w", sum, ErrUnavailable)
	case n != size || hex.EncodeToString(h.Sum(nil)) != sum:
		return nil, fmt.Errorf("image %s: the database holds %d bytes that do not hash to it: %w", sum, n, ErrCorrupt)
	}
	return buf.Bytes(), nil
}

type hashWriter struct {
	w interface{ Write([]byte) (int, error) }
	h interface{ Write([]byte) (int, error) }
}

func (w *hashWriter) Write(p []byte) (int, error) {
	w.h.Write(p)
	return w.w.Write(p)
}

// requestDeltas asks for the deltas a delta campaign's devices need: from
// the stored image of each device's model and reported version to the
// target. devices limits it to those (the devices a following campaign
// just picked up); nil means every device of the campaign (its start). A
// pair asked for before keeps its row (built, failed or pending).
func requestDeltas(ctx context.Context, tx pgx.Tx, campaignID, target string, now time.Time, devices []string) (int64, error) {
	tag, err := tx.Exec(ctx, `INSERT INTO firmware_deltas (base_sha256, target_sha256, created_at)
		SELECT DISTINCT b.sha256, $2, $3::timestamptz FROM campaign_devices cd
		JOIN devices d ON d.id = cd.device_id
		JOIN firmware_models fm ON fm.model = d.model AND fm.version = d.firmware
		JOIN firmware b ON b.id = fm.firmware_id
		WHERE cd.campaign_id = $1 AND b.sha256 <> $2 AND ($4::text[] IS NULL OR cd.device_id = ANY($4))
		ON CONFLICT DO NOTHING`, campaignID, target, now, devices)
	return tag.RowsAffected(), err
}

// deltaWaiting is the SQL condition, over a pending job j2, that its device
// has a delta to the target ($7) still pending since after $8: dispatch
// holds such a job (DeltaOptions.Wait).
const deltaWaiting = `EXISTS (SELECT 1 FROM devices d
		JOIN firmware_models fm ON fm.model = d.model AND fm.version = d.firmware
		JOIN firmware b ON b.id = fm.firmware_id
		JOIN firmware_deltas fd ON fd.base_sha256 = b.sha256 AND fd.target_sha256 = $7
		WHERE d.id = j2.device_id AND fd.state = 'pending' AND fd.created_at > $8)`

// offerDeltas records, on jobs just dispatched, the base image whose ready
// delta their manifest names: the stored image of the device's model and
// reported version. It returns the base of each job it gave one.
func offerDeltas(ctx context.Context, tx pgx.Tx, jobs []string, target string) (map[string]string, error) {
	rows, err := tx.Query(ctx, `UPDATE ota_jobs j SET delta_base = b.sha256
		FROM devices d, firmware_models fm, firmware b, firmware_deltas fd
		WHERE j.id = ANY($1) AND d.id = j.device_id AND fm.model = d.model AND fm.version = d.firmware
			AND b.id = fm.firmware_id AND fd.base_sha256 = b.sha256 AND fd.target_sha256 = $2 AND fd.state = 'ready'
		RETURNING j.id, b.sha256`, jobs, target)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := map[string]string{}
	for rows.Next() {
		var job, base string
		if err := rows.Scan(&job, &base); err != nil {
			return nil, err
		}
		out[job] = base
	}
	return out, rows.Err()
}

// deltaFor returns the manifest entry of the ready delta from base to the
// target image, nil when there is none (any more).
func deltaFor(ctx context.Context, q querier, base, target string) (*manifest.Delta, error) {
	var d manifest.Delta
	err := q.QueryRow(ctx, `SELECT fd.sha256, fd.size, fd.encoding, fd.window_size,
			(SELECT version FROM firmware WHERE sha256 = fd.base_sha256 ORDER BY created_at, id LIMIT 1)
		FROM firmware_deltas fd WHERE fd.base_sha256 = $1 AND fd.target_sha256 = $2 AND fd.state = 'ready'`, base, target).
		Scan(&d.SHA256, &d.Size, &d.Encoding, &d.WindowSize, &d.BaseVersion)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	d.BaseSHA256 = base
	return &d, nil
}

// Delta is a built delta as a download serves it.
type Delta struct {
	Target Artifact
	Base   string // SHA-256 of the base image
	SHA256 string
	Size   int64
}

// OpenDelta opens the ready delta from the image base to the artifact
// targetID for download, from this replica's cache, filled from the
// database once if need be. A target or delta that does not exist is
// ErrNotFound; bytes in the database that do not match the delta's digest
// are ErrCorrupt and are not cached.
func (a *Artifacts) OpenDelta(ctx context.Context, targetID, base string) (Delta, *os.File, error) {
	if !isDigest(base) {
		return Delta{}, nil, fmt.Errorf("delta from %q: %w", base, ErrNotFound)
	}
	art, err := a.Get(ctx, targetID)
	if err != nil {
		return Delta{}, nil, err
	}
	d := Delta{Target: art, Base: base}
	err = a.pool.QueryRow(ctx, `SELECT sha256, size FROM firmware_deltas WHERE base_sha256 = $1 AND target_sha256 = $2 AND state = 'ready'`,
		base, art.SHA256).Scan(&d.SHA256, &d.Size)
	if errors.Is(err, pgx.ErrNoRows) {
		return d, nil, fmt.Errorf("no delta from %s to firmware %s: %w", base, targetID, ErrNotFound)
	}
	if err != nil {
		return d, nil, err
	}
	b := blob{sum: d.SHA256, size: d.Size, name: "delta " + d.SHA256 + " to firmware " + targetID, logKey: "delta_to", logID: targetID}
	f, err := a.openBlob(ctx, b)
	return d, f, err
}

// Served adds n bytes served for a job's signed URL to the job's count
// (full: of the image, not a delta). It is called by the replica that served
// them, once per response, so that the count is true across resumes and
// replicas.
func (a *Artifacts) Served(ctx context.Context, jobID, deviceID string, n int64, full bool) error {
	if n <= 0 {
		return nil
	}
	_, err := a.pool.Exec(ctx, `UPDATE ota_jobs SET bytes_sent = bytes_sent + $3,
			full_bytes_sent = full_bytes_sent + CASE WHEN $4 THEN $3 ELSE 0 END
		WHERE id = $1 AND device_id = $2`, jobID, deviceID, n, full)
	return err
}

// deltaStats sums a campaign's bytes on the wire (DeltaStats).
func deltaStats(ctx context.Context, q querier, campaignID string) (DeltaStats, error) {
	var s DeltaStats
	err := q.QueryRow(ctx, `SELECT coalesce(sum(j.bytes_sent), 0)::bigint,
			coalesce(sum(f.size - j.bytes_sent) FILTER (WHERE j.kind = 'forward' AND j.state = 'succeeded' AND j.delta_base IS NOT NULL), 0)::bigint,
			count(*) FILTER (WHERE j.delta_base IS NOT NULL),
			count(*) FILTER (WHERE j.delta_base IS NOT NULL AND j.full_bytes_sent > 0)
		FROM ota_jobs j JOIN campaigns c ON c.id = j.campaign_id JOIN firmware f ON f.id = c.firmware_id
		WHERE j.campaign_id = $1`, campaignID).Scan(&s.Sent, &s.Saved, &s.DeltaJobs, &s.FellBack)
	return s, err
}
