package firmware

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
)

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
			c.handleNotes(ctx)
		case <-t.C:
			if err := c.StepAll(ctx); err != nil && ctx.Err() == nil {
				c.logger.Warn("campaign step failed; retrying", "err", err)
			}
		}
	}
}

// StepAll steps every running, rolling-back or awaiting campaign once (an
// awaiting campaign's gates are still watched).
func (c *Campaigns) StepAll(ctx context.Context) error {
	rows, err := c.pool.Query(ctx, `SELECT id FROM campaigns WHERE state IN ('running', 'rolling_back', 'awaiting_approval') ORDER BY created_at`)
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
// alone), times out overdue jobs, asks Next what to do and does it, all in
// one transaction; jobs are sent after the commit that records them.
func (c *Campaigns) step(ctx context.Context, id string) error {
	var sends []pendingSend
	changed := false
	err := pgx.BeginFunc(ctx, c.pool, func(tx pgx.Tx) error {
		camp, spec, err := load(ctx, tx, id, "FOR UPDATE SKIP LOCKED")
		if errors.Is(err, ErrNotFound) {
			return nil // claimed by another replica this round
		}
		if err != nil {
			return err
		}
		if camp.State != StateRunning && camp.State != StateRollingBack && camp.State != StateAwaitingApproval {
			return nil
		}
		kind := kindForward
		if camp.State == StateRollingBack {
			kind = kindRollback
		}
		now := c.now()
		timeout := time.Duration(camp.DeviceTimeout)
		tag, err := tx.Exec(ctx, `UPDATE ota_jobs SET state = 'timed_out', finished_at = $3,
				error = 'did not come back on the new firmware within '||$4
			WHERE campaign_id = $1 AND kind = $2 AND state = ANY($5) AND dispatched_at < $6`,
			id, kind, now, timeout.String(), inFlight, now.Add(-timeout))
		if err != nil {
			return err
		}
		changed = tag.RowsAffected() > 0
		if camp.FollowDue(now, c.followEvery) {
			n, err := c.follow(ctx, tx, camp, spec.Selector, now)
			if err != nil {
				return fmt.Errorf("follow the fleet: %w", err)
			}
			changed = changed || n > 0
		}
		stats, err := stageStats(ctx, tx, camp, kind, now)
		if err != nil {
			return err
		}
		d := camp.Next(stats, now)
		switch d.Action {
		case ActionDispatch:
			var picked int
			sends, picked, err = c.dispatch(ctx, tx, camp, kind, d.Dispatch, d.Zones, now)
			if err != nil {
				return err
			}
			changed = changed || len(sends) > 0
			if !d.PacedUntil.IsZero() {
				// Jobs held for their delta were not sent: the schedule
				// moves on only by the jobs that were.
				paced := d.PacedUntil.Add(-time.Duration(d.Dispatch-picked) * (time.Minute / time.Duration(camp.Pacing.DevicesPerMinute)))
				if _, err := tx.Exec(ctx, `UPDATE campaigns SET paced_until = $2 WHERE id = $1`, id, paced); err != nil {
					return err
				}
			}
			return nil
		case ActionFollow:
			changed = true
			if _, err := tx.Exec(ctx, `UPDATE campaigns SET following_since = $2, updated_at = $2 WHERE id = $1`, id, now); err != nil {
				return err
			}
			c.logger.Info("campaign following the fleet", "campaign_id", id, "reason", d.Reason)
			return history(ctx, tx, id, "fleetd", "following", decisionDetail(camp, d, stats), now)
		case ActionAwaitApproval:
			changed = true
			if _, err := tx.Exec(ctx, `UPDATE campaigns SET state = $2, updated_at = $3 WHERE id = $1`, id, string(StateAwaitingApproval), now); err != nil {
				return err
			}
			c.logger.Info("campaign awaiting approval", "campaign_id", id, "stage", camp.Stage)
			return history(ctx, tx, id, "fleetd", "awaiting_approval", decisionDetail(camp, d, stats), now)
		case ActionSoak:
			changed = true
			if _, err := tx.Exec(ctx, `UPDATE campaigns SET stage_done_at = $2, updated_at = $2 WHERE id = $1`, id, now); err != nil {
				return err
			}
			return history(ctx, tx, id, "fleetd", "stage_finished", decisionDetail(camp, d, stats), now)
		case ActionAdvance:
			changed = true
			next := camp.Stage + 1
			n := StageTargets(camp.Stages, camp.Total, next)
			if _, err := tx.Exec(ctx, `UPDATE campaign_devices SET stage = $2 WHERE campaign_id = $1 AND device_id IN (
				SELECT device_id FROM campaign_devices WHERE campaign_id = $1 AND stage IS NULL ORDER BY position LIMIT $3)`, id, next, n); err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, `UPDATE campaigns SET stage = $2, stage_done_at = NULL, updated_at = $3 WHERE id = $1`, id, next, now); err != nil {
				return err
			}
			return history(ctx, tx, id, "fleetd", "advance", decisionDetail(camp, d, stats), now)
		case ActionComplete, ActionPause, ActionAbort, ActionRolledBack:
			changed = true
			state := map[Action]CampaignState{ActionComplete: StateCompleted, ActionPause: StatePaused, ActionAbort: StateAborted, ActionRolledBack: StateRolledBack}[d.Action]
			if _, err := tx.Exec(ctx, `UPDATE campaigns SET state = $2, updated_at = $3 WHERE id = $1`, id, string(state), now); err != nil {
				return err
			}
			action := string(d.Action)
			if d.Gate != nil && d.Gate.Breached {
				action = "gate_breached"
			}
			c.logger.Info("campaign "+action, "campaign_id", id, "reason", d.Reason)
			return history(ctx, tx, id, "fleetd", action, decisionDetail(camp, d, stats), now)
		}
		return nil
	})
	if err != nil {
		return err
	}
	if changed {
		c.onChange(id)
	}
	for _, s := range sends {
		c.deliver(ctx, s)
	}
	return nil
}

