package command_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/autopaho"
	"github.com/eclipse/paho.golang/paho"
	pahov3 "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetd/fleetd/broker"
	"github.com/fleetd/fleetd/command"
	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/brokertest"
	"github.com/fleetd/fleetd/internal/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// clock is a test clock that tests move by hand.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *clock) Add(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

type env struct {
	t   *testing.T
	b   *brokertest.Env
	svc *command.Service
	clk *clock
}

// newEnv runs a broker, a registry and the command service wired as fleetd
// wires them (the broker is the sender: one replica).
func newEnv(t *testing.T, opts command.Options) *env {
	t.Helper()
	b := brokertest.Start(t, nil)
	clk := &clock{now: time.Now().Truncate(time.Millisecond)}
	opts.Now = clk.Now
	opts.Node = "test"
	opts.PollInterval = 20 * time.Millisecond
	svc := command.NewService(command.NewStore(b.Pool), b.Broker, b.Recorder, opts)
	b.Broker.HandleMessage("cmd/response", func(s broker.Session, m broker.Message) error {
		return svc.HandleResponse(command.Session{DeviceID: s.DeviceID, Epoch: s.Epoch, Firmware: s.Firmware, Model: s.Model}, m.Payload, m.CorrelationData)
	})
	b.Broker.OnSubscribe("cmd/#", svc.DeviceListening)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); svc.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	return &env{t: t, b: b, svc: svc, clk: clk}
}

// device is a real MQTT client (paho for 3.1.1, paho.golang for 5) that
// subscribes to its command topics and hands over what it receives.
type device struct {
	id, token string
	protocol  int
	requests  chan request
	seen      map[string]bool
	respond   func(topic string, payload, correlation []byte) error
	close     func()
}

type request struct {
	topic, responseTopic string
	payload, correlation []byte
}

func (e *env) connect(id, token string, protocol int) *device {
	e.t.Helper()
	d := &device{id: id, token: token, protocol: protocol, requests: make(chan request, 16), seen: map[string]bool{}}
	filter := "devices/" + id + "/cmd/#"
	addr := e.b.Addrs["tcp"]
	if protocol == 5 {
		u, _ := url.Parse("mqtt://" + addr)
		ctx := context.Background()
		cm, err := autopaho.NewConnection(ctx, autopaho.ClientConfig{
			ServerUrls: []*url.URL{u}, KeepAlive: 30, CleanStartOnInitialConnection: true,
			ConnectUsername: id, ConnectPassword: []byte(token),
			ClientConfig: paho.ClientConfig{ClientID: id, OnPublishReceived: []func(paho.PublishReceived) (bool, error){
				func(r paho.PublishReceived) (bool, error) {
					req := request{topic: r.Packet.Topic, payload: r.Packet.Payload}
					if p := r.Packet.Properties; p != nil {
						req.responseTopic, req.correlation = p.ResponseTopic, p.CorrelationData
					}
					d.requests <- req
					return true, nil
				}}},
		})
		if err != nil {
			e.t.Fatal(err)
		}
		wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		if err := cm.AwaitConnection(wctx); err != nil {
			e.t.Fatal(err)
		}
		if _, err := cm.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: filter, QoS: 1}}}); err != nil {
			e.t.Fatal(err)
		}
		d.respond = func(topic string, payload, correlation []byte) error {
			p := &paho.Publish{Topic: topic, QoS: 1, Payload: payload}
			if correlation != nil {
				p.Properties = &paho.PublishProperties{CorrelationData: correlation}
			}
			_, err := cm.Publish(ctx, p)
			return err
		}
		d.close = func() {
			dctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			defer cancel()
			_ = cm.Disconnect(dctx)
		}
		e.t.Cleanup(d.close)
		return d
	}
	opts := pahov3.NewClientOptions().AddBroker("tcp://" + addr).SetClientID(id).SetUsername(id).SetPassword(token).
		SetProtocolVersion(uint(protocol)).SetAutoReconnect(false).SetConnectRetry(false).SetKeepAlive(30 * time.Second)
	c := pahov3.NewClient(opts)
	if tk := c.Connect(); !tk.WaitTimeout(5*time.Second) || tk.Error() != nil {
		e.t.Fatalf("connect %s: %v", id, tk.Error())
	}
	if tk := c.Subscribe(filter, 1, func(_ pahov3.Client, m pahov3.Message) {
		d.requests <- request{topic: m.Topic(), payload: m.Payload()}
	}); !tk.WaitTimeout(5*time.Second) || tk.Error() != nil {
		e.t.Fatalf("subscribe: %v", tk.Error())
	}
	d.respond = func(topic string, payload, _ []byte) error {
		tk := c.Publish(topic, 1, false, payload)
		tk.WaitTimeout(5 * time.Second)
		return tk.Error()
	}
	d.close = func() { c.Disconnect(100) }
	e.t.Cleanup(d.close)
	return d
}

