package firmware

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/Masterminds/semver/v3"
	"github.com/jackc/pgx/v5"
)

// Selector chooses a campaign's devices.
type Selector struct {
	Models []string `json:"models,omitempty"`
	// Version is a semver constraint on the devices' current firmware.
	Version string   `json:"version,omitempty"`
	Tags    []string `json:"tags,omitempty"`
	// Compat "incompatible" selects the devices fleetd found incompatible.
	Compat string `json:"compat,omitempty"`
}

// Spec is what an operator creates a campaign with.
type Spec struct {
	Name          string   `json:"name"`
	FirmwareID    string   `json:"firmware_id"`
	Selector      Selector `json:"selector"`
	Stages        []Stage  `json:"stages"`
	Pacing        Pacing   `json:"pacing"`
	DeviceTimeout Duration `json:"device_timeout"`
	GateAction    string   `json:"gate_action"`
	// Follow: the campaign picks up, while it runs, devices that start
	// matching its selector after the start (off by default).
	Follow bool `json:"follow,omitempty"`
	// Delta offers the devices that run a version whose image is stored a
	// binary delta from it instead of the full image (delta.go). Off by
	// default.
	Delta       bool     `json:"delta,omitempty"`
	Windows     []Window `json:"windows,omitempty"`
	Timezone    string   `json:"timezone,omitempty"`
	TimezoneTag string   `json:"timezone_tag,omitempty"`
}

// CampaignView is a campaign as the API shows it: its state, per-stage
// counts and the operator actions its state allows.
type CampaignView struct {
	Campaign
	Selector Selector     `json:"selector"`
	Counts   []StageCount `json:"stage_counts"`
	Rollback *StageCount  `json:"rollback,omitempty"`
	Actions  []string     `json:"actions"`
	// Bytes is what the campaign's downloads came to on the wire.
	Bytes DeltaStats `json:"bytes"`
	// Window is where the campaign's windows stand now for the devices of
	// its current stage it has yet to dispatch (campaigns with windows only).
	Window    *WindowStatus `json:"window,omitempty"`
	CreatedAt time.Time     `json:"created_at"`
	UpdatedAt time.Time     `json:"updated_at"`
}

// StageCount counts a stage's devices by job state.
type StageCount struct {
	Stage int    `json:"stage"`
	Name  string `json:"name"`
	// Planned is how many devices the stage covers (StageTargets), known
	// once the campaign has started; Targets how many it holds so far.
	Planned  int            `json:"planned"`
	Targets  int            `json:"targets"`
	ByState  map[string]int `json:"by_state"`
	Finished int            `json:"finished"`
}

// HistoryEntry is one line of a campaign's audit trail.
type HistoryEntry struct {
	At     time.Time       `json:"at"`
	Actor  string          `json:"actor"`
	Action string          `json:"action"`
	Detail json.RawMessage `json:"detail"`
}

// CampaignDevice is one device of a campaign with its jobs. Progress, error
// and times are those of its latest job (the rollback job once there is one).
type CampaignDevice struct {
	DeviceID      string     `json:"device_id"`
	Stage         *int       `json:"stage"`
	FromVersion   string     `json:"from_version"`
	JobID         string     `json:"job_id"`
	State         string     `json:"state"`
	Progress      int        `json:"progress"`
	Error         string     `json:"error,omitempty"`
	RollbackJobID string     `json:"rollback_job_id,omitempty"`
	RollbackState string     `json:"rollback_state,omitempty"`
	DispatchedAt  *time.Time `json:"dispatched_at,omitempty"`
	DeliveredAt   *time.Time `json:"delivered_at,omitempty"`
	FinishedAt    *time.Time `json:"finished_at,omitempty"`
	// Delta says the forward job's manifest offered a delta; FellBack that
	// the device downloaded the full image too. BytesSent counts what was
	// served for the device's jobs.
	Delta     bool  `json:"delta"`
	FellBack  bool  `json:"fell_back"`
	BytesSent int64 `json:"bytes_sent"`
}

