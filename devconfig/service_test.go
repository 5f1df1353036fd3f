package devconfig_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	pahov3 "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetd/fleetd/broker"
	"github.com/fleetd/fleetd/devconfig"
	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/brokertest"
	"github.com/fleetd/fleetd/internal/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

type env struct {
	t   *testing.T
	b   *brokertest.Env
	svc *devconfig.Service
}

// newEnv runs a broker, a registry and the configuration service wired as
// fleetd wires them on one replica.
func newEnv(t *testing.T, opts devconfig.Options) *env {
	t.Helper()
	b := brokertest.Start(t, nil)
	opts.Node = "test"
	opts.ResolveInterval = 20 * time.Millisecond
	svc := devconfig.NewService(devconfig.NewStore(b.Pool, opts.Limits), b.Broker, b.Recorder, opts)
	b.Broker.HandleSession(devconfig.ReportedSub, func(s broker.Session, payload []byte) error {
		return svc.HandleReport(devconfig.Session{DeviceID: s.DeviceID, Epoch: s.Epoch, Firmware: s.Firmware, Model: s.Model}, payload)
	})
	for _, sub := range []string{devconfig.DesiredSub, "config/#", "config/+"} {
		b.Broker.OnSubscribe(sub, svc.DeviceListening)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); svc.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	return &env{t: t, b: b, svc: svc}
}

func (e *env) register(id, model string, tags ...string) string {
	e.t.Helper()
	_, token, err := e.b.Service.Register(context.Background(), fleet.NewDevice{ID: id, Model: model, Tags: tags})
	if err != nil {
		e.t.Fatal(err)
	}
	return token
}

