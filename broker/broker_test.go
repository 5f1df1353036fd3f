package broker

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/url"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/autopaho"
	"github.com/eclipse/paho.golang/paho"
	pahov3 "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetd/fleetd/fleet"
)

func pahoV311(t *testing.T, server, id, token string) pahov3.Client {
	t.Helper()
	opts := pahov3.NewClientOptions().AddBroker(server).SetClientID(id).SetUsername(id).SetPassword(token).
		SetProtocolVersion(4).SetAutoReconnect(false).SetConnectRetry(false).SetKeepAlive(30*time.Second).
		SetWill("devices/"+id+"/status", `{"online":false}`, 1, true)
	c := pahov3.NewClient(opts)
	t.Cleanup(func() { c.Disconnect(100) })
	return c
}

// TestRealClientsConnect: paho (3.1.1) and autopaho (5) devices connect with
// their tokens, announce their firmware and send telemetry; the registry shows
// them online with the right protocol and firmware.
func TestRealClientsConnect(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()

	tok := e.register("gw-v311")
	c := pahoV311(t, "tcp://"+e.addr("tcp"), "gw-v311", tok)
	if tk := c.Connect(); !tk.WaitTimeout(5*time.Second) || tk.Error() != nil {
		t.Fatalf("paho connect: %v", tk.Error())
	}
	c.Publish("devices/gw-v311/status", 1, true, birthPayload("1.2.0")).Wait()
	c.Publish("devices/gw-v311/telemetry", 0, false, `{"rssi_dbm":-67,"channel":6,"uptime_s":3600}`).Wait()

	tok5 := e.register("gw-v5")
	u, _ := url.Parse("mqtt://" + e.addr("tcp"))
	cm, err := autopaho.NewConnection(ctx, autopaho.ClientConfig{
		ServerUrls: []*url.URL{u}, KeepAlive: 30, CleanStartOnInitialConnection: true,
		ConnectUsername: "gw-v5", ConnectPassword: []byte(tok5),
		WillMessage:  &paho.WillMessage{Topic: "devices/gw-v5/status", Payload: []byte(`{"online":false}`), Retain: true, QoS: 1},
		ClientConfig: paho.ClientConfig{ClientID: "gw-v5"},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer cm.Disconnect(ctx)
	waitCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := cm.AwaitConnection(waitCtx); err != nil {
		t.Fatalf("autopaho connect: %v", err)
	}
	if _, err := cm.Publish(ctx, &paho.Publish{Topic: "devices/gw-v5/status", QoS: 1, Retain: true, Payload: birthPayload("2.0.1")}); err != nil {
		t.Fatal(err)
	}
	if _, err := cm.Publish(ctx, &paho.Publish{Topic: "devices/gw-v5/telemetry", QoS: 1, Payload: []byte(`{"rssi_dbm":-50}`)}); err != nil {
		t.Fatal(err)
	}

	for _, want := range []struct {
		id, fw string
		proto  fleet.Protocol
	}{{"gw-v311", "1.2.0", 4}, {"gw-v5", "2.0.1", 5}} {
		d := e.waitDevice(want.id, 5*time.Second, func(d fleet.Device) bool { return d.Online && d.Firmware == want.fw })
		if d.ProtocolVersion != want.proto || d.KeepaliveRequested != 30 || d.Listener != "tcp" || d.BrokerNode != "test" {
			t.Errorf("%s: %+v", want.id, d)
		}
		e.waitDevice(want.id, 5*time.Second, func(d fleet.Device) bool { return d.LastSeen != nil })
	}

	// A clean DISCONNECT is a client_disconnect and leaves the device offline.
	c.Disconnect(100)
	e.waitEvent("gw-v311", 5*time.Second, isEvent(fleet.KindDisconnect, fleet.ReasonClientDisconnect))
	e.waitDevice("gw-v311", 5*time.Second, func(d fleet.Device) bool { return !d.Online })
}

// TestRefusedConnects checks the CONNACK code of every refusal, for each
// protocol version, and that each refusal is recorded.
func TestRefusedConnects(t *testing.T) {
	e := newEnv(t)
	tok := e.register("dev")
	tests := []struct {
		name             string
		id, user, pass   string
		v3, v4, v5       byte
		reason           fleet.Reason
		detailContaining string
	}{
		{"wrong token", "dev", "dev", tok + "x", 0x04, 0x04, 0x86, fleet.ReasonAuthFailed, "wrong token"},
		{"no password", "dev", "dev", "", 0x04, 0x04, 0x86, fleet.ReasonAuthFailed, "wrong token"},
		{"unknown device", "ghost", "ghost", tok, 0x04, 0x04, 0x86, fleet.ReasonAuthFailed, "unknown device"},
		{"user name is not the id", "dev", "someone", tok, 0x04, 0x04, 0x86, fleet.ReasonAuthFailed, "user name"},
	}
	for _, tt := range tests {
		for _, v := range []byte{3, 4, 5} {
			t.Run(fmt.Sprintf("%s/v%d", tt.name, v), func(t *testing.T) {
				want := map[byte]byte{3: tt.v3, 4: tt.v4, 5: tt.v5}[v]
				c := dialRaw(t, e.addr("tcp"))
				if got := c.connect(v, tt.id, tt.user, tt.pass, 30); got != want {
					t.Fatalf("CONNACK 0x%02x, want 0x%02x", got, want)
				}
				if err := c.closedWithin(2 * time.Second); err != nil {
					t.Fatal(err)
				}
			})
		}
		e.waitEvent(tt.id, 5*time.Second, func(ev fleet.Event) bool {
			return ev.Kind == fleet.KindRefused && ev.Reason == tt.reason && strings.Contains(ev.Detail, tt.detailContaining)
		})
	}
	// 3 refusals with id "dev" × 3 protocol versions. The waits above see
	// the first event of each kind; the last ones may still be on their way
	// through the recorder's batch, so poll for all nine (and no more).
	var events []fleet.Event
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		events, _ = e.svc.Events(context.Background(), "dev", nil, 100)
		if len(events) >= 9 || time.Now().After(deadline) {
			break
		}
	}
	if len(events) != 9 {
		t.Fatalf("%d events for dev, want 9:%s", len(events), describe(events))
	}
}

// TestDecommissionKicksAndForgets: a decommissioned device is kicked within a
// second, cannot come back, and the broker keeps nothing of it.
func TestDecommissionKicksAndForgets(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	tok := e.register("doomed")
	c := dialRaw(t, e.addr("tcp"))
	if code := c.connect(5, "doomed", "doomed", tok, 30); code != 0 {
		t.Fatalf("CONNACK 0x%02x", code)
	}
	c.send(publishPacket("devices/doomed/status", birthPayload("1.0.0"), true, 5))
	sub := appendString([]byte{0, 1, 0}, "devices/doomed/ota/job") // packet id 1, no properties
	c.send(packet(0x82, append(sub, 1)))
	if typ, _ := c.read(); typ>>4 != 9 {
		t.Fatalf("expected SUBACK, got 0x%02x", typ)
	}
	e.waitDevice("doomed", 5*time.Second, func(d fleet.Device) bool { return d.Online && d.Firmware == "1.0.0" })

	start := time.Now()
	if _, err := e.svc.Decommission(ctx, "doomed"); err != nil {
		t.Fatal(err)
	}
	typ, body := c.read()
	if typ != 0xE0 || len(body) < 1 || body[0] != 0x98 {
		t.Fatalf("expected DISCONNECT 0x98, got 0x%02x %x", typ, body)
	}
	if err := c.closedWithin(time.Second - time.Since(start)); err != nil {
		t.Fatalf("not kicked within 1s: %v", err)
	}
	e.waitEvent("doomed", 5*time.Second, isEvent(fleet.KindDisconnect, fleet.ReasonDecommissioned))

	for _, v := range []byte{4, 5} {
		again := dialRaw(t, e.addr("tcp"))
		want := map[byte]byte{4: 0x05, 5: 0x87}[v]
		if code := again.connect(v, "doomed", "doomed", tok, 30); code != want {
			t.Fatalf("v%d reconnect after decommission: CONNACK 0x%02x, want 0x%02x", v, code, want)
		}
	}
	e.waitEvent("doomed", 5*time.Second, isEvent(fleet.KindRefused, fleet.ReasonDecommissioned))

	// No trace: client, session, subscriptions, retained status, rate bucket.
	if _, ok := e.b.srv.Clients.Get("doomed"); ok {
		t.Error("client still known to the broker")
	}
	if msgs := e.b.srv.Topics.Messages("devices/doomed/#"); len(msgs) != 0 {
		t.Errorf("retained messages left: %v", msgs)
	}
	if subs := e.b.srv.Topics.Subscribers("devices/doomed/ota/job"); len(subs.Subscriptions) != 0 {
		t.Errorf("subscriptions left: %v", subs.Subscriptions)
	}
	e.b.sessions.Range(func(_, v any) bool {
		if v.(*session).deviceID == "doomed" {
			t.Error("session left in the broker")
		}
		return true
	})
	e.b.limits.mu.Lock()
	_, limited := e.b.limits.clients["doomed"]
	e.b.limits.mu.Unlock()
	if limited {
		t.Error("rate-limit bucket left")
	}

	// The id can be registered again and connects with its new token.
	_, tok2, err := e.svc.Register(ctx, fleet.NewDevice{ID: "doomed"})
	if err != nil {
		t.Fatal(err)
	}
	if code := dialRaw(t, e.addr("tcp")).connect(4, "doomed", "doomed", tok2, 30); code != 0 {
		t.Fatalf("re-registered device: CONNACK 0x%02x", code)
	}
}

// TestMalformedPingreq plays the firmware that sends PINGREQ with reserved
// flag bits set.
func TestMalformedPingreq(t *testing.T) {
	e := newEnv(t)
	tok := e.register("buggy")
	c := dialRaw(t, e.addr("tcp"))
	if code := c.connect(4, "buggy", "buggy", tok, 30); code != 0 {
		t.Fatalf("CONNACK 0x%02x", code)
	}
	time.Sleep(700 * time.Millisecond) // a silence the session survives
	c.send([]byte{0xC0, 0x00})         // a good PINGREQ
	if typ, _ := c.read(); typ != 0xD0 {
		t.Fatalf("expected PINGRESP, got 0x%02x", typ)
	}
	c.send([]byte{0xC2, 0x00})
	if err := c.closedWithin(2 * time.Second); err != nil {
		t.Fatal(err)
	}
	ev := e.waitEvent("buggy", 5*time.Second, isEvent(fleet.KindDisconnect, fleet.ReasonProtocolError))
	if ev.Detail != "PINGREQ with reserved flags 0x2" || ev.Pings != 2 || ev.IdleMillis > 1000 {
		t.Fatalf("detail %q pings %d, want the PINGREQ named and 2 pings counted", ev.Detail, ev.Pings)
	}
	// CONNECT and two PINGREQs, 2 bytes each after the CONNECT.
	if ev.PacketsIn != 3 || ev.BytesIn < 4+14 || ev.MaxSilenceMillis < 650 || ev.MaxSilenceMillis > 1500 {
		t.Fatalf("packets %d bytes %d longest silence %d ms: want the session's 3 packets, their bytes and the 700 ms pause",
			ev.PacketsIn, ev.BytesIn, ev.MaxSilenceMillis)
	}
}

// TestKeepaliveTimeout: a device that goes silent with its socket open is
// recorded as keepalive_timeout within 1.5 × keepalive + 1 s.
func TestKeepaliveTimeout(t *testing.T) {
	e := newEnv(t)
	tok := e.register("frozen")
	c := dialRaw(t, e.addr("tcp"))
	const keepalive = 2
	if code := c.connect(4, "frozen", "frozen", tok, keepalive); code != 0 {
		t.Fatalf("CONNACK 0x%02x", code)
	}
	silentSince := time.Now()
	limit := time.Duration(1.5*keepalive*float64(time.Second)) + time.Second
	ev := e.waitEvent("frozen", limit, isEvent(fleet.KindDisconnect, fleet.ReasonKeepaliveTimeout))
	if ev.IdleMillis < 2900 || ev.Pings != 0 {
		t.Errorf("idle %d ms, pings %d: want ~3000 ms of silence and no pings", ev.IdleMillis, ev.Pings)
	}
	if ev.PacketsIn != 1 || ev.DurationMillis < 2900 || ev.DurationMillis-int64(ev.IdleMillis) > 500 || ev.MaxSilenceMillis > 500 {
		t.Errorf("packets %d, duration %d ms, idle %d ms: want only the CONNECT, then silence to the end", ev.PacketsIn, ev.DurationMillis, ev.IdleMillis)
	}
	t.Logf("keepalive_timeout committed %s after the device went silent (limit %s)", time.Since(silentSince).Round(time.Millisecond), limit)
}

// TestTakeover: a second connection with the same id takes the session over;
// the takeover is recorded and the device stays online.
func TestTakeover(t *testing.T) {
	e := newEnv(t)
	tok := e.register("twin")
	first := dialRaw(t, e.addr("tcp"))
	if code := first.connect(5, "twin", "twin", tok, 30); code != 0 {
		t.Fatalf("CONNACK 0x%02x", code)
	}
	first.send(publishPacket("devices/twin/status", birthPayload("1.0.0"), true, 5))
	e.waitDevice("twin", 5*time.Second, func(d fleet.Device) bool { return d.Online })
	second := dialRaw(t, e.addr("tcp"))
	if code := second.connect(5, "twin", "twin", tok, 30); code != 0 {
		t.Fatalf("CONNACK 0x%02x", code)
	}
	typ, body := first.read()
	if typ != 0xE0 || body[0] != 0x8E {
		t.Fatalf("first session: expected DISCONNECT 0x8E, got 0x%02x %x", typ, body)
	}
	ev := e.waitEvent("twin", 5*time.Second, isEvent(fleet.KindDisconnect, fleet.ReasonSessionTakeover))
	connects := 0
	events, _ := e.svc.Events(context.Background(), "twin", nil, 100)
	var newest int64
	for _, x := range events {
		if x.Kind == fleet.KindConnect {
			connects++
			newest = max(newest, x.SessionEpoch)
		}
	}
	if connects != 2 || ev.SessionEpoch >= newest {
		t.Fatalf("want 2 connects and the takeover on the older epoch:%s", describe(events))
	}
	d := e.waitDevice("twin", 5*time.Second, func(d fleet.Device) bool { return d.SessionEpoch == newest })
	if !d.Online {
		t.Fatalf("device offline after takeover: %+v", d)
	}
}

// TestTopicACL: device A can neither subscribe to nor publish under devices/B.
func TestTopicACL(t *testing.T) {
	e := newEnv(t)
	tokA, tokB := e.register("a"), e.register("b")
	b := dialRaw(t, e.addr("tcp"))
	if code := b.connect(5, "b", "b", tokB, 30); code != 0 {
		t.Fatalf("CONNACK 0x%02x", code)
	}
	b.send(packet(0x82, append(appendString([]byte{0, 1, 0}, "devices/b/ota/job"), 1)))
	b.read()

	a := dialRaw(t, e.addr("tcp"))
	if code := a.connect(5, "a", "a", tokA, 30); code != 0 {
		t.Fatalf("CONNACK 0x%02x", code)
	}
	for i, filter := range []string{"devices/b/ota/job", "devices/+/ota/job", "devices/#", "devices/a/#"} {
		a.send(packet(0x82, append(appendString([]byte{0, byte(i + 1), 0}, filter), 1)))
		typ, body := a.read()
		if typ>>4 != 9 || body[len(body)-1] != 0x87 {
			t.Fatalf("subscribe %s: got 0x%02x %x, want SUBACK 0x87", filter, typ, body)
		}
	}
	// QoS 1 publish under b's topics: PUBACK 0x87, and b receives nothing.
	var pub []byte
	pub = appendString(pub, "devices/b/ota/job")
	pub = append(pub, 0, 7, 0) // packet id 7, no properties
	pub = append(pub, `{"job_id":"evil"}`...)
	a.send(packet(0x32, pub))
	typ, body := a.read()
	if typ>>4 != 4 || len(body) < 3 || body[2] != 0x87 {
		t.Fatalf("publish to b: got 0x%02x %x, want PUBACK 0x87", typ, body)
	}
	if _, _, err := b.tryRead(300 * time.Millisecond); err == nil {
		t.Fatal("device b received a message published by a")
	}
	e.waitEvent("a", 5*time.Second, func(ev fleet.Event) bool {
		return ev.Kind == fleet.KindACLDenied && ev.Detail == "publish to devices/b/ota/job"
	})
	e.waitEvent("a", 5*time.Second, func(ev fleet.Event) bool {
		return ev.Kind == fleet.KindACLDenied && ev.Detail == "subscribe to devices/b/ota/job"
	})
}

// TestConnectDeadline: a socket that never sends CONNECT is closed.
func TestConnectDeadline(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.ConnectTimeout = 500 * time.Millisecond })
	c := dialRaw(t, e.addr("tcp"))
	if err := c.closedWithin(2 * time.Second); err != nil {
		t.Fatal(err)
	}
	// A slow CONNECT (half a packet) is no better.
	c2 := dialRaw(t, e.addr("tcp"))
	c2.send(connectPacket(4, "x", "x", "y", 30)[:5])
	if err := c2.closedWithin(2 * time.Second); err != nil {
		t.Fatal(err)
	}
}

