package command

import (
	"errors"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func TestBulkDecide(t *testing.T) {
	now := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	running := func(c Counts, p Pacing, paced time.Time) Bulk {
		return Bulk{State: BulkRunning, Counts: c, Pacing: p, PacedUntil: paced}
	}
	tests := []struct {
		name string
		bulk Bulk
		want BulkDecision
	}{
		{"cancelled does nothing", Bulk{State: BulkCancelled, Counts: Counts{Pending: 5}, Pacing: Pacing{MaxConcurrent: 10}},
			BulkDecision{Reason: "bulk is cancelled"}},
		{"completed does nothing", Bulk{State: BulkCompleted, Pacing: Pacing{MaxConcurrent: 10}}, BulkDecision{Reason: "bulk is completed"}},
		{"first batch up to max_concurrent", running(Counts{Pending: 800}, Pacing{MaxConcurrent: 50}, time.Time{}),
			BulkDecision{Send: 50, Reason: "sending 50 of 800 pending (pacing: 0 in flight of max_concurrent 50)"}},
		{"fewer pending than slots", running(Counts{Pending: 3}, Pacing{MaxConcurrent: 50}, time.Time{}),
			BulkDecision{Send: 3, Reason: "sending 3 of 3 pending"}},
		{"slots freed by finished ones", running(Counts{Pending: 700, Queued: 10, Delivered: 30, Succeeded: 60}, Pacing{MaxConcurrent: 50}, time.Time{}),
			BulkDecision{Send: 10, Reason: "sending 10 of 700 pending (pacing: 40 in flight of max_concurrent 50)"}},
		{"full", running(Counts{Pending: 700, Queued: 20, Delivered: 30}, Pacing{MaxConcurrent: 50}, time.Time{}),
			BulkDecision{Reason: "pacing: 50 in flight of max_concurrent 50"}},
		{"queued for offline devices hold their slots", running(Counts{Pending: 1, Queued: 50}, Pacing{MaxConcurrent: 50}, time.Time{}),
			BulkDecision{Reason: "pacing: 50 in flight of max_concurrent 50"}},
		{"rate: first one due now", running(Counts{Pending: 100}, Pacing{MaxConcurrent: 50, DevicesPerMinute: 60}, time.Time{}),
			BulkDecision{Send: 1, PacedUntil: now.Add(time.Second), Reason: "sending 1 of 100 pending (pacing: devices_per_minute 60, 1 due now)"}},
		{"rate: not due yet", running(Counts{Pending: 100, Delivered: 1}, Pacing{MaxConcurrent: 50, DevicesPerMinute: 60}, now.Add(500*time.Millisecond)),
			BulkDecision{Reason: "pacing: devices_per_minute 60, 0 due now"}},
		{"rate: late step catches up", running(Counts{Pending: 100}, Pacing{MaxConcurrent: 50, DevicesPerMinute: 60}, now.Add(-2500*time.Millisecond)),
			BulkDecision{Send: 3, PacedUntil: now.Add(500 * time.Millisecond), Reason: "sending 3 of 100 pending (pacing: devices_per_minute 60, 3 due now)"}},
		{"rate: a long lag is forgiven, not a burst", running(Counts{Pending: 100}, Pacing{MaxConcurrent: 50, DevicesPerMinute: 60}, now.Add(-time.Hour)),
			BulkDecision{Send: 6, PacedUntil: now.Add(time.Second), Reason: "sending 6 of 100 pending (pacing: devices_per_minute 60, 6 due now)"}},
		{"rate and max_concurrent: the tighter wins", running(Counts{Pending: 100, Delivered: 48}, Pacing{MaxConcurrent: 50, DevicesPerMinute: 6000}, now.Add(-time.Second)),
			BulkDecision{Send: 2, PacedUntil: now.Add(-time.Second + 20*time.Millisecond), Reason: "sending 2 of 100 pending (pacing: 48 in flight of max_concurrent 50)"}},
		{"all sent, waiting", running(Counts{Delivered: 2, Succeeded: 5}, Pacing{MaxConcurrent: 50}, time.Time{}),
			BulkDecision{Reason: "all sent; waiting for 2 in flight"}},
		{"complete", running(Counts{Succeeded: 5, Failed: 1, Expired: 1, Skipped: 1}, Pacing{MaxConcurrent: 50}, time.Time{}),
			BulkDecision{Complete: true, Reason: "every device's command finished"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if diff := cmp.Diff(tt.want, tt.bulk.Decide(now)); diff != "" {
				t.Errorf("mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

func TestBulkNormalize(t *testing.T) {
	ok := Request{Name: "reboot"}
	tests := []struct {
		name  string
		req   BulkRequest
		field string // "" = valid
	}{
		{"models", BulkRequest{Request: ok, Selector: Selector{Models: []string{"gw-100"}}}, ""},
		{"all", BulkRequest{Request: ok, Selector: Selector{All: true}}, ""},
		{"everything", BulkRequest{Request: ok, Selector: Selector{Models: []string{"gw-100"}, Version: ">=1.0.0, <2.0.0",
			Tags: []string{"site=lyon"}, Compat: "incompatible"}, Pacing: Pacing{MaxConcurrent: 10, DevicesPerMinute: 600}}, ""},
		{"bad command", BulkRequest{Request: Request{Name: "Reboot"}, Selector: Selector{All: true}}, "name"},
		{"empty selector", BulkRequest{Request: ok}, "selector"},
		{"all and more", BulkRequest{Request: ok, Selector: Selector{All: true, Models: []string{"gw-100"}}}, "selector.all"},
		{"bad version", BulkRequest{Request: ok, Selector: Selector{Version: "lots"}}, "selector.version"},
		{"bad compat", BulkRequest{Request: ok, Selector: Selector{Compat: "compatible"}}, "selector.compat"},
		{"empty model", BulkRequest{Request: ok, Selector: Selector{Models: []string{"gw-100", ""}}}, "selector.models[1]"},
		{"tag with space", BulkRequest{Request: ok, Selector: Selector{Tags: []string{"site lyon"}}}, "selector.tags[0]"},
		{"negative concurrency", BulkRequest{Request: ok, Selector: Selector{All: true}, Pacing: Pacing{MaxConcurrent: -1}}, "pacing.max_concurrent"},
		{"huge concurrency", BulkRequest{Request: ok, Selector: Selector{All: true}, Pacing: Pacing{MaxConcurrent: MaxMaxConcurrent + 1}}, "pacing.max_concurrent"},
		{"negative rate", BulkRequest{Request: ok, Selector: Selector{All: true}, Pacing: Pacing{DevicesPerMinute: -5}}, "pacing.devices_per_minute"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := tt.req.Normalize(Limits{})
			var ve *ValidationError
			switch {
			case tt.field == "" && err != nil:
				t.Fatalf("unexpected error %v", err)
			case tt.field == "":
				if got.Pacing.MaxConcurrent <= 0 || got.Timeout == 0 || string(got.Params) != "{}" && tt.req.Params == nil {
					t.Fatalf("defaults not filled in: %+v", got)
				}
			case !errors.As(err, &ve):
				t.Fatalf("error %v, want a *ValidationError for %s", err, tt.field)
			case ve.Field != tt.field:
				t.Fatalf("error names %s (%v), want %s", ve.Field, err, tt.field)
			}
		})
	}
}
