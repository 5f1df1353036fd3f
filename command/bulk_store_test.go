package command_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/fleetd/fleetd/command"
)

// newBulkEnv registers devices: gw-100 on 1.x (bulk targets), gw-100 on
// 2.1.0 and ap-7 on 1.0.0 (neither matches the test's selector).
func newBulkEnv(t *testing.T, opts command.BulkOptions) (*env, *command.Bulks) {
	t.Helper()
	e := newEnv(t, command.Options{Limits: command.Limits{MaxPending: 2}})
	ctx := context.Background()
	for i := range 6 {
		e.b.Register(t, fmt.Sprintf("a%02d", i), "gw-100")
	}
	e.b.Register(t, "b00", "gw-100")
	e.b.Register(t, "c00", "ap-7")
	if _, err := e.b.Pool.Exec(ctx, `UPDATE devices SET firmware = CASE WHEN id = 'b00' THEN '2.1.0' ELSE '1.4.0' END`); err != nil {
		t.Fatal(err)
	}
	return e, command.NewBulks(e.svc, e.b.Service, opts)
}

func countTargets(t *testing.T, bulks *command.Bulks, id string) map[string]int {
	t.Helper()
	ts, _, err := bulks.Devices(context.Background(), id, "", -1, 200)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]int{}
	for _, x := range ts {
		got[x.State]++
	}
	return got
}

func countsMap(c command.Counts) map[string]int {
	m := map[string]int{}
	for k, v := range map[string]int{"pending": c.Pending, "queued": c.Queued, "delivered": c.Delivered, "succeeded": c.Succeeded,
		"failed": c.Failed, "timed_out": c.TimedOut, "expired": c.Expired, "skipped": c.Skipped, "cancelled": c.Cancelled} {
		if v > 0 {
			m[k] = v
		}
	}
	return m
}

