package firmware

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/fleetd/fleetd/fleet"
)

// register adds a device of model that reports firmware (through the
// devices row, as a birth writes it).
func (d *dispatcher) register(id, model, firmware string) {
	d.t.Helper()
	ctx := context.Background()
	if _, _, err := d.svc.Register(ctx, fleet.NewDevice{ID: id, Model: model}); err != nil {
		d.t.Fatal(err)
	}
	d.setFirmware(id, firmware)
}

func (d *dispatcher) setFirmware(id, firmware string) {
	d.t.Helper()
	if _, err := d.pool.Exec(context.Background(), `UPDATE devices SET firmware = $2 WHERE id = $1`, id, firmware); err != nil {
		d.t.Fatal(err)
	}
}

// upgrade plays a device's side of its current job: rebooting, then a birth
// on the target.
func (d *dispatcher) upgrade(campaign, id string) {
	d.t.Helper()
	d.report(id, d.device(campaign, id).JobID, "rebooting", 100, "")
	d.c.DeviceBirth(id, "2.0.0")
	d.c.handleNotes(context.Background())
	d.setFirmware(id, "2.0.0")
}

func (d *dispatcher) view(id string) CampaignView {
	d.t.Helper()
	v, err := d.c.Get(context.Background(), id)
	if err != nil {
		d.t.Fatal(err)
	}
	return v
}

func (d *dispatcher) members(campaign string) []string {
	d.t.Helper()
	devs, err := d.c.Devices(context.Background(), campaign)
	if err != nil {
		d.t.Fatal(err)
	}
	var ids []string
	for _, dev := range devs {
		ids = append(ids, dev.DeviceID)
	}
	slices.Sort(ids)
	return ids
}

func (d *dispatcher) sentTo(jobID string) bool {
	for _, j := range d.send.jobs() {
		if j.JobID == jobID {
			return true
		}
	}
	return false
}

func (d *dispatcher) historyActions(id string) []string {
	d.t.Helper()
	hist, err := d.c.History(context.Background(), id)
	if err != nil {
		d.t.Fatal(err)
	}
	var out []string
	for _, h := range hist {
		out = append(out, h.Action)
	}
	return out
}

var followSpec = Spec{Name: "follow", Follow: true, Stages: oneStage(Stage{MaxFailureRate: 1, MaxNotBackOnline: -1})}

// A device registered while a campaign follows the fleet is upgraded by
// it; one registered on the target version, one of a model the firmware is
// not built for and a decommissioned one are not touched. Once every
// device is done the campaign follows, running in its last stage, and
// still picks up devices registered later.
func TestFollowPicksUpRegisteredDevices(t *testing.T) {
	d := newDispatcher(t, "gw-1")
	d.c.SetFollowInterval(time.Second)
	v := d.start(followSpec)
	d.step(time.Second)
	d.register("gw-new", "gw-100", "1.0.0")
	d.register("gw-current", "gw-100", "2.0.0")
	d.register("gw-other", "gw-200", "1.0.0")
	d.register("gw-gone", "gw-100", "1.0.0")
	if _, err := d.svc.Decommission(context.Background(), "gw-gone"); err != nil {
		t.Fatal(err)
	}
	d.step(time.Second)
	if got, want := d.members(v.ID), []string{"gw-1", "gw-new"}; !slices.Equal(got, want) {
		t.Fatalf("campaign devices %v, want %v", got, want)
	}
	joiner := d.device(v.ID, "gw-new")
	if joiner.Stage == nil || *joiner.Stage != 0 || joiner.State != "dispatched" || !d.sentTo(joiner.JobID) || joiner.FromVersion != "1.0.0" {
		t.Fatalf("the joiner %+v: want its job dispatched and sent in the last stage, from 1.0.0", joiner)
	}
	view := d.view(v.ID)
	if view.Joined != 1 || view.Total != 1 || view.Counts[0].Targets != 2 || view.State != StateRunning {
		t.Fatalf("view after a join: joined %d total %d targets %d state %s; want 1, 1, 2, running", view.Joined, view.Total, view.Counts[0].Targets, view.State)
	}

	d.upgrade(v.ID, "gw-1")
	d.upgrade(v.ID, "gw-new")
	d.step(time.Second)
	view = d.view(v.ID)
	if view.State != StateRunning || view.FollowingSince == nil || !view.FollowingSince.Equal(d.now) {
		t.Fatalf("every device done: state %s following_since %v; want running, following since %s", view.State, view.FollowingSince, d.now)
	}
	if acts := d.historyActions(v.ID); !slices.Contains(acts, "joined") || acts[len(acts)-1] != "following" || slices.Contains(acts, "complete") {
		t.Fatalf("history %v: want joined, then following, never complete", acts)
	}

	d.register("gw-late", "gw-100", "1.0.0")
	d.step(time.Second)
	if late := d.device(v.ID, "gw-late"); late.State != "dispatched" || !d.sentTo(late.JobID) {
		t.Fatalf("a device registered after the stages passed: %+v, want its job sent", late)
	}
	if view = d.view(v.ID); view.Joined != 2 {
		t.Fatalf("joined %d, want 2", view.Joined)
	}
	for _, id := range []string{"gw-current", "gw-other", "gw-gone"} {
		var n int
		if err := d.pool.QueryRow(context.Background(), `SELECT count(*) FROM ota_jobs WHERE device_id = $1`, id).Scan(&n); err != nil || n != 0 {
			t.Errorf("%s has %d jobs (%v), want none", id, n, err)
		}
	}
}

