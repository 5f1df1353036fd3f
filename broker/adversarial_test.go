package broker

import (
	"encoding/binary"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/fleetd/fleetd/fleet"
)

// TestAdversarialPackets plays the usual suspects of a hostile device against
// a real broker over raw sockets. Each must end with a clear answer (a
// disconnect, recorded with its reason, or the protocol's refusal code), and
// the registry must go on recording: a healthy device that connects right
// after is stored within 2 s.
func TestAdversarialPackets(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.MaxPacket = 64 << 10 })
	publishV5 := func(topic string, qos byte, id uint16, props []byte, payload []byte) []byte {
		body := appendString(nil, topic)
		if qos > 0 {
			body = binary.BigEndian.AppendUint16(body, id)
		}
		body = append(appendVarint(body, len(props)), props...)
		return packet(0x30|qos<<1, append(body, payload...))
	}
	for i, tc := range []struct {
		name string
		v    byte
		// send returns the bytes to write once connected (id is the device id).
		send func(id string) []byte
		// reply, when set, is the packet type the broker must answer with
		// (the session goes on); otherwise the session must be ended.
		reply  byte
		reason fleet.Reason // of the recorded disconnect, when ended
	}{
		{name: "truncated packet", v: 4, send: func(id string) []byte {
			return []byte{0x30, 0x0a, 0x00, 0x03} // promises 10 bytes, sends 2, then closes
		}, reason: fleet.ReasonConnectionLost},
		{name: "remaining length overflow", v: 5, send: func(id string) []byte {
			return []byte{0x30, 0xff, 0xff, 0xff, 0xff, 0x7f}
		}, reason: fleet.ReasonProtocolError},
		{name: "zero-length topic", v: 4, send: func(id string) []byte {
			return publishPacket("", []byte("x"), false, 4)
		}, reason: fleet.ReasonProtocolError},
		{name: "invalid UTF-8 topic", v: 4, send: func(id string) []byte {
			return publishPacket("devices/"+id+"/\xff\xfe", []byte("x"), false, 4)
		}, reason: fleet.ReasonProtocolError},
		{name: "properties longer than the packet", v: 5, send: func(id string) []byte {
			body := appendString(nil, "devices/"+id+"/telemetry")
			body = appendVarint(body, 5000) // property length far beyond the body
			return packet(0x30, append(body, 0x26))
		}, reason: fleet.ReasonProtocolError},
		{name: "packet above the maximum", v: 5, send: func(id string) []byte {
			return publishV5("devices/"+id+"/telemetry", 0, 0, nil, make([]byte, 70<<10))
		}, reason: fleet.ReasonPacketTooLarge},
		{name: "QoS 2 flood", v: 5, send: func(id string) []byte {
			var b []byte
			for n := range 1000 {
				b = append(b, publishV5("devices/"+id+"/telemetry", 2, uint16(n+1), nil, []byte("{}"))...)
			}
			return b
		}, reason: ""},
		{name: "SUBSCRIBE with 1 000 filters", v: 5, send: func(id string) []byte {
			body := binary.BigEndian.AppendUint16(nil, 1)
			body = append(body, 0)
			for n := range 1000 {
				body = append(appendString(body, fmt.Sprintf("devices/%s/cmd/%d", id, n)), 1)
			}
			return packet(0x82, body)
		}, reason: fleet.ReasonThrottled},
		{name: "PUBREL for an unknown packet id", v: 5, send: func(id string) []byte {
			return packet(0x62, []byte{0x12, 0x34})
		}, reply: 7}, // PUBCOMP (0x92 packet identifier not found)
	} {
		t.Run(tc.name, func(t *testing.T) {
			id := fmt.Sprintf("hostile-%d", i)
			token := e.register(id)
			c := dialRaw(t, e.addr("tcp"))
			if code := c.connect(tc.v, id, id, token, 30); code != 0 {
				t.Fatalf("CONNACK 0x%02x", code)
			}
			e.waitEvent(id, 2*time.Second, isEvent(fleet.KindConnect, ""))
			c.conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
			_, _ = c.conn.Write(tc.send(id)) // the broker may close before all of it is read
			if tc.name == "truncated packet" {
				c.conn.Close()
			}
			if tc.reply != 0 {
				typ, body := c.read()
				if typ>>4 != tc.reply {
					t.Fatalf("answer type %d (body %x), want %d", typ>>4, body, tc.reply)
				}
			} else {
				if tc.name != "truncated packet" {
					if err := c.closedWithin(3 * time.Second); err != nil {
						t.Fatal(err)
					}
				}
				ev := e.waitEvent(id, 2*time.Second, isEvent(fleet.KindDisconnect, tc.reason))
				if len(ev.Detail) > 300 || strings.ContainsRune(ev.Detail, 0) {
					t.Fatalf("disconnect detail not bounded: %q", ev.Detail)
				}
			}
			e.healthyAfter("healthy-" + id)
		})
	}
}
