package broker

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"net"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	pahov3 "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetd/fleetd/fleet"
)

// connectWith sends a CONNECT and returns the CONNACK code.
func (c *rawClient) connectWith(o connectSpec) byte {
	c.t.Helper()
	c.v = o.version
	c.send(o.encode())
	typ, body := c.read()
	if typ>>4 != 2 || len(body) < 2 {
		c.t.Fatalf("expected CONNACK, got type 0x%02x body %x", typ, body)
	}
	return body[1]
}

// dialFrom connects from another loopback address, as a second host would.
func dialFrom(t *testing.T, local, addr string) *rawClient {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(local)}, Timeout: 5 * time.Second}
	conn, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &rawClient{t: t, conn: conn, r: bufio.NewReader(conn)}
}

// healthyAfter shows that the registry still records: a healthy device
// connects and is born, and both are stored within 2 s.
func (e *env) healthyAfter(id string) {
	e.t.Helper()
	token := e.register(id)
	c := dialRaw(e.t, e.addr("tcp"))
	if code := c.connect(4, id, id, token, 30); code != 0 {
		e.t.Fatalf("healthy device %s: CONNACK 0x%02x", id, code)
	}
	c.send(publishPacket(devicePrefix(id)+"status", birthPayload("2.0.0"), true, 4))
	e.waitEvent(id, 2*time.Second, isEvent(fleet.KindBirth, ""))
	e.waitDevice(id, 2*time.Second, func(d fleet.Device) bool { return d.Online && d.Firmware == "2.0.0" })
}

// Case 1: a will is a publish with the device's authority, and obeys the
// same ACL.
func TestHostileWill(t *testing.T) {
	e := newEnv(t)
	evilToken := e.register("evil")
	victim := e.register("victim")
	sub := pahoV311(t, e.addr("tcp"), "victim", victim)
	got := make(chan string, 10)
	sub.Subscribe("devices/victim/ota/job", 1, func(_ pahov3.Client, m pahov3.Message) { got <- string(m.Payload()) }).Wait()

	for _, tc := range []struct {
		name  string
		v     byte
		topic string
		want  byte
	}{
		{"v3.1.1 will to another device's job topic", 4, "devices/victim/ota/job", 0x05},
		{"v5 will to another device's job topic", 5, "devices/victim/ota/job", 0x87},
		{"v5 will to a wildcard topic", 5, "devices/evil/#", 0x90},
		{"v5 will to its own job topic", 5, "devices/evil/ota/job", 0x87},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := dialRaw(t, e.addr("tcp"))
			code := c.connectWith(connectSpec{version: tc.v, id: "evil", user: "evil", pass: evilToken, keepalive: 30,
				willTopic: tc.topic, willQoS: 1, willPayload: []byte(`{"job_id":"forged"}`), willRetain: true})
			if code != tc.want {
				t.Fatalf("CONNACK 0x%02x, want 0x%02x", code, tc.want)
			}
			if err := c.closedWithin(2 * time.Second); err != nil {
				t.Fatal(err)
			}
		})
	}
	e.waitEvent("evil", 2*time.Second, func(ev fleet.Event) bool {
		return ev.Kind == fleet.KindRefused && ev.Reason == fleet.ReasonProtocolError && strings.Contains(ev.Detail, "will topic")
	})
	select {
	case m := <-got:
		t.Fatalf("the victim received a forged job: %s", m)
	case <-time.After(300 * time.Millisecond):
	}
	if msgs := e.b.srv.Topics.Messages("devices/victim/#"); len(msgs) != 0 {
		t.Fatalf("retained under the victim's topics: %+v", msgs)
	}

	// A retained will on telemetry is published unretained, as a publish is.
	c := dialRaw(t, e.addr("tcp"))
	if code := c.connectWith(connectSpec{version: 4, id: "evil", user: "evil", pass: evilToken, keepalive: 30,
		willTopic: "devices/evil/telemetry", willPayload: []byte(`{}`), willRetain: true}); code != 0 {
		t.Fatalf("will on its own telemetry: CONNACK 0x%02x", code)
	}
	c.conn.Close()
	e.waitEvent("evil", 2*time.Second, isEvent(fleet.KindDisconnect, fleet.ReasonConnectionLost))
	if msgs := e.b.srv.Topics.Messages("devices/evil/telemetry"); len(msgs) != 0 {
		t.Fatalf("telemetry will retained: %+v", msgs)
	}
}

