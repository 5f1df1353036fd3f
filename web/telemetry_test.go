package web

import (
	"bytes"
	"context"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/pgtest"
	"github.com/fleetd/fleetd/telemetry"
	"github.com/fleetd/fleetd/web/client"
)

// TestTelemetryAPI serves a real telemetry store: points written by the
// writer come back raw and rolled up, the fleet view groups them, and every
// bad parameter is a 400 naming it.
func TestTelemetryAPI(t *testing.T) {
	pool := pgtest.New(t)
	h, _ := fleet.NewHasher(bytes.Repeat([]byte("k"), 32))
	svc := fleet.NewService(fleet.NewStore(pool), h, nil)
	store := telemetry.NewStore(pool)
	s := New(Options{AdminToken: token})
	s.MountDevices(svc)
	s.MountTelemetry(store)
	srv := httptest.NewServer(s)
	t.Cleanup(srv.Close)
	api := client.New(srv.URL, token)
	ctx := context.Background()

	for _, id := range []string{"gw-1", "gw-2"} {
		if _, _, err := svc.Register(ctx, fleet.NewDevice{ID: id, Model: "gw-100"}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := pool.Exec(ctx, `UPDATE devices SET online = true`); err != nil {
		t.Fatal(err)
	}
	if _, err := (&telemetry.Retention{}).Apply(ctx, store); err != nil {
		t.Fatal(err)
	}
	w := telemetry.NewWriter(store, telemetry.WriterOptions{FlushInterval: 10 * time.Millisecond})
	now := time.Now().UTC().Truncate(time.Minute)
	for i, v := range []float64{-70, -60, -50} {
		w.Enqueue(telemetry.Entry{DeviceID: "gw-1", At: now.Add(-10*time.Minute + time.Duration(i)*time.Second),
			Message: telemetry.Message{Metrics: []telemetry.Metric{{Name: "rssi_dbm", Value: v}}, Link: telemetry.Link{Channel: 6}}})
	}
	w.Enqueue(telemetry.Entry{DeviceID: "gw-2", At: now.Add(-5 * time.Minute),
		Message: telemetry.Message{Metrics: []telemetry.Metric{{Name: "rssi_dbm", Value: -80}}, Link: telemetry.Link{Channel: 11}}})
	if err := w.Close(ctx); err != nil {
		t.Fatal(err)
	}

	raw, err := api.Telemetry(ctx, "gw-1", client.TelemetryQuery{Metric: "rssi_dbm"})
	if err != nil {
		t.Fatal(err)
	}
	if len(raw.Points) != 3 || raw.Points[2].Value != -50 || raw.Points[0].Rollup != nil || raw.Step != "" {
		t.Errorf("raw series %+v", raw)
	}
	minutes, err := api.Telemetry(ctx, "gw-1", client.TelemetryQuery{Metric: "rssi_dbm", Step: "1m", From: now.Add(-time.Hour), To: now})
	if err != nil {
		t.Fatal(err)
	}
	if len(minutes.Points) != 1 || minutes.Points[0].Rollup == nil || minutes.Points[0].Count != 3 || minutes.Points[0].Value != -60 || minutes.Points[0].Last != -50 {
		t.Errorf("minute series %+v", minutes.Points)
	}
	empty, err := api.Telemetry(ctx, "gw-2", client.TelemetryQuery{Metric: "uptime_s"})
	if err != nil || empty.Points == nil || len(empty.Points) != 0 {
		t.Errorf("a metric without points: %+v, %v; want an empty list", empty, err)
	}

	// The fleet view reads the latest values, which the rollup job copies.
	if _, err := (&telemetry.RollupJob{}).Apply(ctx, store); err != nil {
		t.Fatal(err)
	}
	sum, err := api.FleetTelemetry(ctx, "rssi_dbm", "channel")
	if err != nil {
		t.Fatal(err)
	}
	if sum.Devices != 2 || len(sum.Groups) != 2 || sum.Groups[0].Key != "11" && sum.Groups[0].Key != "6" {
		t.Errorf("fleet telemetry by channel %+v", sum)
	}

	for _, tc := range []struct {
		name, path string
		status     int
		field      string
	}{
		{"no metric", "/api/v1/devices/gw-1/telemetry", 400, "metric"},
		{"bad metric", "/api/v1/devices/gw-1/telemetry?metric=RSSI", 400, "metric"},
		{"bad from", "/api/v1/devices/gw-1/telemetry?metric=rssi_dbm&from=yesterday", 400, "from"},
		{"bad to", "/api/v1/devices/gw-1/telemetry?metric=rssi_dbm&to=1700000000", 400, "to"},
		{"reversed", "/api/v1/devices/gw-1/telemetry?metric=rssi_dbm&from=2025-01-02T00:00:00Z&to=2025-01-01T00:00:00Z", 400, "from"},
		{"bad step", "/api/v1/devices/gw-1/telemetry?metric=rssi_dbm&step=10s", 400, "step"},
		{"too many buckets", "/api/v1/devices/gw-1/telemetry?metric=rssi_dbm&step=1m&from=2025-01-01T00:00:00Z&to=2025-02-01T00:00:00Z", 400, "from"},
		{"unknown device", "/api/v1/devices/nobody/telemetry?metric=rssi_dbm", 404, ""},
		{"fleet without metric", "/api/v1/fleet/telemetry?group_by=model", 400, "metric"},
		{"fleet bad grouping", "/api/v1/fleet/telemetry?metric=rssi_dbm&group_by=ssid", 400, "group_by"},
	} {
		rec, body := do(t, s, http.MethodGet, tc.path, map[string]string{"Authorization": "Bearer " + token})
		e, _ := body["error"].(map[string]any)
		if rec.Code != tc.status || (tc.field != "" && e["field"] != tc.field) {
			t.Errorf("%s: %d %v; want %d naming %q", tc.name, rec.Code, body, tc.status, tc.field)
		}
	}
}
