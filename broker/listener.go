package broker

import (
	"github.com/fleetd/fleetd/internal/wsconn"

	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
	"github.com/mochi-mqtt/server/v2/listeners"
)

// listener is fleetd's own mochi listener for TCP, TLS and WebSocket. It
// fixes what mochi's listeners lack for a fleet: a deadline for the CONNECT
// (and the TLS handshake), so an idle socket cannot be held forever; an
// accept loop that survives accept errors (EMFILE) instead of silently
// ending; explicit TLS handshakes whose failures are reported; and closing
// of sockets that never sent CONNECT, without which mochi's Close hangs.
type listener struct {
	id             string
	ln             net.Listener
	tlsConfig      *tls.Config // TLS listener: serverTLSConfig, shared by its connections
	ws             bool        // WebSocket listener
	connectTimeout time.Duration
	maxPacket      int
	log            *slog.Logger
	m              *metrics
	// onHandshakeError reports a failed TLS handshake.
	onHandshakeError func(remote string, f *handshakeFailure)
	// throttle answers a connection the connect rate has no room for, and
	// then reports true (Broker.throttle).
	throttle func(listener string, w *wireConn) bool
	// limits caps the connections that have not sent CONNECT yet (nil: no cap).
	limits   *connectLimits
	refusals *repeatLog
	// closeV3 closes the listener's MQTT 3 clients before mochi's
	// closeClients sends DISCONNECT to every client (nil: none).
	closeV3 func(listener string)

	serving atomic.Bool
	closed  atomic.Bool
	mu      sync.Mutex
	conns   map[net.Conn]struct{}
	httpSrv *http.Server
}

var _ listeners.Listener = (*listener)(nil)

func (l *listener) ID() string       { return l.id }
func (l *listener) Address() string  { return l.ln.Addr().String() }
func (l *listener) Protocol() string { return l.id }

// Init is a no-op: the socket was bound when the broker was built, so that a
// taken port fails start-up before anything else starts.
func (l *listener) Init(*slog.Logger) error { return nil }

func (l *listener) Serve(establish listeners.EstablishFn) {
	l.serving.Store(true)
	defer l.serving.Store(false)
	if l.ws {
		l.serveWebSocket(establish)
		return
	}
	backoff := 5 * time.Millisecond
	for {
		raw, err := l.ln.Accept()
		if err != nil {
			if l.closed.Load() || errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of file descriptors and the like: wait and go on accepting.
			l.m.acceptErrors.WithLabelValues(l.id).Inc()
			l.log.Warn("accept failed; retrying", "listener", l.id, "err", err, "backoff", backoff.String())
			time.Sleep(backoff)
			backoff = min(backoff*2, time.Second)
			continue
		}
		backoff = 5 * time.Millisecond
		go l.handle(raw, establish)
	}
}

// handle serves one accepted connection for its whole life. Its goroutine
// becomes the device's read loop and parks below this frame for as long as
// the device stays connected, and Go halves a goroutine's stack at a
// collection only while under a quarter of it is in use: so the set-up
// (admission, TLS handshake) and the teardown logging happen in functions
// that have returned or not yet been called, and this frame holds next to
// nothing (TestIdleDeviceStack).
func (l *listener) handle(raw net.Conn, establish listeners.EstablishFn) {
	w, release := l.open(raw)
	if w == nil {
		return
	}
	defer l.finish(raw, release)
	// What establish does, written out: a call to it here adds a frame
	// below the parked read, and the stack no longer shrinks to 4 KiB
	// (TestIdleDeviceStack fails at 8 KiB).
	if l.throttle != nil && l.throttle(l.id, w) {
		return
	}
	l.ended(w, establish(l.id, w))
}

// open admits and tracks raw, runs its TLS handshake, and returns the
// connection mochi is to read, or nil when raw has been closed instead.
// release gives back raw's place among the connections that have not sent
// CONNECT.
//
//go:noinline
func (l *listener) open(raw net.Conn) (w *wireConn, release func()) {
	release, ok := l.admit(raw)
	if !ok {
		return nil, nil
	}
	if !l.track(raw) {
		release()
		raw.Close()
		return nil, nil
	}
	// mochi replaces this deadline with the keepalive deadline once the
	// CONNECT has been accepted.
	_ = raw.SetDeadline(time.Now().Add(l.connectTimeout))
	var tc *tls.Conn
	conn := raw
	if l.tlsConfig != nil {
		ctx, cancel := context.WithTimeout(context.Background(), l.connectTimeout)
		var failure *handshakeFailure
		tc, failure = handshake(ctx, raw, l.tlsConfig)
		cancel()
		if failure != nil {
			l.m.tlsFailures.WithLabelValues(failure.Class).Inc()
			if l.onHandshakeError != nil {
				l.onHandshakeError(raw.RemoteAddr().String(), failure)
			}
			l.finish(raw, release)
			raw.Close()
			return nil, nil
		}
		conn = tc
	}
	w = newWireConn(conn, tc)
	w.onConnectRead = release
	return w, release
}