// Case 1, delayed: a decommissioned device's pending delayed will neither
// reaches anyone nor comes back as a retained message.
func TestDelayedWillAfterDecommission(t *testing.T) {
	e := newEnv(t)
	token := e.register("gone")
	c := dialRaw(t, e.addr("tcp"))
	if code := c.connectWith(connectSpec{version: 5, id: "gone", user: "gone", pass: token, keepalive: 30, sessionExpiry: 60,
		willTopic: "devices/gone/status", willQoS: 1, willPayload: []byte(`{"online":false}`), willRetain: true, willDelay: 1}); code != 0 {
		t.Fatalf("CONNACK 0x%02x", code)
	}
	c.send(publishPacket("devices/gone/status", birthPayload("1.0.0"), true, 5))
	e.waitEvent("gone", 2*time.Second, isEvent(fleet.KindBirth, ""))
	c.conn.Close()
	e.waitEvent("gone", 2*time.Second, isEvent(fleet.KindDisconnect, ""))
	if _, err := e.svc.Decommission(context.Background(), "gone"); err != nil {
		t.Fatal(err)
	}
	// Past the will delay: there is nothing to poll for, the will must not appear.
	time.Sleep(2500 * time.Millisecond)
	if msgs := e.b.srv.Topics.Messages("devices/gone/#"); len(msgs) != 0 {
		t.Fatalf("retained after decommission: %+v", msgs)
	}
}