// A device that comes back on an old version after the campaign upgraded
// it gets a new job: a new attempt row with its own stored id, the one the
// device view, the stage counts and its reports go to. A second open job of
// one campaign for one device is refused by the database.
func TestFollowReflashedDeviceGetsNewAttempt(t *testing.T) {
	d := newDispatcher(t, "gw-1", "gw-2")
	d.c.SetFollowInterval(time.Second)
	v := d.start(followSpec)
	d.step(time.Second)
	first := d.device(v.ID, "gw-1").JobID
	d.upgrade(v.ID, "gw-1")
	d.upgrade(v.ID, "gw-2")
	d.step(time.Second) // following now

	d.setFirmware("gw-1", "1.0.0") // reflashed by hand
	d.step(time.Second)
	dev := d.device(v.ID, "gw-1")
	if dev.JobID == first || dev.State != "dispatched" || !d.sentTo(dev.JobID) {
		t.Fatalf("reflashed device %+v: want a new job (not %s) dispatched and sent", dev, first)
	}
	var attempts []int
	rows, err := d.pool.Query(context.Background(), `SELECT attempt FROM ota_jobs WHERE campaign_id = $1 AND device_id = 'gw-1' AND kind = 'forward' ORDER BY attempt`, v.ID)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var a int
		if err := rows.Scan(&a); err != nil {
			t.Fatal(err)
		}
		attempts = append(attempts, a)
	}
	if rows.Err() != nil || !slices.Equal(attempts, []int{1, 2}) {
		t.Fatalf("forward attempts of gw-1 %v (%v), want [1 2]", attempts, rows.Err())
	}
	if view := d.view(v.ID); view.Joined != 1 || view.Counts[0].Targets != 2 || view.Counts[0].ByState["dispatched"] != 1 {
		t.Fatalf("view: joined %d, counts %+v; want 1 joined and the new attempt counted instead of the old", view.Joined, view.Counts[0])
	}
	// A report on the first job (an old device replaying it) moves nothing.
	d.report("gw-1", first, "failed", 0, "replayed")
	if got := d.device(v.ID, "gw-1"); got.State != "dispatched" {
		t.Fatalf("a report on the old attempt moved the new one: %+v", got)
	}
	// Looking again (the device is still within the margin) adds nothing.
	d.step(time.Second)
	d.step(time.Second)
	if n := len(d.send.jobs()); n != 3 {
		t.Fatalf("%d jobs sent, want 3 (two first jobs, one new attempt)", n)
	}
	_, err = d.pool.Exec(context.Background(), `INSERT INTO ota_jobs (id, campaign_id, device_id, kind, attempt) VALUES ('job_dup', $1, 'gw-1', 'forward', 3)`, v.ID)
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "23505" || pgErr.ConstraintName != "ota_jobs_open_idx" {
		t.Fatalf("a second open job for gw-1: %v, want a unique violation of ota_jobs_open_idx", err)
	}
	// The new attempt succeeds; a rollback then sends gw-1 back to the
	// version it was reflashed to.
	d.upgrade(v.ID, "gw-1")
	d.step(time.Second)
	if dev := d.device(v.ID, "gw-1"); dev.State != "succeeded" {
		t.Fatalf("the new attempt: %+v, want succeeded", dev)
	}
	if _, err := d.c.Act(context.Background(), v.ID, ActRollback, "test"); err != nil {
		t.Fatal(err)
	}
	d.step(time.Second)
	if dev := d.device(v.ID, "gw-1"); dev.RollbackJobID == "" || dev.RollbackState != "dispatched" {
		t.Fatalf("rollback of a device with two attempts: %+v, want one rollback job dispatched", dev)
	}
}

