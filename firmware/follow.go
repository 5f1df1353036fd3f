package firmware

import (
	"context"
	"fmt"
	"time"

	"github.com/Masterminds/semver/v3"
	"github.com/jackc/pgx/v5"
)

// DefaultFollowInterval is how often a following campaign looks for
// devices that start matching its selector, unless SetFollowInterval says
// otherwise.
const DefaultFollowInterval = 10 * time.Second

// followBatch bounds the devices one look reads (Campaigns.followBatch);
// a look that reads a full batch moves its place to the last one, and the
// next look reads on.
const followBatch = 1000

// followMargin is how far behind the database's clock a follower's place
// stays: a device's selection_changed_at is written before its transaction
// commits, so a look that moved past it at once could miss a change that
// was still committing. Devices changed within the margin are read again
// by the next look, which leaves the ones already handled alone.
const followMargin = time.Minute

// followQuery reads, in the order of devices.selection_changed_at, the
// devices changed after a follower's place ($2, $3) that match the
// campaign's models, tags and compat ($4-$6), with their current forward
// job in campaign $1 if they have one, at most $7 of them.
const followQuery = `SELECT d.id, d.firmware, d.selection_changed_at, cd.device_id IS NOT NULL, coalesce(j.state, ''), coalesce(cd.attempt, 0),
		j.settled_db_at
	FROM devices d
	LEFT JOIN campaign_devices cd ON cd.campaign_id = $1 AND cd.device_id = d.id
	LEFT JOIN ota_jobs j ON j.campaign_id = cd.campaign_id AND j.device_id = cd.device_id AND j.kind = 'forward' AND j.attempt = cd.attempt
	WHERE (d.selection_changed_at, d.id) > ($2::timestamptz, $3::text)
		AND d.state = 'active' AND d.firmware <> '' AND d.model = ANY($4) AND d.tags @> $5::text[] AND (NOT $6 OR d.incompatible)
	ORDER BY d.selection_changed_at, d.id LIMIT $7`

// SetFollowInterval sets how often a following campaign looks for devices
// that start matching its selector. Call before Run.
func (c *Campaigns) SetFollowInterval(d time.Duration) { c.followEvery = d }

// follower is one device a look read: a candidate to join.
type follower struct {
	id, firmware string
	changed      time.Time
	member       bool       // already a device of the campaign
	jobState     string     // the state of its current forward job, when a member
	attempt      int        // its current forward attempt, when a member
	settled      *time.Time // when the birth settled its current job (database clock)
}