// finish gives back what open took for raw.
func (l *listener) finish(raw net.Conn, release func()) {
	release()
	l.untrack(raw)
}

// admit takes a place among the connections that have not sent CONNECT yet,
// or closes raw when its source or the broker has none left: such sockets
// are what an attacker without credentials can open at will. The returned
// release may be called more than once; the first call gives the place back.
func (l *listener) admit(raw net.Conn) (release func(), ok bool) {
	if l.limits == nil {
		return func() {}, true
	}
	src := sourceOf(raw.RemoteAddr())
	if !l.limits.admitPending(src) {
		l.m.pendingRefused.Inc()
		l.refusals.Log(slog.LevelWarn, "pending:"+src.String(), "connection closed: too many connections that have not sent CONNECT",
			"listener", l.id, "remote", raw.RemoteAddr().String())
		raw.Close()
		return nil, false
	}
	var once sync.Once
	return func() { once.Do(func() { l.limits.releasePending(src) }) }, true
}

func (l *listener) establish(w *wireConn, establish listeners.EstablishFn) {
	if l.throttle != nil && l.throttle(l.id, w) {
		return
	}
	l.ended(w, establish(l.id, w))
}

// ended tells how a connection that mochi served ended.
//
//go:noinline
func (l *listener) ended(w *wireConn, err error) {
	w.releaseConnectLock() // a CONNECT accepted but never acknowledged
	if err != nil && errors.Is(err, os.ErrDeadlineExceeded) && !w.accepted.Load() {
		l.m.connectTimeouts.Inc()
		l.log.Info("closed a connection that sent no CONNECT in time", "listener", l.id,
			"remote", w.RemoteAddr().String(), "timeout", l.connectTimeout.String())
		return
	}
	l.log.Debug("connection ended", "listener", l.id, "remote", w.RemoteAddr().String(), "err", err)
}

func (l *listener) serveWebSocket(establish listeners.EstablishFn) {
	up := websocket.Upgrader{
		Subprotocols:     []string{"mqtt"},
		HandshakeTimeout: l.connectTimeout,
		ReadBufferSize:   1024,
		WriteBufferSize:  1024,
		// Devices are not browsers; cross-origin checks protect cookies, which
		// MQTT over WebSocket does not use.
		CheckOrigin: func(*http.Request) bool { return true },
	}
	mux := http.NewServeMux()
	handler := func(w http.ResponseWriter, r *http.Request) {
		ws, err := up.Upgrade(w, r, nil)
		if err != nil {
			return // the upgrader has answered with an HTTP error
		}
		ws.SetReadLimit(int64(l.maxPacket) + 16)
		raw := wsconn.New(ws)
		release, ok := l.admit(raw)
		if !ok {
			return
		}
		defer release()
		if !l.track(raw) {
			raw.Close()
			return
		}
		defer l.untrack(raw)
		_ = raw.SetDeadline(time.Now().Add(l.connectTimeout))
		wc := newWireConn(raw, nil)
		wc.onConnectRead = release
		l.establish(wc, establish)
	}
	mux.HandleFunc("/mqtt", handler)
	mux.HandleFunc("/", handler)
	l.mu.Lock()
	l.httpSrv = &http.Server{Handler: mux, ReadHeaderTimeout: l.connectTimeout, ErrorLog: slog.NewLogLogger(l.log.Handler(), slog.LevelDebug)}
	srv := l.httpSrv
	l.mu.Unlock()
	if err := srv.Serve(l.ln); err != nil && !errors.Is(err, http.ErrServerClosed) && !l.closed.Load() {
		l.log.Error("websocket listener stopped", "listener", l.id, "err", err)
	}
}

func (l *listener) track(c net.Conn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed.Load() {
		return false
	}
	if l.conns == nil {
		l.conns = map[net.Conn]struct{}{}
	}
	l.conns[c] = struct{}{}
	return true
}

func (l *listener) untrack(c net.Conn) {
	l.mu.Lock()
	delete(l.conns, c)
	l.mu.Unlock()
}

// Close stops accepting, lets mochi disconnect the established clients (MQTT 5
// clients get DISCONNECT 0x8B), and then closes every socket still open:
// those that never sent CONNECT, which mochi does not know about.
func (l *listener) Close(closeClients listeners.CloseFn) {
	l.closed.Store(true)
	l.mu.Lock()
	srv := l.httpSrv
	l.mu.Unlock()
	if srv != nil {
		_ = srv.Close()
	} else {
		_ = l.ln.Close()
	}
	if l.closeV3 != nil {
		l.closeV3(l.id)
	}
	closeClients(l.id)
	l.mu.Lock()
	for c := range l.conns {
		_ = c.Close()
	}
	l.mu.Unlock()
}
