package firmware

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/Masterminds/semver/v3"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/untrusted"
)

// Fleet is what campaigns need from the device registry.
type Fleet interface {
	Candidates(ctx context.Context, models, tags []string, incompatibleOnly bool) ([]fleet.Candidate, error)
	JudgeFirmware(model, version string) []fleet.Incompatibility
}

// Sender delivers jobs to devices (the broker).
type Sender interface {
	Send(deviceID, sub string, payload []byte) error
	// Listening reports whether the device has a live session subscribed to
	// devices/{id}/{sub}.
	Listening(deviceID, sub string) bool
}

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
}

// CampaignView is a campaign as the API shows it: its state and per-stage counts.
type CampaignView struct {
	Campaign
	Selector  Selector     `json:"selector"`
	Counts    []StageCount `json:"stage_counts"`
	Rollback  *StageCount  `json:"rollback,omitempty"`
	CreatedAt time.Time    `json:"created_at"`
	UpdatedAt time.Time    `json:"updated_at"`
}

// StageCount counts a stage's devices by job state.
type StageCount struct {
	Stage    int            `json:"stage"`
	Name     string         `json:"name"`
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

// Job is the payload of devices/{id}/ota/job (DESIGN: device protocol).
type Job struct {
	JobID      string `json:"job_id"`
	CampaignID string `json:"campaign_id"`
	Version    string `json:"version"`
	URL        string `json:"url"`
	SHA256     string `json:"sha256"`
	Size       int64  `json:"size"`
	Signature  string `json:"signature"`
}

// jobStates a device passes through; the in-flight ones can time out.
var inFlight = []string{"dispatched", "downloading", "verifying", "installing", "rebooting"}

// Campaigns runs staged OTA campaigns. State lives in PostgreSQL: a restart
// (or another replica) resumes every campaign where it was; the unique
// (campaign, device) row is dispatched once, and its job is sent again only
// to a device that has not reported on it yet.
type Campaigns struct {
	pool      *pgxpool.Pool
	artifacts *Artifacts
	fleet     Fleet
	send      Sender
	publicURL string
	logger    *slog.Logger
	now       func() time.Time
	notes     *noteQueue
}

// NewCampaigns builds the campaign service. publicURL is the base URL
// devices download firmware from.
func NewCampaigns(pool *pgxpool.Pool, artifacts *Artifacts, fl Fleet, send Sender, publicURL string, logger *slog.Logger) *Campaigns {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	return &Campaigns{pool: pool, artifacts: artifacts, fleet: fl, send: send, publicURL: strings.TrimRight(publicURL, "/"),
		logger: logger, now: time.Now, notes: newNoteQueue()}
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
		Pacing: spec.Pacing, DeviceTimeout: spec.DeviceTimeout, GateAction: spec.GateAction, State: StateDraft}
	camp.Normalize()
	if err := camp.Validate(); err != nil {
		return CampaignView{}, err
	}
	spec.FirmwareID, spec.GateAction = art.ID, camp.GateAction
	err = pgx.BeginFunc(ctx, c.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `INSERT INTO campaigns (id, name, firmware_id, version, spec, state) VALUES ($1, $2, $3, $4, $5, $6)`,
			camp.ID, camp.Name, camp.FirmwareID, camp.Version, spec, string(camp.State)); err != nil {
			return err
		}
		return history(ctx, tx, camp.ID, actor, "created", map[string]any{"firmware": art.Version, "selector": spec.Selector})
	})
	if err != nil {
		return CampaignView{}, fmt.Errorf("create campaign: %w", err)
	}
	return c.Get(ctx, camp.ID)
}

func history(ctx context.Context, tx pgx.Tx, id, actor, action string, detail any) error {
	_, err := tx.Exec(ctx, `INSERT INTO campaign_history (campaign_id, actor, action, detail) VALUES ($1, $2, $3, $4)`, id, actor, action, detail)
	return err
}