// waitConfig polls a device's configuration until cond holds.
func (e *env) waitConfig(id, what string, cond func(devconfig.View) bool) devconfig.View {
	e.t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		v, err := e.svc.Get(context.Background(), id)
		if err != nil {
			e.t.Fatal(err)
		}
		if cond(v) {
			return v
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("%s: %s never happened; last %+v", id, what, v)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func keepalive(v devconfig.View) string { return fmt.Sprint(v.Desired.Config["keepalive_s"]) }

// TestLayers: layers resolve into each device's effective document (fleet <
// model < tag < model and tag < device), a version grows exactly when the
// document changes, a change of a device's tags re-resolves it, a device's
// own layer is put and merge-patched, and bad input names the field.
func TestLayers(t *testing.T) {
	e := newEnv(t, devconfig.Options{})
	ctx := context.Background()
	e.register("lyon-1", "gw-100", "site=lyon")
	e.register("lyon-2", "gw-200", "site=lyon")
	e.register("paris-1", "gw-100", "site=paris")

	v, err := e.svc.Get(ctx, "lyon-1")
	if err != nil || v.Desired.Version != 0 || len(v.Desired.Config) != 0 || v.Sync != devconfig.SyncUnreported {
		t.Fatalf("before any layer: %+v %v", v, err)
	}
	ch, err := e.svc.PutLayer(ctx, "fleet", json.RawMessage(`{"keepalive_s":120,"log":"info"}`))
	if err != nil || ch.Devices != 3 || ch.Layer.Revision != 1 {
		t.Fatalf("fleet layer: %+v %v", ch, err)
	}
	// "All gw-100 at site=lyon: keepalive 25" is one request.
	if ch, err = e.svc.PutLayer(ctx, "model:gw-100,tag:site=lyon", json.RawMessage(`{"keepalive_s":25}`)); err != nil || ch.Devices != 1 {
		t.Fatalf("model at tag layer: %+v %v", ch, err)
	}
	v = e.waitConfig("lyon-1", "keepalive 25", func(v devconfig.View) bool { return keepalive(v) == "25" })
	if v.Desired.Version != 2 && v.Desired.Version != 1 {
		t.Fatalf("lyon-1 version %d after two layers", v.Desired.Version)
	}
	lyon1 := v.Desired.Version
	for _, id := range []string{"lyon-2", "paris-1"} {
		v := e.waitConfig(id, "the fleet default", func(v devconfig.View) bool { return keepalive(v) == "120" })
		if v.Desired.Version != 1 || v.Desired.Config["log"] != "info" {
			t.Fatalf("%s: %+v", id, v.Desired)
		}
	}
	// Writing the same layer again changes no document: no new version.
	if _, err := e.svc.PutLayer(ctx, "model:gw-100,tag:site=lyon", json.RawMessage(`{"keepalive_s":25}`)); err != nil {
		t.Fatal(err)
	}
	e.waitConfig("lyon-1", "re-resolved", func(v devconfig.View) bool { return v.Desired.Version == lyon1 })

	// A device's own layer, put and patched; the effective document follows
	// at once.
	v, err = e.svc.PutDevice(ctx, "paris-1", json.RawMessage(`{"log":"debug","wifi":{"band":"5g","tx":17}}`))
	if err != nil || v.Desired.Version != 2 || v.Desired.Config["log"] != "debug" || keepalive(v) != "120" {
		t.Fatalf("put paris-1: %+v %v", v, err)
	}
	v, err = e.svc.PatchDevice(ctx, "paris-1", json.RawMessage(`{"log":null,"wifi":{"tx":null}}`))
	if err != nil || v.Desired.Version != 3 || string(devconfig.Encode(v.Device)) != `{"wifi":{"band":"5g"}}` ||
		string(devconfig.Encode(v.Desired.Config)) != `{"keepalive_s":120,"log":"info","wifi":{"band":"5g"}}` {
		t.Fatalf("patch paris-1: %+v %v", v, err)
	}
	if got := strings.Join(v.Desired.Sources, " "); got != "fleet device" {
		t.Fatalf("sources %q", got)
	}

	// paris-1 moves to Lyon: its tags change in the registry, and the
	// model-at-tag layer now applies.
	tags := []string{"site=lyon"}
	if _, err := e.b.Service.Update(ctx, "paris-1", fleet.Patch{Tags: &tags}); err != nil {
		t.Fatal(err)
	}
	v = e.waitConfig("paris-1", "the Lyon keepalive", func(v devconfig.View) bool { return keepalive(v) == "25" })
	if v.Desired.Version != 4 {
		t.Fatalf("paris-1 after moving: version %d", v.Desired.Version)
	}

	// Deleting a layer re-resolves its devices.
	if ch, err = e.svc.DeleteLayer(ctx, "model:gw-100,tag:site=lyon"); err != nil || ch.Devices != 2 {
		t.Fatalf("delete: %+v %v", ch, err)
	}
	e.waitConfig("lyon-1", "the fleet default again", func(v devconfig.View) bool { return keepalive(v) == "120" && v.Desired.Version == lyon1+1 })
	if _, err := e.svc.Layer(ctx, "model:gw-100,tag:site=lyon"); !errors.Is(err, devconfig.ErrNotFound) {
		t.Fatalf("deleted layer: %v", err)
	}
	if ls, err := e.svc.Layers(ctx); err != nil || len(ls) != 1 || ls[0].Scope.String() != "fleet" {
		t.Fatalf("layers: %+v %v", ls, err)
	}
	// A patch on an absent layer starts from {}.
	if ch, err = e.svc.PatchLayer(ctx, "model:gw-200", json.RawMessage(`{"keepalive_s":45,"x":null}`)); err != nil ||
		string(devconfig.Encode(ch.Layer.Config)) != `{"keepalive_s":45}` || ch.Devices != 1 {
		t.Fatalf("patch an absent layer: %+v %v", ch, err)
	}

	for _, tt := range []struct {
		name, field string
		err         error
	}{
		{"bad scope", "scope", func() error { _, err := e.svc.PutLayer(ctx, "site=lyon", json.RawMessage(`{}`)); return err }()},
		{"not an object", "config", func() error { _, err := e.svc.PutLayer(ctx, "fleet", json.RawMessage(`[1]`)); return err }()},
		{"null in a layer", "config", func() error { _, err := e.svc.PutDevice(ctx, "lyon-1", json.RawMessage(`{"a":null}`)); return err }()},
		{"too large", "config", func() error {
			_, err := e.svc.PutDevice(ctx, "lyon-1", json.RawMessage(`{"a":"`+strings.Repeat("x", 17<<10)+`"}`))
			return err
		}()},
		{"a patch that makes it too large", "config", func() error {
			if _, err := e.svc.PutDevice(ctx, "lyon-2", json.RawMessage(`{"a":"`+strings.Repeat("x", 9<<10)+`"}`)); err != nil {
				return err
			}
			_, err := e.svc.PatchDevice(ctx, "lyon-2", json.RawMessage(`{"b":"`+strings.Repeat("x", 9<<10)+`"}`))
			return err
		}()},
	} {
		var ve *devconfig.ValidationError
		if !errors.As(tt.err, &ve) || ve.Field != tt.field {
			t.Errorf("%s: %v, want a validation error naming %s", tt.name, tt.err, tt.field)
		}
	}
	if _, err := e.svc.Get(ctx, "nobody"); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("unknown device: %v", err)
	}
	if _, err := e.b.Service.Decommission(ctx, "lyon-2"); err != nil {
		t.Fatal(err)
	}
	if _, err := e.svc.PutDevice(ctx, "lyon-2", json.RawMessage(`{}`)); !errors.Is(err, devconfig.ErrGone) {
		t.Fatalf("decommissioned device: %v", err)
	}
}

// TestFleetWideChange: a fleet default reaches thousands of devices through
// batched set-based resolution, one new version each.
func TestFleetWideChange(t *testing.T) {
	e := newEnv(t, devconfig.Options{})
	ctx := context.Background()
	const n = 5000
	if _, err := e.b.Pool.Exec(ctx, `INSERT INTO devices (id, model, tags) SELECT 'bulk-' || i, 'gw-100', ARRAY['site=s' || (i % 7)]
		FROM generate_series(1, $1) AS i`, n); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	ch, err := e.svc.PutLayer(ctx, "fleet", json.RawMessage(`{"keepalive_s":30}`))
	if err != nil || ch.Devices != n {
		t.Fatalf("fleet layer: %+v %v", ch, err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		var left, done int
		if err := e.b.Pool.QueryRow(ctx, `SELECT count(*) FILTER (WHERE stale), count(*) FILTER (WHERE version = 1 AND effective = '{"keepalive_s":30}')
			FROM device_config`).Scan(&left, &done); err != nil {
			t.Fatal(err)
		}
		if left == 0 && done == n {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d stale, %d resolved of %d", left, done, n)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("%d devices resolved in %s", n, time.Since(start).Round(time.Millisecond))
}

// mqttDevice is a real MQTT 3.1.1 device (paho) that subscribes to its
// desired configuration and hands over what it receives.
type mqttDevice struct {
	c   pahov3.Client
	id  string
	got chan pahov3.Message
}

func (e *env) connect(id, token, filter string) *mqttDevice {
	e.t.Helper()
	d := &mqttDevice{id: id, got: make(chan pahov3.Message, 16)}
	d.c = pahov3.NewClient(pahov3.NewClientOptions().AddBroker("tcp://" + e.b.Addrs["tcp"]).SetClientID(id).SetUsername(id).SetPassword(token).
		SetProtocolVersion(4).SetAutoReconnect(false).SetKeepAlive(30 * time.Second))
	if tk := d.c.Connect(); !tk.WaitTimeout(5*time.Second) || tk.Error() != nil {
		e.t.Fatalf("connect %s: %v", id, tk.Error())
	}
	e.t.Cleanup(func() { d.c.Disconnect(50) })
	d.subscribe(e.t, filter)
	return d
}

func (d *mqttDevice) subscribe(t *testing.T, filter string) {
	t.Helper()
	if tk := d.c.Subscribe(filter, 1, func(_ pahov3.Client, m pahov3.Message) { d.got <- m }); !tk.WaitTimeout(5*time.Second) || tk.Error() != nil {
		t.Fatalf("subscribe %s: %v", filter, tk.Error())
	}
}

// next waits for the next desired message.
func (d *mqttDevice) next(t *testing.T) (devconfig.Message, bool) {
	t.Helper()
	select {
	case m := <-d.got:
		if m.Topic() != "devices/"+d.id+"/config/desired" {
			t.Fatalf("%s received on %s: %s", d.id, m.Topic(), m.Payload())
		}
		var msg devconfig.Message
		if err := json.Unmarshal(m.Payload(), &msg); err != nil {
			t.Fatalf("desired %s: %v", m.Payload(), err)
		}
		return msg, m.Retained()
	case <-time.After(5 * time.Second):
		t.Fatalf("%s: no desired configuration", d.id)
	}
	return devconfig.Message{}, false
}

// upTo skips desired messages (copies sent again) until one of version
// want or later.
func (d *mqttDevice) upTo(t *testing.T, want int64) devconfig.Message {
	t.Helper()
	for {
		if msg, _ := d.next(t); msg.Version >= want {
			return msg
		}
	}
}

func (d *mqttDevice) report(t *testing.T, payload string) {
	t.Helper()
	if tk := d.c.Publish("devices/"+d.id+"/config/reported", 1, false, payload); !tk.WaitTimeout(5*time.Second) || tk.Error() != nil {
		t.Fatalf("report: %v", tk.Error())
	}
}

// rejected waits for the device's rejected events and returns their details.
func (e *env) rejected(deviceID string, n int) []string {
	e.t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		events, err := e.b.Service.Events(context.Background(), deviceID, nil, 100)
		if err != nil {
			e.t.Fatal(err)
		}
		var out []string
		for _, ev := range events {
			if ev.Kind == fleet.KindRejected {
				out = append(out, ev.Detail)
			}
		}
		if len(out) >= n || time.Now().After(deadline) {
			return out
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestDesiredAndReported: a device that subscribes gets its desired
// document (from the database), again with the retain flag when it
// subscribes again in its session, and each new version as it is made; its
// report brings it in sync; a stale report is stored and shown as stale;
// reports that are malformed, ahead of the desired version or above the
// rate are refused and recorded once per session; a device cannot reach
// another device's configuration topics.
func TestDesiredAndReported(t *testing.T) {
	e := newEnv(t, devconfig.Options{ReportRate: 0.01, ReportBurst: 4})
	ctx := context.Background()
	token := e.register("cfg-1", "gw-100", "site=lyon")
	other := e.register("cfg-2", "gw-100")
	if _, err := e.svc.PutLayer(ctx, "tag:site=lyon", json.RawMessage(`{"keepalive_s":25}`)); err != nil {
		t.Fatal(err)
	}
	e.waitConfig("cfg-1", "version 1", func(v devconfig.View) bool { return v.Desired.Version == 1 })

	d := e.connect("cfg-1", token, "devices/cfg-1/config/desired")
	msg, _ := d.next(t)
	if msg.Version != 1 || string(devconfig.Encode(msg.Config)) != `{"keepalive_s":25}` {
		t.Fatalf("on subscribe: %+v", msg)
	}
	// Subscribing again within the session: the retained copy (and the
	// database's, again).
	d.subscribe(t, "devices/cfg-1/config/#")
	if msg, retained := d.next(t); msg.Version != 1 || !retained {
		t.Fatalf("subscribing again: %+v retained %v", msg, retained)
	}

	d.report(t, `{"version":1,"config":{"keepalive_s":25,"uptime_s":3}}`)
	v := e.waitConfig("cfg-1", "in sync", func(v devconfig.View) bool { return v.InSync })
	if v.Reported == nil || v.Reported.Version != 1 || len(v.Diff) != 1 || v.Diff[0].Kind != devconfig.DiffExtra {
		t.Fatalf("in sync: %+v", v)
	}

	// A new version reaches the session; until the device reports it, its
	// report is stale.
	if _, err := e.svc.PatchDevice(ctx, "cfg-1", json.RawMessage(`{"keepalive_s":20}`)); err != nil {
		t.Fatal(err)
	}
	if msg := d.upTo(t, 2); msg.Version != 2 || keepaliveOf(msg) != "20" {
		t.Fatalf("after the change: %+v", msg)
	}
	v = e.waitConfig("cfg-1", "stale", func(v devconfig.View) bool { return v.Sync == devconfig.SyncStale })
	if len(v.Diff) == 0 || v.Diff[0].Path != "/keepalive_s" {
		t.Fatalf("stale: %+v", v)
	}
	d.report(t, `{"version":2,"config":{"keepalive_s":20}}`)
	e.waitConfig("cfg-1", "in sync at version 2", func(v devconfig.View) bool { return v.InSync && v.Reported.Version == 2 })
	// After a resync (signals possibly lost) every device listening here
	// gets its document again.
	for len(d.got) > 0 {
		<-d.got
	}
	e.svc.Resync()
	if msg, _ := d.next(t); msg.Version != 2 {
		t.Fatalf("after a resync: %+v", msg)
	}

	// Refused: malformed, ahead; the first is recorded, the rest of the
	// session's refusals are counted only.
	d.report(t, `{"version":"two","config":{}}`)
	d.report(t, `{"version":9,"config":{}}`)
	if got := e.rejected("cfg-1", 1); len(got) != 1 || !strings.Contains(got[0], "non-negative integer") {
		t.Fatalf("rejected events %q", got)
	}
	// Past the rate the reports are dropped before they are read: this
	// valid stale one is not stored.
	d.report(t, `{"version":2,"config":{"keepalive_s":20}}`)
	d.report(t, `{"version":1,"config":{}}`)
	if v, _ := e.svc.Get(ctx, "cfg-1"); !v.InSync {
		t.Fatalf("a report above the rate was stored: %+v", v.Reported)
	}

	// cfg-2 may neither subscribe to nor publish on cfg-1's topics: the
	// broker refuses (and records) both, and cfg-1's report stands.
	o := e.connect("cfg-2", other, "devices/cfg-2/config/desired")
	if msg, _ := o.next(t); msg.Version != 0 {
		t.Fatalf("cfg-2's own document: %+v", msg)
	}
	o.c.Subscribe("devices/cfg-1/config/desired", 1, nil).WaitTimeout(2 * time.Second)
	o.c.Publish("devices/cfg-1/config/reported", 1, false, `{"version":0,"config":{}}`).WaitTimeout(2 * time.Second)
	if _, err := e.svc.PatchLayer(ctx, "tag:site=lyon", json.RawMessage(`{"ntp":"lyon.pool"}`)); err != nil {
		t.Fatal(err)
	}
	if msg := d.upTo(t, 3); msg.Version != 3 {
		t.Fatalf("cfg-1 after the layer patch: %+v", msg)
	}
	select {
	case m := <-o.got:
		t.Fatalf("cfg-2 received %s %s", m.Topic(), m.Payload())
	case <-time.After(200 * time.Millisecond):
	}
	if v, _ := e.svc.Get(ctx, "cfg-1"); v.Reported == nil || v.Reported.Version != 2 {
		t.Fatalf("cfg-1's report after cfg-2's attempt: %+v", v.Reported)
	}
	events, _ := e.b.Service.Events(ctx, "cfg-2", nil, 100)
	var denied int
	for _, ev := range events {
		if ev.Kind == fleet.KindACLDenied {
			denied++
		}
	}
	if denied < 2 {
		t.Fatalf("cfg-2's attempts recorded %d times: %+v", denied, events)
	}
}

func keepaliveOf(m devconfig.Message) string { return fmt.Sprint(m.Config["keepalive_s"]) }