// Joiners are counted in the last stage's gates: joiners that fail move the
// failure rate over the limit and pause the campaign. A paused campaign
// picks nobody up; resumed, it reads on from where it left off, so a device
// registered while it was paused is not missed.
func TestFollowJoinersCountInGates(t *testing.T) {
	d := newDispatcher(t, "gw-1", "gw-2")
	d.c.SetFollowInterval(time.Second)
	spec := followSpec
	spec.Stages = oneStage(Stage{MaxFailureRate: 0.4, MaxNotBackOnline: -1})
	v := d.start(spec)
	d.step(time.Second)
	d.upgrade(v.ID, "gw-1")
	d.upgrade(v.ID, "gw-2")
	d.step(time.Second)

	d.register("gw-3", "gw-100", "1.0.0")
	d.step(time.Second)
	d.report("gw-3", d.device(v.ID, "gw-3").JobID, "failed", 0, "flash error")
	d.step(time.Second)
	if s := d.state(v.ID); s != StateRunning {
		t.Fatalf("1 of 3 failed against 40%%: campaign %s, want running", s)
	}
	d.register("gw-4", "gw-100", "1.0.0")
	d.step(time.Second)
	d.report("gw-4", d.device(v.ID, "gw-4").JobID, "failed", 0, "flash error")
	d.step(time.Second)
	if s := d.state(v.ID); s != StatePaused {
		t.Fatalf("2 of 4 failed against 40%%: campaign %s, want paused", s)
	}
	hist, _ := d.c.History(context.Background(), v.ID)
	last := hist[len(hist)-1]
	if last.Action != "gate_breached" || !jsonContains(last.Detail, "2 of 4 devices failed") {
		t.Fatalf("last history entry %s %s, want the failure_rate breach over 2 of 4", last.Action, last.Detail)
	}

	d.register("gw-5", "gw-100", "1.0.0")
	d.step(time.Second)
	d.step(time.Second)
	if slices.Contains(d.members(v.ID), "gw-5") {
		t.Fatal("a paused campaign picked up gw-5")
	}
	if _, err := d.c.Act(context.Background(), v.ID, ActResume, "test"); err != nil {
		t.Fatal(err)
	}
	d.step(time.Second)
	if dev := d.device(v.ID, "gw-5"); dev.State != "dispatched" {
		t.Fatalf("after resume: %+v, want gw-5 picked up and dispatched", dev)
	}
	// The failed joiners are not retried: their outcome stays counted.
	if dev := d.device(v.ID, "gw-3"); dev.State != "failed" {
		t.Fatalf("gw-3 after resume: %+v, want its failure kept", dev)
	}
}

// A campaign without follow never picks anyone up, before or after it
// completes.
func TestFollowOffNeverPicksUp(t *testing.T) {
	d := newDispatcher(t, "gw-1")
	d.c.SetFollowInterval(time.Second)
	v := d.start(Spec{Name: "fixed", Stages: oneStage(Stage{MaxFailureRate: 1, MaxNotBackOnline: -1})})
	d.step(time.Second)
	d.register("gw-new", "gw-100", "1.0.0")
	d.step(time.Second)
	d.upgrade(v.ID, "gw-1")
	d.step(time.Second)
	d.register("gw-later", "gw-100", "1.0.0")
	d.setFirmware("gw-1", "1.0.0")
	d.step(time.Second)
	view := d.view(v.ID)
	if got := d.members(v.ID); !slices.Equal(got, []string{"gw-1"}) || view.Joined != 0 || view.State != StateCompleted || view.Follow {
		t.Fatalf("campaign without follow: devices %v joined %d state %s; want only gw-1, none joined, completed", got, view.Joined, view.State)
	}
	if n := len(d.send.jobs()); n != 1 {
		t.Fatalf("%d jobs sent, want 1", n)
	}
}