// load reads a campaign row (FOR UPDATE when locking).
func load(ctx context.Context, q pgx.Tx, id string, lock string) (Campaign, Spec, error) {
	var camp Campaign
	var spec Spec
	var state string
	var pacedUntil *time.Time
	err := q.QueryRow(ctx, `SELECT id, name, firmware_id, version, spec, state, stage, stage_done_at, total, paced_until FROM campaigns WHERE id = $1 `+lock, id).
		Scan(&camp.ID, &camp.Name, &camp.FirmwareID, &camp.Version, &spec, &state, &camp.Stage, &camp.StageDoneAt, &camp.Total, &pacedUntil)
	if errors.Is(err, pgx.ErrNoRows) {
		return camp, spec, fmt.Errorf("campaign %s: %w", id, ErrNotFound)
	}
	camp.State = CampaignState(state)
	if pacedUntil != nil {
		camp.PacedUntil = *pacedUntil
	}
	camp.Stages, camp.Pacing, camp.DeviceTimeout, camp.GateAction = spec.Stages, spec.Pacing, spec.DeviceTimeout, spec.GateAction
	return camp, spec, err
}

// Get returns a campaign with its per-stage counts.
func (c *Campaigns) Get(ctx context.Context, id string) (CampaignView, error) {
	var v CampaignView
	err := pgx.BeginFunc(ctx, c.pool, func(tx pgx.Tx) error {
		camp, spec, err := load(ctx, tx, id, "")
		if err != nil {
			return err
		}
		v.Campaign, v.Selector = camp, spec.Selector
		if err := tx.QueryRow(ctx, `SELECT created_at, updated_at FROM campaigns WHERE id = $1`, id).Scan(&v.CreatedAt, &v.UpdatedAt); err != nil {
			return err
		}
		v.Counts = make([]StageCount, len(camp.Stages))
		for i, s := range camp.Stages {
			v.Counts[i] = StageCount{Stage: i, Name: s.Name, ByState: map[string]int{}}
		}
		rows, err := tx.Query(ctx, `SELECT stage, state, rollback_state, count(*) FROM campaign_devices
			WHERE campaign_id = $1 AND stage IS NOT NULL GROUP BY 1, 2, 3`, id)
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
				sc := &v.Counts[stage]
				sc.Targets += n
				sc.ByState[state] += n
				if state == "succeeded" || state == "failed" || state == "timed_out" {
					sc.Finished += n
				}
			}
			if rbState != "" {
				rb.Targets += n
				rb.ByState[rbState] += n
				if rbState == "succeeded" || rbState == "failed" || rbState == "timed_out" {
					rb.Finished += n
				}
			}
		}
		if rb.Targets > 0 {
			v.Rollback = rb
		}
		return rows.Err()
	})
	return v, err
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

// CampaignDevice is one device's job in a campaign.
type CampaignDevice struct {
	DeviceID      string     `json:"device_id"`
	Stage         *int       `json:"stage"`
	FromVersion   string     `json:"from_version"`
	State         string     `json:"state"`
	Progress      int        `json:"progress"`
	Error         string     `json:"error,omitempty"`
	RollbackState string     `json:"rollback_state,omitempty"`
	DispatchedAt  *time.Time `json:"dispatched_at,omitempty"`
	DeliveredAt   *time.Time `json:"delivered_at,omitempty"`
	FinishedAt    *time.Time `json:"finished_at,omitempty"`
}

