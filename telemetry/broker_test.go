package telemetry_test

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fleetd/fleetd/broker"
	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/brokertest"
	"github.com/fleetd/fleetd/telemetry"
)

// mqttConn is a device speaking MQTT 3.1.1 over raw TCP: as fast as the
// socket allows, and with PINGREQ on demand to time the broker's answer.
type mqttConn struct {
	conn net.Conn
	r    *bufio.Reader
}

func lenPrefixed(b []byte, s string) []byte {
	return append(binary.BigEndian.AppendUint16(b, uint16(len(s))), s...)
}

// frame prepends the fixed header (type and flags, remaining length).
func frame(first byte, body []byte) []byte {
	out := []byte{first}
	for n := len(body); ; {
		d := byte(n & 0x7f)
		if n >>= 7; n > 0 {
			d |= 0x80
		}
		out = append(out, d)
		if n == 0 {
			break
		}
	}
	return append(out, body...)
}

func dialDevice(t testing.TB, addr, id, token string) *mqttConn {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	body := lenPrefixed(nil, "MQTT")
	body = append(body, 4, 0xC2, 0, 30) // level 4; user name, password, clean session; keepalive 30 s
	body = lenPrefixed(lenPrefixed(lenPrefixed(body, id), id), token)
	if _, err := conn.Write(frame(0x10, body)); err != nil {
		t.Fatal(err)
	}
	c := &mqttConn{conn: conn, r: bufio.NewReader(conn)}
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	ack := make([]byte, 4)
	if _, err := io.ReadFull(c.r, ack); err != nil || ack[0] != 0x20 || ack[3] != 0 {
		t.Fatalf("CONNACK of %s: % x, %v", id, ack, err)
	}
	return c
}

func (c *mqttConn) publish(topic string, payload []byte) error {
	_, err := c.conn.Write(frame(0x30, append(lenPrefixed(nil, topic), payload...)))
	return err
}

// ping sends PINGREQ and returns how long PINGRESP took.
func (c *mqttConn) ping() (time.Duration, error) {
	start := time.Now()
	if _, err := c.conn.Write([]byte{0xC0, 0}); err != nil {
		return 0, err
	}
	c.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp := make([]byte, 2)
	if _, err := io.ReadFull(c.r, resp); err != nil || resp[0] != 0xD0 {
		return 0, fmt.Errorf("PINGRESP: % x, %v", resp, err)
	}
	return time.Since(start), nil
}

