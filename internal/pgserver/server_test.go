package pgserver

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// newServer returns a Server in a fresh directory that the postgres user can
// reach (t.TempDir's parents are 0700 when tests run as root).
func newServer(t *testing.T) *Server {
	t.Helper()
	bin, err := FindBinDir(os.Getenv("FLEETD_PG_BIN"))
	if err != nil {
		t.Skipf("no PostgreSQL binaries: %v", err)
	}
	dir, err := os.MkdirTemp("", "pgserver-test-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o755)
	t.Cleanup(func() { os.RemoveAll(dir) })
	return &Server{Dir: filepath.Join(dir, "pg"), BinDir: bin, DieWithParent: true,
		Settings: map[string]string{"fsync": "off"}}
}

func start(t *testing.T, s *Server) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := s.Start(ctx); err != nil {
		t.Fatalf("Start: %v", err)
	}
}

func stop(t *testing.T, s *Server) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := s.Stop(ctx); err != nil {
		t.Fatalf("Stop: %v", err)
	}
}

func exec1(t *testing.T, s *Server, sql string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, s.ConnString())
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	defer conn.Close(ctx)
	rows, err := conn.Query(ctx, sql)
	if err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	var out string
	for rows.Next() {
		rows.Scan(&out)
	}
	if err := rows.Err(); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return out
}

func postmasterPID(t *testing.T, s *Server) int {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(s.DataDir(), "postmaster.pid"))
	if err != nil {
		t.Fatalf("read postmaster.pid: %v", err)
	}
	pid, _ := strconv.Atoi(strings.SplitN(string(data), "\n", 2)[0])
	return pid
}

func waitFor(t *testing.T, what string, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestStartStopReusesCluster(t *testing.T) {
	s := newServer(t)
	start(t, s)
	exec1(t, s, "CREATE TABLE kept (v text)")
	exec1(t, s, "INSERT INTO kept VALUES ('yes')")
	pid := postmasterPID(t, s)
	stop(t, s)
	if processAlive(pid) {
		t.Fatalf("postgres pid %d still alive after Stop", pid)
	}
	if _, err := os.Stat(filepath.Join(s.DataDir(), "postmaster.pid")); !os.IsNotExist(err) {
		t.Fatalf("postmaster.pid left after clean stop: %v", err)
	}

	again := &Server{Dir: s.Dir, BinDir: s.BinDir, DieWithParent: true}
	start(t, again)
	defer stop(t, again)
	if got := exec1(t, again, "SELECT v FROM kept"); got != "yes" {
		t.Fatalf("cluster not reused: got %q", got)
	}
}

func TestSecondSupervisorRefused(t *testing.T) {
	s := newServer(t)
	start(t, s)
	defer stop(t, s)
	other := &Server{Dir: s.Dir, BinDir: s.BinDir}
	err := other.Start(context.Background())
	if err == nil || !strings.Contains(err.Error(), "in use by another process") {
		t.Fatalf("second Start on the same dir: got %v, want 'in use by another process'", err)
	}
}

func TestRestartsCrashedPostgres(t *testing.T) {
	s := newServer(t)
	start(t, s)
	defer stop(t, s)
	old := postmasterPID(t, s)
	syscall.Kill(old, syscall.SIGKILL)
	waitFor(t, "not ready after crash", 5*time.Second, func() bool { return s.Ready() != nil })
	waitFor(t, "restart after crash", 30*time.Second, func() bool { return s.Ready() == nil })
	if pid := postmasterPID(t, s); pid == old {
		t.Fatalf("postmaster pid unchanged (%d) after restart", pid)
	}
	exec1(t, s, "SELECT 'alive'")
}

// TestStopsOrphanedPostmaster plays a fleetd that was killed with -9 and left
// its postgres running: the next Start must stop the orphan and take over.
func TestStopsOrphanedPostmaster(t *testing.T) {
	s := newServer(t)
	start(t, s)
	stop(t, s)

	orphan := exec.Command(filepath.Join(s.BinDir, "postgres"), "-D", s.DataDir(),
		"-c", "listen_addresses=", "-c", "unix_socket_directories="+s.SocketDir())
	orphan.Dir = s.DataDir()
	orphan.SysProcAttr = &syscall.SysProcAttr{Credential: s.cred, Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := orphan.Start(); err != nil {
		t.Fatal(err)
	}
	orphanExited := make(chan struct{})
	go func() { orphan.Wait(); close(orphanExited) }()
	waitFor(t, "orphan to write postmaster.pid", 20*time.Second, func() bool {
		_, err := os.Stat(filepath.Join(s.SocketDir(), ".s.PGSQL.5432"))
		return err == nil
	})

	again := &Server{Dir: s.Dir, BinDir: s.BinDir, DieWithParent: true}
	start(t, again)
	defer stop(t, again)
	if pid := postmasterPID(t, again); pid == orphan.Process.Pid {
		t.Fatalf("orphan pid %d was adopted, want a supervised postmaster", pid)
	}
	waitFor(t, "orphan to exit", 10*time.Second, func() bool {
		select {
		case <-orphanExited:
			return true
		default:
			return false
		}
	})
	exec1(t, again, "SELECT 'alive'")
}

// TestIgnoresStalePidFile plays a crash that left postmaster.pid naming a pid
// that now belongs to another process.
func TestIgnoresStalePidFile(t *testing.T) {
	s := newServer(t)
	start(t, s)
	stop(t, s)
	stale := strconv.Itoa(os.Getpid()) + "\n" + s.DataDir() + "\n"
	if err := os.WriteFile(filepath.Join(s.DataDir(), "postmaster.pid"), []byte(stale), 0o600); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(s.SocketDir(), ".s.PGSQL.5432.lock"), []byte(stale), 0o600)
	again := &Server{Dir: s.Dir, BinDir: s.BinDir, DieWithParent: true}
	start(t, again)
	defer stop(t, again)
	exec1(t, again, "SELECT 'alive'")
}

func TestFindBinDir(t *testing.T) {
	if _, err := FindBinDir(t.TempDir()); err == nil || !strings.Contains(err.Error(), "FLEETD_PG_BIN") {
		t.Fatalf("override without binaries: got %v", err)
	}
	if got := versionOf("/usr/lib/postgresql/16/bin"); got != 16 {
		t.Fatalf("versionOf: got %v", got)
	}
	if got := versionOf("/opt/homebrew/opt/postgresql@14/bin"); got != 14 {
		t.Fatalf("versionOf: got %v", got)
	}
}

func TestNoBinariesMessageNamesWaysOut(t *testing.T) {
	for _, want := range []string{"install PostgreSQL", "FLEETD_DATABASE_URL", "docker compose up", "FLEETD_PG_BIN"} {
		if !strings.Contains(ErrNoBinaries.Error(), want) {
			t.Errorf("ErrNoBinaries does not mention %q", want)
		}
	}
}
