package broker

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"runtime"
	"runtime/debug"
	"strconv"
	"testing"
	"time"

	"github.com/fleetd/fleetd/internal/devcert"
)

// The memory test's clients run in a child process (this test binary again),
// so that the heap the parent measures is the server's alone.
const (
	envProbeAddr = "FLEETD_TLSMEM_ADDR"
	envProbeN    = "FLEETD_TLSMEM_N"
	envProbeDir  = "FLEETD_TLSMEM_DIR"
)

// TestTLSMemoryPerConnection: an idle TLS connection handshaken by
// serverHandshake keeps no more heap than one handshaken by crypto/tls alone
// with the listener's configuration (no per-connection copy of the config, no
// handshake record kept for the connection's life). Both are measured in the
// same run, as the heap each holds per connection after a GC, with and
// without client certificates.
func TestTLSMemoryPerConnection(t *testing.T) {
	if testing.Short() {
		t.Skip("handshakes a few thousand TLS connections")
	}
	const n = 400
	// Generous: the per-connection Clone of the config alone was ~600 B.
	const maxOverhead = 256
	dir, ca, srv := probeCerts(t)
	for _, mtls := range []bool{false, true} {
		base := &tls.Config{Certificates: []tls.Certificate{srv}, MinVersion: tls.VersionTLS12}
		name := "tls"
		if mtls {
			base.ClientCAs, base.ClientAuth, name = ca.Pool(), tls.RequireAndVerifyClientCert, "mtls"
		}
		t.Run(name, func(t *testing.T) {
			bare := heapPerConnection(t, n, dir, mtls, func(ctx context.Context, raw net.Conn) (*tls.Conn, error) {
				tc := tls.Server(raw, base)
				return tc, tc.HandshakeContext(ctx)
			})
			shared := serverTLSConfig(base)
			fleetd := heapPerConnection(t, n, dir, mtls, func(ctx context.Context, raw net.Conn) (*tls.Conn, error) {
				tc, f := serverHandshake(ctx, raw, shared)
				if f != nil {
					return nil, fmt.Errorf("%s", f.Detail())
				}
				return tc, nil
			})
			t.Logf("heap per idle %s connection: crypto/tls alone %d B, serverHandshake %d B (%+d B)", name, bare, fleetd, fleetd-bare)
			if fleetd-bare > maxOverhead {
				t.Errorf("serverHandshake keeps %d B more per connection than crypto/tls alone; want at most %d", fleetd-bare, maxOverhead)
			}
		})
	}
}

// heapPerConnection handshakes n connections from a child process with
// handshake, reads a first record from each, and returns the heap they hold
// per connection.
func heapPerConnection(t *testing.T, n int, dir string, mtls bool, handshake func(context.Context, net.Conn) (*tls.Conn, error)) int64 {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	env := []string{envProbeDir + "=" + dir}
	if !mtls {
		env = append(env, "FLEETD_TLSMEM_NOCERT=1")
	}
	before := heapAlloc()
	clients := startProbeClients(t, ln.Addr().String(), n, env...)
	defer clients.stop()
	conns := make([]*tls.Conn, 0, n)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	buf := make([]byte, 2)
	for range n {
		raw, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		tc, err := handshake(ctx, raw)
		cancel()
		if err != nil {
			t.Fatalf("handshake: %v", err)
		}
		if _, err := io.ReadFull(tc, buf); err != nil {
			t.Fatalf("read: %v", err)
		}
		conns = append(conns, tc)
	}
	clients.waitHeld(t)
	after := heapAlloc()
	runtime.KeepAlive(conns)
	return (after - before) / int64(n)
}

func heapAlloc() int64 {
	var ms runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&ms)
	return int64(ms.HeapAlloc)
}

