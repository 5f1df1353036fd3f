package web

import (
	"bytes"
	"context"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/pgtest"
	"github.com/fleetd/fleetd/web/client"
)

// TestFleetHistoryAPI records events through the recorder, as the broker
// does, and reads them back per minute and per hour; bad parameters are
// 400s naming the parameter.
func TestFleetHistoryAPI(t *testing.T) {
	ctx := context.Background()
	h, _ := fleet.NewHasher(bytes.Repeat([]byte("k"), 32))
	store := fleet.NewStore(pgtest.New(t))
	svc := fleet.NewService(store, h, nil)
	s := New(Options{AdminToken: token})
	s.MountDiagnosis(svc)
	srv := httptest.NewServer(s)
	defer srv.Close()
	api := client.New(srv.URL, token)

	t0 := time.Now().UTC().Truncate(time.Hour).Add(-2 * time.Hour)
	rec, err := fleet.NewRecorder(store, fleet.RecorderOptions{SpoolPath: filepath.Join(t.TempDir(), "events.jsonl"),
		Registerer: prometheus.NewRegistry(), Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	for i, e := range []struct {
		at     time.Duration
		kind   fleet.Kind
		reason fleet.Reason
	}{
		{0, fleet.KindConnect, ""},
		{30 * time.Second, fleet.KindDisconnect, fleet.ReasonKeepaliveTimeout},
		{61 * time.Second, fleet.KindRefused, fleet.ReasonAuthFailed},
		{61 * time.Minute, fleet.KindConnect, ""},
	} {
		at := t0.Add(e.at)
		rec.Record(fleet.Event{ID: fleet.NewEventID(at), DeviceID: "gw-1", At: at, Kind: e.kind, Reason: e.reason, SessionEpoch: int64(i/2 + 1)})
	}
	if err := rec.Close(ctx); err != nil {
		t.Fatal(err)
	}

	type bucket struct {
		At                   time.Time
		Connects             int64
		Disconnects, Refused map[fleet.Reason]int64
	}
	none := map[fleet.Reason]int64{}
	for _, tt := range []struct {
		step     string
		from, to time.Time
		want     []bucket
	}{
		{"1m", t0, t0.Add(150 * time.Second), []bucket{
			{t0, 1, map[fleet.Reason]int64{fleet.ReasonKeepaliveTimeout: 1}, none},
			{t0.Add(time.Minute), 0, none, map[fleet.Reason]int64{fleet.ReasonAuthFailed: 1}},
			{t0.Add(2 * time.Minute), 0, none, none},
		}},
		{"1h", t0.Add(time.Minute), t0.Add(2 * time.Hour), []bucket{
			{t0, 1, map[fleet.Reason]int64{fleet.ReasonKeepaliveTimeout: 1}, map[fleet.Reason]int64{fleet.ReasonAuthFailed: 1}},
			{t0.Add(time.Hour), 1, none, none},
		}},
	} {
		got, err := api.FleetHistory(ctx, tt.from, tt.to, tt.step)
		if err != nil {
			t.Fatalf("history by %s: %v", tt.step, err)
		}
		var buckets []bucket
		for _, b := range got.Buckets {
			buckets = append(buckets, bucket{b.At.UTC(), b.Connects, b.Disconnects, b.Refused})
		}
		if diff := cmp.Diff(tt.want, buckets); diff != "" {
			t.Errorf("history by %s mismatch (-want +got):\n%s", tt.step, diff)
		}
	}
	if got, err := api.FleetHistory(ctx, time.Time{}, time.Time{}, ""); err != nil || len(got.Buckets) != 60 || got.Step != "1m" {
		t.Errorf("default history: %d buckets of %q, %v; want the last 60 minutes", len(got.Buckets), got.Step, err)
	}

	_, err = api.FleetHistory(ctx, t0, t0.Add(time.Hour), "10m")
	wantAPIError(t, err, http.StatusBadRequest, "step")
	_, err = api.FleetHistory(ctx, t0, t0.Add(3*24*time.Hour), "1m")
	wantAPIError(t, err, http.StatusBadRequest, "step")
	_, err = api.FleetHistory(ctx, t0, t0.Add(-time.Minute), "1m")
	wantAPIError(t, err, http.StatusBadRequest, "to")
	for _, q := range []struct{ query, field string }{
		{"from=yesterday", "from"},
		{"to=2025-13-01T00:00:00Z", "to"},
	} {
		rec, body := do(t, s, http.MethodGet, "/api/v1/fleet/history?"+q.query, map[string]string{"Authorization": "Bearer " + token})
		e, _ := body["error"].(map[string]any)
		if rec.Code != http.StatusBadRequest || e["field"] != q.field {
			t.Errorf("?%s: %d %v, want 400 naming %s", q.query, rec.Code, body, q.field)
		}
	}
}
