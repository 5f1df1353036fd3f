// Package fleetdtest runs the real fleetd binary as a child process, exactly
// as a user would, for end-to-end tests.
package fleetdtest

import (
	"bufio"
	"bytes"
	"cmp"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/fleetd/fleetd/internal/testlog"
)

var (
	buildMu sync.Mutex
	built   = map[string]string{}
)

// Binary builds cmd/fleetd once per test binary and returns its path.
func Binary(t testing.TB) string { return Build(t, "fleetd") }

// Build builds cmd/NAME once per test binary and returns its path.
func Build(t testing.TB, name string) string {
	t.Helper()
	buildMu.Lock()
	defer buildMu.Unlock()
	if p, ok := built[name]; ok {
		return p
	}
	dir, err := os.MkdirTemp("", "fleetd-bin-")
	if err != nil {
		t.Fatal(err)
	}
	_, file, _, _ := runtime.Caller(0)
	root := filepath.Join(filepath.Dir(file), "..", "..")
	path := filepath.Join(dir, name)
	cmd := exec.Command("go", "build", "-o", path, "./cmd/"+name)
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build ./cmd/%s: %v\n%s", name, err, out)
	}
	built[name] = path
	return path
}

// DataDir returns a fresh directory that the postgres user can reach when the
// tests run as root (t.TempDir's parents are 0700). It is removed when the test
// ends.
func DataDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "fleetd-e2e-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o755)
	t.Cleanup(func() { os.RemoveAll(dir) })
	return filepath.Join(dir, "data")
}

// Process is a running fleetd.
type Process struct {
	t       testing.TB
	Cmd     *exec.Cmd
	DataDir string
	// Node is the replica's name (FLEETD_NODE) when the environment sets it;
	// empty means fleetd's default, the host name.
	Node string
	// HTTPURL is http://addr of the HTTP listener, read from fleetd's log.
	HTTPURL string
	// Addrs maps a listener's log component ("http", "mqtt-tcp", ...) to the address it bound.
	Addrs map[string]string

	env       []string // as passed to Start, for Token
	listening chan struct{}
	mu        sync.Mutex
	logs      bytes.Buffer
	exited    chan struct{}
	err       error
}

// Start runs fleetd with the given environment (on top of a minimal one: PATH,
// HOME) and waits until it logs its HTTP address. Every listener binds port 0
// unless env says otherwise. The process is killed when the test ends if it
// is still running.
func Start(t testing.TB, dataDir string, env ...string) *Process {
	t.Helper()
	p, err := launch(t, Binary(t), dataDir, env)
	if err != nil {
		t.Fatal(err)
	}
	p.killAtEnd()
	if err := p.waitListening(30 * time.Second); err != nil {
		t.Fatal(err)
	}
	return p
}

// launch starts fleetd and returns at once; it neither fails the test nor
// registers a clean-up, so that several replicas can be started together and
// come up concurrently.
func launch(t testing.TB, bin, dataDir string, env []string) (*Process, error) {
	p := &Process{t: t, DataDir: dataDir, Addrs: map[string]string{}, exited: make(chan struct{}), env: env}
	if v, ok := lastEnv(env, "FLEETD_NODE"); ok {
		p.Node = v
	}
	cmd := exec.Command(bin)
	cmd.Env = append([]string{
		"PATH=" + os.Getenv("PATH"),
		"HOME=" + os.Getenv("HOME"),
		"FLEETD_DATA_DIR=" + dataDir,
		"FLEETD_HTTP_ADDR=127.0.0.1:0",
		"FLEETD_MQTT_ADDR=127.0.0.1:0",
		"FLEETD_LOG_FORMAT=json",
		"FLEETD_LOG_LEVEL=debug",
	}, env...)
	if v := os.Getenv("FLEETD_PG_BIN"); v != "" {
		cmd.Env = append(cmd.Env, "FLEETD_PG_BIN="+v)
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return nil, err
	}
	cmd.Stdout = io.Discard
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start fleetd: %w", err)
	}
	p.Cmd = cmd
	p.listening = make(chan struct{})
	var once sync.Once
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64*1024), 1<<20)
		for sc.Scan() {
			line := sc.Bytes()
			p.mu.Lock()
			p.logs.Write(line)
			p.logs.WriteByte('\n')
			var rec struct {
				Msg, Component, Addr string
			}
			if json.Unmarshal(line, &rec) == nil && strings.HasSuffix(rec.Msg, "listening") && rec.Addr != "" {
				p.Addrs[rec.Component] = rec.Addr
				if rec.Component == "http" {
					p.HTTPURL = "http://" + rec.Addr
					once.Do(func() { close(p.listening) })
				}
			}
			p.mu.Unlock()
		}
		p.err = cmd.Wait()
		close(p.exited)
	}()
	return p, nil
}

