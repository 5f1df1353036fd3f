package haproxytest

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// fakeReplica stands in for fleetd: a TCP listener that greets every
// connection with its name and holds it open, and an HTTP server with
// /readyz (switchable), /healthz and /who.
type fakeReplica struct {
	name     string
	mqtt     net.Listener
	http     *http.Server
	httpAddr string
	ready    atomic.Bool
	alive    atomic.Bool
}

func newFakeReplica(t *testing.T, name string) *fakeReplica {
	t.Helper()
	r := &fakeReplica{name: name}
	r.ready.Store(true)
	r.alive.Store(true)
	var err error
	if r.mqtt, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.mqtt.Close() })
	go func() {
		for {
			c, err := r.mqtt.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				fmt.Fprintln(c, r.name)
				io.Copy(io.Discard, c)
			}()
		}
	}()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r.httpAddr = ln.Addr().String()
	mux := http.NewServeMux()
	status := func(ok *atomic.Bool) http.HandlerFunc {
		return func(w http.ResponseWriter, _ *http.Request) {
			if !ok.Load() {
				w.WriteHeader(http.StatusServiceUnavailable)
			}
		}
	}
	mux.HandleFunc("/readyz", status(&r.ready))
	mux.HandleFunc("/healthz", status(&r.alive))
	mux.HandleFunc("/who", func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, r.name) })
	r.http = &http.Server{Handler: mux}
	go r.http.Serve(ln)
	t.Cleanup(func() { r.http.Close() })
	return r
}

func (r *fakeReplica) backend() Backend {
	return Backend{Name: r.name, MQTT: r.mqtt.Addr().String(), HTTP: r.httpAddr}
}

// dial connects through the proxy's MQTT frontend and returns the connection
// and the name of the replica it reached.
func dial(t *testing.T, p *Proxy) (net.Conn, string) {
	t.Helper()
	c, err := net.DialTimeout("tcp", p.MQTTAddr, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		t.Fatalf("read greeting through the proxy: %v", err)
	}
	c.SetReadDeadline(time.Time{})
	return c, strings.TrimSpace(line)
}

func TestConfigHasWhatTheReplicasNeed(t *testing.T) {
	cfg := Config([]Backend{{Name: "r1", MQTT: "127.0.0.1:1883", HTTP: "127.0.0.1:8080"}, {Name: "r2", MQTT: "10.0.0.2:1883", HTTP: "10.0.0.2:8081"}},
		Options{MQTTAddr: "127.0.0.1:1", HTTPAddr: "127.0.0.1:2"}, "/tmp/s.sock")
	for _, want := range []string{
		"mode tcp", "balance leastconn", "http-check send meth GET uri /readyz", "http-check send meth GET uri /healthz",
		"on-marked-down shutdown-sessions", "server r1 127.0.0.1:1883 check addr 127.0.0.1 port 8080",
		"server r2 10.0.0.2:1883 check addr 10.0.0.2 port 8081", "mode http", "server r2 10.0.0.2:8081 check",
		"use_backend mqtt_ready if { nbsrv(mqtt_ready) gt 0 }", "timeout client 15m", "stats socket /tmp/s.sock",
	} {
		if !strings.Contains(cfg, want) {
			t.Errorf("config lacks %q:\n%s", want, cfg)
		}
	}
	// The fallback backend must not shut sessions: it is what keeps devices
	// connected while no replica is ready.
	fallback := cfg[strings.Index(cfg, "\nbackend "+BackendMQTTFallback):strings.Index(cfg, "frontend http")]
	if strings.Contains(fallback, "shutdown-sessions") {
		t.Errorf("the fallback backend shuts sessions:\n%s", fallback)
	}
}

// TestConfigIsValid has haproxy itself check the configuration.
func TestConfigIsValid(t *testing.T) {
	bin := Binary(t)
	cfg := Config([]Backend{{Name: "r1", MQTT: "127.0.0.1:1883", HTTP: "127.0.0.1:8080"}}, Options{MQTTAddr: "127.0.0.1:1", HTTPAddr: "127.0.0.1:2"}, "")
	cmd := exec.Command(bin, "-c", "-f", "/dev/stdin")
	cmd.Stdin = strings.NewReader(cfg)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("haproxy -c: %v\n%s\n%s", err, out, cfg)
	}
}

// TestProxyFollowsReadiness: connections spread over the replicas; a replica
// that stops being ready is marked down, its sessions are shut and new ones
// go to the others; with none ready, connections still reach a live replica.
func TestProxyFollowsReadiness(t *testing.T) {
	a, b := newFakeReplica(t, "a"), newFakeReplica(t, "b")
	p := Start(t, []Backend{a.backend(), b.backend()}, Options{CheckInterval: 100 * time.Millisecond})

	seen := map[string]int{}
	var onA net.Conn
	for range 4 {
		c, name := dial(t, p)
		seen[name]++
		if name == "a" {
			onA = c
		}
	}
	if seen["a"] != 2 || seen["b"] != 2 {
		t.Fatalf("4 held connections reached %v, want 2 each (leastconn)", seen)
	}

	a.ready.Store(false)
	p.WaitServer(BackendMQTT, "a", "DOWN", 3*time.Second)
	onA.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, err := onA.Read(make([]byte, 1)); err == nil {
		t.Fatal("a session on the replica marked down is still open")
	}
	for range 3 {
		if _, name := dial(t, p); name != "b" {
			t.Fatalf("a new connection reached %s, which is not ready", name)
		}
	}

	b.ready.Store(false)
	p.WaitServer(BackendMQTT, "b", "DOWN", 3*time.Second)
	if _, name := dial(t, p); name != "a" && name != "b" {
		t.Fatalf("with no replica ready, reached %q", name)
	}

	// The API goes round robin over the ready replicas only.
	a.ready.Store(true)
	b.ready.Store(true)
	p.WaitServer(BackendHTTP, "a", "UP", 3*time.Second)
	p.WaitServer(BackendHTTP, "b", "UP", 3*time.Second)
	got := map[string]int{}
	for range 4 {
		resp, err := http.Get("http://" + p.HTTPAddr + "/who")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		got[string(body)]++
	}
	if got["a"] != 2 || got["b"] != 2 {
		t.Fatalf("4 API requests reached %v, want 2 each (round robin)", got)
	}
	b.ready.Store(false)
	p.WaitServer(BackendHTTP, "b", "DOWN", 3*time.Second)
	for range 3 {
		resp, err := http.Get("http://" + p.HTTPAddr + "/who")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if string(body) != "a" {
			t.Fatalf("an API request reached %q, want a (b is not ready)", body)
		}
	}
}