// TestPacketTooLarge: a 10 MiB packet is refused and recorded.
func TestPacketTooLarge(t *testing.T) {
	e := newEnv(t)
	tok := e.register("chatty")
	c := dialRaw(t, e.addr("tcp"))
	if code := c.connect(4, "chatty", "chatty", tok, 30); code != 0 {
		t.Fatalf("CONNACK 0x%02x", code)
	}
	body := appendString(nil, "devices/chatty/telemetry")
	body = append(body, make([]byte, 10<<20)...)
	go c.conn.Write(packet(0x30, body)) // the broker hangs up part way
	if err := c.closedWithin(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	ev := e.waitEvent("chatty", 5*time.Second, isEvent(fleet.KindDisconnect, fleet.ReasonPacketTooLarge))
	if want := fmt.Sprintf("maximum packet size of %d bytes", 256<<10); !strings.Contains(ev.Detail, want) {
		t.Fatalf("detail %q: want it to name the limit (%s)", ev.Detail, want)
	}
}

// TestThrottled: over the broker's connect rate, and over one device's, a
// connect is refused with "connection rate exceeded" (v5) / "server
// unavailable" (v3) and recorded.
func TestThrottled(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.ClientConnectRate, c.ClientConnectBurst = 0.01, 2 })
	tok := e.register("flappy")
	for i, want := range []byte{0, 0, 0x9F} {
		if got := dialRaw(t, e.addr("tcp")).connect(5, "flappy", "flappy", tok, 30); got != want {
			t.Fatalf("attempt %d: CONNACK 0x%02x, want 0x%02x", i+1, got, want)
		}
	}
	if got := dialRaw(t, e.addr("tcp")).connect(4, "flappy", "flappy", tok, 30); got != 0x03 {
		t.Fatalf("v3 attempt: CONNACK 0x%02x, want 0x03", got)
	}
	e.waitEvent("flappy", 5*time.Second, isEvent(fleet.KindRefused, fleet.ReasonThrottled))
	// Another device is not affected by flappy's bucket.
	other := e.register("calm")
	if got := dialRaw(t, e.addr("tcp")).connect(5, "calm", "calm", other, 30); got != 0 {
		t.Fatalf("other device: CONNACK 0x%02x", got)
	}

	g := newEnv(t, func(c *Config) { c.ConnectRate, c.ConnectBurst = 0.01, 1 })
	t1, t2 := g.register("one"), g.register("two")
	if got := dialRaw(t, g.addr("tcp")).connect(5, "one", "one", t1, 30); got != 0 {
		t.Fatalf("first connect: 0x%02x", got)
	}
	// Over the broker's rate the connection is answered before mochi sees
	// it (Broker.throttle): the same codes, the event, then the socket closes.
	c := dialRaw(t, g.addr("tcp"))
	if got := c.connect(5, "two", "two", t2, 30); got != 0x9F {
		t.Fatalf("over the broker rate: CONNACK 0x%02x, want 0x9F", got)
	}
	if err := c.closedWithin(time.Second); err != nil {
		t.Fatalf("throttled connection: %v", err)
	}
	if got := dialRaw(t, g.addr("tcp")).connect(4, "two", "two", t2, 30); got != 0x03 {
		t.Fatalf("v3 over the broker rate: CONNACK 0x%02x, want 0x03", got)
	}
	ev := g.waitEvent("two", 5*time.Second, isEvent(fleet.KindRefused, fleet.ReasonThrottled))
	if ev.Detail != "broker connect rate exceeded" || ev.Listener != "tcp" || ev.RemoteAddr == "" || ev.ProtocolVersion == 0 {
		t.Fatalf("throttled event %+v", ev)
	}
	// A throttled socket that never sends CONNECT is closed at the connect
	// timeout (2 s here), not held.
	if err := dialRaw(t, g.addr("tcp")).closedWithin(4 * time.Second); err != nil {
		t.Fatalf("silent throttled connection: %v", err)
	}
}