// next returns the next command the device has not seen: the server sends a
// command again on every subscription until it is answered (at least once),
// and devices ignore an id they already have.
func (d *device) next(t *testing.T) request {
	t.Helper()
	for {
		select {
		case r := <-d.requests:
			var m command.Message
			json.Unmarshal(r.payload, &m)
			if d.seen[m.ID] {
				continue
			}
			d.seen[m.ID] = true
			return r
		case <-time.After(5 * time.Second):
			t.Fatalf("%s received no command", d.id)
			return request{}
		}
	}
}

// answer replies to a request the way the protocol says: MQTT 5 on the
// Response Topic with the Correlation Data and no id in the payload, MQTT 3
// with the id in the payload.
func (d *device) answer(t *testing.T, r request, status string, result any) {
	t.Helper()
	var m command.Message
	if err := json.Unmarshal(r.payload, &m); err != nil {
		t.Fatalf("command payload %s: %v", r.payload, err)
	}
	body := map[string]any{"status": status, "result": result}
	topic := "devices/" + d.id + "/cmd/response"
	if d.protocol == 5 {
		topic = r.responseTopic
	} else {
		body["id"] = m.ID
	}
	payload, _ := json.Marshal(body)
	if err := d.respond(topic, payload, r.correlation); err != nil {
		t.Fatal(err)
	}
}

