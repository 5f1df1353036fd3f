package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	pahov3 "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetd/fleetd/command"
	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/fleetdtest"
	"github.com/fleetd/fleetd/sim"
	"github.com/fleetd/fleetd/web/client"
)

// commandStream reads a replica's live stream and returns, per command id,
// the states its "command" events carried.
func commandStream(t *testing.T, url, token string) func(id string) []command.State {
	t.Helper()
	var mu sync.Mutex
	seen := map[string][]command.State{}
	streamEvents(t, url, token, "command", func(data []byte) {
		var c command.Change
		if json.Unmarshal(data, &c) == nil {
			mu.Lock()
			seen[c.ID] = append(seen[c.ID], c.State)
			mu.Unlock()
		}
	})
	return func(id string) []command.State {
		mu.Lock()
		defer mu.Unlock()
		return slices.Clone(seen[id])
	}
}

// pahoDevice connects an MQTT 3.1.1 device with paho and subscribes it to
// its command topics.
func pahoDevice(t *testing.T, addr, id, token string) (pahov3.Client, chan pahov3.Message) {
	t.Helper()
	got := make(chan pahov3.Message, 16)
	c := pahov3.NewClient(pahov3.NewClientOptions().AddBroker("tcp://" + addr).SetClientID(id).SetUsername(id).SetPassword(token).
		SetProtocolVersion(4).SetAutoReconnect(false).SetKeepAlive(30 * time.Second))
	if tk := c.Connect(); !tk.WaitTimeout(5*time.Second) || tk.Error() != nil {
		t.Fatalf("connect %s: %v", id, tk.Error())
	}
	t.Cleanup(func() { c.Disconnect(100) })
	if tk := c.Subscribe("devices/"+id+"/cmd/#", 1, func(_ pahov3.Client, m pahov3.Message) { got <- m }); !tk.WaitTimeout(5*time.Second) || tk.Error() != nil {
		t.Fatalf("subscribe: %v", tk.Error())
	}
	return c, got
}