// A look reads at most a batch of changed devices and reads on from the
// last one next time, so a burst of registrations joins over a few looks,
// every device once. A campaign that follows may start with no device.
func TestFollowReadsInBatches(t *testing.T) {
	d := newDispatcher(t)
	d.c.SetFollowInterval(time.Second)
	d.c.followBatch = 3
	v := d.start(followSpec)
	if v.Total != 0 || v.State != StateRunning {
		t.Fatalf("a following campaign over no device: total %d state %s, want 0, running", v.Total, v.State)
	}
	for i := range 8 {
		d.register(fmt.Sprintf("gw-%d", i), "gw-100", "1.0.0")
	}
	d.step(time.Second)
	if n := len(d.members(v.ID)); n != 3 {
		t.Fatalf("first look: %d joined, want a batch of 3", n)
	}
	for range 4 {
		d.step(time.Second)
	}
	if got := d.view(v.ID); got.Joined != 8 || len(d.members(v.ID)) != 8 || len(d.send.jobs()) != 8 {
		t.Fatalf("after five looks: joined %d, %d devices, %d jobs; want 8 each", got.Joined, len(d.members(v.ID)), len(d.send.jobs()))
	}
	// The interval holds: a step sooner than it does not look.
	d.register("gw-soon", "gw-100", "1.0.0")
	d.step(100 * time.Millisecond)
	if slices.Contains(d.members(v.ID), "gw-soon") {
		t.Fatal("a look came before the follow interval")
	}
	d.step(time.Second)
	if !slices.Contains(d.members(v.ID), "gw-soon") {
		t.Fatal("gw-soon not picked up once the interval passed")
	}
}

func jsonContains(raw []byte, sub string) bool { return strings.Contains(string(raw), sub) }

// A device whose tags change so that it matches the selector joins: the
// database marks every change of a selected column, whoever writes it.
func TestFollowPicksUpRetaggedDevice(t *testing.T) {
	d := newDispatcher(t, "gw-1")
	if _, err := d.pool.Exec(context.Background(), `UPDATE devices SET tags = '{site=lyon}' WHERE id = 'gw-1'`); err != nil {
		t.Fatal(err)
	}
	d.c.SetFollowInterval(time.Second)
	spec := followSpec
	spec.Selector = Selector{Tags: []string{"site=lyon"}}
	v := d.start(spec)
	d.register("gw-2", "gw-100", "1.0.0")
	d.step(time.Second)
	if got := d.members(v.ID); !slices.Equal(got, []string{"gw-1"}) {
		t.Fatalf("before the tag: devices %v, want only gw-1", got)
	}
	if _, err := d.svc.Update(context.Background(), "gw-2", fleet.Patch{Tags: &[]string{"site=lyon"}}); err != nil {
		t.Fatal(err)
	}
	d.step(time.Second)
	if dev := d.device(v.ID, "gw-2"); dev.State != "dispatched" {
		t.Fatalf("after the tag: %+v, want gw-2 joined and dispatched", dev)
	}
}

