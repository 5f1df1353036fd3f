package firmware

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/fleetd/fleetd/firmware/manifest"
	"github.com/fleetd/fleetd/internal/untrusted"
)

// Job is the payload of devices/{id}/ota/job (DESIGN: device protocol).
// JobID is the stored id of the attempt: the device reports on it by that
// id, and fleetd never parses it.
//
// Manifest, signed by the server (ManifestSignature), is what the device
// must check and act on: the image's digest, size, version and models, the
// job and device it was issued to, whether it is a rollback, and its expiry.
// Signature is the image's own signature (server or trusted operator key)
// over the job-independent part (manifest.Image). Version, SHA256 and Size
// repeat the manifest for older firmware and humans; a device must not
// trust them alone.
type Job struct {
	JobID             string       `json:"job_id"`
	CampaignID        string       `json:"campaign_id"`
	Version           string       `json:"version"`
	URL               string       `json:"url"`
	SHA256            string       `json:"sha256"`
	Size              int64        `json:"size"`
	Signature         string       `json:"signature"`
	Manifest          manifest.Job `json:"manifest"`
	ManifestSignature string       `json:"manifest_signature"`
	// DeltaURL downloads the delta Manifest.Delta names, signed for this
	// device and job like URL; a device that cannot use it takes URL.
	DeltaURL string `json:"delta_url,omitempty"`
}

// manifestGrace is how long after a job's device timeout its manifest and
// download URL stay valid: long enough for a device that was slow but is
// still within its timeout to finish the download, short enough that a
// leaked URL or a replayed job is soon useless.
const manifestGrace = 5 * time.Minute

// status is the payload of devices/{id}/ota/status.
type status struct {
	JobID    string `json:"job_id"`
	State    string `json:"state"`
	Progress int    `json:"progress"`
	Error    string `json:"error"`
}

// Bounds on what a device reports: the stored failure reason, and a job id
// (fleetd's are 36 characters).
const (
	maxReportedError = 500
	maxJobIDLen      = 64
)

// parseStatus decodes and checks an OTA status report. The state is one a
// device may report; the failure reason is made storable.
func parseStatus(payload []byte) (status, error) {
	var st status
	if err := json.Unmarshal(payload, &st); err != nil {
		return st, fmt.Errorf("not a JSON object: %v", err)
	}
	switch {
	case st.JobID == "":
		return st, errors.New("no job_id")
	case len(st.JobID) > maxJobIDLen:
		return st, fmt.Errorf("job_id is %d bytes long; fleetd's are at most %d", len(st.JobID), maxJobIDLen)
	}
	// Any state may carry a detail (a device that falls back from a delta
	// to the full image says so while downloading): it is stored bounded.
	st.Error = untrusted.Text(st.Error, maxReportedError)
	switch st.State {
	case "downloading", "verifying", "installing", "rebooting", "succeeded":
	case "failed":
		if st.Error == "" {
			st.Error = "the device reported a failure without a reason"
		}
	default:
		return st, fmt.Errorf("unknown state %s", untrusted.Excerpt(st.State, 32))
	}
	st.Progress = min(max(st.Progress, 0), 100)
	return st, nil
}

// HandleStatus stores an OTA status report before the broker acknowledges
// it (an error leaves it unacknowledged, and the device sends it again).
// A report counts only for a job of the reporting device that is still in
// flight: reports never move a job back from an outcome, and a device cannot
// report on another device's job.
func (c *Campaigns) HandleStatus(deviceID string, payload []byte) error {
	st, err := parseStatus(payload)
	if err != nil {
		c.logger.Warn("malformed OTA status", "device_id", deviceID, "err", err, "payload", untrusted.Excerpt(payload, 200))
		return nil // acknowledged: resending would not make it readable
	}
	if st.State == "succeeded" {
		return nil // success is the device's birth on the target version
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var campaignID string
	err = c.pool.QueryRow(ctx, `UPDATE ota_jobs SET state = $3, progress = $4, error = $5,
			finished_at = CASE WHEN $3 = 'failed' THEN $6::timestamptz END
		WHERE id = $1 AND device_id = $2 AND state = ANY($7) RETURNING campaign_id`,
		st.JobID, deviceID, st.State, st.Progress, st.Error, c.now(), inFlight).Scan(&campaignID)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		c.logger.Debug("OTA status for no job of this device in flight", "device_id", deviceID, "job_id", untrusted.Excerpt(st.JobID, maxJobIDLen))
		return nil
	case err != nil:
		return fmt.Errorf("store OTA status of %s: %w", deviceID, err)
	}
	if st.State == "failed" {
		c.logger.Info("OTA job failed", "device_id", deviceID, "job_id", st.JobID, "error", st.Error)
	}
	c.onChange(campaignID)
	return nil
}