// TestFloodingDeviceIsSampled runs a real broker with telemetry wired as
// fleetd wires it. One device floods telemetry as fast as its socket goes
// (thousands of messages a second): it is sampled, and gets one rejected
// event saying so. Meanwhile another device's telemetry is stored within 2 s
// every time, and its pings are answered promptly.
func TestFloodingDeviceIsSampled(t *testing.T) {
	env := brokertest.Start(t, func(c *broker.Config) { c.PublishRate = -1 })
	store := telemetry.NewStore(env.Pool)
	w := telemetry.NewWriter(store, telemetry.WriterOptions{})
	t.Cleanup(func() { w.Close(context.Background()) })
	in := telemetry.NewIngest(w, env.Recorder, telemetry.IngestOptions{Node: "brokertest"})
	env.Broker.HandleSession("telemetry", func(s broker.Session, payload []byte) error {
		return in.Handle(telemetry.Session{DeviceID: s.DeviceID, Epoch: s.Epoch, Firmware: s.Firmware, Model: s.Model}, payload)
	})
	ctx := context.Background()
	if _, err := (&telemetry.Retention{}).Apply(ctx, store); err != nil {
		t.Fatal(err)
	}

	flood := dialDevice(t, env.Addrs["tcp"], "flood", env.Register(t, "flood", "gw"))
	calm := dialDevice(t, env.Addrs["tcp"], "calm", env.Register(t, "calm", "gw"))
	var sent atomic.Int64
	stop := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		payload := []byte(`{"rssi_dbm":-60,"uptime_s":1}`)
		for {
			select {
			case <-stop:
				done <- nil
				return
			default:
			}
			if err := flood.publish("devices/flood/telemetry", payload); err != nil {
				done <- err
				return
			}
			sent.Add(1)
		}
	}()

	// The calm device sends once a second, within its rate, and pings every
	// 100 ms meanwhile.
	start := time.Now()
	var worstPing, worstStore time.Duration
	ping := func() {
		t.Helper()
		d, err := calm.ping()
		if err != nil {
			t.Fatalf("calm device's ping during the flood: %v", err)
		}
		worstPing = max(worstPing, d)
		time.Sleep(100 * time.Millisecond)
	}
	for i := 0; i < 5; i++ {
		rssi := -40 - i
		sentAt := time.Now()
		if err := calm.publish("devices/calm/telemetry", []byte(fmt.Sprintf(`{"rssi_dbm":%d}`, rssi))); err != nil {
			t.Fatal(err)
		}
		for {
			s, err := store.Series(ctx, telemetry.SeriesQuery{DeviceID: "calm", Metric: "rssi_dbm"})
			if err != nil {
				t.Fatal(err)
			}
			if n := len(s.Points); n > 0 && s.Points[n-1].Value == float64(rssi) {
				break
			}
			if time.Since(sentAt) > 2*time.Second {
				t.Fatalf("calm device's telemetry #%d not stored within 2 s during the flood (%d flood messages sent)", i, sent.Load())
			}
			ping()
		}
		worstStore = max(worstStore, time.Since(sentAt))
		for time.Since(sentAt) < 1100*time.Millisecond {
			ping()
		}
	}
	close(stop)
	if err := <-done; err != nil {
		t.Fatalf("flood: %v", err)
	}
	rate := float64(sent.Load()) / time.Since(start).Seconds()
	t.Logf("flood: %d messages (%.0f/s); calm device: worst ping %s, worst time to stored %s", sent.Load(), rate, worstPing, worstStore)
	if rate < 1000 {
		t.Errorf("the flood sent %.0f messages/s; the test wants thousands", rate)
	}
	if worstPing > 500*time.Millisecond {
		t.Errorf("calm device's worst ping took %s during the flood", worstPing)
	}

	// The flood's own telemetry: its burst and one a second, no more.
	fs, err := store.Series(ctx, telemetry.SeriesQuery{DeviceID: "flood", Metric: "rssi_dbm"})
	if err != nil {
		t.Fatal(err)
	}
	if n := len(fs.Points); n < 10 || n > 20 {
		t.Errorf("%d of the flood's messages stored; want its burst of 10 and about one a second", n)
	}
	var sampled []fleet.Event
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) && len(sampled) == 0 {
		events, err := env.Service.Events(ctx, "flood", nil, 100)
		if err != nil {
			t.Fatal(err)
		}
		sampled = sampled[:0]
		for _, e := range events {
			if e.Kind == fleet.KindRejected && strings.HasPrefix(e.Detail, "telemetry sampled") {
				sampled = append(sampled, e)
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	if len(sampled) != 1 || sampled[0].SessionEpoch == 0 || sampled[0].Model != "gw" {
		t.Errorf("rejected events of the flood: %+v; want exactly one (the minute is not over), tied to its session", sampled)
	}
	events, _ := env.Service.Events(ctx, "calm", nil, 100)
	for _, e := range events {
		if e.Kind == fleet.KindRejected || e.Kind == fleet.KindDisconnect {
			t.Errorf("calm device: %s event %q", e.Kind, e.Detail)
		}
	}
}

// TestMalformedTelemetryOverTheWire: hostile payloads through the broker
// never break the session; the device gets one rejected event for its
// session, and what is valid is stored.
func TestMalformedTelemetryOverTheWire(t *testing.T) {
	env := brokertest.Start(t, nil)
	store := telemetry.NewStore(env.Pool)
	w := telemetry.NewWriter(store, telemetry.WriterOptions{})
	t.Cleanup(func() { w.Close(context.Background()) })
	in := telemetry.NewIngest(w, env.Recorder, telemetry.IngestOptions{Rate: -1})
	env.Broker.HandleSession("telemetry", func(s broker.Session, payload []byte) error {
		return in.Handle(telemetry.Session{DeviceID: s.DeviceID, Epoch: s.Epoch}, payload)
	})
	ctx := context.Background()
	if _, err := (&telemetry.Retention{}).Apply(ctx, store); err != nil {
		t.Fatal(err)
	}
	dev := dialDevice(t, env.Addrs["tcp"], "h1", env.Register(t, "h1", "gw"))
	var fields strings.Builder
	for i := range 5000 {
		fmt.Fprintf(&fields, `"f%d":%d,`, i, i)
	}
	for _, p := range []string{
		strings.Repeat("[", 100000),
		`{` + fields.String() + `"last":1}`,
		`{"rssi_dbm":NaN}`,
		`{"ssid":"` + strings.Repeat("x", 10000) + `"}`,
		`{"bssid":"'; DROP TABLE devices; --"}`,
		"\x00\xff\xfe",
		`{"rssi_dbm":-55,"bssid":"AA:BB:CC:DD:EE:FF"}`,
	} {
		if err := dev.publish("devices/h1/telemetry", []byte(p)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := dev.ping(); err != nil {
		t.Fatalf("session broken by hostile telemetry: %v", err)
	}
	deadline := time.Now().Add(3 * time.Second)
	for {
		s, err := store.Series(ctx, telemetry.SeriesQuery{DeviceID: "h1", Metric: "rssi_dbm"})
		if err != nil {
			t.Fatal(err)
		}
		if len(s.Points) == 1 && s.Points[0].Value == -55 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("valid message not stored: %+v", s.Points)
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond) // the recorder flushes every 10 ms
	events, err := env.Service.Events(ctx, "h1", nil, 100)
	if err != nil {
		t.Fatal(err)
	}
	var rejected []string
	for _, e := range events {
		if e.Kind == fleet.KindRejected {
			rejected = append(rejected, e.Detail)
		}
	}
	if len(rejected) != 1 || len(rejected[0]) > 400 {
		t.Errorf("rejected events %q; want one, bounded", rejected)
	}
}