// killAtEnd kills the process when the test ends if it is still running, and
// logs what it logged when the test failed.
func (p *Process) killAtEnd() {
	p.t.Cleanup(func() {
		if !p.Exited() {
			p.Kill()
		}
		if p.t.Failed() {
			testlog.Keep(p.t, "fleetd "+cmp.Or(p.Node, filepath.Base(p.DataDir)), p.Logs())
		}
	})
}

// waitListening waits until fleetd has logged its HTTP address.
func (p *Process) waitListening(timeout time.Duration) error {
	select {
	case <-p.listening:
		return nil
	case <-p.exited:
		return fmt.Errorf("fleetd exited before listening: %v\n%s", p.err, p.Logs())
	case <-time.After(timeout):
		return fmt.Errorf("fleetd did not log its HTTP address within %s\n%s", timeout, p.Logs())
	}
}

// lastEnv returns the value of the last NAME=value in env: the one exec
// passes on when a name is given twice.
func lastEnv(env []string, name string) (string, bool) {
	for i := len(env) - 1; i >= 0; i-- {
		if v, ok := strings.CutPrefix(env[i], name+"="); ok {
			return v, true
		}
	}
	return "", false
}

// Logs returns everything fleetd has logged so far.
func (p *Process) Logs() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.logs.String()
}

// Addr returns the address the named listener bound, waiting for it.
func (p *Process) Addr(component string) string {
	p.t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		p.mu.Lock()
		a := p.Addrs[component]
		p.mu.Unlock()
		if a != "" {
			return a
		}
		time.Sleep(20 * time.Millisecond)
	}
	p.t.Fatalf("fleetd logged no %s listener address\n%s", component, p.Logs())
	return ""
}

// WaitReady polls /readyz until it answers 200.
func (p *Process) WaitReady(timeout time.Duration) {
	p.t.Helper()
	deadline := time.Now().Add(timeout)
	var last string
	for time.Now().Before(deadline) {
		resp, err := http.Get(p.HTTPURL + "/readyz")
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
			last = fmt.Sprintf("%d %s", resp.StatusCode, body)
		} else {
			last = err.Error()
		}
		if p.Exited() {
			p.t.Fatalf("fleetd exited while waiting for /readyz: %v\n%s", p.err, p.Logs())
		}
		time.Sleep(50 * time.Millisecond)
	}
	p.t.Fatalf("/readyz not 200 within %s (last: %s)\n%s", timeout, last, p.Logs())
}

// Metric returns the value of an unlabelled sample on /metrics, such as
// fleetd_flagged_firmware. It fails when fleetd does not answer or does not
// export the sample.
func (p *Process) Metric(name string) (float64, error) {
	resp, err := http.Get(p.HTTPURL + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name+" "); ok {
			return strconv.ParseFloat(v, 64)
		}
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	return 0, fmt.Errorf("/metrics has no sample %s", name)
}

// WaitMetric polls /metrics until the unlabelled sample name equals want.
func (p *Process) WaitMetric(name string, want float64, within time.Duration) {
	p.t.Helper()
	deadline := time.Now().Add(within)
	for {
		got, err := p.Metric(name)
		if err == nil && got == want {
			return
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("%s is not %v within %s (last: %v, %v)", name, want, within, got, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Exited reports whether the process has ended.
func (p *Process) Exited() bool {
	select {
	case <-p.exited:
		return true
	default:
		return false
	}
}

// Wait waits up to timeout for the process to end and returns its exit error.
func (p *Process) Wait(timeout time.Duration) error {
	p.t.Helper()
	select {
	case <-p.exited:
		return p.err
	case <-time.After(timeout):
		p.t.Fatalf("fleetd still running %s after being asked to stop\n%s", timeout, p.Logs())
		return nil
	}
}

// Signal sends sig to fleetd.
func (p *Process) Signal(sig syscall.Signal) { _ = p.Cmd.Process.Signal(sig) }

// Kill kills fleetd with SIGKILL and waits for it, leaving behind whatever a
// crash leaves (the embedded postgres keeps running as an orphan).
func (p *Process) Kill() {
	_ = p.Cmd.Process.Kill()
	<-p.exited
}

// Token returns the admin token: the one the environment configured
// (FLEETD_ADMIN_TOKEN or FLEETD_ADMIN_TOKEN_FILE), else the one generated in
// the data dir.
func (p *Process) Token() string {
	p.t.Helper()
	if v, ok := lastEnv(p.env, "FLEETD_ADMIN_TOKEN"); ok && v != "" {
		return v
	}
	path := filepath.Join(p.DataDir, "admin-token")
	if v, ok := lastEnv(p.env, "FLEETD_ADMIN_TOKEN_FILE"); ok && v != "" {
		path = v
	}
	data, err := os.ReadFile(path)
	if err != nil {
		p.t.Fatalf("read admin token: %v", err)
	}
	return strings.TrimSpace(string(data))
}