// TestTLSMemoryClients is the memory test's client process; it does nothing
// unless started by heapPerConnection.
func TestTLSMemoryClients(t *testing.T) {
	addr := os.Getenv(envProbeAddr)
	if addr == "" {
		t.Skip("the client process of TestTLSMemoryPerConnection")
	}
	n, _ := strconv.Atoi(os.Getenv(envProbeN))
	dir := os.Getenv(envProbeDir)
	pem, err := os.ReadFile(dir + "/ca.pem")
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(pem)
	cfg := &tls.Config{RootCAs: roots, ServerName: "127.0.0.1"}
	if os.Getenv("FLEETD_TLSMEM_NOCERT") == "" {
		cert, err := tls.LoadX509KeyPair(dir+"/device.crt", dir+"/device.key")
		if err != nil {
			t.Fatal(err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	conns := make([]net.Conn, 0, n)
	for range n {
		c, err := tls.Dial("tcp", addr, cfg)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Write([]byte{0xc0, 0}); err != nil { // a PINGREQ
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	fmt.Println("held")
	_, _ = io.Copy(io.Discard, os.Stdin)
	for _, c := range conns {
		c.Close()
	}
}

// TestTLSStackPerConnection: the goroutine that handshakes a TLS connection
// goes on to be mochi's reader and parks for the connection's life, so it
// must not keep the stack the handshake grew: Go shrinks a stack at GC only
// while under a quarter of it is in use, and mochi's parked reader uses more
// than a quarter of 32 KiB with TLS. Measured with the GC off (so nothing
// shrinks) as the stack in use per connection whose goroutine handshook, as
// listener.handle does, and then parked in Read.
func TestTLSStackPerConnection(t *testing.T) {
	if testing.Short() {
		t.Skip("handshakes a few hundred TLS connections")
	}
	const n = 300
	// The handshake on the reader's own goroutine left 32 KiB; a parked TLS
	// reader needs less than 8.
	const maxStack = 12 << 10
	dir, ca, srv := probeCerts(t)
	cfg := serverTLSConfig(&tls.Config{Certificates: []tls.Certificate{srv}, MinVersion: tls.VersionTLS12,
		ClientCAs: ca.Pool(), ClientAuth: tls.RequireAndVerifyClientCert})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	defer debug.SetGCPercent(debug.SetGCPercent(-1))
	before := stackInuse()
	clients := startProbeClients(t, ln.Addr().String(), n, envProbeDir+"="+dir)
	defer clients.stop()
	read := make(chan error, n)
	var conns []net.Conn
	for range n {
		raw, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, raw)
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			tc, f := handshake(ctx, raw, cfg)
			cancel()
			if f != nil {
				read <- fmt.Errorf("%s", f.Detail())
				return
			}
			buf := make([]byte, 2)
			_, err := io.ReadFull(tc, buf)
			read <- err
			_, _ = tc.Read(buf) // parks until the client process ends
		}()
	}
	for range n {
		if err := <-read; err != nil {
			t.Fatal(err)
		}
	}
	clients.waitHeld(t)
	per := (stackInuse() - before) / n
	t.Logf("stack per parked mTLS reader: %d B", per)
	if per > maxStack {
		t.Errorf("stack per parked TLS reader %d B, want at most %d", per, maxStack)
	}
	for _, c := range conns {
		c.Close()
	}
}

func stackInuse() int64 {
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return int64(ms.StackInuse)
}

// probeCerts makes a device CA and a server certificate for 127.0.0.1, and
// writes into a new directory what the client process of the probes reads:
// the CA (ca.pem) and a device's pair (device.crt, device.key).
func probeCerts(t *testing.T) (dir string, ca *devcert.CA, srv tls.Certificate) {
	t.Helper()
	dir = t.TempDir()
	ca, err := devcert.NewCA("devices")
	if err != nil {
		t.Fatal(err)
	}
	if err := ca.WriteCA(dir + "/ca.pem"); err != nil {
		t.Fatal(err)
	}
	srv, _ = ca.Server(devcert.Options{IPs: []net.IP{net.ParseIP("127.0.0.1")}})
	dev, _ := ca.Device("mem-dev", devcert.Options{})
	if _, _, err := devcert.WritePair(dir, "device", dev); err != nil {
		t.Fatal(err)
	}
	return dir, ca, srv
}

// probeClients is the client process of the probes (TestTLSMemoryClients):
// it dials n TLS connections to addr, says "held" once every one is up, and
// ends when its stdin is closed.
type probeClients struct {
	cmd    *exec.Cmd
	stdin  io.Closer
	stdout *bufio.Reader
}

// startProbeClients starts the client process with env added to its
// environment.
func startProbeClients(t *testing.T, addr string, n int, env ...string) *probeClients {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestTLSMemoryClients$")
	cmd.Env = append(append(os.Environ(), envProbeAddr+"="+addr, envProbeN+"="+strconv.Itoa(n)), env...)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	return &probeClients{cmd: cmd, stdin: stdin, stdout: bufio.NewReader(stdout)}
}

// waitHeld waits until the process holds all its connections.
func (p *probeClients) waitHeld(t *testing.T) {
	t.Helper()
	if line, err := p.stdout.ReadString('\n'); err != nil || line != "held\n" {
		t.Fatalf("client process: %q %v", line, err)
	}
}

// stop ends the process and waits for it.
func (p *probeClients) stop() {
	p.stdin.Close()
	_ = p.cmd.Wait()
}
