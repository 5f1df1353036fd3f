package wsconn

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"
)

// readLimit plays the broker's ws.SetReadLimit(maxPacket + 16).
const readLimit = 4096 + 16

// Frame kinds of a fuzz script: each op is one byte, kind in the low three
// bits, arg in the high five; some kinds take further bytes.
const (
	opSmall  = iota // binary message of arg bytes (0 to 31)
	opBinary        // binary message, size in the next two bytes (mod 6000)
	opSplit         // binary message as opBinary, a ping sent in its middle
	opText          // text message of arg bytes
	opPing          // ping with arg bytes of payload
	opPong          // unsolicited pong with arg bytes of payload
	opClose         // close frame: code closeCodes[arg], then one byte of text length (mod 100)
	opHangup        // the peer's TCP half-close, without a close frame
)

// closeCodes are the close codes a peer may send; the valid ones become a
// *ClosedError, the others (and the zeros of the unused entries) a protocol
// error. 1005 is sent as an empty close payload.
var closeCodes = [32]int{1000, 1001, 1002, 1003, 1005, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 3000, 4000, 4999,
	999, 1004, 1006, 1015, 2999, 5000, 65535}

// step is one thing the peer sends.
type step struct {
	kind    int
	size    int // payload bytes (text bytes for a close)
	code    int // opClose
	payload []byte
}

// script decodes a fuzz input into what the peer sends, up to and including
// the first step that ends the stream (text, close, hangup); when there is
// none, a normal close ends it. Payload bytes follow their position in the
// stream of binary bytes so that lost, repeated or reordered bytes show.
func script(ops []byte) []step {
	var steps []step
	pos, total := 0, 0
	for len(ops) > 0 {
		b := ops[0]
		ops = ops[1:]
		s := step{kind: int(b & 7), size: int(b >> 3)}
		switch s.kind {
		case opBinary, opSplit:
			var n uint16
			if len(ops) >= 2 {
				n = binary.LittleEndian.Uint16(ops)
				ops = ops[2:]
			}
			s.size = int(n) % 6000
		case opClose:
			s.code = closeCodes[s.size]
			s.size = 0
			if len(ops) > 0 {
				s.size = int(ops[0]) % 100
				ops = ops[1:]
			}
		}
		if total += s.size; total > 64<<10 {
			break // keeps each input fast
		}
		if s.kind == opSmall {
			s.kind = opBinary
		}
		switch s.kind {
		case opBinary, opSplit:
			s.payload = make([]byte, s.size)
			for i := range s.payload {
				s.payload[i] = byte(pos) ^ byte(pos>>8)*31
				pos++
			}
		case opText, opClose:
			s.payload = []byte(strings.Repeat("é", s.size/2) + strings.Repeat("t", s.size%2))
		default:
			s.payload = bytes.Repeat([]byte{'p'}, s.size)
		}
		steps = append(steps, s)
		if s.kind == opText || s.kind == opClose || s.kind == opHangup {
			return steps
		}
	}
	return append(steps, step{kind: opClose, code: websocket.CloseNormalClosure})
}

// play sends the steps from the peer's side.
func play(ws *websocket.Conn, steps []step) error {
	deadline := time.Now().Add(5 * time.Second)
	_ = ws.SetWriteDeadline(deadline)
	for _, s := range steps {
		var err error
		switch s.kind {
		case opBinary:
			err = ws.WriteMessage(websocket.BinaryMessage, s.payload)
		case opSplit:
			var w io.WriteCloser
			if w, err = ws.NextWriter(websocket.BinaryMessage); err == nil {
				_, _ = w.Write(s.payload[:s.size/2])
				_ = ws.WriteControl(websocket.PingMessage, []byte("mid"), deadline)
				_, _ = w.Write(s.payload[s.size/2:])
				err = w.Close()
			}
		case opText:
			err = ws.WriteMessage(websocket.TextMessage, s.payload)
		case opPing:
			err = ws.WriteControl(websocket.PingMessage, s.payload, deadline)
		case opPong:
			err = ws.WriteControl(websocket.PongMessage, s.payload, deadline)
		case opClose:
			err = ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(s.code, string(s.payload)), deadline)
		case opHangup:
			err = ws.NetConn().(*net.TCPConn).CloseWrite()
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// peer is a loopback WebSocket server whose connections are handed to the
// fuzz function, configured as the broker's listener configures its own.
type peer struct {
	srv   *httptest.Server
	conns chan *websocket.Conn
}

func newPeer(tb testing.TB) *peer {
	p := &peer{conns: make(chan *websocket.Conn, 1)}
	up := websocket.Upgrader{Subprotocols: []string{"mqtt"}, ReadBufferSize: 1024, WriteBufferSize: 1024,
		CheckOrigin: func(*http.Request) bool { return true }}
	p.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ws, err := up.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		ws.SetReadLimit(readLimit)
		p.conns <- ws
	}))
	tb.Cleanup(p.srv.Close)
	return p
}

