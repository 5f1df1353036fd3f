package e2e

import (
	"context"
	"encoding/json"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	pahov3 "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetd/fleetd/command"
	"github.com/fleetd/fleetd/devconfig"
	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/fleetdtest"
	"github.com/fleetd/fleetd/sim"
	"github.com/fleetd/fleetd/web/client"
)

// waitInSync polls a device's configuration until the device reported the
// desired version and the effective document is want.
func waitInSync(t *testing.T, api *client.Client, id, want string, within time.Duration) devconfig.View {
	t.Helper()
	deadline := time.Now().Add(within)
	var v devconfig.View
	var err error
	for time.Now().Before(deadline) {
		v, err = api.DeviceConfig(context.Background(), id)
		if err == nil && v.InSync && string(devconfig.Encode(v.Desired.Config)) == want && v.Reported.Version == v.Desired.Version {
			return v
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("%s: not in sync with %s within %s (err %v): %+v", id, want, within, err, v)
	return v
}

// setTags gives simulated devices their tags, as an operator would after
// they registered.
func setTags(t *testing.T, api *client.Client, tags map[string][]string) {
	t.Helper()
	for id, tt := range tags {
		if _, err := api.UpdateDevice(context.Background(), id, fleet.Patch{Tags: &tt}); err != nil {
			t.Fatalf("tag %s: %v", id, err)
		}
	}
}

// TestDesiredConfig is issue #18's "desired configuration layered by model
// and tag reaches each device's effective document; the device's report
// brings it in sync": simulated devices (MQTT 3.1.1 and 5) of two models at
// two sites get fleet defaults, a model layer and a model-at-a-site layer
// ("all gw-100 at site=lyon: keepalive 25", one request); each reports the
// version it applied; a keepalive change takes effect at the next connect;
// a device's own layer wins; fleetctl shows and sets it all.
func TestDesiredConfig(t *testing.T) {
	p, api := fastFleetd(t, fleetdtest.DataDir(t))
	ctx := context.Background()
	f := &sim.Fleet{
		Server: sim.Server{MQTT: "tcp://" + p.Addr("mqtt-tcp"), API: p.HTTPURL},
		Run:    sim.RunOptions{Duration: secs(300), Register: true},
		Cohorts: []sim.Cohort{
			{Name: "lyon", Count: 2, Model: "gw-100", Firmware: "1.0.0", Protocol: "3.1.1", Keepalive: secs(60)},
			{Name: "lyon5", Count: 1, Model: "gw-100", Firmware: "1.0.0", Protocol: "5", Keepalive: secs(60)},
			{Name: "paris", Count: 2, Model: "gw-100", Firmware: "1.0.0", Protocol: "3.1.1", Keepalive: secs(60)},
			{Name: "big", Count: 2, Model: "gw-200", Firmware: "1.0.0", Protocol: "5", Keepalive: secs(60)},
		},
	}
	runFleet(t, api, f, p.Token())
	lyon, paris, big := []string{"lyon-0", "lyon-1", "lyon5-0"}, []string{"paris-0", "paris-1"}, []string{"big-0", "big-1"}
	tags := map[string][]string{}
	for _, id := range lyon {
		tags[id] = []string{"site=lyon"}
	}
	for _, id := range paris {
		tags[id] = []string{"site=paris"}
	}
	tags["big-0"], tags["big-1"] = []string{"site=lyon"}, []string{"site=paris"}
	setTags(t, api, tags)

	for _, l := range []struct{ scope, doc string }{
		{"fleet", `{"keepalive_s":60,"log":"info"}`},
		{"model:gw-100", `{"log":"warn"}`},
		{"model:gw-100,tag:site=lyon", `{"keepalive_s":25}`},
	} {
		if _, err := api.SetConfigLayer(ctx, l.scope, json.RawMessage(l.doc)); err != nil {
			t.Fatalf("layer %s: %v", l.scope, err)
		}
	}
	for _, id := range lyon {
		v := waitInSync(t, api, id, `{"keepalive_s":25,"log":"warn"}`, 30*time.Second)
		if got := strings.Join(v.Desired.Sources, " "); got != "fleet model:gw-100 model:gw-100,tag:site=lyon" {
			t.Fatalf("%s sources %q", id, got)
		}
	}
	for _, id := range paris {
		waitInSync(t, api, id, `{"keepalive_s":60,"log":"warn"}`, 30*time.Second)
	}
	for _, id := range big {
		waitInSync(t, api, id, `{"keepalive_s":60,"log":"info"}`, 30*time.Second)
	}

	// The keepalive applies at the next connect: lyon-0 reboots and asks
	// for 25 s.
	before, _ := api.Device(ctx, "lyon-0")
	if before.KeepaliveRequested != 60 {
		t.Fatalf("lyon-0 connected with keepalive %d before rebooting", before.KeepaliveRequested)
	}
	if c := exec1(t, api, "lyon-0", "reboot", ""); c.State != command.StateSucceeded {
		t.Fatalf("reboot: %s", c.State)
	}
	waitUntil(t, 20*time.Second, "lyon-0 back with keepalive 25", func() bool {
		d, err := api.Device(ctx, "lyon-0")
		return err == nil && d.Online && d.SessionEpoch > before.SessionEpoch && d.KeepaliveRequested == 25
	})

	// A device's own layer wins over every layer; the device follows.
	v, err := api.PatchDeviceConfig(ctx, "paris-0", json.RawMessage(`{"keepalive_s":40}`))
	// The answer is read after the document is published: a quick device
	// may have reported it already (in sync), else it is stale.
	if err != nil || (v.Sync != devconfig.SyncStale && v.Sync != devconfig.SyncInSync) || v.Desired.Config["keepalive_s"] != float64(40) {
		t.Fatalf("paris-0's own layer: %+v %v", v, err)
	}
	waitInSync(t, api, "paris-0", `{"keepalive_s":40,"log":"warn"}`, 20*time.Second)

	// fleetctl: set a layer as a merge patch, see a device follow, diff it.
	bin := fleetdtest.Build(t, "fleetctl")
	fleetctl := func(args ...string) (string, error) {
		t.Helper()
		cmd := exec.Command(bin, args...)
		cmd.Env = []string{"FLEETD_URL=" + p.HTTPURL, "FLEETD_ADMIN_TOKEN_FILE=" + filepath.Join(p.DataDir, "admin-token")}
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	if out, err := fleetctl("config", "set", "-layer", "tag:site=paris", "-merge", `{"ntp":"paris.pool","x":null}`); err != nil ||
		!strings.Contains(out, "devices\t3") && !strings.Contains(out, "3 (re-resolved") {
		t.Fatalf("config set -layer: %v\n%s", err, out)
	}
	waitInSync(t, api, "paris-1", `{"keepalive_s":60,"log":"warn","ntp":"paris.pool"}`, 20*time.Second)
	if out, err := fleetctl("config", "diff", "paris-1"); err != nil || !strings.Contains(out, "in_sync") {
		t.Fatalf("config diff: %v\n%s", err, out)
	}
	if out, err := fleetctl("config", "get", "paris-1"); err != nil || !strings.Contains(out, "tag:site=paris") || !strings.Contains(out, "paris.pool") {
		t.Fatalf("config get: %v\n%s", err, out)
	}
	if out, err := fleetctl("config", "set", "ghost", `{"a":1}`); err == nil || !strings.Contains(out, "404") {
		t.Fatalf("config set on an unknown device: %v\n%s", err, out)
	}
	if out, err := fleetctl("config", "set", "-layer", "site=paris", `{}`); err == nil || !strings.Contains(out, "scope") {
		t.Fatalf("config set with a bad scope: %v\n%s", err, out)
	}
	if out, err := fleetctl("-output", "json", "config", "layers"); err != nil || strings.Count(out, `"scope"`) != 4 {
		t.Fatalf("config layers: %v\n%s", err, out)
	}
}

// TestDesiredConfigAcrossReplicas: with three replicas, a layer changed
// through replica 1 reaches devices whose sessions replicas 2 and 3 hold
// (each publishes, from the database, on replica 1's signal), and their
// reports, stored there, are what replica 1 shows; a device's own layer
// too. A device that moves between replicas is handed its current
// document first wherever it lands, never a copy an old replica retained.
func TestDesiredConfigAcrossReplicas(t *testing.T) {
	c := fleetdtest.StartCluster(t, fleetdtest.ClusterOptions{Replicas: 3})
	ctx := context.Background()
	a := c.Client(0)
	f := &sim.Fleet{
		Server: sim.Server{MQTT: "tcp://" + c.MQTTAddr(1), API: c.Replicas[0].HTTPURL},
		Run:    sim.RunOptions{Duration: secs(300), Register: true},
		Cohorts: []sim.Cohort{
			{Name: "far5", Count: 1, Model: "gw-100", Firmware: "1.0.0", Protocol: "5"},
			{Name: "far311", Count: 1, Model: "gw-100", Firmware: "1.0.0", Protocol: "3.1.1", URL: "tcp://" + c.MQTTAddr(2)},
			{Name: "near", Count: 1, Model: "gw-200", Firmware: "1.0.0", Protocol: "3.1.1", URL: "tcp://" + c.MQTTAddr(2)},
		},
	}
	runFleet(t, a, f, c.AdminToken)
	holder := map[string]int{"far5-0": 1, "far311-0": 2, "near-0": 2}
	setTags(t, a, map[string][]string{"far5-0": {"site=lyon"}, "far311-0": {"site=lyon"}, "near-0": {"site=lyon"}})
	for id, i := range holder {
		c.WaitDevice(0, id, 20*time.Second, "online on its replica", func(d fleet.Device) bool { return d.Online && d.BrokerNode == c.Node(i) })
		// Subscribed and reported its (empty) document, through its replica.
		waitInSync(t, a, id, `{}`, 20*time.Second)
	}
	if _, err := a.SetConfigLayer(ctx, "model:gw-100,tag:site=lyon", json.RawMessage(`{"keepalive_s":25}`)); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"far5-0", "far311-0"} {
		if v := waitInSync(t, a, id, `{"keepalive_s":25}`, 20*time.Second); v.Desired.Version != 1 {
			t.Fatalf("%s: version %d", id, v.Desired.Version)
		}
	}
	if v, err := a.DeviceConfig(ctx, "near-0"); err != nil || v.Desired.Version != 0 || !v.InSync {
		t.Fatalf("near-0 (gw-200) changed: %+v %v", v, err)
	}
	if _, err := a.SetDeviceConfig(ctx, "near-0", json.RawMessage(`{"log":"debug"}`)); err != nil {
		t.Fatal(err)
	}
	waitInSync(t, a, "near-0", `{"log":"debug"}`, 20*time.Second)
	// The replicas holding the sessions show the same.
	if v, err := c.Client(1).DeviceConfig(ctx, "far5-0"); err != nil || !v.InSync || v.Desired.Version != 1 {
		t.Fatalf("replica 2's view: %+v %v", v, err)
	}

	// A wanderer: version 1 on replica 2; on replica 3, version 1 and then
	// version 2, made through replica 1; back on replica 2, version 2 first:
	// replica 2's retained copy of version 1 went with its session there.
	reg, err := a.RegisterDevice(ctx, fleet.NewDevice{ID: "wanderer", Model: "gw-100", Tags: []string{"site=lyon"}})
	if err != nil {
		t.Fatal(err)
	}
	visit := func(replica int, want int64, change func(), thenWant int64) {
		t.Helper()
		got := make(chan devconfig.Message, 8)
		dev := pahov3.NewClient(pahov3.NewClientOptions().AddBroker("tcp://" + c.MQTTAddr(replica)).SetClientID("wanderer").
			SetUsername("wanderer").SetPassword(reg.Token).SetProtocolVersion(4).SetAutoReconnect(false))
		if tk := dev.Connect(); !tk.WaitTimeout(5*time.Second) || tk.Error() != nil {
			t.Fatalf("connect to replica %d: %v", replica+1, tk.Error())
		}
		defer dev.Disconnect(50)
		if tk := dev.Subscribe("devices/wanderer/config/desired", 1, func(_ pahov3.Client, m pahov3.Message) {
			var msg devconfig.Message
			if json.Unmarshal(m.Payload(), &msg) == nil {
				got <- msg
			}
		}); !tk.WaitTimeout(5*time.Second) || tk.Error() != nil {
			t.Fatalf("subscribe: %v", tk.Error())
		}
		next := func() devconfig.Message {
			t.Helper()
			select {
			case msg := <-got:
				return msg
			case <-time.After(10 * time.Second):
				t.Fatalf("on replica %d the wanderer got no document", replica+1)
				return devconfig.Message{}
			}
		}
		if msg := next(); msg.Version != want {
			t.Fatalf("on replica %d the wanderer was handed version %d first, want %d", replica+1, msg.Version, want)
		}
		if change != nil {
			change()
			for msg := next(); msg.Version != thenWant; msg = next() {
				if msg.Version > thenWant {
					t.Fatalf("on replica %d: version %d, want %d", replica+1, msg.Version, thenWant)
				}
			}
		}
		c.WaitDevice(0, "wanderer", 10*time.Second, "seen", func(d fleet.Device) bool { return d.Online })
	}
	visit(1, 1, nil, 0)
	c.WaitDevice(0, "wanderer", 10*time.Second, "offline", func(d fleet.Device) bool { return !d.Online })
	visit(2, 1, func() {
		if _, err := a.PatchDeviceConfig(ctx, "wanderer", json.RawMessage(`{"log":"debug"}`)); err != nil {
			t.Fatal(err)
		}
	}, 2)
	c.WaitDevice(0, "wanderer", 10*time.Second, "offline", func(d fleet.Device) bool { return !d.Online })
	visit(1, 2, nil, 0)
}
