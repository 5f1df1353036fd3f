package notify

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/fleetd/fleetd/internal/pgtest"
)

func notificationsOf(t *testing.T, pool *pgxpool.Pool, types ...Type) []string {
	t.Helper()
	rows, err := pool.Query(context.Background(), `SELECT type, payload->>'model', coalesce(payload->>'devices', ''), coalesce(payload->>'offline', ''),
		coalesce(payload->>'sample', '')
		FROM notifications WHERE type = ANY($1) ORDER BY id`, typeStrings(types))
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var typ, model, devices, offline, sample string
		if err := rows.Scan(&typ, &model, &devices, &offline, &sample); err != nil {
			t.Fatal(err)
		}
		out = append(out, strings.TrimSpace(fmt.Sprintf("%s %s devices=%s offline=%s %s", typ, model, devices, offline, sample)))
	}
	return out
}

func TestOfflineWatch(t *testing.T) {
	pool := pgtest.New(t)
	ctx := context.Background()
	exec := func(q string, args ...any) {
		t.Helper()
		if _, err := pool.Exec(ctx, q, args...); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	// gw-100: 10 devices online; sensor: 4 devices online.
	exec(`INSERT INTO devices (id, model, online, connected_at) SELECT 'gw-' || i, 'gw-100', true, now() FROM generate_series(1, 10) i`)
	exec(`INSERT INTO devices (id, model, online, connected_at) SELECT 's-' || i, 'sensor', true, now() FROM generate_series(1, 4) i`)
	w := NewOfflineWatch(pool, OfflineOptions{After: time.Second, ModelShare: 0.3, MinModelDevices: 5})
	if err := w.Round(ctx); err != nil { // starts the watermark
		t.Fatal(err)
	}
	// Three gateways and three sensors go offline; a decommissioned device too.
	exec(`UPDATE devices SET online = false, disconnected_at = now() WHERE id IN ('gw-1', 'gw-2', 'gw-3', 's-1', 's-2', 's-3')`)
	exec(`INSERT INTO devices (id, model, state, online, disconnected_at) VALUES ('old', 'gw-100', 'decommissioned', false, now())`)
	if err := w.Round(ctx); err != nil {
		t.Fatal(err)
	}
	if got := notificationsOf(t, pool, DevicesOffline, ModelOffline); len(got) != 0 {
		t.Fatalf("told before the threshold: %v", got)
	}
	time.Sleep(1100 * time.Millisecond)
	if err := w.Round(ctx); err != nil {
		t.Fatal(err)
	}
	if err := w.Round(ctx); err != nil { // nothing is told twice
		t.Fatal(err)
	}
	want := []string{
		`devices.offline gw-100 devices=3 offline= ["gw-1", "gw-2", "gw-3"]`,
		`devices.offline sensor devices=3 offline= ["s-1", "s-2", "s-3"]`,
		// 3 of 10 gateways is the 0.3 share; 3 of 4 sensors is below the
		// minimum of 5 devices.
		`model.offline gw-100 devices=10 offline=3`,
	}
	if got := notificationsOf(t, pool, DevicesOffline, ModelOffline); strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("notifications:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	// One gateway comes back: 2 of 10 is below the share.
	exec(`UPDATE devices SET online = true, connected_at = now() WHERE id = 'gw-1'`)
	if err := w.Round(ctx); err != nil {
		t.Fatal(err)
	}
	if got := notificationsOf(t, pool, ModelBackOnline); len(got) != 1 || got[0] != "model.back_online gw-100 devices=10 offline=2" {
		t.Fatalf("back online: %v", got)
	}
	// Another watch (another replica) picks up where the watermark is.
	exec(`UPDATE devices SET online = false, disconnected_at = now() WHERE id = 'gw-4'`)
	time.Sleep(1100 * time.Millisecond)
	if err := NewOfflineWatch(pool, OfflineOptions{After: time.Second}).Round(ctx); err != nil {
		t.Fatal(err)
	}
	if got := notificationsOf(t, pool, DevicesOffline); len(got) != 3 || got[2] != `devices.offline gw-100 devices=1 offline= ["gw-4"]` {
		t.Fatalf("after another replica's round: %v", got)
	}
}