// TestShutdownTellsClients: closing the broker sends MQTT 5 clients DISCONNECT
// 0x8B and records server_shutdown for every session.
func TestShutdownTellsClients(t *testing.T) {
	e := newEnv(t)
	var clients []*rawClient
	for i := range 5 {
		id := fmt.Sprintf("s%d", i)
		c := dialRaw(t, e.addr("tcp"))
		if code := c.connect(5, id, id, e.register(id), 30); code != 0 {
			t.Fatalf("CONNACK 0x%02x", code)
		}
		clients = append(clients, c)
	}
	idle := dialRaw(t, e.addr("tcp")) // never sends CONNECT: must not hold up the shutdown
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := e.b.Close(ctx); err != nil {
		t.Fatal(err)
	}
	for i, c := range clients {
		typ, body := c.read()
		if typ != 0xE0 || body[0] != 0x8B {
			t.Fatalf("client %d: expected DISCONNECT 0x8B, got 0x%02x %x", i, typ, body)
		}
	}
	if err := idle.closedWithin(time.Second); err != nil {
		t.Fatal(err)
	}
	if err := e.rec.Close(ctx); err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		e.waitEvent(fmt.Sprintf("s%d", i), time.Second, isEvent(fleet.KindDisconnect, fleet.ReasonServerShutdown))
	}
}