// A device that joins while the campaign is still in an earlier stage waits
// in the last stage, and the join alone is a change the live stream is told.
func TestFollowJoinWaitsForTheLastStageAndTellsChange(t *testing.T) {
	d := newDispatcher(t, "gw-1", "gw-2")
	d.c.SetFollowInterval(time.Second)
	var mu sync.Mutex
	changed := map[string]int{}
	d.c.OnChange(func(id string) { mu.Lock(); changed[id]++; mu.Unlock() })
	spec := followSpec
	spec.Stages = []Stage{{Name: "canary", Count: 1, MaxFailureRate: 1, MaxNotBackOnline: -1}, {Name: "rest", Percent: 100, MaxFailureRate: 1, MaxNotBackOnline: -1}}
	v := d.start(spec)
	d.step(time.Second) // the canary's job goes out and stays in flight
	count := func() int { mu.Lock(); defer mu.Unlock(); return changed[v.ID] }
	before := count()
	d.step(time.Second)
	if count() != before {
		t.Fatal("a step that changed nothing told a change")
	}
	d.register("gw-3", "gw-100", "1.0.0")
	d.step(time.Second)
	if count() <= before {
		t.Fatal("a join told no change")
	}
	dev := d.device(v.ID, "gw-3")
	if dev.Stage == nil || *dev.Stage != 1 || dev.State != "pending" {
		t.Fatalf("joiner during the canary: %+v, want pending in the last stage", dev)
	}
	if view := d.view(v.ID); view.Stage != 0 || view.Joined != 1 || view.Counts[1].Planned != 1 || view.Counts[1].Targets != 1 {
		// The device planned for the last stage is assigned to it when it starts.
		t.Fatalf("view: stage %d joined %d last stage %+v; want still the canary, 1 joined, 1 planned and the joiner held by the last stage", view.Stage, view.Joined, view.Counts[1])
	}
	canary := "gw-1"
	if st := d.device(v.ID, "gw-2").Stage; st != nil && *st == 0 {
		canary = "gw-2"
	}
	d.upgrade(v.ID, canary)
	d.step(time.Second) // the canary passes: advance
	d.step(time.Second) // the last stage dispatches its planned device and the joiner
	if view := d.view(v.ID); view.Stage != 1 || view.Counts[1].Targets != 2 || view.Counts[1].ByState["dispatched"] != 2 {
		t.Fatalf("last stage: stage %d %+v, want the planned device and the joiner dispatched; history %v; devices %+v", view.Stage, view.Counts, d.historyActions(v.ID), d.members(v.ID))
	}
}

// Three replicas stepping one following campaign at once, while devices
// register and others are reflashed, give every device one open job at a
// time and one job per time it needed one: the campaign row is claimed
// with SKIP LOCKED, and the open-job index would refuse a second job.
func TestFollowAcrossReplicas(t *testing.T) {
	d := newDispatcher(t, "gw-0", "gw-1", "gw-2")
	d.c.SetFollowInterval(0)
	v := d.start(followSpec)
	replicas := []*Campaigns{d.c}
	for range 2 {
		r := NewCampaigns(d.pool, d.c.artifacts, d.svc, d.send, "http://127.0.0.1:8080", nil)
		r.now = func() time.Time { return d.now }
		r.SetFollowInterval(0)
		replicas = append(replicas, r)
	}
	d.step(time.Second)
	for _, id := range []string{"gw-0", "gw-1", "gw-2"} {
		d.upgrade(v.ID, id)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errs := make(chan error, len(replicas))
	var wg sync.WaitGroup
	for _, r := range replicas {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				if err := r.StepAll(ctx); err != nil && ctx.Err() == nil {
					errs <- err
					return
				}
			}
		}()
	}
	for i := range 20 {
		d.register(fmt.Sprintf("new-%d", i), "gw-100", "1.0.0")
	}
	for _, id := range []string{"gw-0", "gw-1", "gw-2"} {
		d.setFirmware(id, "1.0.0") // reflashed: each needs a second attempt
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		var open int
		if err := d.pool.QueryRow(ctx, `SELECT count(*) FROM ota_jobs WHERE campaign_id = $1 AND state = 'dispatched'`, v.ID).Scan(&open); err != nil {
			t.Fatal(err)
		}
		if open == 23 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d jobs dispatched, want 23 (20 new devices, 3 reflashed)", open)
		}
		time.Sleep(50 * time.Millisecond)
	}
	cancel()
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("a replica's step: %v", err)
	}
	var devices, jobs, most int
	if err := d.pool.QueryRow(context.Background(), `SELECT count(DISTINCT device_id), count(*), max(attempt) FROM ota_jobs WHERE campaign_id = $1`, v.ID).
		Scan(&devices, &jobs, &most); err != nil {
		t.Fatal(err)
	}
	if devices != 23 || jobs != 26 || most != 2 {
		t.Fatalf("%d devices hold %d jobs, at most attempt %d; want 23 devices, 26 jobs (3 with a second attempt)", devices, jobs, most)
	}
	if view := d.view(v.ID); view.Joined != 23 {
		t.Fatalf("joined %d, want 23", view.Joined)
	}
}

