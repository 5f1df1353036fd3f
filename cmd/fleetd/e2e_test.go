package main

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fleetd/fleetd/internal/fleetdtest"
	"github.com/fleetd/fleetd/internal/pgserver"
	"github.com/fleetd/fleetd/internal/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// postgresPIDs lists the postgres processes serving the embedded cluster of
// dataDir (postgres runs with its working directory in the cluster).
func postgresPIDs(dataDir string) []int {
	cluster, _ := filepath.Abs(filepath.Join(dataDir, "postgres", "data"))
	entries, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		comm, _ := os.ReadFile("/proc/" + e.Name() + "/comm")
		cwd, _ := os.Readlink("/proc/" + e.Name() + "/cwd")
		if strings.TrimSpace(string(comm)) == "postgres" && cwd == cluster {
			pids = append(pids, pid)
		}
	}
	return pids
}

func waitNoPostgres(t *testing.T, dataDir string, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for len(postgresPIDs(dataDir)) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("postgres processes still running for %s: %v", dataDir, postgresPIDs(dataDir))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func getJSON(t *testing.T, url, token string) (int, map[string]any) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, url, nil)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	var body map[string]any
	data, _ := io.ReadAll(resp.Body)
	if err := json.Unmarshal(data, &body); err != nil {
		t.Fatalf("GET %s: body is not JSON: %q", url, data)
	}
	return resp.StatusCode, body
}

// TestEmbeddedLifecycle is the newcomer's path: start on an empty data dir,
// become ready, stop on SIGTERM without leaving postgres behind, and reuse the
// cluster on the next start.
func TestEmbeddedLifecycle(t *testing.T) {
	dir := fleetdtest.DataDir(t)
	p := fleetdtest.Start(t, dir)
	p.WaitReady(15 * time.Second)
	token := p.Token()
	if strings.Contains(p.Logs(), token) {
		t.Fatal("the admin token appears in the log")
	}
	if code, _ := getJSON(t, p.HTTPURL+"/api/v1/server", token); code != http.StatusOK {
		t.Fatalf("GET /api/v1/server with the generated token: %d", code)
	}
	if len(postgresPIDs(dir)) == 0 {
		t.Fatal("no embedded postgres process found while fleetd runs")
	}

	p.Signal(syscall.SIGTERM)
	start := time.Now()
	if err := p.Wait(10 * time.Second); err != nil {
		t.Fatalf("exit after SIGTERM: %v, want status 0", err)
	}
	t.Logf("stopped in %s", time.Since(start))
	waitNoPostgres(t, dir, time.Second)

	again := fleetdtest.Start(t, dir)
	again.WaitReady(15 * time.Second)
	logs := again.Logs()
	if strings.Contains(logs, "creating embedded PostgreSQL cluster") || strings.Contains(logs, "applied migration") {
		t.Fatalf("second start re-created the cluster or re-applied migrations:\n%s", logs)
	}
	if again.Token() != token {
		t.Fatal("admin token changed between starts")
	}
	again.Signal(syscall.SIGINT)
	if err := again.Wait(10 * time.Second); err != nil {
		t.Fatalf("exit after SIGINT: %v", err)
	}
	waitNoPostgres(t, dir, time.Second)
}

// TestStartAfterKill9 kills fleetd with SIGKILL, which leaves its postgres
// running as an orphan, and checks that the next start stops the orphan and
// comes up ready on the same data.
func TestStartAfterKill9(t *testing.T) {
	dir := fleetdtest.DataDir(t)
	p := fleetdtest.Start(t, dir)
	p.WaitReady(15 * time.Second)
	p.Kill()
	orphans := postgresPIDs(dir)
	if len(orphans) == 0 {
		t.Fatal("expected the killed fleetd's postgres to survive as an orphan")
	}

	again := fleetdtest.Start(t, dir)
	again.WaitReady(15 * time.Second)
	for _, pid := range orphans {
		if syscall.Kill(pid, 0) == nil && contains(postgresPIDs(dir), pid) {
			t.Errorf("orphaned postgres %d still running after the new start", pid)
		}
	}
	if !strings.Contains(again.Logs(), "orphaned postgres") {
		t.Errorf("the new start did not report the orphan it stopped")
	}

	// And a second kill -9 in a row, this time with the orphan already
	// stopped by hand: only a stale postmaster.pid is left.
	again.Kill()
	for _, pid := range postgresPIDs(dir) {
		syscall.Kill(pid, syscall.SIGKILL)
	}
	waitNoPostgres(t, dir, 5*time.Second)
	third := fleetdtest.Start(t, dir)
	third.WaitReady(15 * time.Second)
	third.Signal(syscall.SIGTERM)
	if err := third.Wait(10 * time.Second); err != nil {
		t.Fatalf("exit after SIGTERM: %v", err)
	}
	waitNoPostgres(t, dir, time.Second)
}

