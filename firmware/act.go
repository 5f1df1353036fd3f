package firmware

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"
)

// Act performs an operator's action: start, approve, pause, resume, abort,
// rollback. Which action each state allows is Transition's; an action that
// does not fit the campaign's state is ErrConflict. The history records the
// actor of each (for approve, with the stage approved).
func (c *Campaigns) Act(ctx context.Context, id, action, actor string) (CampaignView, error) {
	err := pgx.BeginFunc(ctx, c.pool, func(tx pgx.Tx) error {
		camp, spec, err := load(ctx, tx, id, "FOR UPDATE")
		if err != nil {
			return err
		}
		var rollbackStarted bool
		if action == ActResume {
			if err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM ota_jobs WHERE campaign_id = $1 AND kind = 'rollback')`, id).Scan(&rollbackStarted); err != nil {
				return err
			}
		}
		next, err := Transition(camp.State, action, rollbackStarted)
		if err != nil {
			return err
		}
		now := c.now()
		detail := map[string]any{"from": camp.State}
		switch action {
		case ActStart:
			total, err := c.selectDevices(ctx, tx, camp, spec.Selector)
			if err != nil {
				return err
			}
			first := StageTargets(camp.Stages, total, 0)
			if _, err := tx.Exec(ctx, `UPDATE campaign_devices SET stage = 0 WHERE campaign_id = $1 AND position < $2`, id, first); err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, `UPDATE campaigns SET total = $2, stage = 0, stage_done_at = NULL WHERE id = $1`, id, total); err != nil {
				return err
			}
			if camp.Follow {
				// The follower looks at the devices changed since the start
				// (less its margin, for transactions that were committing).
				if _, err := tx.Exec(ctx, `UPDATE campaigns SET follow_after = now() - $2::interval, follow_after_id = '' WHERE id = $1`,
					id, followMargin.String()); err != nil {
					return err
				}
			}
			detail["devices"], detail["first_stage"] = total, first
			if camp.Delta {
				art, err := c.artifacts.Get(ctx, camp.FirmwareID)
				if err != nil {
					return err
				}
				n, err := requestDeltas(ctx, tx, id, art.SHA256, now, nil)
				if err != nil {
					return fmt.Errorf("request deltas: %w", err)
				}
				detail["deltas_requested"] = n
			}
		case ActApprove:
			// Transition allowed it, so the campaign is awaiting_approval:
			// the previous stage soaked and passed its gates, and the
			// current one has dispatched nothing.
			if _, err := tx.Exec(ctx, `UPDATE campaigns SET approved = stage + 1 WHERE id = $1`, id); err != nil {
				return err
			}
			detail["stage"], detail["name"] = camp.Stage, camp.Stages[camp.Stage].Name
		case ActRollback:
			// Every device the campaign moved gets a rollback job to the
			// version it ran before.
			tag, err := tx.Exec(ctx, `INSERT INTO ota_jobs (id, campaign_id, device_id, kind)
				SELECT `+newJobID+`, j.campaign_id, j.device_id, 'rollback'
				FROM ota_jobs j JOIN campaign_devices cd ON cd.campaign_id = j.campaign_id AND cd.device_id = j.device_id
				WHERE j.campaign_id = $1 AND j.kind = 'forward' AND j.state = 'succeeded' AND j.attempt = cd.attempt AND cd.from_version <> ''`, id)
			if err != nil {
				return err
			}
			detail["devices"] = tag.RowsAffected()
		}
		// Whatever makes the campaign dispatch again (start, approve, resume,
		// rollback) starts its pacing schedule now: time spent paused,
		// waiting or finished is not owed as a burst.
		if _, err := tx.Exec(ctx, `UPDATE campaigns SET state = $2, updated_at = $3,
				paced_until = CASE WHEN $2 IN ('running', 'rolling_back') THEN $3 ELSE paced_until END
			WHERE id = $1`, id, string(next), now); err != nil {
			return err
		}
		return history(ctx, tx, id, actor, action, detail, now)
	})
	if err != nil {
		return CampaignView{}, err
	}
	if action == ActStart || action == ActRollback {
		// A start or rollback can add tens of thousands of rows at once. The
		// stepping queries are prepared once per connection; planned against
		// the statistics of the tables before the load they join the rows in
		// quadratic time (measured: a stage count running for minutes over
		// 95 000 jobs). Fresh statistics right after the load avoid it.
		if _, err := c.pool.Exec(ctx, `ANALYZE campaign_devices, ota_jobs`); err != nil {
			c.logger.Warn("cannot refresh the campaign tables' statistics", "campaign_id", id, "err", err)
		}
	}
	c.logger.Info("campaign "+action, "campaign_id", id, "actor", actor)
	c.onChange(id)
	return c.Get(ctx, id)
}