// A look costs what changed since the last one, not the fleet: over 100 000
// devices unchanged for a year, the look's query reads the
// selection_changed_at index range (no sequential scan of devices) and a
// look that picks up 10 new devices takes milliseconds.
func TestFollowLookIsBounded(t *testing.T) {
	d := newDispatcher(t, "gw-seed")
	ctx := context.Background()
	if _, err := d.pool.Exec(ctx, `INSERT INTO devices (id, model, firmware) SELECT 'old-'||i, 'gw-100', '1.0.0' FROM generate_series(1, 50000) i`); err != nil {
		t.Fatal(err)
	}
	if _, err := d.pool.Exec(ctx, `UPDATE devices SET selection_changed_at = now() - interval '1 year'`); err != nil {
		t.Fatal(err)
	}
	// The rows as they were a year ago: no dead versions left in the index.
	if _, err := d.pool.Exec(ctx, `VACUUM ANALYZE devices`); err != nil {
		t.Fatal(err)
	}
	d.c.SetFollowInterval(0)
	spec := followSpec
	spec.Selector = Selector{Version: ">=9.0.0"} // matches none at the start: every device the look reads is new
	v := d.start(spec)
	var plan []string
	rows, err := d.pool.Query(ctx, `EXPLAIN ANALYZE `+followQuery, v.ID, time.Now().Add(-followMargin), "", []string{"gw-100"}, []string{}, false, followBatch)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var line string
		if err := rows.Scan(&line); err != nil {
			t.Fatal(err)
		}
		plan = append(plan, line)
	}
	if p := strings.Join(plan, "\n"); !strings.Contains(p, "devices_selection_changed_idx") || strings.Contains(p, "Seq Scan on devices") {
		t.Fatalf("the look's query does not read the selection_changed_at index range:\n%s", p)
	}
	t.Logf("the look's query with nothing changed: %s", strings.TrimSpace(plan[len(plan)-1]))
	spent := time.Duration(0)
	for i := range 5 {
		for j := range 10 {
			if _, err := d.pool.Exec(ctx, `INSERT INTO devices (id, model, firmware) VALUES ($1, 'gw-100', '9.1.0')`, fmt.Sprintf("new-%d-%d", i, j)); err != nil {
				t.Fatal(err)
			}
		}
		// 9.1.0 is newer than the target: read, matched by the selector,
		// and left alone (so the look's cost is measured, not dispatch).
		start := time.Now()
		d.step(time.Second)
		spent += time.Since(start)
	}
	if n := len(d.members(v.ID)); n != 0 {
		t.Fatalf("%d devices joined, want none (newer than the target)", n)
	}
	t.Logf("a step with a look over 50 000 devices, 10 changed: %s on average", spent/5)
}

// TestFollowWaitsForTheBirthsVersion: a job succeeds on the device's birth
// message, and the presence writer stores that birth's version in the
// device's row a moment later. A look in between sees the row still on the
// old version: that is not a reflash, and the device gets no second job.
func TestFollowWaitsForTheBirthsVersion(t *testing.T) {
	d := newDispatcher(t, "gw-1")
	d.c.SetFollowInterval(time.Second)
	v := d.start(followSpec)
	d.step(time.Second)
	d.report("gw-1", d.device(v.ID, "gw-1").JobID, "rebooting", 100, "")
	d.c.DeviceBirth("gw-1", "2.0.0") // the row still says 1.0.0
	d.c.handleNotes(context.Background())
	d.step(time.Second)
	d.step(time.Second)
	if dev := d.device(v.ID, "gw-1"); dev.State != "succeeded" || d.view(v.ID).Joined != 0 {
		t.Fatalf("after the birth, before its version is stored: %+v, joined %d; want succeeded, no join", dev, d.view(v.ID).Joined)
	}
	d.setFirmware("gw-1", "2.0.0") // the presence writer catches up
	d.step(time.Second)
	d.setFirmware("gw-1", "1.0.0") // a real reflash
	d.step(time.Second)
	if dev := d.device(v.ID, "gw-1"); dev.State != "dispatched" || d.view(v.ID).Joined != 1 {
		t.Fatalf("after a reflash: %+v, joined %d; want a new attempt dispatched", dev, d.view(v.ID).Joined)
	}
}