// Devices lists a campaign's devices in selection order, with their jobs.
func (c *Campaigns) Devices(ctx context.Context, id string) ([]CampaignDevice, error) {
	if _, err := c.Get(ctx, id); err != nil {
		return nil, err
	}
	rows, err := c.pool.Query(ctx, `SELECT device_id, stage, from_version, state, progress, error, rollback_state,
		dispatched_at, delivered_at, finished_at FROM campaign_devices WHERE campaign_id = $1 ORDER BY position`, id)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := []CampaignDevice{}
	for rows.Next() {
		var d CampaignDevice
		if err := rows.Scan(&d.DeviceID, &d.Stage, &d.FromVersion, &d.State, &d.Progress, &d.Error, &d.RollbackState,
			&d.DispatchedAt, &d.DeliveredAt, &d.FinishedAt); err != nil {
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

// Act performs an operator's action: start, pause, resume, abort, rollback.
// An action that does not fit the campaign's state is ErrConflict.
func (c *Campaigns) Act(ctx context.Context, id, action, actor string) (CampaignView, error) {
	err := pgx.BeginFunc(ctx, c.pool, func(tx pgx.Tx) error {
		camp, spec, err := load(ctx, tx, id, "FOR UPDATE")
		if err != nil {
			return err
		}
		conflict := func() error {
			return fmt.Errorf("cannot %s a campaign that is %s: %w", action, camp.State, ErrConflict)
		}
		detail := map[string]any{"from": camp.State}
		switch action {
		case "start":
			if camp.State != StateDraft {
				return conflict()
			}
			total, err := c.selectDevices(ctx, tx, camp, spec.Selector)
			if err != nil {
				return err
			}
			camp.Total = total
			first := StageTargets(camp.Stages, total, 0)
			if _, err := tx.Exec(ctx, `UPDATE campaign_devices SET stage = 0 WHERE campaign_id = $1 AND position < $2`, id, first); err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, `UPDATE campaigns SET state = 'running', total = $2, stage = 0, stage_done_at = NULL, updated_at = now() WHERE id = $1`, id, total); err != nil {
				return err
			}
			detail["devices"], detail["first_stage"] = total, first
		case "pause":
			if camp.State != StateRunning && camp.State != StateRollingBack {
				return conflict()
			}
			if _, err := tx.Exec(ctx, `UPDATE campaigns SET state = 'paused', updated_at = now() WHERE id = $1`, id); err != nil {
				return err
			}
		case "resume":
			if camp.State != StatePaused {
				return conflict()
			}
			next := "running"
			var rolling int
			tx.QueryRow(ctx, `SELECT count(*) FROM campaign_devices WHERE campaign_id = $1 AND rollback_state <> ''`, id).Scan(&rolling)
			if rolling > 0 {
				next = "rolling_back"
			}
			if _, err := tx.Exec(ctx, `UPDATE campaigns SET state = $2, updated_at = now() WHERE id = $1`, id, next); err != nil {
				return err
			}
		case "abort":
			if camp.State != StateRunning && camp.State != StatePaused && camp.State != StateRollingBack {
				return conflict()
			}
			if _, err := tx.Exec(ctx, `UPDATE campaigns SET state = 'aborted', updated_at = now() WHERE id = $1`, id); err != nil {
				return err
			}
		case "rollback":
			if camp.State == StateDraft || camp.State == StateRollingBack || camp.State == StateRolledBack {
				return conflict()
			}
			tag, err := tx.Exec(ctx, `UPDATE campaign_devices SET rollback_state = 'pending', dispatched_at = NULL, delivered_at = NULL,
				finished_at = NULL, error = '' WHERE campaign_id = $1 AND state = 'succeeded' AND from_version <> ''`, id)
			if err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, `UPDATE campaigns SET state = 'rolling_back', updated_at = now() WHERE id = $1`, id); err != nil {
				return err
			}
			detail["devices"] = tag.RowsAffected()
		default:
			return invalid("action", "unknown action %q (start, pause, resume, abort, rollback)", action)
		}
		// Whatever made the campaign dispatch again (start, resume, rollback)
		// starts its pacing schedule now: time spent paused or finished is
		// not owed as a burst.
		if _, err := tx.Exec(ctx, `UPDATE campaigns SET paced_until = $2 WHERE id = $1 AND state IN ('running', 'rolling_back')`, id, c.now()); err != nil {
			return err
		}
		return history(ctx, tx, id, actor, action, detail)
	})
	if err != nil {
		return CampaignView{}, err
	}
	c.logger.Info("campaign "+action, "campaign_id", id, "actor", actor)
	return c.Get(ctx, id)
}

// selectDevices records the campaign's devices in their deterministic
// order, with the version each one runs now (for rollback).
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
	if len(ids) == 0 {
		return 0, invalid("selector", "matches no device that needs firmware %s", camp.Version)
	}
	ordered := SelectDevices(camp.ID, ids)
	froms := make([]string, len(ordered))
	positions := make([]int32, len(ordered))
	for i, id := range ordered {
		froms[i], positions[i] = from[id], int32(i)
	}
	_, err = tx.Exec(ctx, `INSERT INTO campaign_devices (campaign_id, device_id, position, from_version)
		SELECT $1, d, p, f FROM unnest($2::text[], $3::int[], $4::text[]) AS x(d, p, f)`, camp.ID, ordered, positions, froms)
	return len(ordered), err
}

// Run steps every active campaign every interval until ctx ends, and
// handles device notes (job subscriptions, births) as they come.
func (c *Campaigns) Run(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-c.notes.wake:
			for _, n := range c.notes.take() {
				if ctx.Err() != nil {
					return
				}
				c.handleNote(ctx, n)
			}
		case <-t.C:
			if err := c.StepAll(ctx); err != nil && ctx.Err() == nil {
				c.logger.Warn("campaign step failed; retrying", "err", err)
			}
		}
	}
}

