package sim

import (
	"net"
	"sync"
	"sync/atomic"
)

// firmwareConn sits between an MQTT client library and the socket and makes
// the client behave like a given firmware: it rewrites or drops the PINGREQs
// the library sends, and it can freeze (stop reading and writing while the
// socket stays open). It follows the outgoing MQTT framing, so it touches a
// PINGREQ only at a packet boundary, however the library splits its writes.
//
// It is a sync.Locker: paho.golang writes one packet in several Writes
// (header, properties, payload) from several goroutines (its pinger sends a
// PINGREQ of its own right after CONNACK) and holds the lock of a conn that
// has one for the whole packet. Without it a PINGREQ could land inside the
// birth message and the broker would see a malformed packet.
type firmwareConn struct {
	net.Conn
	pings string // normal, malformed, none

	pmu       sync.Mutex // one packet at a time (Lock, Unlock)
	wmu       sync.Mutex // one Write at a time: the libraries write from several goroutines
	state     uint8      // outgoing parser: 0 header, 1 length, 2 body
	remaining int
	shift     uint
	dropping  bool // inside a PINGREQ that is being dropped

	frozen   atomic.Bool
	thaw     chan struct{} // closed when the real socket is closed
	thawOnce sync.Once
	keepOpen atomic.Bool // the library's Close leaves the socket open (frozen firmware)
}

func newFirmwareConn(c net.Conn, pings string) *firmwareConn {
	return &firmwareConn{Conn: c, pings: pings, thaw: make(chan struct{})}
}

// Lock is taken by paho.golang around the Writes of one packet.
func (f *firmwareConn) Lock() { f.pmu.Lock() }

// Unlock ends the packet that Lock started.
func (f *firmwareConn) Unlock() { f.pmu.Unlock() }

// Write applies the firmware's ping behaviour and, when frozen, pretends to
// send.
func (f *firmwareConn) Write(p []byte) (int, error) {
	f.wmu.Lock()
	defer f.wmu.Unlock()
	if f.frozen.Load() {
		return len(p), nil
	}
	if f.pings == "normal" {
		f.frame(p, nil) // bytes pass unchanged; only the framing state follows
		return f.Conn.Write(p)
	}
	if out := f.frame(p, make([]byte, 0, len(p))); len(out) > 0 {
		if _, err := f.Conn.Write(out); err != nil {
			return 0, err
		}
	}
	return len(p), nil
}

// frame advances the outgoing framing parser over p. With out non-nil it
// also returns the bytes to send, PINGREQs rewritten (0xC2: a reserved flag
// bit set, as the buggy firmware does) or dropped.
func (f *firmwareConn) frame(p, out []byte) []byte {
	keep := func(b ...byte) {
		if out != nil && !f.dropping {
			out = append(out, b...)
		}
	}
	for i := 0; i < len(p); {
		switch f.state {
		case 0:
			b := p[i]
			i++
			f.dropping = false
			if b == 0xC0 && out != nil { // PINGREQ
				switch f.pings {
				case "malformed":
					b = 0xC2
				case "none":
					f.dropping = true
				}
			}
			keep(b)
			f.remaining, f.shift, f.state = 0, 0, 1
		case 1:
			b := p[i]
			i++
			keep(b)
			f.remaining |= int(b&0x7f) << f.shift
			f.shift += 7
			if b&0x80 == 0 {
				f.state = 2
				if f.remaining == 0 {
					f.state = 0
				}
			}
		case 2:
			k := min(f.remaining, len(p)-i)
			keep(p[i : i+k]...)
			i += k
			f.remaining -= k
			if f.remaining == 0 {
				f.state = 0
			}
		}
	}
	return out
}

// Read blocks while frozen: the firmware no longer reads its socket.
func (f *firmwareConn) Read(p []byte) (int, error) {
	if f.frozen.Load() {
		<-f.thaw
		return 0, net.ErrClosed
	}
	return f.Conn.Read(p)
}

// freeze stops all traffic; the socket stays open until closeSocket.
func (f *firmwareConn) freeze() {
	f.keepOpen.Store(true)
	f.frozen.Store(true)
}

// Close is the client library's close. A frozen firmware does not close its
// socket: only the watchdog (closeSocket) does.
func (f *firmwareConn) Close() error {
	if f.keepOpen.Load() {
		return nil
	}
	return f.closeSocket()
}

// closeSocket closes the real socket (a reboot, a flap, the end of the run).
func (f *firmwareConn) closeSocket() error {
	f.thawOnce.Do(func() { close(f.thaw) })
	return f.Conn.Close()
}