// jobRef names a job row and what building its message needs.
type jobRef struct {
	id, deviceID, from, kind string
	dispatched               time.Time
	// deltaBase is the SHA-256 of the base image whose delta the job
	// offers (ota_jobs.delta_base), empty for the full image only.
	deltaBase string
}

// artifactCache holds the artifacts and deltas of one dispatch batch, so
// that a batch of a thousand jobs for one image costs one lookup, not a
// thousand.
type artifactCache struct {
	arts   map[string]Artifact
	deltas map[string]*manifest.Delta
}

func newArtifactCache() artifactCache {
	return artifactCache{arts: map[string]Artifact{}, deltas: map[string]*manifest.Delta{}}
}

// job builds a device's job message: the target artifact, or for a rollback
// the artifact of the version the device ran before.
func (c *Campaigns) job(ctx context.Context, q querier, camp Campaign, ref jobRef, arts artifactCache) (Job, error) {
	key := camp.FirmwareID
	var model string
	rolling := ref.kind == kindRollback
	if rolling {
		if err := q.QueryRow(ctx, `SELECT model FROM devices WHERE id = $1`, ref.deviceID).Scan(&model); err != nil {
			return Job{}, err
		}
		key = model + "\x00" + ref.from
	}
	art, ok := arts.arts[key]
	if !ok {
		var err error
		if rolling {
			art, err = c.artifacts.ForModel(ctx, model, ref.from)
		} else {
			art, err = c.artifacts.Get(ctx, camp.FirmwareID)
		}
		if err != nil {
			return Job{}, err
		}
		arts.arts[key] = art
	}
	exp := ref.dispatched.Add(time.Duration(camp.DeviceTimeout) + manifestGrace)
	m := manifest.Job{Image: art.Manifest(), JobID: ref.id, DeviceID: ref.deviceID, Rollback: rolling, Expires: exp}
	deltaURL := ""
	if ref.deltaBase != "" && !rolling {
		d, ok := arts.deltas[ref.deltaBase]
		if !ok {
			var err error
			if d, err = deltaFor(ctx, q, ref.deltaBase, art.SHA256); err != nil {
				return Job{}, err
			}
			arts.deltas[ref.deltaBase] = d
		}
		if d != nil { // nil: deleted with its base since the dispatch; the full image only
			m.Delta = d
			deltaURL = c.publicURL + DeltaPath(art.ID, d.BaseSHA256) + "?" + c.artifacts.SignURL(DeltaKey(art.ID, d.BaseSHA256), ref.deviceID, ref.id, exp)
		}
	}
	return Job{JobID: ref.id, CampaignID: camp.ID, Version: art.Version, SHA256: art.SHA256, Size: art.Size, Signature: art.Signature,
		Manifest: m, ManifestSignature: manifest.SignJob(c.artifacts.keys.Signing, m), DeltaURL: deltaURL,
		URL: c.publicURL + "/api/v1/firmware/" + art.ID + "/download?" + c.artifacts.SignURL(art.ID, ref.deviceID, ref.id, exp)}, nil
}

// DeltaPath is the download path of the delta from the image base to the
// artifact id.
func DeltaPath(id, base string) string { return "/api/v1/firmware/" + id + "/deltas/" + base }

// DeltaKey is what a delta's signed URL is signed for: the target artifact
// and the base, so that a URL for one delta opens no other.
func DeltaKey(id, base string) string { return id + "/deltas/" + base }

// Manifest is the job-independent part of what the artifact is, the part
// its Signature covers.
func (a Artifact) Manifest() manifest.Image {
	return manifest.Image{SHA256: a.SHA256, Size: a.Size, Version: a.Version, Models: a.Models}
}

// deliver sends a job to a device that is listening and records when it
// did; a device that is not gets it when it subscribes (DeviceListening),
// and so does one that never reported on it.
func (c *Campaigns) deliver(ctx context.Context, s pendingSend) {
	if !c.send.Listening(s.deviceID, "ota/job") {
		return
	}
	payload, _ := json.Marshal(s.job)
	if err := c.send.Send(s.deviceID, "ota/job", payload); err != nil {
		c.logger.Warn("OTA job not sent; it will be sent when the device subscribes", "device_id", s.deviceID, "job_id", s.job.JobID, "err", err)
		return
	}
	if _, err := c.pool.Exec(ctx, `UPDATE ota_jobs SET delivered_at = $2 WHERE id = $1`, s.job.JobID, c.now()); err != nil {
		c.logger.Warn("cannot record delivery", "device_id", s.deviceID, "err", err)
	}
}

// DeviceListening notes that a device subscribed to its job topic: jobs
// dispatched while it was away are delivered now. It never blocks the
// caller (a broker hook).
func (c *Campaigns) DeviceListening(deviceID string) {
	c.notes.add(deviceNote{deviceID: deviceID, listening: true})
}