// Create validates a spec and stores the campaign as a draft. It refuses a
// target firmware that is flagged or below a minimum for the selected
// models, or that does not fit them.
func (c *Campaigns) Create(ctx context.Context, spec Spec, actor string) (CampaignView, error) {
	if spec.FirmwareID == "" {
		return CampaignView{}, invalid("firmware_id", "is required")
	}
	art, err := c.artifacts.Get(ctx, spec.FirmwareID)
	if errors.Is(err, ErrNotFound) {
		return CampaignView{}, invalid("firmware_id", "no firmware %s", spec.FirmwareID)
	}
	if err != nil {
		return CampaignView{}, err
	}
	if spec.Selector.Version != "" {
		if _, err := semver.NewConstraint(spec.Selector.Version); err != nil {
			return CampaignView{}, invalid("selector.version", "is not a semver constraint: %v", err)
		}
	}
	if spec.Selector.Compat != "" && spec.Selector.Compat != "incompatible" {
		return CampaignView{}, invalid("selector.compat", "must be incompatible or empty")
	}
	models := spec.Selector.Models
	for i, m := range models {
		if !contains(art.Models, m) {
			return CampaignView{}, invalid(fmt.Sprintf("selector.models[%d]", i), "firmware %s is not built for model %s (it is for %v)", art.Version, m, art.Models)
		}
	}
	if len(models) == 0 {
		models = art.Models
	}
	for _, m := range models {
		if bad := c.fleet.JudgeFirmware(m, art.Version); len(bad) > 0 {
			return CampaignView{}, invalid("firmware_id", "firmware %s is incompatible for %s: %s", art.Version, m, bad[0].Detail)
		}
	}
	camp := Campaign{ID: newID("camp"), Name: spec.Name, FirmwareID: art.ID, Version: art.Version, Stages: spec.Stages,
		Pacing: spec.Pacing, DeviceTimeout: spec.DeviceTimeout, GateAction: spec.GateAction, Follow: spec.Follow, Delta: spec.Delta, State: StateDraft,
		Windows: spec.Windows, Timezone: spec.Timezone, TimezoneTag: spec.TimezoneTag}
	camp.Normalize()
	if err := camp.Validate(); err != nil {
		return CampaignView{}, err
	}
	spec.FirmwareID, spec.GateAction = art.ID, camp.GateAction
	now := c.now()
	err = pgx.BeginFunc(ctx, c.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `INSERT INTO campaigns (id, name, firmware_id, version, spec, state, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $7)`,
			camp.ID, camp.Name, camp.FirmwareID, camp.Version, spec, string(camp.State), now); err != nil {
			return err
		}
		return history(ctx, tx, camp.ID, actor, "created", map[string]any{"firmware": art.Version, "selector": spec.Selector}, now)
	})
	if err != nil {
		return CampaignView{}, fmt.Errorf("create campaign: %w", err)
	}
	c.onChange(camp.ID)
	return c.Get(ctx, camp.ID)
}

func history(ctx context.Context, tx pgx.Tx, id, actor, action string, detail any, at time.Time) error {
	_, err := tx.Exec(ctx, `INSERT INTO campaign_history (campaign_id, actor, action, detail, at) VALUES ($1, $2, $3, $4, $5)`, id, actor, action, detail, at)
	return err
}

