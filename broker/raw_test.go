package broker

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"testing"
	"time"
)

// rawClient speaks MQTT byte by byte, for what real clients never send
// (reserved flags, oversize packets, silence) and for exact reason codes.
type rawClient struct {
	t    *testing.T
	conn net.Conn
	r    *bufio.Reader
	v    byte
}

func appendString(b []byte, s string) []byte {
	b = binary.BigEndian.AppendUint16(b, uint16(len(s)))
	return append(b, s...)
}

func appendVarint(b []byte, n int) []byte {
	for {
		d := byte(n % 128)
		n /= 128
		if n > 0 {
			d |= 0x80
		}
		b = append(b, d)
		if n == 0 {
			return b
		}
	}
}

func packet(header byte, body []byte) []byte {
	return append(appendVarint([]byte{header}, len(body)), body...)
}

// connectPacket builds a CONNECT for protocol level v (3, 4 or 5).
func connectPacket(v byte, id, user, pass string, keepalive uint16) []byte {
	return connectSpec{version: v, id: id, user: user, pass: pass, keepalive: keepalive}.encode()
}

// connectSpec describes a CONNECT as any device, well-behaved or hostile,
// may write it: every optional part of the variable header and payload
// ([MQTT-3.1]).
type connectSpec struct {
	version         byte // 3 (MQIsdp), 4 or 5
	id, user, pass  string
	keepalive       uint16
	props, willProp []byte // MQTT 5 property bytes, without their length
	willTopic       string
	willPayload     []byte
	willQoS         byte
	willRetain      bool
	// MQTT 5 properties by name, added after props and willProp.
	sessionExpiry uint32 // Session Expiry Interval
	willDelay     uint32 // Will Delay Interval
	userProps     [][2]string
}

func (s connectSpec) encode() []byte {
	name := "MQTT"
	if s.version == 3 {
		name = "MQIsdp"
	}
	flags := byte(0x02) // clean session / clean start
	if s.willTopic != "" {
		flags |= 0x04 | s.willQoS<<3
		if s.willRetain {
			flags |= 0x20
		}
	}
	if s.pass != "" {
		flags |= 0x40
	}
	if s.user != "" {
		flags |= 0x80
	}
	body := appendString(nil, name)
	body = append(body, s.version, flags)
	body = binary.BigEndian.AppendUint16(body, s.keepalive)
	if s.version == 5 {
		props := s.props
		if s.sessionExpiry > 0 {
			props = binary.BigEndian.AppendUint32(append(props, 0x11), s.sessionExpiry)
		}
		for _, up := range s.userProps {
			props = appendString(appendString(append(props, 0x26), up[0]), up[1])
		}
		body = append(appendVarint(body, len(props)), props...)
	}
	body = appendString(body, s.id)
	if s.willTopic != "" {
		if s.version == 5 {
			wp := s.willProp
			if s.willDelay > 0 {
				wp = binary.BigEndian.AppendUint32(append(wp, 0x18), s.willDelay)
			}
			body = append(appendVarint(body, len(wp)), wp...)
		}
		body = appendString(body, s.willTopic)
		body = binary.BigEndian.AppendUint16(body, uint16(len(s.willPayload)))
		body = append(body, s.willPayload...)
	}
	if s.user != "" {
		body = appendString(body, s.user)
	}
	if s.pass != "" {
		body = appendString(body, s.pass)
	}
	return packet(0x10, body)
}

func dialRaw(t *testing.T, addr string) *rawClient {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &rawClient{t: t, conn: conn, r: bufio.NewReader(conn)}
}

// connect sends CONNECT and returns the CONNACK's return/reason code.
func (c *rawClient) connect(v byte, id, user, pass string, keepalive uint16) byte {
	c.t.Helper()
	c.v = v
	c.send(connectPacket(v, id, user, pass, keepalive))
	typ, body := c.read()
	if typ>>4 != 2 || len(body) < 2 {
		c.t.Fatalf("expected CONNACK, got type 0x%02x body %x", typ, body)
	}
	return body[1]
}

func (c *rawClient) send(b []byte) {
	c.t.Helper()
	c.conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.conn.Write(b); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

// read returns the next packet's header byte and body.
func (c *rawClient) read() (byte, []byte) {
	c.t.Helper()
	typ, body, err := c.tryRead(5 * time.Second)
	if err != nil {
		c.t.Fatalf("read: %v", err)
	}
	return typ, body
}

func (c *rawClient) tryRead(d time.Duration) (byte, []byte, error) {
	c.conn.SetReadDeadline(time.Now().Add(d))
	typ, err := c.r.ReadByte()
	if err != nil {
		return 0, nil, err
	}
	n, mult := 0, 1
	for {
		b, err := c.r.ReadByte()
		if err != nil {
			return 0, nil, err
		}
		n += int(b&0x7f) * mult
		mult *= 128
		if b&0x80 == 0 {
			break
		}
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(c.r, body); err != nil {
		return 0, nil, err
	}
	return typ, body, nil
}

// closedWithin reports whether the server closes the connection within d
// (packets it sends first, such as a DISCONNECT, are skipped).
func (c *rawClient) closedWithin(d time.Duration) error {
	deadline := time.Now().Add(d)
	for {
		_, _, err := c.tryRead(time.Until(deadline))
		if err == nil {
			continue
		}
		if ne, ok := err.(net.Error); ok && ne.Timeout() {
			return fmt.Errorf("connection still open after %s", d)
		}
		return nil
	}
}

func publishPacket(topic string, payload []byte, retain bool, v byte) []byte {
	var body []byte
	body = appendString(body, topic)
	if v == 5 {
		body = append(body, 0)
	}
	body = append(body, payload...)
	h := byte(0x30)
	if retain {
		h |= 0x01
	}
	return packet(h, body)
}
