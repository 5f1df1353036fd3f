package broker

import (
	"net"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// flakyListener fails Accept with EMFILE (out of file descriptors) a few
// times, as the kernel does under descriptor exhaustion.
type flakyListener struct {
	net.Listener
	failures atomic.Int32
}

func (f *flakyListener) Accept() (net.Conn, error) {
	if f.failures.Add(-1) >= 0 {
		return nil, &net.OpError{Op: "accept", Net: "tcp", Err: syscall.EMFILE}
	}
	return f.Listener.Accept()
}

// TestAcceptErrorsDoNotEndListener: mochi's own listener returns on the first
// accept error and never accepts again; fleetd's backs off and goes on.
func TestAcceptErrorsDoNotEndListener(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.TCPAddr = "" })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	flaky := &flakyListener{Listener: ln}
	flaky.failures.Store(3)
	l := &listener{id: "flaky", ln: flaky, connectTimeout: time.Second, maxPacket: 1 << 20, log: e.b.log, m: e.b.m}
	if err := e.b.srv.AddListener(l); err != nil {
		t.Fatal(err)
	}
	e.b.srv.Listeners.Serve(l.ID(), e.b.srv.EstablishConnection) // the server is already serving
	tok := e.register("survivor")
	if code := dialRaw(t, ln.Addr().String()).connect(4, "survivor", "survivor", tok, 30); code != 0 {
		t.Fatalf("CONNACK 0x%02x", code)
	}
	if n := testutil.ToFloat64(e.b.m.acceptErrors.WithLabelValues("flaky")); n != 3 {
		t.Fatalf("accept errors counted: %v, want 3", n)
	}
}