// dial returns both ends of a new connection: the device's, which sends, and
// the broker's.
func (p *peer) dial(t *testing.T, writeBuffer int) (device, broker *websocket.Conn) {
	d := websocket.Dialer{Subprotocols: []string{"mqtt"}, HandshakeTimeout: 5 * time.Second, WriteBufferSize: writeBuffer}
	device, _, err := d.Dial("ws"+strings.TrimPrefix(p.srv.URL, "http"), nil)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	select {
	case broker = <-p.conns:
	case <-time.After(5 * time.Second):
		t.Fatal("no server side connection")
	}
	return device, broker
}

func FuzzWSConn(f *testing.F) {
	le := func(n int) []byte { return binary.LittleEndian.AppendUint16(nil, uint16(n)) }
	op := func(kind, arg int, more ...byte) []byte { return append([]byte{byte(arg<<3 | kind)}, more...) }
	cat := func(ps ...[]byte) []byte { return bytes.Join(ps, nil) }
	connect := op(opSmall, 18) // the size of a small CONNECT
	for _, ops := range [][]byte{
		{},
		connect,
		cat(connect, op(opSmall, 2), op(opSmall, 2), op(opSmall, 0)),                         // PINGREQs, an empty frame
		cat(connect, op(opBinary, 0, le(1000)...), op(opPing, 4), op(opBinary, 0, le(3)...)), // a ping between messages
		cat(op(opSplit, 0, le(3000)...), op(opSplit, 0, le(1)...)),                           // a ping inside a message
		cat(op(opBinary, 0, le(readLimit)...), op(opSmall, 2)),                               // exactly the read limit
		cat(connect, op(opBinary, 0, le(readLimit+1)...), op(opSmall, 2)),                    // over the read limit
		cat(connect, op(opSplit, 0, le(5999)...)),                                            // over the limit, fragmented
		cat(connect, op(opText, 5), op(opSmall, 2)),                                          // text frame [MQTT-6.0.0-1]
		cat(op(opText, 0)),
		cat(connect, op(opPong, 3), op(opHangup, 0), op(opSmall, 2)),
		cat(connect, op(opClose, 0, 12)), // 1000 with a reason
		cat(connect, op(opClose, 1, 0)),  // 1001
		cat(connect, op(opClose, 4, 0)),  // no status (1005)
		cat(connect, op(opClose, 14, 99)),
		cat(connect, op(opClose, 15, 3)), // invalid code 999
		cat(connect, op(opClose, 17, 0)), // 1006 may not be sent
		cat(op(opPing, 31), op(opPing, 0), op(opPong, 31), op(opHangup, 0)),
	} {
		f.Add(ops, []byte{}, false)
		f.Add(ops, []byte{0}, true)           // one byte at a time, small frames
		f.Add(ops, []byte{2, 6, 0}, false)    // 3, 7, 1
		f.Add(ops, []byte{127, 1}, true)      // 128, 2
		f.Add(ops, []byte{255, 16, 4}, false) // 256, 17, 5
	}

	p := newPeer(f)
	f.Fuzz(func(t *testing.T, ops, reads []byte, smallFrames bool) {
		steps := script(ops)
		writeBuffer := 4096
		if smallFrames {
			writeBuffer = 61 // large messages go as many continuation frames
		}
		device, ws := p.dial(t, writeBuffer)
		defer device.Close()
		c := New(ws)
		defer c.Close()
		played := make(chan error, 1)
		go func() { played <- play(device, steps) }()

		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		var got []byte
		var err error
		for i, empty := 0, 0; err == nil; i++ {
			size := 512
			if len(reads) > 0 {
				size = int(reads[i%len(reads)]) + 1
			}
			buf := make([]byte, size)
			var n int
			n, err = c.Read(buf)
			if n < 0 || n > size {
				t.Fatalf("Read of %d bytes returned %d", size, n)
			}
			got = append(got, buf[:n]...)
			if n > 0 {
				empty = 0
			} else if empty++; empty > 100 && err == nil {
				t.Fatalf("Read returns 0 bytes and no error, %d bytes read, steps %v", len(got), describe(steps))
			}
		}
		if ne := net.Error(nil); errors.As(err, &ne) && ne.Timeout() {
			t.Fatalf("read hung: %d bytes read, steps %v", len(got), describe(steps))
		}
		checkRead(t, steps, got, err)

		_ = c.Close()
		select {
		case <-played:
		case <-time.After(5 * time.Second):
			t.Fatal("the peer's writes hung")
		}
	})
}