// load reads a campaign row (FOR UPDATE when locking).
func load(ctx context.Context, q querier, id string, lock string) (Campaign, Spec, error) {
	var camp Campaign
	var spec Spec
	var state string
	var pacedUntil *time.Time
	err := q.QueryRow(ctx, `SELECT id, name, firmware_id, version, spec, state, stage, stage_done_at, total, paced_until,
			following_since, joined, follow_looked_at, approved FROM campaigns WHERE id = $1 `+lock, id).
		Scan(&camp.ID, &camp.Name, &camp.FirmwareID, &camp.Version, &spec, &state, &camp.Stage, &camp.StageDoneAt, &camp.Total, &pacedUntil,
			&camp.FollowingSince, &camp.Joined, &camp.FollowLookedAt, &camp.Approved)
	if errors.Is(err, pgx.ErrNoRows) {
		return camp, spec, fmt.Errorf("campaign %s: %w", id, ErrNotFound)
	}
	camp.State = CampaignState(state)
	if pacedUntil != nil {
		camp.PacedUntil = *pacedUntil
	}
	camp.Stages, camp.Pacing, camp.DeviceTimeout, camp.GateAction, camp.Follow = spec.Stages, spec.Pacing, spec.DeviceTimeout, spec.GateAction, spec.Follow
	camp.Delta = spec.Delta
	camp.Windows, camp.Timezone, camp.TimezoneTag = spec.Windows, spec.Timezone, spec.TimezoneTag
	return camp, spec, err
}

// Get returns a campaign with its per-stage counts and allowed actions.
func (c *Campaigns) Get(ctx context.Context, id string) (CampaignView, error) {
	var v CampaignView
	err := pgx.BeginFunc(ctx, c.pool, func(tx pgx.Tx) error {
		camp, spec, err := load(ctx, tx, id, "")
		if err != nil {
			return err
		}
		v.Campaign, v.Selector, v.Actions = camp, spec.Selector, Actions(camp.State)
		if err := tx.QueryRow(ctx, `SELECT created_at, updated_at FROM campaigns WHERE id = $1`, id).Scan(&v.CreatedAt, &v.UpdatedAt); err != nil {
			return err
		}
		v.Counts = make([]StageCount, len(camp.Stages))
		for i, s := range camp.Stages {
			v.Counts[i] = StageCount{Stage: i, Name: s.Name, Planned: StageTargets(camp.Stages, camp.Total, i), ByState: map[string]int{}}
		}
		rows, err := tx.Query(ctx, `SELECT cd.stage, f.state, coalesce(r.state, ''), count(*)
			FROM campaign_devices cd
			JOIN ota_jobs f ON f.campaign_id = cd.campaign_id AND f.device_id = cd.device_id AND f.kind = 'forward' AND f.attempt = cd.attempt
			LEFT JOIN ota_jobs r ON r.campaign_id = cd.campaign_id AND r.device_id = cd.device_id AND r.kind = 'rollback'
			WHERE cd.campaign_id = $1 AND cd.stage IS NOT NULL GROUP BY 1, 2, 3`, id)
		if err != nil {
			return err
		}
		defer rows.Close()
		rb := &StageCount{Stage: -1, Name: "rollback", ByState: map[string]int{}}
		for rows.Next() {
			var stage, n int
			var state, rbState string
			if err := rows.Scan(&stage, &state, &rbState, &n); err != nil {
				return err
			}
			if stage < len(v.Counts) {
				count(&v.Counts[stage], state, n)
			}
			if rbState != "" {
				count(rb, rbState, n)
			}
		}
		if rb.Targets > 0 {
			rb.Planned = rb.Targets
			v.Rollback = rb
		}
		if err := rows.Err(); err != nil {
			return err
		}
		if v.Bytes, err = deltaStats(ctx, tx, id); err != nil {
			return err
		}
		if len(camp.Windows) == 0 {
			return nil
		}
		// The pending devices of a campaign that may still dispatch; a
		// draft or a finished campaign shows its own zone's windows.
		var groups []ZonePending
		if camp.State == StateRunning || camp.State == StatePaused || camp.State == StateAwaitingApproval {
			if groups, err = pendingByZone(ctx, tx, camp); err != nil {
				return err
			}
		}
		ws := camp.WindowStatus(groups, c.now())
		v.Window = &ws
		return nil
	})
	return v, err
}