// TestCloseWithoutStart: a broker that was built but never started (start-up
// failed after New) closes promptly and releases the addresses New bound.
func TestCloseWithoutStart(t *testing.T) {
	b, err := New(Config{TCPAddr: "127.0.0.1:0", WSAddr: "127.0.0.1:0", Node: "test"}, nil, nil, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	addrs := b.Addrs()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	closed := make(chan error, 1)
	go func() { closed <- b.Close(ctx) }()
	select {
	case err := <-closed:
		if err != nil {
			t.Fatalf("Close: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close without Start did not return")
	}
	for id, addr := range addrs {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			t.Fatalf("%s listener's address %s still bound after Close: %v", id, addr, err)
		}
		ln.Close()
	}
	if err := b.Close(ctx); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

// TestWebSocket: a paho device connects over MQTT-over-WebSocket.
func TestWebSocket(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.WSAddr = "127.0.0.1:0" })
	tok := e.register("ws-dev")
	c := pahoV311(t, "ws://"+e.addr("ws")+"/mqtt", "ws-dev", tok)
	if tk := c.Connect(); !tk.WaitTimeout(5*time.Second) || tk.Error() != nil {
		t.Fatalf("connect over websocket: %v", tk.Error())
	}
	got := make(chan string, 1)
	c.Subscribe("devices/ws-dev/cmd/#", 1, func(_ pahov3.Client, m pahov3.Message) { got <- string(m.Payload()) }).Wait()
	c.Publish("devices/ws-dev/status", 1, true, birthPayload("3.0.0")).Wait()
	d := e.waitDevice("ws-dev", 5*time.Second, func(d fleet.Device) bool { return d.Online && d.Firmware == "3.0.0" })
	if d.Listener != "ws" {
		t.Fatalf("listener %q, want ws", d.Listener)
	}
	if err := e.b.srv.Publish("devices/ws-dev/cmd/reboot", []byte("now"), false, 1); err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-got:
		if m != "now" {
			t.Fatalf("got %q", m)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("command not delivered over websocket")
	}
}