// checkRead compares what was read with what the steps sent: the binary
// payloads in order, up to the step that ends the stream, and that step's
// error.
func checkRead(t *testing.T, steps []step, got []byte, err error) {
	t.Helper()
	var want []byte
	for _, s := range steps {
		switch s.kind {
		case opBinary, opSplit:
			if len(s.payload) > readLimit {
				// gorilla checks the limit frame by frame: fragments before
				// the one that crosses it may have been delivered.
				if !errors.Is(err, websocket.ErrReadLimit) || !bytes.HasPrefix(got, want) || !bytes.HasPrefix(append(want, s.payload...), got) {
					t.Fatalf("message of %d bytes over the limit: read %d bytes (%d before it), err %v, steps %v",
						len(s.payload), len(got), len(want), err, describe(steps))
				}
				return
			}
			want = append(want, s.payload...)
			continue
		case opPing, opPong:
			continue // answered or ignored by gorilla, invisible to Read
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("read %d bytes, want %d (first difference at %d), err %v, steps %v",
				len(got), len(want), firstDiff(got, want), err, describe(steps))
		}
		var ce *ClosedError
		switch s.kind {
		case opText:
			if !errors.Is(err, errTextFrame) {
				t.Fatalf("after a text frame: err %v, want %v", err, errTextFrame)
			}
		case opHangup:
			if !errors.As(err, &ce) || ce.Code != websocket.CloseAbnormalClosure || ce.Error() != "websocket connection lost" {
				t.Fatalf("after the peer hung up: err %v (%T), want a lost connection", err, err)
			}
		case opClose:
			text := string(s.payload)
			if s.code == websocket.CloseNoStatusReceived {
				text = "" // FormatCloseMessage sends no payload at all
			}
			// RFC 6455 section 7.4: 1004, 1006 and 1015 are reserved, 1014 was
			// registered later and gorilla refuses it too.
			valid := (s.code >= 1000 && s.code <= 1003) || (s.code >= 1007 && s.code <= 1013) ||
				(s.code >= 3000 && s.code <= 4999) || s.code == websocket.CloseNoStatusReceived
			switch {
			case valid && (!errors.As(err, &ce) || ce.Code != s.code || ce.Text != text):
				t.Fatalf("after close %d %q: err %v (%T), want *ClosedError{%d, %q}", s.code, text, err, err, s.code, text)
			case !valid && (err == nil || errors.As(err, &ce)):
				t.Fatalf("after invalid close code %d: err %v (%T), want a protocol error", s.code, err, err)
			}
		}
		return
	}
	t.Fatal("script without an end")
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

func describe(steps []step) string {
	names := [...]string{"small", "binary", "split", "text", "ping", "pong", "close", "hangup"}
	var b strings.Builder
	for _, s := range steps {
		fmt.Fprintf(&b, " %s:%d", names[s.kind], s.size)
		if s.kind == opClose {
			fmt.Fprintf(&b, ":%d", s.code)
		}
	}
	return "[" + strings.TrimPrefix(b.String(), " ") + "]"
}
