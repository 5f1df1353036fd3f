package broker

import (
	"crypto/tls"
	"net"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
)

// wireConn wraps every device connection. It follows the MQTT framing of the
// bytes the device sends, cheaply (headers are inspected, bodies skipped by
// count), to learn what mochi does not tell: which packet had malformed
// flags, how many PINGREQs and packets and bytes the device sent, and when it
// was last heard from.
// Only mochi's reader goroutine calls Read, so the parser state needs no lock;
// the results are atomics read by hooks and the last-seen flusher.
type wireConn struct {
	net.Conn
	tls *tls.Conn // the TLS connection underneath, if any

	lastRead atomic.Int64 // unix nanoseconds of the last byte received
	pings    atomic.Int32 // PINGREQs received
	packets  atomic.Int32 // control packets received (fixed headers seen)
	bytes    atomic.Int64 // bytes received
	// maxSilence is the longest wait, in nanoseconds, between two reads
	// that returned bytes: the longest silence the connection survived.
	maxSilence atomic.Int64
	badHeader  atomic.Uint32 // 0x100 | first fixed header with bad flags, or 0
	accepted   atomic.Bool   // the CONNECT was accepted (set by the hook)
	// onConnectRead gives back the connection's place among those that have
	// not sent CONNECT (listener.admit); called once the CONNECT was read.
	onConnectRead func()
	// releaseID gives back the client id's connect lock (Broker.idLocks).
	releaseID func()
	// session is the connection's session from its establishment to its
	// disconnect, as in Broker.sessions (Broker.sessionOf).
	session atomic.Pointer[session]

	state     uint8 // parser: 0 header, 1 length, 2 body, 3 lost sync
	remaining int
	shift     uint
}

func newWireConn(c net.Conn, tc *tls.Conn) *wireConn {
	w := &wireConn{Conn: c, tls: tc}
	w.lastRead.Store(time.Now().UnixNano())
	return w
}

// ReadBufferSize tells mochi the read buffer a connection needs
// (mqtt.ReadBufferSizer): a TLS connection already holds a whole decrypted
// record, so mochi's buffer on top of it only doubles what every idle TLS
// device keeps; 0 keeps the broker's ClientNetReadBufferSize.
var _ mqtt.ReadBufferSizer = (*wireConn)(nil)

func (w *wireConn) ReadBufferSize() int {
	if w.tls != nil {
		return 64
	}
	return 0
}

// probeIdle turns on TCP keepalive probes (Go's defaults: after 15 s of
// silence, every 15 s, 9 probes) on the socket under the connection, for a
// device that asked for no MQTT keepalive: without them a device whose link
// died silently would hold its session until the broker restarts. Listeners
// accept without TCP keepalive (Broker.New), so devices that keep MQTT's
// do not pay for it.
func (w *wireConn) probeIdle() error {
	var c net.Conn = w.Conn
	for {
		switch conn := c.(type) {
		case *net.TCPConn:
			return conn.SetKeepAliveConfig(net.KeepAliveConfig{Enable: true})
		case interface{ NetConn() net.Conn }: // TLS, WebSocket
			c = conn.NetConn()
		default:
			return nil
		}
	}
}

const (
	stHeader = iota
	stLength
	stBody
	stLost
)

func (w *wireConn) Read(p []byte) (int, error) {
	n, err := w.Conn.Read(p)
	if n > 0 {
		now := time.Now().UnixNano()
		if gap := now - w.lastRead.Swap(now); gap > w.maxSilence.Load() {
			w.maxSilence.Store(gap) // only the reader writes it
		}
		w.bytes.Add(int64(n))
		w.scan(p[:n])
	}
	return n, err
}

// scan advances the framing parser over bytes just read.
func (w *wireConn) scan(p []byte) {
	for i := 0; i < len(p); {
		switch w.state {
		case stHeader:
			b := p[i]
			i++
			w.packets.Add(1)
			if b>>4 == 12 {
				w.pings.Add(1)
			}
			if !validHeader(b) {
				w.badHeader.CompareAndSwap(0, 0x100|uint32(b))
			}
			w.remaining, w.shift, w.state = 0, 0, stLength
		case stLength:
			b := p[i]
			i++
			w.remaining |= int(b&0x7f) << w.shift
			w.shift += 7
			switch {
			case b&0x80 == 0 && w.remaining == 0:
				w.state = stHeader
			case b&0x80 == 0:
				w.state = stBody
			case w.shift >= 28: // more than four length bytes: mochi will drop the client
				w.state = stLost
			}
		case stBody:
			k := min(w.remaining, len(p)-i)
			i += k
			w.remaining -= k
			if w.remaining == 0 {
				w.state = stHeader
			}
		default:
			return
		}
	}
}

// connectRead says the CONNECT has been read.
func (w *wireConn) connectRead() {
	if w.onConnectRead != nil {
		w.onConnectRead()
	}
}

// releaseConnectLock gives back the id's connect lock, if this connection
// holds it; safe to call more than once.
func (w *wireConn) releaseConnectLock() {
	if w.releaseID != nil {
		w.releaseID()
	}
}

// BadHeader returns the first fixed header with bad flags, or 0.
func (w *wireConn) BadHeader() byte {
	v := w.badHeader.Load()
	if v == 0 {
		return 0
	}
	return byte(v)
}

// LastRead returns when the device last sent a byte.
func (w *wireConn) LastRead() time.Time { return time.Unix(0, w.lastRead.Load()) }

// TLSVersion names the negotiated TLS version, or "".
func (w *wireConn) TLSVersion() string {
	if w.tls == nil {
		return ""
	}
	return tls.VersionName(w.tls.ConnectionState().Version)
}