// TestDeviceHandler: a handler sees a device's message before it is
// acknowledged; when the handler fails, no PUBACK is sent, so the device sends
// it again. Send reaches a subscribed device.
func TestDeviceHandler(t *testing.T) {
	e := newEnv(t)
	tok := e.register("reporter")
	var fail atomic.Bool
	fail.Store(true)
	got := make(chan string, 4)
	e.b.Handle("ota/status", func(id string, payload []byte) error {
		if fail.Load() {
			return fmt.Errorf("database unavailable")
		}
		got <- id + " " + string(payload)
		return nil
	})
	c := dialRaw(t, e.addr("tcp"))
	if code := c.connect(5, "reporter", "reporter", tok, 30); code != 0 {
		t.Fatalf("CONNACK 0x%02x", code)
	}
	pub := appendString(nil, "devices/reporter/ota/status")
	pub = append(pub, 0, 9, 0) // packet id 9, no properties
	pub = append(pub, `{"job_id":"j","state":"installing"}`...)
	c.send(packet(0x32, pub))
	if typ, body, err := c.tryRead(500 * time.Millisecond); err == nil {
		t.Fatalf("acknowledged although the handler failed: 0x%02x %x", typ, body)
	}
	fail.Store(false)
	c.send(packet(0x3A, pub)) // the same message again, DUP set
	if typ, _ := c.read(); typ>>4 != 4 {
		t.Fatalf("expected PUBACK, got 0x%02x", typ)
	}
	if m := <-got; m != `reporter {"job_id":"j","state":"installing"}` {
		t.Fatalf("handler got %q", m)
	}

	c.send(packet(0x82, append(appendString([]byte{0, 1, 0}, "devices/reporter/ota/job"), 1)))
	c.read() // SUBACK
	if err := e.b.Send("reporter", "ota/job", []byte(`{"job_id":"k"}`)); err != nil {
		t.Fatal(err)
	}
	typ, body := c.read()
	if typ>>4 != 3 || !strings.Contains(string(body), `{"job_id":"k"}`) {
		t.Fatalf("expected the job, got 0x%02x %q", typ, body)
	}
}