// Case 2: no string a device sends can make the event writer stop.
func TestHostileStringsAreRefusedAtTheEdge(t *testing.T) {
	e := newEnv(t)
	long := strings.Repeat("x", 3500)
	for _, v := range []byte{4, 5} {
		c := dialRaw(t, e.addr("tcp"))
		want := byte(0x02)
		if v == 5 {
			want = 0x85
		}
		if code := c.connect(v, long, long, "wrong", 30); code != want {
			t.Fatalf("v%d: 3 500-character client id: CONNACK 0x%02x, want 0x%02x", v, code, want)
		}
	}
	var detail string
	deadline := time.Now().Add(2 * time.Second)
	for detail == "" {
		err := e.pool.QueryRow(context.Background(), `SELECT detail FROM device_events WHERE device_id = '' AND kind = 'refused' LIMIT 1`).Scan(&detail)
		if err != nil && time.Now().After(deadline) {
			t.Fatalf("the refusal of a 3 500-character client id was not recorded: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if !strings.Contains(detail, "(3500 bytes)") || len(detail) > 300 {
		t.Fatalf("refusal detail %q: want a bounded excerpt naming the length", detail)
	}

	token := e.register("gw-1")
	c := dialRaw(t, e.addr("tcp"))
	if code := c.connectWith(connectSpec{version: 5, id: "gw-1", user: "gw-1", pass: token, keepalive: 30,
		userProps: [][2]string{{"firmware", strings.Repeat("9", 1000)}}}); code != 0 {
		t.Fatalf("CONNACK 0x%02x", code)
	}
	e.waitEvent("gw-1", 2*time.Second, func(ev fleet.Event) bool {
		return ev.Kind == fleet.KindRejected && strings.Contains(ev.Detail, "firmware user property")
	})
	c.send(publishPacket("devices/gw-1/status", birthPayload("1.0.0"), true, 5))
	e.waitDevice("gw-1", 2*time.Second, func(d fleet.Device) bool { return d.Firmware == "1.0.0" })
	c.send(publishPacket("devices/gw-1/status", []byte(`{"online":true,"firmware":"1.\u0000"}`), true, 5))
	e.waitEvent("gw-1", 2*time.Second, func(ev fleet.Event) bool {
		return ev.Kind == fleet.KindRejected && strings.Contains(ev.Detail, "control character")
	})
	if d := e.waitDevice("gw-1", time.Second, func(fleet.Device) bool { return true }); d.Firmware != "1.0.0" {
		t.Fatalf("firmware after a bad birth: %q, want the previous 1.0.0", d.Firmware)
	}
	e.healthyAfter("healthy")
}

// Case 3: failed logins with a device's id cannot lock the device out.
func TestWrongTokensCannotLockOut(t *testing.T) {
	e := newEnv(t, func(c *Config) {
		c.ClientConnectRate, c.ClientConnectBurst = 1, 5
		c.AuthFailureRate, c.AuthFailureBurst = 1, 5
	})
	token := e.register("victim")
	var codes []byte
	for range 15 {
		c := dialFrom(t, "127.0.0.2", e.addr("tcp"))
		codes = append(codes, c.connect(5, "victim", "victim", "wrong-token", 30))
	}
	if codes[0] != 0x86 || codes[14] != 0x9F {
		t.Fatalf("attacker's CONNACKs %x: want 0x86 first, 0x9f once its address is over the failure limit", codes)
	}
	c := dialRaw(t, e.addr("tcp"))
	if code := c.connect(5, "victim", "victim", token, 30); code != 0 {
		t.Fatalf("the device with its right token: CONNACK 0x%02x, want 0", code)
	}
	e.waitEvent("victim", 2*time.Second, isEvent(fleet.KindRefused, fleet.ReasonThrottled))
	// The device itself reconnecting too often is still limited.
	var last byte
	for range 10 {
		last = dialRaw(t, e.addr("tcp")).connect(5, "victim", "victim", token, 30)
	}
	if last != 0x9F {
		t.Fatalf("the device's own 11th connect in a second: CONNACK 0x%02x, want 0x9f", last)
	}
}

// Case 4: memory for unauthenticated traffic comes back.
func TestUnauthenticatedMemoryIsBounded(t *testing.T) {
	e := newEnv(t)
	heap := func() uint64 {
		runtime.GC()
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m.HeapAlloc
	}
	before := heap()
	big := strings.Repeat("p", 60_000)
	will := []byte(strings.Repeat("w", 60_000))
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 125 {
				conn, err := net.DialTimeout("tcp", e.addr("tcp"), 5*time.Second)
				if err != nil {
					t.Error(err)
					return
				}
				id := fmt.Sprintf("u-%d-%d-%x", w, i, rand.Uint64())
				o := connectSpec{version: 4, id: id, user: id, pass: big, keepalive: 30, willTopic: "devices/" + id + "/status", willPayload: will}
				conn.SetDeadline(time.Now().Add(5 * time.Second))
				conn.Write(o.encode())
				buf := make([]byte, 4)
				_, _ = conn.Read(buf)
				conn.Close()
			}
		}()
	}
	wg.Wait()
	// Every refusal is recorded before memory is measured: the recorder's
	// buffer is not what is under test.
	deadline := time.Now().Add(10 * time.Second)
	for {
		var n int
		if err := e.pool.QueryRow(context.Background(), `SELECT count(*) FROM device_events WHERE kind = 'refused'`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n >= 1000 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of 1000 refusals recorded", n)
		}
		time.Sleep(50 * time.Millisecond)
	}
	after := heap()
	grown := int64(after) - int64(before)
	t.Logf("heap before %d MB, after %d MB", before>>20, after>>20)
	if grown > 20<<20 {
		t.Fatalf("heap grew by %d MB after 1 000 unauthenticated 120 KB CONNECTs; want at most 20 MB", grown>>20)
	}
}