func contains(s []int, v int) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// TestExternalDatabase checks that a database URL means no embedded cluster.
func TestExternalDatabase(t *testing.T) {
	dir := fleetdtest.DataDir(t)
	p := fleetdtest.Start(t, dir, "FLEETD_DATABASE_URL="+pgtest.EmptyURL(t))
	p.WaitReady(15 * time.Second)
	if _, err := os.Stat(filepath.Join(dir, "postgres")); !os.IsNotExist(err) {
		t.Fatalf("embedded cluster directory created although a database URL is set (stat: %v)", err)
	}
	if !strings.Contains(p.Logs(), "applied migration") {
		t.Fatal("migrations not applied to the external database")
	}
	p.Signal(syscall.SIGTERM)
	if err := p.Wait(10 * time.Second); err != nil {
		t.Fatalf("exit after SIGTERM: %v", err)
	}
}

// TestReadyzWhenDatabaseDown stops the database under a running fleetd:
// /healthz stays 200, /readyz turns 503 naming the database, and comes back.
func TestReadyzWhenDatabaseDown(t *testing.T) {
	bin, err := pgserver.FindBinDir(os.Getenv("FLEETD_PG_BIN"))
	if err != nil {
		t.Skip(err)
	}
	pgDir := fleetdtest.DataDir(t)
	db := &pgserver.Server{Dir: pgDir, BinDir: bin, DieWithParent: true, Logger: slog.New(slog.DiscardHandler)}
	ctx := context.Background()
	if err := db.Start(ctx); err != nil {
		t.Fatal(err)
	}
	defer db.Stop(ctx)

	p := fleetdtest.Start(t, fleetdtest.DataDir(t), "FLEETD_DATABASE_URL="+db.ConnString())
	p.WaitReady(15 * time.Second)
	if err := db.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	code, body := getJSON(t, p.HTTPURL+"/readyz", "")
	if code != http.StatusServiceUnavailable {
		t.Fatalf("/readyz with the database down: %d %v, want 503", code, body)
	}
	checks, _ := body["checks"].(map[string]any)
	if msg, _ := checks["database"].(string); msg == "" || msg == "ok" {
		t.Fatalf("/readyz does not name the database: %v", body)
	}
	if code, _ := getJSON(t, p.HTTPURL+"/healthz", ""); code != http.StatusOK {
		t.Fatalf("/healthz with the database down: %d, want 200", code)
	}

	db2 := &pgserver.Server{Dir: pgDir, BinDir: bin, DieWithParent: true, Logger: slog.New(slog.DiscardHandler)}
	if err := db2.Start(ctx); err != nil {
		t.Fatal(err)
	}
	defer db2.Stop(ctx)
	p.WaitReady(15 * time.Second)
}

func TestAddressInUseNamesTheSetting(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	for _, setting := range []string{"FLEETD_HTTP_ADDR", "FLEETD_MQTT_ADDR"} {
		env := []string{setting + "=" + ln.Addr().String()}
		if setting != "FLEETD_HTTP_ADDR" {
			env = append(env, "FLEETD_HTTP_ADDR=127.0.0.1:0")
		}
		out, err := runFleetd(t, env...)
		if err == nil {
			t.Fatalf("fleetd started with %s on a taken address", setting)
		}
		for _, want := range []string{ln.Addr().String(), setting, "address already in use"} {
			if !strings.Contains(out, want) {
				t.Errorf("%s: output does not mention %q:\n%s", setting, want, out)
			}
		}
	}
}

func TestBadConfigExitsNonZero(t *testing.T) {
	out, err := runFleetd(t, "FLEETD_LOG_FORMAT=xml")
	if err == nil {
		t.Fatal("fleetd accepted FLEETD_LOG_FORMAT=xml")
	}
	if !strings.Contains(out, "FLEETD_LOG_FORMAT") {
		t.Errorf("output does not name FLEETD_LOG_FORMAT:\n%s", out)
	}
}

// runFleetd runs fleetd to completion (it is expected to fail fast).
func runFleetd(t *testing.T, env ...string) (string, error) {
	t.Helper()
	p := fleetdtestCmd(t, env...)
	out, err := p.CombinedOutput()
	return string(out), err
}