// StepAll steps every running or rolling-back campaign once.
func (c *Campaigns) StepAll(ctx context.Context) error {
	rows, err := c.pool.Query(ctx, `SELECT id FROM campaigns WHERE state IN ('running', 'rolling_back') ORDER BY created_at`)
	if err != nil {
		return err
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return err
	}
	for _, id := range ids {
		if err := c.step(ctx, id); err != nil {
			return fmt.Errorf("step campaign %s: %w", id, err)
		}
	}
	return nil
}

// pendingSend is a job committed as dispatched, to be sent after commit.
type pendingSend struct {
	deviceID string
	job      Job
}

// step claims a campaign (SKIP LOCKED: another replica stepping it is left
// alone), times out overdue devices, asks Next what to do and does it, all
// in one transaction; jobs are sent after the commit that records them.
func (c *Campaigns) step(ctx context.Context, id string) error {
	var sends []pendingSend
	err := pgx.BeginFunc(ctx, c.pool, func(tx pgx.Tx) error {
		camp, _, err := load(ctx, tx, id, "FOR UPDATE SKIP LOCKED")
		if errors.Is(err, ErrNotFound) {
			return nil // claimed by another replica this round
		}
		if err != nil {
			return err
		}
		if camp.State != StateRunning && camp.State != StateRollingBack {
			return nil
		}
		rolling := camp.State == StateRollingBack
		col := "state"
		if rolling {
			col = "rollback_state"
		}
		if _, err := tx.Exec(ctx, fmt.Sprintf(`UPDATE campaign_devices SET %[1]s = 'timed_out', finished_at = now(),
			error = 'did not come back on the new firmware within '||$2 WHERE campaign_id = $1 AND %[1]s = ANY($3) AND dispatched_at < now() - $4::interval`, col),
			id, time.Duration(camp.DeviceTimeout).String(), inFlight, fmt.Sprintf("%d milliseconds", time.Duration(camp.DeviceTimeout).Milliseconds())); err != nil {
			return err
		}
		stats, err := stageStats(ctx, tx, camp, rolling)
		if err != nil {
			return err
		}
		now := c.now()
		d := camp.Next(stats, now)
		switch d.Action {
		case ActionDispatch:
			if !d.PacedUntil.IsZero() {
				if _, err := tx.Exec(ctx, `UPDATE campaigns SET paced_until = $2 WHERE id = $1`, id, d.PacedUntil); err != nil {
					return err
				}
			}
			sends, err = c.dispatch(ctx, tx, camp, d.Dispatch, rolling)
			return err
		case ActionSoak:
			if _, err := tx.Exec(ctx, `UPDATE campaigns SET stage_done_at = $2, updated_at = now() WHERE id = $1`, id, now); err != nil {
				return err
			}
			return history(ctx, tx, id, "fleetd", "stage_finished", decisionDetail(camp, d, stats))
		case ActionAdvance:
			next := camp.Stage + 1
			n := StageTargets(camp.Stages, camp.Total, next)
			if _, err := tx.Exec(ctx, `UPDATE campaign_devices SET stage = $2 WHERE campaign_id = $1 AND device_id IN (
				SELECT device_id FROM campaign_devices WHERE campaign_id = $1 AND stage IS NULL ORDER BY position LIMIT $3)`, id, next, n); err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, `UPDATE campaigns SET stage = $2, stage_done_at = NULL, updated_at = now() WHERE id = $1`, id, next); err != nil {
				return err
			}
			return history(ctx, tx, id, "fleetd", "advance", decisionDetail(camp, d, stats))
		case ActionComplete, ActionPause, ActionAbort, ActionRolledBack:
			state := map[Action]CampaignState{ActionComplete: StateCompleted, ActionPause: StatePaused, ActionAbort: StateAborted, ActionRolledBack: StateRolledBack}[d.Action]
			if _, err := tx.Exec(ctx, `UPDATE campaigns SET state = $2, updated_at = now() WHERE id = $1`, id, string(state)); err != nil {
				return err
			}
			action := string(d.Action)
			if d.Gate != nil && d.Gate.Breached {
				action = "gate_breached"
			}
			c.logger.Info("campaign "+action, "campaign_id", id, "reason", d.Reason)
			return history(ctx, tx, id, "fleetd", action, decisionDetail(camp, d, stats))
		}
		return nil
	})
	if err != nil {
		return err
	}
	for _, s := range sends {
		c.deliver(ctx, s)
	}
	return nil
}