func (e *env) waitState(t *testing.T, deviceID, id string, want command.State) command.Command {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		c, err := e.svc.Get(context.Background(), deviceID, id)
		if err != nil {
			t.Fatal(err)
		}
		if c.State == want {
			return c
		}
		if time.Now().After(deadline) {
			t.Fatalf("command %s is %s, want %s", id, c.State, want)
		}
		time.Sleep(10 * time.Millisecond)
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

// TestRoundTrip: a command to an online device is delivered at once (with
// Response Topic and Correlation Data for MQTT 5, the id in the payload for
// both), the device's answer settles it with its result, and a waiting
// request sees the outcome as soon as it is stored.
func TestRoundTrip(t *testing.T) {
	e := newEnv(t, command.Options{})
	ctx := context.Background()
	for _, proto := range []int{4, 5} {
		t.Run(fmt.Sprintf("mqtt %d", proto), func(t *testing.T) {
			id := fmt.Sprintf("rt-v%d", proto)
			d := e.connect(id, e.b.Register(t, id, "gw-100"), proto)
			c, err := e.svc.Create(ctx, id, command.Request{Name: "ping", Params: json.RawMessage(`{"n":1}`)})
			if err != nil {
				t.Fatal(err)
			}
			if c.State != command.StateDelivered || c.DeliveredAt == nil {
				t.Fatalf("created as %s, want delivered (the device listens)", c.State)
			}
			r := d.next(t)
			var m command.Message
			json.Unmarshal(r.payload, &m)
			if r.topic != "devices/"+id+"/cmd/ping" || m.ID != c.ID || m.Name != "ping" || string(m.Params) != `{"n":1}` {
				t.Fatalf("received %s %s", r.topic, r.payload)
			}
			if proto == 5 && (r.responseTopic != "devices/"+id+"/cmd/response" || string(r.correlation) != c.ID) {
				t.Fatalf("MQTT 5 properties: response topic %q, correlation %q", r.responseTopic, r.correlation)
			}
			waited := make(chan command.Command, 1)
			go func() {
				w, _ := e.svc.Wait(ctx, id, c.ID, 10*time.Second)
				waited <- w
			}()
			d.answer(t, r, "succeeded", map[string]any{"pong": true})
			select {
			case w := <-waited:
				if w.State != command.StateSucceeded || string(w.Result) != `{"pong":true}` || w.FinishedAt == nil {
					t.Fatalf("waited for %+v", w)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("Wait did not return when the answer came")
			}
			// A failure is an answer too.
			c2, _ := e.svc.Create(ctx, id, command.Request{Name: "frobnicate"})
			d.answer(t, d.next(t), "failed", map[string]any{"error": "unknown command"})
			if got := e.waitState(t, id, c2.ID, command.StateFailed); string(got.Result) != `{"error":"unknown command"}` {
				t.Fatalf("result %s", got.Result)
			}
		})
	}
}

// TestOfflineDevice: a command to an offline device waits queued and is
// delivered when the device connects and subscribes; one that waits past
// expires_in expires and is never delivered; a delivered one that is not
// answered within its timeout times out, and a late answer is refused.
func TestOfflineDevice(t *testing.T) {
	e := newEnv(t, command.Options{})
	ctx := context.Background()
	tok := e.b.Register(t, "off", "gw-100")

	c, err := e.svc.Create(ctx, "off", command.Request{Name: "reboot", ExpiresIn: command.Duration(time.Minute)})
	if err != nil || c.State != command.StateQueued {
		t.Fatalf("created %+v, %v; want queued", c, err)
	}
	stale, _ := e.svc.Create(ctx, "off", command.Request{Name: "get_logs", ExpiresIn: command.Duration(time.Second)})
	e.clk.Add(2 * time.Second)
	e.svc.Sweep(ctx)
	e.waitState(t, "off", stale.ID, command.StateExpired)

	d := e.connect("off", tok, 4)
	r := d.next(t)
	if !strings.Contains(string(r.payload), c.ID) || r.topic != "devices/off/cmd/reboot" {
		t.Fatalf("delivered on reconnect: %s %s", r.topic, r.payload)
	}
	e.waitState(t, "off", c.ID, command.StateDelivered)
	select {
	case r := <-d.requests:
		t.Fatalf("the expired command was delivered too: %s", r.payload)
	default:
	}
	d.answer(t, r, "succeeded", nil)
	e.waitState(t, "off", c.ID, command.StateSucceeded)

	// Timeout.
	late, _ := e.svc.Create(ctx, "off", command.Request{Name: "ping", Timeout: command.Duration(5 * time.Second)})
	lateReq := d.next(t)
	e.clk.Add(6 * time.Second)
	e.svc.Sweep(ctx)
	e.waitState(t, "off", late.ID, command.StateTimedOut)
	d.answer(t, lateReq, "succeeded", nil)
	if got := e.rejected("off", 1); len(got) != 1 || !strings.Contains(got[0], "already timed_out") {
		t.Fatalf("rejected events %q", got)
	}
	if got, _ := e.svc.Get(ctx, "off", late.ID); got.State != command.StateTimedOut {
		t.Fatalf("a late answer changed a timed-out command to %s", got.State)
	}
}

// TestRefusedResponses: answers from another device, malformed or oversized
// answers and answers to unknown ids settle nothing; each session records
// one rejected event however many it sends.
func TestRefusedResponses(t *testing.T) {
	e := newEnv(t, command.Options{ResponseRate: 1000, ResponseBurst: 1000})
	ctx := context.Background()
	victim := e.connect("victim", e.b.Register(t, "victim", "gw-100"), 4)
	c, _ := e.svc.Create(ctx, "victim", command.Request{Name: "reboot"})
	victim.next(t)

	for _, tt := range []struct {
		name, payload, detail string
		correlation           []byte
		proto                 int
	}{
		{"another device's command", `{"id":"` + c.ID + `","status":"succeeded"}`, "of another device", nil, 4},
		{"another device's command, MQTT 5", `{"status":"succeeded"}`, "of another device", []byte(c.ID), 5},
		{"malformed", `{"id":"` + c.ID + `","status":`, "not a JSON object", nil, 4},
		{"oversized", `{"id":"` + c.ID + `","status":"succeeded","result":"` + strings.Repeat("x", 40<<10) + `"}`, "at most", nil, 4},
		{"bad status", `{"id":"` + c.ID + `","status":"done"}`, "want succeeded or failed", nil, 4},
		{"unknown id", `{"id":"cmd_00000000000000000000000000000000","status":"succeeded"}`, "unknown command", nil, 4},
	} {
		t.Run(tt.name, func(t *testing.T) {
			id := "rogue-" + strings.NewReplacer(" ", "-", ",", "", "'", "").Replace(tt.name)
			d := e.connect(id, e.b.Register(t, id, "gw-100"), tt.proto)
			for range 5 { // a flood records one event
				if err := d.respond("devices/"+id+"/cmd/response", []byte(tt.payload), tt.correlation); err != nil {
					t.Fatal(err)
				}
			}
			got := e.rejected(id, 1)
			if len(got) != 1 || !strings.Contains(got[0], tt.detail) || !strings.Contains(got[0], "once per session") {
				t.Fatalf("rejected events %q, want one saying %q", got, tt.detail)
			}
		})
	}
	// Publishing on the victim's response topic is outside a device's ACL.
	rogue := e.connect("rogue-acl", e.b.Register(t, "rogue-acl", "gw-100"), 4)
	_ = rogue.respond("devices/victim/cmd/response", []byte(`{"id":"`+c.ID+`","status":"succeeded"}`), nil)
	if got, _ := e.svc.Get(ctx, "victim", c.ID); got.State != command.StateDelivered {
		t.Fatalf("the victim's command is %s after the refused answers", got.State)
	}
}

// TestLimits: a device's pending commands are capped; the API's inputs are
// validated; unknown devices and decommissioned ones are refused.
func TestLimits(t *testing.T) {
	e := newEnv(t, command.Options{Limits: command.Limits{MaxPending: 2}})
	ctx := context.Background()
	e.b.Register(t, "busy", "gw-100")
	for range 2 {
		if _, err := e.svc.Create(ctx, "busy", command.Request{Name: "ping"}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := e.svc.Create(ctx, "busy", command.Request{Name: "ping"}); !errors.Is(err, command.ErrTooMany) {
		t.Fatalf("third pending command: %v, want ErrTooMany", err)
	}
	var ve *command.ValidationError
	if _, err := e.svc.Create(ctx, "busy", command.Request{Name: "Bad"}); !errors.As(err, &ve) || ve.Field != "name" {
		t.Fatalf("bad name: %v", err)
	}
	if _, err := e.svc.Create(ctx, "nobody", command.Request{Name: "ping"}); !errors.Is(err, fleet.ErrNotFound) {
		t.Fatalf("unknown device: %v", err)
	}
	e.b.Register(t, "gone", "gw-100")
	if _, err := e.b.Service.Decommission(ctx, "gone"); err != nil {
		t.Fatal(err)
	}
	if _, err := e.svc.Create(ctx, "gone", command.Request{Name: "ping"}); !errors.Is(err, command.ErrGone) {
		t.Fatalf("decommissioned device: %v", err)
	}
	if _, err := e.svc.Get(ctx, "busy", "cmd_00000000000000000000000000000000"); !errors.Is(err, command.ErrNotFound) {
		t.Fatalf("unknown command: %v", err)
	}
}

// TestPrune: finished commands go after the retention, and past the newest
// KeepPerDevice of their device; pending ones stay.
func TestPrune(t *testing.T) {
	e := newEnv(t, command.Options{Retention: time.Hour, KeepPerDevice: 3, Limits: command.Limits{MaxPending: 100}})
	ctx := context.Background()
	e.b.Register(t, "p", "gw-100")
	var ids []string
	for range 6 {
		c, err := e.svc.Create(ctx, "p", command.Request{Name: "ping", ExpiresIn: command.Duration(time.Second)})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, c.ID)
		e.clk.Add(time.Millisecond)
	}
	e.clk.Add(2 * time.Second)
	e.svc.Sweep(ctx) // all six expire
	pending, _ := e.svc.Create(ctx, "p", command.Request{Name: "ping"})
	e.svc.Prune(ctx)
	list, _, err := e.svc.List(ctx, "p", nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, c := range list {
		got = append(got, c.ID)
	}
	want := []string{pending.ID, ids[5], ids[4], ids[3]}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("kept %v, want the pending one and the newest three finished %v", got, want)
	}
	e.clk.Add(2 * time.Hour)
	e.svc.Prune(ctx)
	list, _, _ = e.svc.List(ctx, "p", nil, 0)
	if len(list) != 1 || list[0].ID != pending.ID {
		t.Fatalf("after the retention: %+v", list)
	}
}