// TestKeepalivePolicy: an MQTT 5 device asking for more than the policy
// allows is told the cap in the CONNACK (Server Keep Alive) and held to it;
// an MQTT 3 device keeps what it asked for (it could not be told).
func TestKeepalivePolicy(t *testing.T) {
	e := newEnv(t)
	if _, err := e.svc.SetPolicy(context.Background(), fleet.Policy{Keepalive: fleet.KeepalivePolicy{MaxSeconds: 20}}); err != nil {
		t.Fatal(err)
	}
	tok5, tok3 := e.register("ka5"), e.register("ka3")
	c := dialRaw(t, e.addr("tcp"))
	c.send(connectPacket(5, "ka5", "ka5", tok5, 60))
	typ, body := c.read()
	if typ != 0x20 || body[1] != 0 || !bytes.Contains(body[2:], []byte{0x13, 0x00, 20}) {
		t.Fatalf("CONNACK %x: want success with Server Keep Alive 20", body)
	}
	ev := e.waitEvent("ka5", 5*time.Second, isEvent(fleet.KindConnect, ""))
	if ev.KeepaliveRequested != 60 || ev.KeepaliveEffective != 20 {
		t.Fatalf("v5 keepalive requested %d effective %d, want 60 and 20", ev.KeepaliveRequested, ev.KeepaliveEffective)
	}
	if code := dialRaw(t, e.addr("tcp")).connect(4, "ka3", "ka3", tok3, 60); code != 0 {
		t.Fatalf("CONNACK 0x%02x", code)
	}
	ev = e.waitEvent("ka3", 5*time.Second, isEvent(fleet.KindConnect, ""))
	if ev.KeepaliveEffective != 60 {
		t.Fatalf("v3 keepalive changed to %d without telling the device", ev.KeepaliveEffective)
	}
}