func decisionDetail(camp Campaign, d Decision, s StageStats) map[string]any {
	return map[string]any{"stage": camp.Stage, "reason": d.Reason, "gate": d.Gate, "stats": s}
}

// stageStats counts the current stage (or the rollback jobs).
func stageStats(ctx context.Context, tx pgx.Tx, camp Campaign, rolling bool) (StageStats, error) {
	var s StageStats
	col, where := "state", "stage = $2"
	if rolling {
		col, where = "rollback_state", "rollback_state <> '' AND $2::int >= 0"
	}
	err := tx.QueryRow(ctx, fmt.Sprintf(`SELECT count(*),
			count(*) FILTER (WHERE %[1]s = 'pending'),
			count(*) FILTER (WHERE %[1]s = ANY($3)),
			count(*) FILTER (WHERE %[1]s = 'succeeded'),
			count(*) FILTER (WHERE %[1]s = 'failed'),
			count(*) FILTER (WHERE %[1]s = 'timed_out')
		FROM campaign_devices WHERE campaign_id = $1 AND %[2]s`, col, where), camp.ID, camp.Stage, inFlight).
		Scan(&s.Targets, &s.Pending, &s.InFlight, &s.Succeeded, &s.Failed, &s.TimedOut)
	if err != nil {
		return s, err
	}
	s.NotBackOnline = s.TimedOut
	if rolling {
		return s, nil
	}
	// Connectivity: disconnects per device-hour of the devices this campaign
	// upgraded, since their upgrade, against the devices it has not touched.
	var upEvents int
	var upHours, fleetHours float64
	var fleetEvents int
	err = tx.QueryRow(ctx, `
		WITH up AS (SELECT device_id, finished_at FROM campaign_devices WHERE campaign_id = $1 AND state = 'succeeded'),
		     since AS (SELECT min(finished_at) AS t FROM up)
		SELECT
			(SELECT count(*) FROM device_events e JOIN up ON e.device_id = up.device_id WHERE e.kind = 'disconnect' AND e.at > up.finished_at),
			coalesce((SELECT sum(extract(epoch FROM now() - finished_at)) / 3600 FROM up), 0),
			(SELECT count(*) FROM device_events e, since WHERE e.kind = 'disconnect' AND e.at > since.t
				AND e.device_id NOT IN (SELECT device_id FROM campaign_devices WHERE campaign_id = $1)),
			coalesce((SELECT count(*) FROM devices WHERE state = 'active' AND id NOT IN (SELECT device_id FROM campaign_devices WHERE campaign_id = $1))
				* (SELECT extract(epoch FROM now() - t) / 3600 FROM since), 0)`, camp.ID).
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

// dispatch marks n pending devices of the stage dispatched and prepares
// their jobs; the commit that records them comes before any send.
func (c *Campaigns) dispatch(ctx context.Context, tx pgx.Tx, camp Campaign, n int, rolling bool) ([]pendingSend, error) {
	var rows pgx.Rows
	var err error
	if rolling {
		rows, err = tx.Query(ctx, `UPDATE campaign_devices SET rollback_state = 'dispatched', dispatched_at = now(), delivered_at = NULL
			WHERE campaign_id = $1 AND device_id IN (SELECT device_id FROM campaign_devices WHERE campaign_id = $1 AND rollback_state = 'pending'
				ORDER BY position LIMIT $2) RETURNING device_id, from_version`, camp.ID, n)
	} else {
		rows, err = tx.Query(ctx, `UPDATE campaign_devices SET state = 'dispatched', dispatched_at = now(), delivered_at = NULL
			WHERE campaign_id = $1 AND device_id IN (SELECT device_id FROM campaign_devices WHERE campaign_id = $1 AND stage = $2 AND state = 'pending'
				ORDER BY position LIMIT $3) RETURNING device_id, from_version`, camp.ID, camp.Stage, n)
	}
	if err != nil {
		return nil, err
	}
	type picked struct{ id, from string }
	var ps []picked
	for rows.Next() {
		var p picked
		if err := rows.Scan(&p.id, &p.from); err != nil {
			rows.Close()
			return nil, err
		}
		ps = append(ps, p)
	}
	rows.Close()
	var out []pendingSend
	arts := artifactCache{}
	for _, p := range ps {
		job, err := c.job(ctx, tx, camp, p.id, p.from, rolling, arts)
		if err != nil {
			// No artifact to roll back to: the job fails at once, with the reason.
			if _, uerr := tx.Exec(ctx, `UPDATE campaign_devices SET rollback_state = 'failed', finished_at = now(), error = $3
				WHERE campaign_id = $1 AND device_id = $2`, camp.ID, p.id, err.Error()); uerr != nil {
				return nil, uerr
			}
			continue
		}
		out = append(out, pendingSend{deviceID: p.id, job: job})
	}
	return out, nil
}

// artifactCache holds the artifacts of one dispatch batch, so that a batch
// of a thousand jobs for one image costs one lookup, not a thousand.
type artifactCache map[string]Artifact

// job builds a device's job: the target artifact, or for a rollback the
// artifact of the version the device ran before.
func (c *Campaigns) job(ctx context.Context, tx pgx.Tx, camp Campaign, deviceID, from string, rolling bool, arts artifactCache) (Job, error) {
	jobID := camp.ID + ":" + deviceID
	key := camp.FirmwareID
	var model string
	if rolling {
		if err := tx.QueryRow(ctx, `SELECT model FROM devices WHERE id = $1`, deviceID).Scan(&model); err != nil {
			return Job{}, err
		}
		key = model + "\x00" + from
		jobID += ":rollback"
	}
	art, ok := arts[key]
	if !ok {
		var err error
		if rolling {
			art, err = c.artifacts.ForModel(ctx, model, from)
		} else {
			art, err = c.artifacts.Get(ctx, camp.FirmwareID)
		}
		if err != nil {
			return Job{}, err
		}
		arts[key] = art
	}
	exp := c.now().Add(time.Duration(camp.DeviceTimeout) + time.Hour)
	return Job{JobID: jobID, CampaignID: camp.ID, Version: art.Version, SHA256: art.SHA256, Size: art.Size, Signature: art.Signature,
		URL: c.publicURL + "/api/v1/firmware/" + art.ID + "/download?" + c.artifacts.SignURL(art.ID, deviceID, exp)}, nil
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
	if _, err := c.pool.Exec(ctx, `UPDATE campaign_devices SET delivered_at = now() WHERE campaign_id = $1 AND device_id = $2`, s.job.CampaignID, s.deviceID); err != nil {
		c.logger.Warn("cannot record delivery", "device_id", s.deviceID, "err", err)
	}
}

// DeviceListening notes that a device subscribed to its job topic: jobs
// dispatched while it was away are delivered now. It never blocks the
// caller (a broker hook).
func (c *Campaigns) DeviceListening(deviceID string) {
	c.note(deviceNote{deviceID: deviceID, listening: true})
}

// DeviceBirth notes a device's birth: a device back on the target version
// has succeeded; one back on its old version after rebooting has failed.
func (c *Campaigns) DeviceBirth(deviceID, firmware string) {
	c.note(deviceNote{deviceID: deviceID, firmware: firmware})
}

func (c *Campaigns) note(n deviceNote) { c.notes.add(n) }

func (c *Campaigns) handleNote(ctx context.Context, n deviceNote) {
	if n.listening {
		// A job counts as received once the device reports on it. Until then
		// it goes out again on every subscription: handing it to the broker
		// is not delivery (a crash can lose it from the outbound queue), and
		// devices ignore a job id they already have.
		rows, err := c.pool.Query(ctx, `SELECT cd.campaign_id, cd.from_version, cd.rollback_state = 'dispatched'
			FROM campaign_devices cd JOIN campaigns c ON c.id = cd.campaign_id
			WHERE cd.device_id = $1 AND c.state IN ('running', 'rolling_back', 'paused')
				AND (cd.state = 'dispatched' OR cd.rollback_state = 'dispatched')`, n.deviceID)
		if err != nil {
			c.logger.Warn("cannot look up undelivered jobs", "device_id", n.deviceID, "err", err)
			return
		}
		type undelivered struct {
			campaign, from string
			rolling        bool
		}
		var us []undelivered
		for rows.Next() {
			var u undelivered
			if rows.Scan(&u.campaign, &u.from, &u.rolling) == nil {
				us = append(us, u)
			}
		}
		rows.Close()
		for _, u := range us {
			err := pgx.BeginFunc(ctx, c.pool, func(tx pgx.Tx) error {
				camp, _, err := load(ctx, tx, u.campaign, "")
				if err != nil {
					return err
				}
				job, err := c.job(ctx, tx, camp, n.deviceID, u.from, u.rolling, artifactCache{})
				if err != nil {
					return err
				}
				c.deliver(ctx, pendingSend{deviceID: n.deviceID, job: job})
				return nil
			})
			if err != nil {
				c.logger.Warn("cannot deliver job", "device_id", n.deviceID, "err", err)
			}
		}
		return
	}
	// A birth: success is the target version; a device that rebooted and came
	// back on another one has failed (it rolled itself back).
	if _, err := c.pool.Exec(ctx, `
		UPDATE campaign_devices cd SET
			state = CASE WHEN $2 = c.version THEN 'succeeded' ELSE 'failed' END,
			error = CASE WHEN $2 = c.version THEN '' ELSE 'came back on '||$2||', not '||c.version END,
			progress = 100, finished_at = now()
		FROM campaigns c WHERE c.id = cd.campaign_id AND cd.device_id = $1
			AND (($2 = c.version AND cd.state = ANY($3)) OR ($2 <> c.version AND cd.state = 'rebooting'))`,
		n.deviceID, n.firmware, inFlight); err != nil {
		c.logger.Warn("cannot record OTA outcome", "device_id", n.deviceID, "err", err)
	}
	if _, err := c.pool.Exec(ctx, `
		UPDATE campaign_devices SET rollback_state = 'succeeded', finished_at = now()
		WHERE device_id = $1 AND from_version = $2 AND rollback_state = ANY($3)`, n.deviceID, n.firmware, inFlight); err != nil {
		c.logger.Warn("cannot record rollback outcome", "device_id", n.deviceID, "err", err)
	}
}

// status is the payload of devices/{id}/ota/status.
type status struct {
	JobID    string `json:"job_id"`
	State    string `json:"state"`
	Progress int    `json:"progress"`
	Error    string `json:"error"`
}

// maxReportedError bounds the failure reason a device reports.
const maxReportedError = 500

// HandleStatus stores an OTA status report before the broker acknowledges
// it (an error leaves it unacknowledged, and the device sends it again).
// Reports never move a job back from a final state.
func (c *Campaigns) HandleStatus(deviceID string, payload []byte) error {
	var st status
	if err := json.Unmarshal(payload, &st); err != nil || st.JobID == "" {
		c.logger.Warn("malformed OTA status", "device_id", deviceID, "payload", untrusted.Excerpt(payload, 200))
		return nil // acknowledged: resending would not make it readable
	}
	parts := strings.Split(st.JobID, ":")
	if len(parts) < 2 || parts[1] != deviceID {
		c.logger.Warn("OTA status for another device's job", "device_id", deviceID, "job_id", untrusted.Excerpt(st.JobID, 100))
		return nil
	}
	col := "state"
	if len(parts) == 3 && parts[2] == "rollback" {
		col = "rollback_state"
	}
	var newState, errText string
	switch st.State {
	case "downloading", "verifying", "installing", "rebooting":
		newState = st.State
	case "failed":
		// Stored and shown to operators: bounded, printable text.
		newState, errText = "failed", untrusted.Text(st.Error, maxReportedError)
		if errText == "" {
			errText = "the device reported a failure without a reason"
		}
	case "succeeded":
		return nil // success is the device's birth on the target version
	default:
		c.logger.Warn("unknown OTA state", "device_id", deviceID, "state", untrusted.Excerpt(st.State, 32))
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	finished := "NULL"
	if newState == "failed" {
		finished = "now()"
	}
	_, err := c.pool.Exec(ctx, fmt.Sprintf(`UPDATE campaign_devices SET %[1]s = $3, progress = $4, error = $5, finished_at = %[2]s
		WHERE campaign_id = $1 AND device_id = $2 AND %[1]s = ANY($6)`, col, finished),
		parts[0], deviceID, newState, min(max(st.Progress, 0), 100), errText, inFlight)
	if err != nil {
		return fmt.Errorf("store OTA status of %s: %w", deviceID, err)
	}
	if newState == "failed" {
		c.logger.Info("OTA job failed", "device_id", deviceID, "job_id", st.JobID, "error", errText)
	}
	return nil
}

func contains(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}
