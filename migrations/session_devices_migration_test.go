package migrations_test

import (
	"context"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// Migration 00018 counts the open sessions of a database written before it
// into session_devices: on the row of a device that also ended sessions on
// that firmware, and on a new row (last_end -infinity) otherwise.
func TestSessionDevicesMigrationCountsOpenSessions(t *testing.T) {
	ctx := context.Background()
	pool, p := migratedTo(t, 17)
	if _, err := pool.Exec(ctx, `
		INSERT INTO sessions_open (device_id, session_epoch, started_at, model, firmware) VALUES
			('a', 1, now(), 'gw-100', '1.0.0'), ('a', 2, now(), 'gw-100', '1.0.0'), ('b', 1, now(), 'gw-100', '2.0.0');
		INSERT INTO session_devices (model, firmware, device_id, last_end) VALUES
			('gw-100', '1.0.0', 'a', now()), ('gw-100', '1.0.0', 'c', now())`); err != nil {
		t.Fatal(err)
	}
	if _, err := p.UpTo(ctx, 18); err != nil {
		t.Fatal(err)
	}
	rows, err := pool.Query(ctx, `SELECT device_id || ' ' || firmware, open_sessions, last_end = '-infinity' FROM session_devices ORDER BY 1`)
	if err != nil {
		t.Fatal(err)
	}
	type row struct {
		Open  int
		Never bool // no session ended: last_end -infinity
	}
	got := map[string]row{}
	for rows.Next() {
		var k string
		var r row
		if err := rows.Scan(&k, &r.Open, &r.Never); err != nil {
			t.Fatal(err)
		}
		got[k] = r
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	want := map[string]row{"a 1.0.0": {Open: 2}, "b 2.0.0": {Open: 1, Never: true}, "c 1.0.0": {}}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("session_devices after 00018 (-want +got):\n%s", diff)
	}
}