func decisionDetail(camp Campaign, d Decision, s StageStats) map[string]any {
	return map[string]any{"stage": camp.Stage, "reason": d.Reason, "gate": d.Gate, "stats": s}
}

// dispatch marks n pending jobs of kind in the current stage dispatched and
// prepares them; the commit that records them comes before any send. zones,
// when not nil, are the timezone tag values (Decision.Zones) whose devices
// are inside an open window: only theirs go. In a delta campaign, a job
// whose device's delta is still being built waits (for at most the delta
// wait since the delta was asked for), and a job whose device's delta is
// ready records its base (offerDeltas).
//
// It returns the jobs to send and how many jobs it marked dispatched (a job
// that failed at once, with no image to send, counts as dispatched).
func (c *Campaigns) dispatch(ctx context.Context, tx pgx.Tx, camp Campaign, kind string, n int, zones []string, now time.Time) ([]pendingSend, int, error) {
	target := ""
	deltas := camp.Delta && kind == kindForward
	if deltas {
		art, err := c.artifacts.Get(ctx, camp.FirmwareID)
		if err != nil {
			return nil, 0, err
		}
		target = art.SHA256
	}
	// Without windows no device's tags are read ($9 = '' and $10 NULL make
	// the zone test true before it looks at any).
	zoned, tag := `true`, ""
	if zones != nil {
		zoned, tag = zoneTag("$9")+` = ANY($10)`, camp.TimezoneTag
	}
	rows, err := tx.Query(ctx, `UPDATE ota_jobs j SET state = 'dispatched', dispatched_at = $5, delivered_at = NULL
		FROM campaign_devices cd
		WHERE cd.campaign_id = j.campaign_id AND cd.device_id = j.device_id AND j.id IN (
			SELECT j2.id FROM ota_jobs j2 JOIN campaign_devices cd2 ON cd2.campaign_id = j2.campaign_id AND cd2.device_id = j2.device_id
			LEFT JOIN devices d ON d.id = j2.device_id
			WHERE j2.campaign_id = $1 AND j2.kind = $2 AND j2.state = 'pending' AND ($2 = 'rollback' OR cd2.stage = $3)
				AND NOT ($6 AND `+deltaWaiting+`)
				AND ($10::text[] IS NULL OR `+zoned+`) AND $9::text IS NOT NULL
			ORDER BY cd2.position LIMIT $4)
		RETURNING j.id, j.device_id, cd.from_version, cd.position`, camp.ID, kind, camp.Stage, n, now, deltas, target, now.Add(-c.deltaWait), tag, zones)
	if err != nil {
		return nil, 0, err
	}
	type picked struct {
		job, device, from string
		position          int
	}
	ps, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (picked, error) {
		var p picked
		err := r.Scan(&p.job, &p.device, &p.from, &p.position)
		return p, err
	})
	if err != nil {
		return nil, 0, err
	}
	slices.SortFunc(ps, func(a, b picked) int { return a.position - b.position }) // sent in selection order
	bases := map[string]string{}
	if deltas && len(ps) > 0 {
		ids := make([]string, len(ps))
		for i, p := range ps {
			ids[i] = p.job
		}
		if bases, err = offerDeltas(ctx, tx, ids, target); err != nil {
			return nil, 0, fmt.Errorf("offer deltas: %w", err)
		}
	}
	var out []pendingSend
	arts := newArtifactCache()
	for _, p := range ps {
		job, err := c.job(ctx, tx, camp, jobRef{id: p.job, deviceID: p.device, from: p.from, kind: kind, dispatched: now, deltaBase: bases[p.job]}, arts)
		if err != nil {
			// No artifact to roll back to: the job fails at once, with the reason.
			if _, uerr := tx.Exec(ctx, `UPDATE ota_jobs SET state = 'failed', finished_at = $2, error = $3 WHERE id = $1`,
				p.job, now, err.Error()); uerr != nil {
				return nil, 0, uerr
			}
			continue
		}
		out = append(out, pendingSend{deviceID: p.device, job: job})
	}
	return out, len(ps), nil
}