// TestBulkStore walks a bulk through pacing, answers, a skipped device, a
// cancel and pruning, checking after each that the summary counters (kept
// by the database's triggers) are what the per-device results say.
func TestBulkStore(t *testing.T) {
	e, bulks := newBulkEnv(t, command.BulkOptions{})
	ctx := context.Background()
	store := command.NewStore(e.b.Pool)
	check := func(step string, id string, want map[string]int) command.Bulk {
		t.Helper()
		b, err := bulks.Get(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(want, countsMap(b.Counts)); diff != "" {
			t.Fatalf("%s: summary mismatch (-want +got):\n%s", step, diff)
		}
		if diff := cmp.Diff(want, countTargets(t, bulks, id)); diff != "" {
			t.Fatalf("%s: per-device results mismatch (-want +got):\n%s", step, diff)
		}
		if b.Counts.Sum() != b.Total {
			t.Fatalf("%s: counts add up to %d, total %d", step, b.Counts.Sum(), b.Total)
		}
		return b
	}

	b, err := bulks.Create(ctx, command.BulkRequest{Request: command.Request{Name: "ping"},
		Selector: command.Selector{Models: []string{"gw-100"}, Version: "<2.0.0"}, Pacing: command.Pacing{MaxConcurrent: 2}})
	if err != nil {
		t.Fatal(err)
	}
	if b.Total != 6 || b.State != command.BulkRunning {
		t.Fatalf("created %+v, want 6 devices running", b)
	}
	check("created", b.ID, map[string]int{"pending": 6})

	bulks.Step(ctx) // nobody listens: two queued
	check("first step", b.ID, map[string]int{"pending": 4, "queued": 2})
	bulks.Step(ctx) // max_concurrent holds
	check("held", b.ID, map[string]int{"pending": 4, "queued": 2})

	ts, _, _ := bulks.Devices(ctx, b.ID, "queued", -1, 10)
	if len(ts) != 2 || ts[0].DeviceID != "a00" || ts[1].DeviceID != "a01" {
		t.Fatalf("queued targets %+v, want a00 and a01 (id order)", ts)
	}
	now := e.clk.Now()
	if _, ok, err := store.Settle(ctx, "a00", command.Response{ID: ts[0].CommandID, Status: command.StateSucceeded}, now); !ok || err != nil {
		t.Fatal(ok, err)
	}
	if _, ok, err := store.MarkDelivered(ctx, ts[1].CommandID, now); !ok || err != nil {
		t.Fatal(ok, err)
	}
	if _, ok, err := store.Settle(ctx, "a01", command.Response{ID: ts[1].CommandID, Status: command.StateFailed}, now); !ok || err != nil {
		t.Fatal(ok, err)
	}
	// a02 is decommissioned, a03 has as many pending commands as it may.
	if _, err := e.b.Pool.Exec(ctx, `UPDATE devices SET state = 'decommissioned' WHERE id = 'a02'`); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if _, err := e.svc.Create(ctx, "a03", command.Request{Name: "reboot"}); err != nil {
			t.Fatal(err)
		}
	}
	bulks.Step(ctx) // a02 and a03 skipped (a batch's budget covers the targets it looked at)
	check("skips", b.ID, map[string]int{"succeeded": 1, "failed": 1, "skipped": 2, "pending": 2})
	bulks.Step(ctx) // a04 and a05 queued
	check("second step", b.ID, map[string]int{"succeeded": 1, "failed": 1, "skipped": 2, "queued": 2})
	skipped, _, _ := bulks.Devices(ctx, b.ID, "skipped", -1, 10)
	if len(skipped) != 2 || skipped[0].Skipped != "device decommissioned" || skipped[1].Skipped != "device had 2 pending commands (at most 2)" {
		t.Fatalf("skipped %+v", skipped)
	}

	// The sweep expires one; cancel expires the other queued one.
	if _, err := e.b.Pool.Exec(ctx, `UPDATE commands SET expires_at = $1 WHERE bulk_id = $2 AND device_id = 'a04'`, now.Add(-time.Second), b.ID); err != nil {
		t.Fatal(err)
	}
	e.svc.Sweep(ctx)
	check("sweep", b.ID, map[string]int{"succeeded": 1, "failed": 1, "skipped": 2, "queued": 1, "expired": 1})
	c, err := bulks.Cancel(ctx, b.ID)
	if err != nil {
		t.Fatal(err)
	}
	if c.State != command.BulkCancelled || c.FinishedAt == nil {
		t.Fatalf("cancelled %+v", c)
	}
	check("cancelled", b.ID, map[string]int{"succeeded": 1, "failed": 1, "skipped": 2, "expired": 2})
	if _, err := bulks.Cancel(ctx, b.ID); !errors.Is(err, command.ErrFinished) {
		t.Fatalf("second cancel: %v, want ErrFinished", err)
	}
	if _, err := bulks.Cancel(ctx, "bulk_nope"); !errors.Is(err, command.ErrNotFound) {
		t.Fatalf("cancel unknown: %v, want ErrNotFound", err)
	}

	// Pruning the commands leaves the summary as it was.
	e.clk.Add(2 * time.Hour)
	if _, err := store.Prune(ctx, e.clk.Now(), time.Hour, 100); err != nil {
		t.Fatal(err)
	}
	if got, err := bulks.Get(ctx, b.ID); err == nil {
		t.Fatalf("bulk finished 2 h ago survived a 1 h retention: %+v", got)
	}

	// A second bulk whose commands are pruned before it is.
	b2, err := bulks.Create(ctx, command.BulkRequest{Request: command.Request{Name: "ping"}, Selector: command.Selector{Models: []string{"ap-7"}}})
	if err != nil {
		t.Fatal(err)
	}
	bulks.Step(ctx)
	ts, _, _ = bulks.Devices(ctx, b2.ID, "", -1, 10)
	if _, ok, err := store.Settle(ctx, "c00", command.Response{ID: ts[0].CommandID, Status: command.StateSucceeded}, e.clk.Now()); !ok || err != nil {
		t.Fatal(ok, err)
	}
	bulks.Step(ctx)
	if got, _ := bulks.Get(ctx, b2.ID); got.State != command.BulkCompleted {
		t.Fatalf("bulk with every command answered is %s", got.State)
	}
	if _, err := store.Prune(ctx, e.clk.Now(), time.Hour, 0); err != nil { // keep 0 per device: every finished command goes
		t.Fatal(err)
	}
	got, err := bulks.Get(ctx, b2.ID)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(map[string]int{"succeeded": 1}, countsMap(got.Counts)); diff != "" {
		t.Fatalf("summary after pruning its commands (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff(map[string]int{"pruned": 1}, countTargets(t, bulks, b2.ID)); diff != "" {
		t.Fatalf("per-device results after pruning (-want +got):\n%s", diff)
	}
}

// TestBulkLimits: the selection is bounded, and so are the running bulks.
func TestBulkLimits(t *testing.T) {
	e, bulks := newBulkEnv(t, command.BulkOptions{MaxDevices: 5, MaxRunning: 1})
	_ = e
	ctx := context.Background()
	field := func(err error) string {
		var ve *command.ValidationError
		if errors.As(err, &ve) {
			return ve.Field
		}
		return fmt.Sprint(err)
	}
	if _, err := bulks.Create(ctx, command.BulkRequest{Request: command.Request{Name: "ping"}, Selector: command.Selector{Models: []string{"gw-100"}}}); field(err) != "selector" {
		t.Fatalf("7 devices past a cap of 5: %v", err)
	}
	if _, err := bulks.Create(ctx, command.BulkRequest{Request: command.Request{Name: "ping"}, Selector: command.Selector{Models: []string{"nope"}}}); field(err) != "selector" {
		t.Fatalf("no device: %v", err)
	}
	if _, err := bulks.Create(ctx, command.BulkRequest{Request: command.Request{Name: "ping"}, Selector: command.Selector{Tags: []string{"x=y"}, Models: []string{"ap-7"}}}); field(err) != "selector" {
		t.Fatalf("no device with the tag: %v", err)
	}
	if _, err := bulks.Create(ctx, command.BulkRequest{Request: command.Request{Name: "ping"}, Selector: command.Selector{Models: []string{"ap-7"}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := bulks.Create(ctx, command.BulkRequest{Request: command.Request{Name: "ping"}, Selector: command.Selector{Models: []string{"ap-7"}}}); !errors.Is(err, command.ErrTooManyBulks) {
		t.Fatalf("second running bulk past a cap of 1: %v", err)
	}
}

// TestBulkReplicasStepTogether plays three replicas stepping the same bulks
// at once on one database: each target gets one command, never more than
// max_concurrent are in flight, and the summary adds up.
func TestBulkReplicasStepTogether(t *testing.T) {
	e, first := newBulkEnv(t, command.BulkOptions{})
	ctx := context.Background()
	for i := range 40 {
		e.b.Register(t, fmt.Sprintf("z%02d", i), "gw-100")
	}
	replicas := []*command.Bulks{first}
	for range 2 {
		svc := command.NewService(command.NewStore(e.b.Pool), e.b.Broker, e.b.Recorder, command.Options{Now: e.clk.Now})
		replicas = append(replicas, command.NewBulks(svc, e.b.Service, command.BulkOptions{}))
	}
	var ids []string
	for _, sel := range []command.Selector{{Models: []string{"gw-100"}}, {All: true}} {
		b, err := first.Create(ctx, command.BulkRequest{Request: command.Request{Name: "ping"}, Selector: sel, Pacing: command.Pacing{MaxConcurrent: 7}})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, b.ID)
	}
	store := command.NewStore(e.b.Pool)
	for round := 0; ; round++ {
		var wg sync.WaitGroup
		for _, r := range replicas {
			wg.Add(1)
			go func() { defer wg.Done(); r.Step(ctx) }()
		}
		wg.Wait()
		done := 0
		for _, id := range ids {
			b, err := first.Get(ctx, id)
			if err != nil {
				t.Fatal(err)
			}
			if b.Counts.InFlight() > 7 {
				t.Fatalf("round %d: %d in flight, max_concurrent 7", round, b.Counts.InFlight())
			}
			if b.Counts.Sum() != b.Total {
				t.Fatalf("round %d: counts %+v add up to %d, total %d", round, b.Counts, b.Counts.Sum(), b.Total)
			}
			if b.State == command.BulkCompleted {
				done++
			}
			// Answer every queued one (the devices are not connected).
			ts, _, err := first.Devices(ctx, id, "queued", -1, 200)
			if err != nil {
				t.Fatal(err)
			}
			for _, x := range ts {
				if _, ok, err := store.Settle(ctx, x.DeviceID, command.Response{ID: x.CommandID, Status: command.StateSucceeded}, e.clk.Now()); !ok || err != nil {
					t.Fatal(ok, err)
				}
			}
		}
		if done == len(ids) {
			break
		}
		if round > 100 {
			t.Fatal("bulks did not complete")
		}
	}
	var dup int
	if err := e.b.Pool.QueryRow(ctx, `SELECT count(*) FROM (SELECT bulk_id, device_id FROM commands WHERE bulk_id IS NOT NULL
		GROUP BY 1, 2 HAVING count(*) > 1) x`).Scan(&dup); err != nil || dup != 0 {
		t.Fatalf("%d devices got a bulk's command twice (%v)", dup, err)
	}
	for _, id := range ids {
		b, _ := first.Get(ctx, id)
		if b.Counts.Succeeded != b.Total {
			t.Fatalf("%s: %+v of %d", id, b.Counts, b.Total)
		}
	}
}

// TestBulkRate: devices_per_minute spaces the commands on the clock.
func TestBulkRate(t *testing.T) {
	e, bulks := newBulkEnv(t, command.BulkOptions{})
	ctx := context.Background()
	b, err := bulks.Create(ctx, command.BulkRequest{Request: command.Request{Name: "ping"}, Selector: command.Selector{Models: []string{"gw-100"}},
		Pacing: command.Pacing{MaxConcurrent: 100, DevicesPerMinute: 120}})
	if err != nil {
		t.Fatal(err)
	}
	sent := func() int {
		got, err := bulks.Get(ctx, b.ID)
		if err != nil {
			t.Fatal(err)
		}
		return got.Total - got.Counts.Pending
	}
	for _, step := range []struct {
		advance time.Duration
		want    int
	}{{0, 1}, {0, 1}, {400 * time.Millisecond, 1}, {100 * time.Millisecond, 2}, {time.Second, 4}, {10 * time.Second, 7}} {
		e.clk.Add(step.advance)
		bulks.Step(ctx)
		if got := sent(); got != step.want {
			t.Fatalf("after %s more: %d sent, want %d", step.advance, got, step.want)
		}
	}
}

// TestBulkDeviceDeleted: a pending command deleted with its device's row
// counts as expired, so that its bulk still completes.
func TestBulkDeviceDeleted(t *testing.T) {
	e, bulks := newBulkEnv(t, command.BulkOptions{})
	ctx := context.Background()
	b, err := bulks.Create(ctx, command.BulkRequest{Request: command.Request{Name: "ping"}, Selector: command.Selector{Models: []string{"ap-7"}}})
	if err != nil {
		t.Fatal(err)
	}
	bulks.Step(ctx)
	if _, err := e.b.Pool.Exec(ctx, `DELETE FROM devices WHERE id = 'c00'`); err != nil {
		t.Fatal(err)
	}
	bulks.Step(ctx)
	got, err := bulks.Get(ctx, b.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got.State != command.BulkCompleted || got.Counts != (command.Counts{Expired: 1}) {
		t.Fatalf("bulk after its device was deleted: %s %+v", got.State, got.Counts)
	}
}