// DeviceBirth notes a device's birth: a device back on the target version
// has succeeded; one back on its old version after rebooting has failed.
func (c *Campaigns) DeviceBirth(deviceID, firmware string) {
	c.notes.add(deviceNote{deviceID: deviceID, firmware: firmware})
}

func (c *Campaigns) handleNotes(ctx context.Context) {
	for _, n := range c.notes.take() {
		if ctx.Err() != nil {
			return
		}
		if n.listening {
			c.redeliver(ctx, n.deviceID)
		} else {
			c.birth(ctx, n.deviceID, n.firmware)
		}
	}
}

// redeliver sends a device that subscribed every job it has not reported on.
// A job counts as received once the device reports on it. Until then it goes
// out again on every subscription: handing it to the broker is not delivery
// (a crash can lose it from the outbound queue), and devices ignore a job id
// they already have.
func (c *Campaigns) redeliver(ctx context.Context, deviceID string) {
	rows, err := c.pool.Query(ctx, `SELECT j.id, j.campaign_id, j.kind, cd.from_version, j.dispatched_at, coalesce(j.delta_base, '')
		FROM ota_jobs j
		JOIN campaign_devices cd ON cd.campaign_id = j.campaign_id AND cd.device_id = j.device_id
		JOIN campaigns c ON c.id = j.campaign_id
		WHERE j.device_id = $1 AND j.state = 'dispatched' AND c.state IN ('running', 'rolling_back', 'paused')`, deviceID)
	if err != nil {
		c.logger.Warn("cannot look up undelivered jobs", "device_id", deviceID, "err", err)
		return
	}
	type undelivered struct {
		jobRef
		campaign string
	}
	us, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (undelivered, error) {
		u := undelivered{jobRef: jobRef{deviceID: deviceID}}
		err := r.Scan(&u.id, &u.campaign, &u.kind, &u.from, &u.dispatched, &u.deltaBase)
		return u, err
	})
	if err != nil {
		c.logger.Warn("cannot look up undelivered jobs", "device_id", deviceID, "err", err)
		return
	}
	for _, u := range us {
		camp, _, err := load(ctx, c.pool, u.campaign, "")
		if err == nil {
			var job Job
			if job, err = c.job(ctx, c.pool, camp, u.jobRef, newArtifactCache()); err == nil {
				c.deliver(ctx, pendingSend{deviceID: deviceID, job: job})
				continue
			}
		}
		c.logger.Warn("cannot deliver job", "device_id", deviceID, "job_id", u.id, "err", err)
	}
}

// birth settles a device's jobs from its birth: back on the target version
// is success; back on another version after rebooting is failure (it rolled
// itself back); a rollback succeeds when the device is back on the version
// it ran before the campaign.
func (c *Campaigns) birth(ctx context.Context, deviceID, firmware string) {
	now := c.now()
	rows, err := c.pool.Query(ctx, `
		UPDATE ota_jobs j SET
			state = CASE WHEN $2 = c.version THEN 'succeeded' ELSE 'failed' END,
			error = CASE WHEN $2 = c.version THEN '' ELSE 'came back on '||$2||', not '||c.version END,
			progress = 100, finished_at = $4, settled_db_at = clock_timestamp()
		FROM campaigns c WHERE c.id = j.campaign_id AND j.device_id = $1 AND j.kind = 'forward'
			AND (($2 = c.version AND j.state = ANY($3)) OR ($2 <> c.version AND j.state = 'rebooting'))
		RETURNING j.campaign_id`, deviceID, firmware, inFlight, now)
	c.settled(rows, err, deviceID, "cannot record OTA outcome")
	rows, err = c.pool.Query(ctx, `
		UPDATE ota_jobs j SET state = 'succeeded', progress = 100, finished_at = $4
		FROM campaign_devices cd WHERE cd.campaign_id = j.campaign_id AND cd.device_id = j.device_id
			AND j.device_id = $1 AND j.kind = 'rollback' AND cd.from_version = $2 AND j.state = ANY($3)
		RETURNING j.campaign_id`, deviceID, firmware, inFlight, now)
	c.settled(rows, err, deviceID, "cannot record rollback outcome")
}

// settled tells OnChange about the campaigns whose jobs an update settled.
func (c *Campaigns) settled(rows pgx.Rows, err error, deviceID, what string) {
	var ids []string
	if err == nil {
		ids, err = pgx.CollectRows(rows, pgx.RowTo[string])
	}
	if err != nil {
		c.logger.Warn(what, "device_id", deviceID, "err", err)
		return
	}
	for _, id := range ids {
		c.onChange(id)
	}
}
