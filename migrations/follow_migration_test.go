package migrations_test

import (
	"context"
	"errors"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
)

// Migration 00021 gives existing devices a selection_changed_at no
// follower looks at, keeps it from then on for every change of a selected
// column (and only those), and lets a device have several forward attempts
// of one campaign but never two open jobs.
func TestFollowMigration(t *testing.T) {
	ctx := context.Background()
	pool, p := migratedTo(t, 18)
	for _, q := range []string{
		`INSERT INTO devices (id, model, firmware) VALUES ('gw:1', 'gw-100', '2.0.0'), ('gw:2', 'gw-100', '1.0.0')`,
		`INSERT INTO firmware (id, version, models, sha256, size, signature, signed_by) VALUES ('fw_1', '2.0.0', '{gw-100}', 'x', 1, 's', 'server')`,
		`INSERT INTO campaigns (id, name, firmware_id, version, spec, state) VALUES ('camp_1', 'c', 'fw_1', '2.0.0', '{}', 'rolling_back')`,
		`INSERT INTO campaign_devices (campaign_id, device_id, position, stage, from_version) VALUES ('camp_1', 'gw:1', 0, 0, '1.0.0'), ('camp_1', 'gw:2', 1, 0, '1.0.0')`,
		`INSERT INTO ota_jobs (id, campaign_id, device_id, kind, state) VALUES ('job_f1', 'camp_1', 'gw:1', 'forward', 'succeeded'),
			('job_r1', 'camp_1', 'gw:1', 'rollback', 'dispatched'), ('job_f2', 'camp_1', 'gw:2', 'forward', 'failed')`,
	} {
		if _, err := pool.Exec(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := p.Up(ctx); err != nil {
		t.Fatal(err)
	}
	var old, attempts int
	if err := pool.QueryRow(ctx, `SELECT count(*) FILTER (WHERE selection_changed_at = '-infinity'), (SELECT count(*) FROM ota_jobs WHERE attempt = 1) FROM devices`).Scan(&old, &attempts); err != nil {
		t.Fatal(err)
	}
	if old != 2 || attempts != 3 {
		t.Fatalf("%d devices at -infinity and %d jobs at attempt 1, want 2 and 3", old, attempts)
	}
	changed := func(id string) bool {
		t.Helper()
		var recent bool
		if err := pool.QueryRow(ctx, `SELECT selection_changed_at > now() - interval '1 minute' FROM devices WHERE id = $1`, id).Scan(&recent); err != nil {
			t.Fatal(err)
		}
		return recent
	}
	if _, err := pool.Exec(ctx, `UPDATE devices SET last_seen = now(), online = true, firmware = firmware WHERE id = 'gw:1'`); err != nil {
		t.Fatal(err)
	}
	if changed("gw:1") {
		t.Fatal("a presence update that changed no selected column moved selection_changed_at")
	}
	if _, err := pool.Exec(ctx, `UPDATE devices SET firmware = '1.0.0' WHERE id = 'gw:1'`); err != nil {
		t.Fatal(err)
	}
	if !changed("gw:1") || changed("gw:2") {
		t.Fatal("a firmware change did not move selection_changed_at of that device alone")
	}
	if _, err := pool.Exec(ctx, `INSERT INTO devices (id, model) VALUES ('gw:3', 'gw-100')`); err != nil {
		t.Fatal(err)
	}
	if !changed("gw:3") {
		t.Fatal("a new device has no selection_changed_at of its insert")
	}
	// gw:2's first attempt failed: a second may be opened; gw:1 has an open
	// rollback job: no other open job of the campaign.
	if _, err := pool.Exec(ctx, `INSERT INTO ota_jobs (id, campaign_id, device_id, kind, attempt) VALUES ('job_f2b', 'camp_1', 'gw:2', 'forward', 2)`); err != nil {
		t.Fatalf("a second attempt after a finished one: %v", err)
	}
	_, err := pool.Exec(ctx, `INSERT INTO ota_jobs (id, campaign_id, device_id, kind, attempt) VALUES ('job_f1b', 'camp_1', 'gw:1', 'forward', 2)`)
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.ConstraintName != "ota_jobs_open_idx" {
		t.Fatalf("a second open job for gw:1: %v, want refused by ota_jobs_open_idx", err)
	}
	_, err = pool.Exec(ctx, `INSERT INTO ota_jobs (id, campaign_id, device_id, kind, state, attempt) VALUES ('job_f2c', 'camp_1', 'gw:2', 'forward', 'failed', 2)`)
	if !errors.As(err, &pgErr) || pgErr.ConstraintName != "ota_jobs_attempt_key" {
		t.Fatalf("attempt 2 twice: %v, want refused by ota_jobs_attempt_key", err)
	}
}
