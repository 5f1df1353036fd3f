package firmware

import (
	"context"
	"fmt"
	"math"
	"path/filepath"
	"testing"
	"time"

	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/pgtest"
)

// TestStageConnectivityFromRollups: the connectivity gate compares the
// disconnects per device-hour of the devices a campaign upgraded, since
// their upgrade, with the rest of the fleet's since the first upgrade, the
// latter read from the event rollups minus the campaign's own devices.
// Disconnects before the upgrade, and the campaign's devices', do not count
// for the fleet.
func TestStageConnectivityFromRollups(t *testing.T) {
	ctx := context.Background()
	pool := pgtest.New(t)
	store := fleet.NewStore(pool)
	h, err := fleet.NewHasher([]byte("0123456789abcdef0123456789abcdef"))
	if err != nil {
		t.Fatal(err)
	}
	svc := fleet.NewService(store, h, nil)
	ids := []string{"up-1", "up-2", "waiting-1"}
	for i := range 8 {
		ids = append(ids, fmt.Sprintf("other-%d", i))
	}
	for _, id := range ids {
		if _, _, err := svc.Register(ctx, fleet.NewDevice{ID: id, Model: "gw-100"}); err != nil {
			t.Fatal(err)
		}
	}
	now := time.Now().UTC()
	upgraded := now.Add(-2 * time.Hour)
	if _, err := pool.Exec(ctx, `
		INSERT INTO firmware (id, version, models, sha256, size, signature, signed_by) VALUES ('fw', '2.0.0', '{gw-100}', '', 0, '', '');
		INSERT INTO campaigns (id, name, firmware_id, version, spec, state) VALUES ('c1', 'c1', 'fw', '2.0.0', '{}', 'running');
		INSERT INTO campaign_devices (campaign_id, device_id, position, stage) VALUES ('c1', 'up-1', 0, 0), ('c1', 'up-2', 1, 0), ('c1', 'waiting-1', 2, 1);`); err != nil {
		t.Fatal(err)
	}
	if _, err := pool.Exec(ctx, `INSERT INTO ota_jobs (id, campaign_id, device_id, kind, state, finished_at)
		VALUES ('j1', 'c1', 'up-1', 'forward', 'succeeded', $1), ('j2', 'c1', 'up-2', 'forward', 'succeeded', $1)`, upgraded); err != nil {
		t.Fatal(err)
	}
	rec, err := fleet.NewRecorder(store, fleet.RecorderOptions{SpoolPath: filepath.Join(t.TempDir(), "spool.jsonl")})
	if err != nil {
		t.Fatal(err)
	}
	disconnect := func(id string, at time.Time) {
		rec.Record(fleet.Event{ID: fleet.NewEventID(at), DeviceID: id, At: at, Kind: fleet.KindDisconnect,
			Reason: fleet.ReasonConnectionLost, Model: "gw-100", SessionEpoch: at.UnixMicro()})
	}
	for i := range 4 { // 8 disconnects over 4 device-hours since the upgrade
		disconnect("up-1", upgraded.Add(time.Duration(i+1)*20*time.Minute))
		disconnect("up-2", upgraded.Add(time.Duration(i+1)*20*time.Minute))
	}
	disconnect("up-1", upgraded.Add(-time.Hour)) // before its upgrade
	for i := range 8 {                           // 8 over 16 device-hours
		disconnect(fmt.Sprintf("other-%d", i), upgraded.Add(time.Duration(i+1)*10*time.Minute))
	}
	disconnect("other-0", upgraded.Add(-3*time.Hour))  // before the campaign's first upgrade
	disconnect("waiting-1", upgraded.Add(time.Minute)) // the campaign's, not the fleet's
	if err := rec.Close(ctx); err != nil {
		t.Fatal(err)
	}
	s, err := stageStats(ctx, pool, Campaign{ID: "c1", Stage: 0}, kindForward, now)
	if err != nil {
		t.Fatal(err)
	}
	if math.Abs(s.UpgradedDeviceHours-4) > 0.01 || math.Abs(s.UpgradedDisconnectsPerHour-2) > 0.01 {
		t.Fatalf("upgraded: %.3f disconnects/h over %.3f h, want 2 over 4", s.UpgradedDisconnectsPerHour, s.UpgradedDeviceHours)
	}
	if math.Abs(s.FleetDisconnectsPerHour-0.5) > 0.01 {
		t.Fatalf("fleet: %.3f disconnects/h, want 8 over 16 device-hours = 0.5", s.FleetDisconnectsPerHour)
	}
}