func count(sc *StageCount, state string, n int) {
	sc.Targets += n
	sc.ByState[state] += n
	if finished(state) {
		sc.Finished += n
	}
}

// List returns every campaign, newest first.
func (c *Campaigns) List(ctx context.Context) ([]CampaignView, error) {
	rows, err := c.pool.Query(ctx, `SELECT id FROM campaigns ORDER BY created_at DESC, id`)
	if err != nil {
		return nil, err
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, err
	}
	out := []CampaignView{}
	for _, id := range ids {
		v, err := c.Get(ctx, id)
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, nil
}

// Devices lists a campaign's devices in selection order, with their jobs.
func (c *Campaigns) Devices(ctx context.Context, id string) ([]CampaignDevice, error) {
	if _, err := c.Get(ctx, id); err != nil {
		return nil, err
	}
	rows, err := c.pool.Query(ctx, `SELECT cd.device_id, cd.stage, cd.from_version, f.id, f.state,
			coalesce(r.progress, f.progress), coalesce(r.error, f.error), coalesce(r.id, ''), coalesce(r.state, ''),
			CASE WHEN r.id IS NULL THEN f.dispatched_at ELSE r.dispatched_at END,
			CASE WHEN r.id IS NULL THEN f.delivered_at ELSE r.delivered_at END,
			CASE WHEN r.id IS NULL THEN f.finished_at ELSE r.finished_at END,
			f.delta_base IS NOT NULL, f.delta_base IS NOT NULL AND f.full_bytes_sent > 0, f.bytes_sent + coalesce(r.bytes_sent, 0)
		FROM campaign_devices cd
		JOIN ota_jobs f ON f.campaign_id = cd.campaign_id AND f.device_id = cd.device_id AND f.kind = 'forward' AND f.attempt = cd.attempt
		LEFT JOIN ota_jobs r ON r.campaign_id = cd.campaign_id AND r.device_id = cd.device_id AND r.kind = 'rollback'
		WHERE cd.campaign_id = $1 ORDER BY cd.position`, id)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := []CampaignDevice{}
	for rows.Next() {
		var d CampaignDevice
		if err := rows.Scan(&d.DeviceID, &d.Stage, &d.FromVersion, &d.JobID, &d.State, &d.Progress, &d.Error, &d.RollbackJobID,
			&d.RollbackState, &d.DispatchedAt, &d.DeliveredAt, &d.FinishedAt, &d.Delta, &d.FellBack, &d.BytesSent); err != nil {
			return nil, err
		}
		out = append(out, d)
	}
	return out, rows.Err()
}

// History returns a campaign's audit trail, oldest first.
func (c *Campaigns) History(ctx context.Context, id string) ([]HistoryEntry, error) {
	if _, err := c.Get(ctx, id); err != nil {
		return nil, err
	}
	rows, err := c.pool.Query(ctx, `SELECT at, actor, action, detail FROM campaign_history WHERE campaign_id = $1 ORDER BY id`, id)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := []HistoryEntry{}
	for rows.Next() {
		var h HistoryEntry
		if err := rows.Scan(&h.At, &h.Actor, &h.Action, &h.Detail); err != nil {
			return nil, err
		}
		out = append(out, h)
	}
	return out, rows.Err()
}

// selectDevices records the campaign's devices in their deterministic
// order, with the version each one runs now (for rollback), and gives each
// its forward job.
func (c *Campaigns) selectDevices(ctx context.Context, tx pgx.Tx, camp Campaign, sel Selector) (int, error) {
	art, err := c.artifacts.Get(ctx, camp.FirmwareID)
	if err != nil {
		return 0, err
	}
	models := sel.Models
	if len(models) == 0 {
		models = art.Models
	}
	cands, err := c.fleet.Candidates(ctx, models, sel.Tags, sel.Compat == "incompatible")
	if err != nil {
		return 0, err
	}
	var constraint *semver.Constraints
	if sel.Version != "" {
		constraint, _ = semver.NewConstraint(sel.Version)
	}
	from := map[string]string{}
	var ids []string
	for _, d := range cands {
		if d.Firmware == camp.Version {
			continue // already there
		}
		if constraint != nil {
			v, err := semver.NewVersion(d.Firmware)
			if err != nil || !constraint.Check(v) {
				continue
			}
		}
		from[d.ID] = d.Firmware
		ids = append(ids, d.ID)
	}
	if len(ids) == 0 && !camp.Follow {
		// A campaign that follows the fleet may start with none: it waits
		// in its last stage for the devices that come.
		return 0, invalid("selector", "matches no device that needs firmware %s", camp.Version)
	}
	ordered := SelectDevices(camp.ID, ids)
	froms := make([]string, len(ordered))
	positions := make([]int32, len(ordered))
	for i, id := range ordered {
		froms[i], positions[i] = from[id], int32(i)
	}
	if _, err := tx.Exec(ctx, `INSERT INTO campaign_devices (campaign_id, device_id, position, from_version)
		SELECT $1, d, p, f FROM unnest($2::text[], $3::int[], $4::text[]) AS x(d, p, f)`, camp.ID, ordered, positions, froms); err != nil {
		return 0, err
	}
	_, err = tx.Exec(ctx, `INSERT INTO ota_jobs (id, campaign_id, device_id, kind)
		SELECT `+newJobID+`, $1, d, 'forward' FROM unnest($2::text[]) AS x(d)`, camp.ID, ordered)
	return len(ordered), err
}

// stageStats counts the jobs of kind in the current stage (a rollback's
// jobs are one stage), and for forward jobs the connectivity of the devices
// the campaign upgraded against the rest of the fleet, as of now.
func stageStats(ctx context.Context, q querier, camp Campaign, kind string, now time.Time) (StageStats, error) {
	var s StageStats
	err := q.QueryRow(ctx, `SELECT count(*),
			count(*) FILTER (WHERE j.state = 'pending'),
			count(*) FILTER (WHERE j.state = ANY($4)),
			count(*) FILTER (WHERE j.state = 'succeeded'),
			count(*) FILTER (WHERE j.state = 'failed'),
			count(*) FILTER (WHERE j.state = 'timed_out')
		FROM ota_jobs j JOIN campaign_devices cd ON cd.campaign_id = j.campaign_id AND cd.device_id = j.device_id
		WHERE j.campaign_id = $1 AND j.kind = $2 AND ($2 = 'rollback' OR (cd.stage = $3 AND j.attempt = cd.attempt))`, camp.ID, kind, camp.Stage, inFlight).
		Scan(&s.Targets, &s.Pending, &s.InFlight, &s.Succeeded, &s.Failed, &s.TimedOut)
	if err != nil {
		return s, err
	}
	s.NotBackOnline = s.TimedOut
	if kind == kindRollback {
		return s, nil
	}
	if len(camp.Windows) > 0 && s.Pending > 0 {
		if s.PendingByZone, err = pendingByZone(ctx, q, camp); err != nil {
			return s, err
		}
	}
	// Connectivity: disconnects per device-hour of the devices this campaign
	// upgraded, since their upgrade, against the devices it has not touched.
	// The fleet's disconnects come from the event rollups (minutes from the
	// top of the first upgrade's minute to the next full hour, hours from
	// there) minus the campaign's own devices' (read per device through the
	// (device_id, at) index), so that the gate costs what the campaign and the
	// hours since its start hold, never a scan of the fleet's events.
	var upEvents int
	var upHours, fleetHours float64
	var fleetEvents int
	err = q.QueryRow(ctx, `
		WITH up AS (SELECT j.device_id, j.finished_at FROM ota_jobs j JOIN campaign_devices cd ON cd.campaign_id = j.campaign_id AND cd.device_id = j.device_id
		            WHERE j.campaign_id = $1 AND j.kind = 'forward' AND j.state = 'succeeded' AND j.attempt = cd.attempt),
		     since AS (SELECT min(finished_at) AS t, date_trunc('minute', min(finished_at), 'UTC') AS m,
		                      date_trunc('hour', min(finished_at) + interval '59 minutes 59.999999 seconds', 'UTC') AS h FROM up)
		SELECT
			(SELECT count(*) FROM device_events e JOIN up ON e.device_id = up.device_id WHERE e.kind = 'disconnect' AND e.at > up.finished_at),
			coalesce((SELECT sum(extract(epoch FROM $2::timestamptz - finished_at)) / 3600 FROM up), 0),
			coalesce((SELECT sum(count) FROM fleet_counts_minute r, since WHERE r.kind = 'disconnect' AND r.minute >= since.m AND r.minute < since.h), 0)
			+ coalesce((SELECT sum(count) FROM fleet_counts_hour r, since WHERE r.kind = 'disconnect' AND r.hour >= since.h), 0)
			- (SELECT count(*) FROM device_events e JOIN campaign_devices cd ON cd.device_id = e.device_id, since
				WHERE cd.campaign_id = $1 AND e.kind = 'disconnect' AND e.at >= since.m),
			coalesce((SELECT count(*) FROM devices WHERE state = 'active' AND id NOT IN (SELECT device_id FROM campaign_devices WHERE campaign_id = $1))
				* (SELECT extract(epoch FROM $2::timestamptz - t) / 3600 FROM since), 0)`, camp.ID, now).
		Scan(&upEvents, &upHours, &fleetEvents, &fleetHours)
	if err != nil {
		return s, err
	}
	s.UpgradedDeviceHours = upHours
	if upHours > 0 {
		s.UpgradedDisconnectsPerHour = float64(upEvents) / upHours
	}
	if fleetHours > 0 {
		s.FleetDisconnectsPerHour = float64(fleetEvents) / fleetHours
	}
	return s, nil
}

// maxZoneGroups bounds the zone groups one step reads: the IANA database
// has about 600 zones, so only tags that name no zone (each one a group of
// its own) can make more, and their devices wait for a later step rather
// than make every step read them all.
const maxZoneGroups = 1000

// zoneTag is the SQL value of a device d's timezone tag (param is the
// placeholder of the tag key, ” when the campaign names none): the first,
// in sort order, of its tags key=value with that key, ” when it has none.
func zoneTag(param string) string {
	return `coalesce((SELECT substr(t, length(` + param + `) + 2) FROM unnest(d.tags) t
	WHERE ` + param + ` <> '' AND left(t, length(` + param + `) + 1) = ` + param + ` || '=' ORDER BY t LIMIT 1), '')`
}

// pendingByZone groups the pending forward jobs of the campaign's current
// stage by their device's timezone tag, the group holding the earliest
// position first: one pass over the stage's pending jobs, as the stage
// count already makes, returning at most maxZoneGroups rows.
func pendingByZone(ctx context.Context, q querier, camp Campaign) ([]ZonePending, error) {
	rows, err := q.Query(ctx, `SELECT zone, count(*) FROM (
			SELECT `+zoneTag("$2")+` AS zone, cd.position
			FROM ota_jobs j
			JOIN campaign_devices cd ON cd.campaign_id = j.campaign_id AND cd.device_id = j.device_id
			LEFT JOIN devices d ON d.id = j.device_id
			WHERE j.campaign_id = $1 AND j.kind = 'forward' AND j.state = 'pending' AND cd.stage = $3) p
		GROUP BY zone ORDER BY min(position) LIMIT $4`, camp.ID, camp.TimezoneTag, camp.Stage, maxZoneGroups)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (ZonePending, error) {
		var z ZonePending
		err := r.Scan(&z.Tag, &z.Pending)
		return z, err
	})
}