// follow is one look of a following campaign, in the step's transaction
// (the campaign row is locked): it reads the devices whose selection
// columns changed since its place (devices.selection_changed_at, an index
// range, so a look costs what changed since the last one, not the fleet),
// and adds to the last stage each one that matches the selector as the
// start applied it and runs neither the target version nor a newer one:
//   - a device that is not in the campaign joins it, with a first forward job;
//   - a device whose current job succeeded and that runs another version
//     again (reflashed, or rolled back by hand) gets a new forward attempt
//     with its own job id;
//   - a device whose current job is open, failed or timed out is left as
//     it is: its outcome stays counted, a failure is not retried unasked.
//
// It returns how many devices joined.
func (c *Campaigns) follow(ctx context.Context, tx pgx.Tx, camp Campaign, sel Selector, now time.Time) (int, error) {
	art, err := c.artifacts.Get(ctx, camp.FirmwareID)
	if err != nil {
		return 0, err
	}
	models := sel.Models
	if len(models) == 0 {
		models = art.Models
	}
	tags := sel.Tags
	if tags == nil {
		tags = []string{}
	}
	var constraint *semver.Constraints
	if sel.Version != "" {
		if constraint, err = semver.NewConstraint(sel.Version); err != nil {
			return 0, fmt.Errorf("campaign %s selector.version: %w", camp.ID, err)
		}
	}
	target, _ := semver.NewVersion(camp.Version)

	// The place is set at the start; a campaign started before it existed
	// has none and starts from the margin before now.
	var after, dbNow time.Time
	var afterID string
	if err := tx.QueryRow(ctx, `SELECT coalesce(follow_after, now() - $2::interval), follow_after_id, now() FROM campaigns WHERE id = $1`,
		camp.ID, followMargin.String()).Scan(&after, &afterID, &dbNow); err != nil {
		return 0, err
	}
	rows, err := tx.Query(ctx, followQuery,
		camp.ID, after, afterID, models, tags, sel.Compat == "incompatible", c.followBatch)
	if err != nil {
		return 0, err
	}
	fs, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (follower, error) {
		var f follower
		err := r.Scan(&f.id, &f.firmware, &f.changed, &f.member, &f.jobState, &f.attempt, &f.settled)
		return f, err
	})
	if err != nil {
		return 0, err
	}

	last := len(camp.Stages) - 1
	var newIDs, newFroms, againIDs, againFroms []string
	var newPositions []int32
	for _, f := range fs {
		if !followMatches(f.firmware, camp.Version, target, constraint) {
			continue
		}
		switch {
		case !f.member:
			newIDs, newFroms = append(newIDs, f.id), append(newFroms, f.firmware)
			newPositions = append(newPositions, int32(camp.Total+camp.Joined+len(newIDs)-1))
		case f.jobState == "succeeded" && f.settled != nil && f.changed.After(*f.settled):
			// Only a change of the device's row after the birth that
			// settled its job is a reflash: the presence writer stores
			// that birth's version a moment after the job succeeded, and
			// until then the row still shows the old version, changed
			// before. Both times are the database's clock_timestamp().
			againIDs, againFroms = append(againIDs, f.id), append(againFroms, f.firmware)
		}
	}
	if len(newIDs) > 0 {
		if _, err := tx.Exec(ctx, `INSERT INTO campaign_devices (campaign_id, device_id, position, stage, from_version)
			SELECT $1, d, p, $5, f FROM unnest($2::text[], $3::int[], $4::text[]) AS x(d, p, f)`, camp.ID, newIDs, newPositions, newFroms, last); err != nil {
			return 0, err
		}
		if _, err := tx.Exec(ctx, `INSERT INTO ota_jobs (id, campaign_id, device_id, kind)
			SELECT `+newJobID+`, $1, d, 'forward' FROM unnest($2::text[]) AS x(d)`, camp.ID, newIDs); err != nil {
			return 0, err
		}
	}
	if len(againIDs) > 0 {
		// The new attempt is the one the last stage counts; the version the
		// device runs now is what a rollback sends it back to.
		if _, err := tx.Exec(ctx, `UPDATE campaign_devices cd SET attempt = cd.attempt + 1, stage = $4, from_version = x.f
			FROM unnest($2::text[], $3::text[]) AS x(d, f) WHERE cd.campaign_id = $1 AND cd.device_id = x.d`,
			camp.ID, againIDs, againFroms, last); err != nil {
			return 0, err
		}
		if _, err := tx.Exec(ctx, `INSERT INTO ota_jobs (id, campaign_id, device_id, kind, attempt)
			SELECT `+newJobID+`, cd.campaign_id, cd.device_id, 'forward', cd.attempt
			FROM campaign_devices cd WHERE cd.campaign_id = $1 AND cd.device_id = ANY($2)`, camp.ID, againIDs); err != nil {
			return 0, err
		}
	}

	// The place moves to the last device read when the batch was full (the
	// next look reads on from there), else to the database's clock less the
	// margin, never back.
	nextAt, nextID := after, afterID
	if len(fs) == c.followBatch {
		nextAt, nextID = fs[len(fs)-1].changed, fs[len(fs)-1].id
	} else if m := dbNow.Add(-followMargin); m.After(after) {
		nextAt, nextID = m, ""
	}
	joinedIDs := append(append([]string(nil), newIDs...), againIDs...)
	joined := len(joinedIDs)
	if camp.Delta && joined > 0 {
		// Joiners on a version whose image is stored get a delta too (a
		// pair already asked for keeps its row; dispatch holds them while
		// a new one is built, as at the start).
		if _, err := requestDeltas(ctx, tx, camp.ID, art.SHA256, now, joinedIDs); err != nil {
			return 0, err
		}
	}
	if _, err := tx.Exec(ctx, `UPDATE campaigns SET follow_after = $2, follow_after_id = $3, follow_looked_at = $4,
			joined = joined + $5, updated_at = CASE WHEN $5 > 0 THEN $4 ELSE updated_at END WHERE id = $1`,
		camp.ID, nextAt, nextID, now, joined); err != nil {
		return 0, err
	}
	if joined == 0 {
		return 0, nil
	}
	detail := map[string]any{"stage": last, "devices": joined, "new": len(newIDs), "again": len(againIDs),
		"device_ids": firstIDs(joinedIDs, 20)}
	return joined, history(ctx, tx, camp.ID, "fleetd", "joined", detail, now)
}

// followMatches reports whether a device running firmware is one a
// following campaign to version target upgrades: its version passes the
// selector's constraint (as at the start: a version that is not semver
// does not pass one), and it runs neither the target nor, when both are
// semver, a newer version.
func followMatches(firmware, version string, target *semver.Version, constraint *semver.Constraints) bool {
	if firmware == version {
		return false
	}
	v, err := semver.NewVersion(firmware)
	if constraint != nil && (err != nil || !constraint.Check(v)) {
		return false
	}
	if err == nil && target != nil && !v.LessThan(target) {
		return false
	}
	return true
}

// firstIDs returns at most n ids, for a history entry that stays small
// however many devices joined at once.
func firstIDs(ids []string, n int) []string {
	if len(ids) > n {
		return ids[:n]
	}
	return ids
}
