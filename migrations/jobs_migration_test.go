package migrations_test

import (
	"context"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// Migration 00007 moves the forward and rollback jobs kept side by side in
// campaign_devices into one ota_jobs row per attempt, each with its own id.
func TestJobsMigrationMovesRows(t *testing.T) {
	ctx := context.Background()
	pool, p := migratedTo(t, 6)
	for _, q := range []string{
		`INSERT INTO firmware (id, version, models, sha256, size, signature, signed_by) VALUES ('fw_1', '2.0.0', '{gw-100}', 'x', 1, 's', 'server')`,
		`INSERT INTO campaigns (id, name, firmware_id, version, spec, state) VALUES ('camp_1', 'c', 'fw_1', '2.0.0', '{}', 'rolling_back')`,
		`INSERT INTO campaign_devices (campaign_id, device_id, position, stage, from_version, state, progress, error, rollback_state) VALUES
			('camp_1', 'gw:1', 0, 0, '1.0.0', 'failed', 30, 'checksum mismatch', ''),
			('camp_1', 'gw:2', 1, 0, '1.0.0', 'succeeded', 60, '', 'downloading'),
			('camp_1', 'gw:3', 2, NULL, '1.0.0', 'pending', 0, '', '')`,
	} {
		if _, err := pool.Exec(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := p.Up(ctx); err != nil {
		t.Fatal(err)
	}
	rows, err := pool.Query(ctx, `SELECT device_id, kind, state, progress, error, id LIKE 'job\_%' FROM ota_jobs ORDER BY device_id, kind`)
	if err != nil {
		t.Fatal(err)
	}
	type job struct {
		Device, Kind, State string
		Progress            int
		Error               string
		HasID               bool
	}
	var got []job
	for rows.Next() {
		var j job
		if err := rows.Scan(&j.Device, &j.Kind, &j.State, &j.Progress, &j.Error, &j.HasID); err != nil {
			t.Fatal(err)
		}
		got = append(got, j)
	}
	want := []job{
		{"gw:1", "forward", "failed", 30, "checksum mismatch", true},
		{"gw:2", "forward", "succeeded", 100, "", true},
		{"gw:2", "rollback", "downloading", 60, "", true},
		{"gw:3", "forward", "pending", 0, "", true},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Fatalf("ota_jobs mismatch (-want +got):\n%s", diff)
	}
}