// Case 4: sockets that never finish CONNECT are capped per source.
func TestPendingConnectsCapped(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.MaxPendingConnectsPerSource = 5 })
	var held []net.Conn
	for range 5 {
		conn, err := net.Dial("tcp", e.addr("tcp"))
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, conn)
		t.Cleanup(func() { conn.Close() })
	}
	// Wait until the five are accepted and counted.
	deadline := time.Now().Add(2 * time.Second)
	for e.b.limits.pendingFrom(sourceOf(held[0].LocalAddr())) < 5 {
		if time.Now().After(deadline) {
			t.Fatal("the five silent sockets were never counted")
		}
		time.Sleep(10 * time.Millisecond)
	}
	sixth := dialRaw(t, e.addr("tcp"))
	if err := sixth.closedWithin(time.Second); err != nil {
		t.Fatalf("sixth silent socket from one address: %v", err)
	}
	// Another source is not affected.
	other := dialFrom(t, "127.0.0.3", e.addr("tcp"))
	token := e.register("elsewhere")
	if code := other.connect(4, "elsewhere", "elsewhere", token, 30); code != 0 {
		t.Fatalf("device from another address: CONNACK 0x%02x", code)
	}
}

// Case 5: one device cannot flood the dispatcher; its session ends.
func TestSubscribeFloodEndsSession(t *testing.T) {
	e := newEnv(t)
	var mu sync.Mutex
	notes := 0
	e.b.OnSubscribe("ota/job", func(string) { mu.Lock(); notes++; mu.Unlock() })
	token := e.register("noisy")
	c := dialRaw(t, e.addr("tcp"))
	if code := c.connect(5, "noisy", "noisy", token, 30); code != 0 {
		t.Fatalf("CONNACK 0x%02x", code)
	}
	sub := func(id uint16) []byte {
		body := binary.BigEndian.AppendUint16(nil, id)
		body = append(body, 0) // no properties
		body = appendString(body, "devices/noisy/ota/job")
		return packet(0x82, append(body, 1))
	}
	// One SUBSCRIBE at a time, each answered, as a looping device would:
	// the session must end at its subscribe burst, not at 20 000.
	var reason byte
	for i := range 20000 {
		c.send(sub(uint16(i%60000 + 1)))
		typ, body, err := c.tryRead(5 * time.Second)
		if err != nil {
			break
		}
		if typ>>4 == 14 {
			if len(body) > 0 {
				reason = body[0]
			}
			break
		}
	}
	if reason != 0x96 {
		t.Fatalf("DISCONNECT reason 0x%02x, want 0x96 (message rate too high)", reason)
	}
	e.waitEvent("noisy", 2*time.Second, isEvent(fleet.KindDisconnect, fleet.ReasonThrottled))
	mu.Lock()
	defer mu.Unlock()
	if notes > 60 {
		t.Fatalf("%d subscription notes from one session; want them bounded by its subscribe burst", notes)
	}
	e.healthyAfter("healthy")
}

// Case 6: refusals and bad messages leave bounded, folded log lines.
func TestLogFloodBounded(t *testing.T) {
	e := newEnv(t)
	token := e.register("chatty")
	start := len(e.log.String())
	for range 50 {
		dialRaw(t, e.addr("tcp")).connect(4, "chatty", "chatty", "wrong", 30)
	}
	c := dialRaw(t, e.addr("tcp"))
	if code := c.connect(4, "chatty", "chatty", token, 30); code != 0 {
		t.Fatalf("CONNACK 0x%02x", code)
	}
	for range 5 {
		c.send(publishPacket("devices/chatty/status", []byte(`{"online":true,"firmware":"`+strings.Repeat("A", 200_000)+`"}`), false, 4))
	}
	e.waitEvent("chatty", 2*time.Second, isEvent(fleet.KindRejected, ""))
	time.Sleep(200 * time.Millisecond) // let the last log lines land; nothing else to wait on
	logs := e.log.String()[start:]
	if n := strings.Count(logs, "connection refused"); n > 2 {
		t.Fatalf("%d log lines for 50 refusals of one id within the interval; want them folded", n)
	}
	if len(logs) > 20_000 {
		t.Fatalf("%d bytes of log for 50 refusals and 5 oversized births; want bounded excerpts", len(logs))
	}
}