func waitUntil(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// exec sends a command and waits for its outcome, as an operator would.
func exec1(t *testing.T, api *client.Client, device, name, params string) command.Command {
	t.Helper()
	ctx := context.Background()
	c, err := api.SendCommand(ctx, device, command.Request{Name: name, Params: json.RawMessage(params), Timeout: command.Duration(10 * time.Second)})
	if err != nil {
		t.Fatalf("%s %s: %v", device, name, err)
	}
	for !c.State.Final() {
		if c, err = api.Command(ctx, device, c.ID, 20*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	return c
}

// TestCommands: commands to simulated devices on MQTT 3.1.1 and 5
// round-trip through fleetd (ping, get_logs, an unknown command, reboot,
// after which the device comes back), and the live stream shows their
// states; a command to an offline device waits and is delivered when it
// connects, or expires; an answer from another device is refused and
// recorded; bad requests get 4xx naming the field; fleetctl devices exec
// shows the outcome.
func TestCommands(t *testing.T) {
	p, api := fastFleetd(t, fleetdtest.DataDir(t))
	ctx := context.Background()
	states := commandStream(t, p.HTTPURL, p.Token())
	f := &sim.Fleet{
		Server: sim.Server{MQTT: "tcp://" + p.Addr("mqtt-tcp"), API: p.HTTPURL},
		Run:    sim.RunOptions{Duration: secs(300), Register: true},
		Cohorts: []sim.Cohort{
			{Name: "c311", Count: 1, Model: "gw-100", Firmware: "1.0.0", Protocol: "3.1.1"},
			{Name: "c5", Count: 1, Model: "gw-100", Firmware: "1.0.0", Protocol: "5"},
		},
	}
	runFleet(t, api, f, p.Token())
	for _, id := range []string{"c311-0", "c5-0"} {
		waitUntil(t, 20*time.Second, id+" online", func() bool {
			d, err := api.Device(ctx, id)
			return err == nil && d.Online
		})
	}

	for _, id := range []string{"c311-0", "c5-0"} {
		t.Run(id, func(t *testing.T) {
			// Right after connecting the device may not have subscribed yet:
			// the command then waits queued and goes out when it does.
			c := exec1(t, api, id, "ping", "")
			if c.State != command.StateSucceeded || !strings.Contains(string(c.Result), "pong") || c.DeliveredAt == nil {
				t.Fatalf("ping: %+v", c)
			}
			waitUntil(t, 5*time.Second, "the live stream to show "+c.ID+" succeeded", func() bool {
				return slices.Contains(states(c.ID), command.StateSucceeded)
			})
			if c := exec1(t, api, id, "get_logs", `{"lines":2}`); c.State != command.StateSucceeded || strings.Count(string(c.Result), "line ") != 2 {
				t.Fatalf("get_logs: %s %s", c.State, c.Result)
			}
			if c := exec1(t, api, id, "self_destruct", ""); c.State != command.StateFailed {
				t.Fatalf("unknown command: %s %s", c.State, c.Result)
			}
			before, _ := api.Device(ctx, id)
			if c := exec1(t, api, id, "reboot", ""); c.State != command.StateSucceeded {
				t.Fatalf("reboot: %s %s", c.State, c.Result)
			}
			waitUntil(t, 20*time.Second, id+" back online after its reboot", func() bool {
				d, err := api.Device(ctx, id)
				return err == nil && d.Online && d.SessionEpoch > before.SessionEpoch
			})
			page, err := api.Commands(ctx, id, "", 10)
			if err != nil || len(page.Commands) != 4 || page.Commands[0].Name != "reboot" {
				t.Fatalf("commands listed: %+v %v", page, err)
			}
		})
	}

	// An offline device: one command expires, the other is delivered when
	// the device connects and subscribes.
	reg, err := api.RegisterDevice(ctx, fleet.NewDevice{ID: "late-1", Model: "gw-100"})
	if err != nil {
		t.Fatal(err)
	}
	stale, err := api.SendCommand(ctx, "late-1", command.Request{Name: "ping", ExpiresIn: command.Duration(time.Second)})
	if err != nil || stale.State != command.StateQueued {
		t.Fatalf("to an offline device: %+v %v", stale, err)
	}
	queued, _ := api.SendCommand(ctx, "late-1", command.Request{Name: "reboot", ExpiresIn: command.Duration(time.Minute)})
	if got, _ := api.Command(ctx, "late-1", stale.ID, 5*time.Second); got.State != command.StateExpired {
		t.Fatalf("after its expiry: %s", got.State)
	}
	dev, msgs := pahoDevice(t, p.Addr("mqtt-tcp"), "late-1", reg.Token)
	var m pahov3.Message
	select {
	case m = <-msgs:
	case <-time.After(5 * time.Second):
		t.Fatal("the queued command was not delivered when the device subscribed")
	}
	var msg command.Message
	if json.Unmarshal(m.Payload(), &msg) != nil || msg.ID != queued.ID || m.Topic() != "devices/late-1/cmd/reboot" {
		t.Fatalf("delivered %s %s", m.Topic(), m.Payload())
	}
	dev.Publish("devices/late-1/cmd/response", 1, false, `{"id":"`+queued.ID+`","status":"succeeded","result":{"ok":true}}`).Wait()
	if got, _ := api.Command(ctx, "late-1", queued.ID, 5*time.Second); got.State != command.StateSucceeded || string(got.Result) != `{"ok":true}` {
		t.Fatalf("answered: %s %s", got.State, got.Result)
	}
	select {
	case m := <-msgs:
		t.Fatalf("the expired command (or the device's own answer) reached the device: %s %s", m.Topic(), m.Payload())
	default:
	}

	// An answer to another device's command is refused and recorded.
	theirs := exec1(t, api, "c5-0", "ping", "")
	dev.Publish("devices/late-1/cmd/response", 1, false, `{"id":"`+theirs.ID+`","status":"failed"}`).Wait()
	waitUntil(t, 5*time.Second, "a rejected event for late-1", func() bool {
		page, _ := api.Events(ctx, "late-1", "", 50)
		return slices.ContainsFunc(page.Events, func(e fleet.Event) bool {
			return e.Kind == fleet.KindRejected && strings.Contains(e.Detail, "of another device")
		})
	})
	if got, _ := api.Command(ctx, "c5-0", theirs.ID, 0); got.State != command.StateSucceeded {
		t.Fatalf("another device's answer changed the command to %s", got.State)
	}

	// Bad requests.
	for _, tt := range []struct {
		device string
		req    command.Request
		status int
		field  string
	}{
		{"late-1", command.Request{Name: "Reboot!"}, 400, "name"},
		{"late-1", command.Request{Name: "response"}, 400, "name"},
		{"late-1", command.Request{Name: "ping", Params: json.RawMessage(`[1]`)}, 400, "params"},
		{"late-1", command.Request{Name: "ping", Timeout: command.Duration(time.Hour)}, 400, "timeout"},
		{"nobody", command.Request{Name: "ping"}, 404, ""},
	} {
		_, err := api.SendCommand(ctx, tt.device, tt.req)
		var ae *client.Error
		if !errors.As(err, &ae) || ae.Status != tt.status || ae.Field != tt.field {
			t.Errorf("%+v: %v, want %d naming %q", tt.req, err, tt.status, tt.field)
		}
	}
	if _, err := api.Command(ctx, "late-1", "cmd_00000000000000000000000000000000", 0); err == nil || !strings.Contains(err.Error(), "404") {
		t.Errorf("unknown command: %v", err)
	}

	// fleetctl.
	bin := fleetdtest.Build(t, "fleetctl")
	cmd := exec.Command(bin, "devices", "exec", "c311-0", "get_logs", "-params", `{"lines":1}`, "-wait")
	cmd.Env = []string{"FLEETD_URL=" + p.HTTPURL, "FLEETD_ADMIN_TOKEN_FILE=" + filepath.Join(p.DataDir, "admin-token")}
	if out, err := cmd.CombinedOutput(); err != nil || !strings.Contains(string(out), "succeeded") || !strings.Contains(string(out), "lines") {
		t.Fatalf("fleetctl devices exec: %v\n%s", err, out)
	}
	cmd = exec.Command(bin, "devices", "exec", "c311-0", "self_destruct", "-wait")
	cmd.Env = []string{"FLEETD_URL=" + p.HTTPURL, "FLEETD_ADMIN_TOKEN_FILE=" + filepath.Join(p.DataDir, "admin-token")}
	if out, err := cmd.CombinedOutput(); err == nil || !strings.Contains(string(out), "failed") {
		t.Fatalf("fleetctl devices exec of an unknown command: %v\n%s", err, out)
	}
}

// TestCommandsAcrossReplicas: with two replicas, a command posted on A
// reaches a device connected to B and its answer, recorded by B, is what a
// request waiting on A returns; A's live stream shows it. A command posted
// on A while the device is offline reaches it when it connects to B. A bulk
// command posted on A completes over devices on B.
func TestCommandsAcrossReplicas(t *testing.T) {
	c := fleetdtest.StartCluster(t, fleetdtest.ClusterOptions{Replicas: 2})
	ctx := context.Background()
	a, b := c.Client(0), c.Client(1)
	states := commandStream(t, c.Replicas[0].HTTPURL, c.AdminToken)
	f := &sim.Fleet{
		Server: sim.Server{MQTT: "tcp://" + c.MQTTAddr(1), API: c.Replicas[0].HTTPURL},
		Run:    sim.RunOptions{Duration: secs(300), Register: true},
		Cohorts: []sim.Cohort{
			{Name: "far5", Count: 1, Model: "gw-100", Firmware: "1.0.0", Protocol: "5"},
			{Name: "far311", Count: 1, Model: "gw-100", Firmware: "1.0.0", Protocol: "3.1.1"},
		},
	}
	runFleet(t, a, f, c.AdminToken)
	for _, id := range []string{"far5-0", "far311-0"} {
		c.WaitDevice(0, id, 20*time.Second, "online on replica 2", func(d fleet.Device) bool { return d.Online && d.BrokerNode == c.Node(1) })
		got := exec1(t, a, id, "ping", "")
		if got.State != command.StateSucceeded || !strings.Contains(string(got.Result), "pong") {
			t.Fatalf("%s: ping through replica 1: %+v", id, got)
		}
		waitUntil(t, 5*time.Second, "replica 1's live stream to show "+got.ID+" succeeded", func() bool {
			return slices.Contains(states(got.ID), command.StateSucceeded)
		})
		if seen, _ := b.Command(ctx, id, got.ID, 0); seen.State != command.StateSucceeded {
			t.Fatalf("replica 2 sees %s", seen.State)
		}
	}

	// Offline, then connected to the other replica.
	reg, err := a.RegisterDevice(ctx, fleet.NewDevice{ID: "wanderer", Model: "gw-100"})
	if err != nil {
		t.Fatal(err)
	}
	queued, err := a.SendCommand(ctx, "wanderer", command.Request{Name: "get_logs"})
	if err != nil || queued.State != command.StateQueued {
		t.Fatalf("queued: %+v %v", queued, err)
	}
	waited := make(chan command.Command, 1)
	go func() {
		got, _ := a.Command(ctx, "wanderer", queued.ID, 30*time.Second)
		waited <- got
	}()
	dev, msgs := pahoDevice(t, c.MQTTAddr(1), "wanderer", reg.Token)
	select {
	case m := <-msgs:
		if !strings.Contains(string(m.Payload()), queued.ID) {
			t.Fatalf("delivered %s", m.Payload())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the command posted on replica 1 did not reach the device on replica 2")
	}
	dev.Publish("devices/wanderer/cmd/response", 1, false, `{"id":"`+queued.ID+`","status":"succeeded","result":["l1"]}`).Wait()
	select {
	case got := <-waited:
		if got.State != command.StateSucceeded || string(got.Result) != `["l1"]` {
			t.Fatalf("replica 1's waiting request returned %s %s", got.State, got.Result)
		}
	case <-time.After(40 * time.Second):
		t.Fatal("replica 1's waiting request did not return")
	}

	// A bulk command posted on A to the devices on B: the pacer (on either
	// replica) sends through the router, B records the answers, and A's
	// summary and live stream show it completed.
	progress := bulkStream(t, c.Replicas[0].HTTPURL, c.AdminToken)
	bulk, err := a.SendBulk(ctx, command.BulkRequest{Request: command.Request{Name: "ping"},
		Selector: command.Selector{Models: []string{"gw-100"}, Version: "1.0.0"}, Pacing: command.Pacing{MaxConcurrent: 1}})
	if err != nil || bulk.Total != 2 {
		t.Fatalf("bulk over the two simulated devices: %+v %v", bulk, err)
	}
	waitUntil(t, 20*time.Second, "replica 1's live stream to show the bulk completed", func() bool {
		ch, _ := progress(bulk.ID)
		return ch.State == command.BulkCompleted && ch.Counts == command.Counts{Succeeded: 2}
	})
	if got, err := a.Bulk(ctx, bulk.ID); err != nil || got.State != command.BulkCompleted || got.Counts.Succeeded != 2 {
		t.Fatalf("bulk on replica 1: %+v %v", got, err)
	}
}