// TestTCPKeepaliveOnlyWithoutMQTTKeepalive: accepted sockets carry no TCP
// keepalive (it would cost every connect four setsockopt calls), except for
// a device that asked for no MQTT keepalive, whose dead link only TCP
// probes can find.
func TestTCPKeepaliveOnlyWithoutMQTTKeepalive(t *testing.T) {
	e := newEnv(t)
	for _, tc := range []struct {
		id        string
		keepalive uint16
		want      bool
	}{{"ka-mqtt", 30, false}, {"ka-none", 0, true}} {
		tok := e.register(tc.id)
		c := dialRaw(t, e.addr("tcp"))
		if code := c.connect(4, tc.id, tc.id, tok, tc.keepalive); code != 0 {
			t.Fatalf("%s: CONNACK 0x%02x", tc.id, code)
		}
		cl, ok := e.b.srv.Clients.Get(tc.id)
		if !ok {
			t.Fatalf("%s: no client", tc.id)
		}
		if got := socketKeepalive(t, cl.Net.Conn.(*wireConn).Conn); got != tc.want {
			t.Errorf("%s (MQTT keepalive %d): SO_KEEPALIVE %v on the broker's socket, want %v", tc.id, tc.keepalive, got, tc.want)
		}
	}
}

// socketKeepalive reads SO_KEEPALIVE of a TCP connection.
func socketKeepalive(t *testing.T, c net.Conn) bool {
	t.Helper()
	rc, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var v int
	var serr error
	if err := rc.Control(func(fd uintptr) { v, serr = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_KEEPALIVE) }); err != nil {
		t.Fatal(err)
	}
	if serr != nil {
		t.Fatal(serr)
	}
	return v != 0
}
