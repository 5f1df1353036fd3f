package firmware

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/pgtest"
)

// fakeSender records the jobs the dispatcher hands to the broker. Devices
// listed in offline are not listening; fail makes every send fail (a broker
// that lost the job, as in a crash between commit and send).
type fakeSender struct {
	mu      sync.Mutex
	sent    []Job
	offline map[string]bool
	fail    bool
}

func (f *fakeSender) Send(deviceID, sub string, payload []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fail {
		return errors.New("broker gone")
	}
	var j Job
	if err := json.Unmarshal(payload, &j); err != nil {
		return err
	}
	f.sent = append(f.sent, j)
	return nil
}

func (f *fakeSender) Listening(deviceID, sub string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return !f.offline[deviceID]
}

func (f *fakeSender) jobs() []Job {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]Job(nil), f.sent...)
}

// dispatcher is a Campaigns over a real per-test PostgreSQL with a fake
// sender and a clock the test moves: nothing here sleeps.
type dispatcher struct {
	t      *testing.T
	c      *Campaigns
	pool   *pgxpool.Pool
	svc    *fleet.Service
	send   *fakeSender
	now    time.Time
	target Artifact
}

func newDispatcher(t *testing.T, devices ...string) *dispatcher {
	t.Helper()
	ctx := context.Background()
	pool := pgtest.New(t)
	h, err := fleet.NewHasher([]byte("0123456789abcdef0123456789abcdef"))
	if err != nil {
		t.Fatal(err)
	}
	svc := fleet.NewService(fleet.NewStore(pool), h, nil)
	_, key, _ := ed25519.GenerateKey(rand.Reader)
	arts, err := NewArtifacts(pool, t.TempDir(), Keys{Signing: key}, []byte("url-key"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := arts.Create(ctx, NewArtifact{Version: "1.0.0", Models: []string{"gw-100"}}, bytes.NewReader([]byte("old image"))); err != nil {
		t.Fatal(err)
	}
	target, err := arts.Create(ctx, NewArtifact{Version: "2.0.0", Models: []string{"gw-100"}}, bytes.NewReader([]byte("new image")))
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range devices {
		if _, _, err := svc.Register(ctx, fleet.NewDevice{ID: id, Model: "gw-100"}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := pool.Exec(ctx, `UPDATE devices SET firmware = '1.0.0'`); err != nil {
		t.Fatal(err)
	}
	d := &dispatcher{t: t, pool: pool, svc: svc, send: &fakeSender{offline: map[string]bool{}}, target: target,
		now: time.Date(2026, 6, 1, 12, 0, 0, 0, time.UTC)}
	d.c = NewCampaigns(pool, arts, svc, d.send, "http://127.0.0.1:8080", nil)
	d.c.now = func() time.Time { return d.now }
	return d
}

func (d *dispatcher) start(spec Spec) CampaignView {
	d.t.Helper()
	spec.FirmwareID = d.target.ID
	if spec.DeviceTimeout == 0 {
		spec.DeviceTimeout = Duration(10 * time.Minute)
	}
	v, err := d.c.Create(context.Background(), spec, "test")
	if err != nil {
		d.t.Fatal(err)
	}
	if v, err = d.c.Act(context.Background(), v.ID, ActStart, "test"); err != nil {
		d.t.Fatal(err)
	}
	return v
}

// step moves the clock on and steps every campaign once.
func (d *dispatcher) step(by time.Duration) {
	d.t.Helper()
	d.now = d.now.Add(by)
	if err := d.c.StepAll(context.Background()); err != nil {
		d.t.Fatal(err)
	}
}

func (d *dispatcher) device(campaign, id string) CampaignDevice {
	d.t.Helper()
	devs, err := d.c.Devices(context.Background(), campaign)
	if err != nil {
		d.t.Fatal(err)
	}
	for _, dev := range devs {
		if dev.DeviceID == id {
			return dev
		}
	}
	d.t.Fatalf("campaign %s has no device %s", campaign, id)
	return CampaignDevice{}
}

func (d *dispatcher) state(id string) CampaignState {
	d.t.Helper()
	v, err := d.c.Get(context.Background(), id)
	if err != nil {
		d.t.Fatal(err)
	}
	return v.State
}

func (d *dispatcher) report(deviceID, jobID, state string, progress int, errText string) {
	d.t.Helper()
	b, _ := json.Marshal(status{JobID: jobID, State: state, Progress: progress, Error: errText})
	if err := d.c.HandleStatus(deviceID, b); err != nil {
		d.t.Fatal(err)
	}
}

func oneStage(gate Stage) []Stage {
	gate.Name, gate.Percent = "all", 100
	return []Stage{gate}
}

func TestDispatcherPacing(t *testing.T) {
	var ids []string
	for i := range 10 {
		ids = append(ids, fmt.Sprintf("gw-%d", i))
	}
	d := newDispatcher(t, ids...)
	d.start(Spec{Name: "paced", Stages: oneStage(Stage{MaxFailureRate: 1, MaxNotBackOnline: -1}), Pacing: Pacing{DevicesPerMinute: 60}})
	// One job is due at the start, then one a second.
	for i := 1; i <= 5; i++ {
		d.step(time.Second)
		if n := len(d.send.jobs()); n != i+1 {
			t.Fatalf("%d s after the start at 60/min: %d jobs sent, want %d", i, n, i+1)
		}
	}
	d.step(0) // a step at the same instant owes nothing
	if n := len(d.send.jobs()); n != 6 {
		t.Fatalf("a second step in the same second sent more: %d jobs", n)
	}
}

func TestDispatcherTimeoutAndGate(t *testing.T) {
	d := newDispatcher(t, "gw-1", "gw-2")
	v := d.start(Spec{Name: "gated", Stages: oneStage(Stage{MaxFailureRate: 0, MaxNotBackOnline: -1}), DeviceTimeout: Duration(5 * time.Minute)})
	d.step(time.Second)
	if n := len(d.send.jobs()); n != 2 {
		t.Fatalf("%d jobs sent, want 2", n)
	}
	d.step(4 * time.Minute)
	if got := d.device(v.ID, "gw-1").State; got != "dispatched" {
		t.Fatalf("before the timeout: %s", got)
	}
	d.step(2 * time.Minute) // past the 5-minute device timeout, on the test's clock
	dev := d.device(v.ID, "gw-1")
	if dev.State != "timed_out" || dev.FinishedAt == nil || !dev.FinishedAt.Equal(d.now) {
		t.Fatalf("after the timeout: %+v (finished_at must be the dispatcher's clock, %s)", dev, d.now)
	}
	d.step(time.Second)
	if s := d.state(v.ID); s != StatePaused {
		t.Fatalf("a stage with every device timed out and max_failure_rate 0: campaign %s, want paused", s)
	}
	hist, _ := d.c.History(context.Background(), v.ID)
	if last := hist[len(hist)-1]; last.Action != "gate_breached" || last.Actor != "fleetd" {
		t.Fatalf("last history entry %+v, want gate_breached by fleetd", last)
	}
}

// A job whose send was lost (the broker had it, then crashed; the commit
// that recorded the dispatch stands) goes out again, with the same stored
// id, when the device subscribes.
func TestDispatcherResendsAfterLostSend(t *testing.T) {
	d := newDispatcher(t, "gw-1")
	v := d.start(Spec{Name: "lost", Stages: oneStage(Stage{MaxFailureRate: 1, MaxNotBackOnline: -1})})
	d.send.fail = true
	d.step(time.Second)
	dev := d.device(v.ID, "gw-1")
	if dev.State != "dispatched" || dev.DeliveredAt != nil || len(d.send.jobs()) != 0 {
		t.Fatalf("after a failed send: %+v", dev)
	}
	d.send.fail = false
	d.c.DeviceListening("gw-1")
	d.c.handleNotes(context.Background())
	jobs := d.send.jobs()
	if len(jobs) != 1 || jobs[0].JobID != dev.JobID {
		t.Fatalf("resent jobs %+v, want one with the stored id %s", jobs, dev.JobID)
	}
	if dev = d.device(v.ID, "gw-1"); dev.DeliveredAt == nil || !dev.DeliveredAt.Equal(d.now) {
		t.Fatalf("delivery not recorded on the dispatcher's clock: %+v", dev)
	}
	// A device that subscribes again before reporting gets it again.
	d.c.DeviceListening("gw-1")
	d.c.handleNotes(context.Background())
	if n := len(d.send.jobs()); n != 2 {
		t.Fatalf("%d sends, want the unreported job sent again", n)
	}
	// Once it reports, it is received: no more sends.
	d.report("gw-1", dev.JobID, "downloading", 10, "")
	d.c.DeviceListening("gw-1")
	d.c.handleNotes(context.Background())
	if n := len(d.send.jobs()); n != 2 {
		t.Fatalf("%d sends after the device reported, want 2", n)
	}
}

// Device ids may hold ':'; job ids are stored, never parsed, so a device
// "gw:1" (and one named "x:rollback") reports progress and failure.
func TestDispatcherDeviceIDsWithColons(t *testing.T) {
	d := newDispatcher(t, "gw:1", "x:rollback")
	v := d.start(Spec{Name: "colons", Stages: oneStage(Stage{MaxFailureRate: 1, MaxNotBackOnline: -1})})
	d.step(time.Second)
	jobs := map[string]string{}
	for _, j := range d.send.jobs() {
		jobs[d.deviceOf(v.ID, j.JobID)] = j.JobID
	}
	d.report("gw:1", jobs["gw:1"], "downloading", 40, "")
	if dev := d.device(v.ID, "gw:1"); dev.State != "downloading" || dev.Progress != 40 {
		t.Fatalf("progress of gw:1 not stored: %+v", dev)
	}
	d.report("x:rollback", jobs["x:rollback"], "failed", 0, "signature mismatch")
	if dev := d.device(v.ID, "x:rollback"); dev.State != "failed" || dev.Error != "signature mismatch" {
		t.Fatalf("failure of x:rollback not stored: %+v", dev)
	}
	// A device cannot report on another device's job.
	d.report("gw:1", jobs["x:rollback"], "installing", 90, "")
	if dev := d.device(v.ID, "x:rollback"); dev.State != "failed" {
		t.Fatalf("gw:1 moved x:rollback's job: %+v", dev)
	}
}

func (d *dispatcher) deviceOf(campaign, jobID string) string {
	devs, _ := d.c.Devices(context.Background(), campaign)
	for _, dev := range devs {
		if dev.JobID == jobID || dev.RollbackJobID == jobID {
			return dev.DeviceID
		}
	}
	d.t.Fatalf("no device holds job %s", jobID)
	return ""
}

func TestDispatcherRollback(t *testing.T) {
	d := newDispatcher(t, "gw-1")
	v := d.start(Spec{Name: "back", Stages: oneStage(Stage{MaxFailureRate: 1, MaxNotBackOnline: -1})})
	d.step(time.Second)
	forward := d.device(v.ID, "gw-1").JobID
	d.report("gw-1", forward, "rebooting", 100, "")
	d.c.DeviceBirth("gw-1", "2.0.0")
	d.c.handleNotes(context.Background())
	d.step(time.Second)
	if s := d.state(v.ID); s != StateCompleted {
		t.Fatalf("campaign %s after the device came back on 2.0.0, want completed", s)
	}
	if _, err := d.c.Act(context.Background(), v.ID, ActRollback, "test"); err != nil {
		t.Fatal(err)
	}
	d.step(time.Second)
	jobs := d.send.jobs()
	last := jobs[len(jobs)-1]
	dev := d.device(v.ID, "gw-1")
	if last.JobID == forward || last.JobID != dev.RollbackJobID || last.Version != "1.0.0" {
		t.Fatalf("rollback job %+v: want a new stored id (not %s) for version 1.0.0; device %+v", last, forward, dev)
	}
	// The rollback's reports go to the rollback job, not the forward one.
	d.report("gw-1", last.JobID, "installing", 50, "")
	if dev = d.device(v.ID, "gw-1"); dev.State != "succeeded" || dev.RollbackState != "installing" {
		t.Fatalf("after a rollback report: %+v", dev)
	}
	d.c.DeviceBirth("gw-1", "1.0.0")
	d.c.handleNotes(context.Background())
	d.step(time.Second)
	if s := d.state(v.ID); s != StateRolledBack {
		t.Fatalf("campaign %s after the device came back on 1.0.0, want rolled_back", s)
	}
	if _, err := d.c.Act(context.Background(), v.ID, ActRollback, "test"); !errors.Is(err, ErrConflict) {
		t.Fatalf("a second rollback: %v, want ErrConflict", err)
	}
}

// Every committed change tells OnChange, so the live stream needs no polling.
func TestDispatcherTellsChanges(t *testing.T) {
	d := newDispatcher(t, "gw-1")
	var mu sync.Mutex
	changed := map[string]int{}
	d.c.OnChange(func(id string) { mu.Lock(); changed[id]++; mu.Unlock() })
	v := d.start(Spec{Name: "told", Stages: oneStage(Stage{MaxFailureRate: 1, MaxNotBackOnline: -1})})
	count := func() int { mu.Lock(); defer mu.Unlock(); return changed[v.ID] }
	afterStart := count()
	if afterStart < 2 {
		t.Fatalf("create and start told %d changes, want 2", afterStart)
	}
	d.step(time.Second)
	afterDispatch := count()
	if afterDispatch <= afterStart {
		t.Fatal("a dispatch told no change")
	}
	d.report("gw-1", d.device(v.ID, "gw-1").JobID, "downloading", 5, "")
	if count() <= afterDispatch {
		t.Fatal("a status report told no change")
	}
	before := count()
	d.step(time.Second) // nothing to do: in flight, not timed out
	if count() != before {
		t.Fatal("a step that changed nothing told a change")
	}
}
