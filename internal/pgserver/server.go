package pgserver

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

const (
	// Port is only part of the socket file name: the cluster never listens on TCP.
	Port = 5432
	// User is the cluster's superuser. Authentication is trust over a unix socket
	// in a 0700 directory, so only the cluster's owner (and root) can connect.
	User = "fleetd"
	// Database is the database fleetd uses inside the cluster.
	Database = "fleetd"
	// maxSocketPath is the kernel's limit for a unix socket path (sun_path) less
	// the terminating NUL.
	maxSocketPath = 107
)

// Server is one private PostgreSQL cluster below Dir: Dir/data holds the
// cluster, Dir/run the unix socket. Start creates the cluster on first use and
// reuses it afterwards; it repairs what a killed predecessor left behind.
type Server struct {
	// Dir is the cluster's root directory. It is created if missing.
	Dir string
	// BinDir holds initdb and postgres (see FindBinDir).
	BinDir string
	// Settings are extra postgres -c settings (e.g. fsync=off for tests).
	Settings map[string]string
	// DieWithParent makes the kernel stop postgres (immediate shutdown) when
	// the process that started it dies, so a crashed test binary leaves no
	// server behind.
	DieWithParent bool
	// Logger receives postgres's own log lines and supervision events.
	Logger *slog.Logger
	// StartTimeout bounds one start, crash recovery included. Default 60 s.
	StartTimeout time.Duration

	lockFile *os.File
	cred     *syscall.Credential // nil when running as a non-root user

	mu       sync.Mutex
	cmd      *exec.Cmd
	exited   chan struct{} // closed when cmd has been waited for
	stopping bool
	ready    bool
	lastErr  error
	done     chan struct{} // closed when the supervisor goroutine ends
	lastLogs *logTail
}

// DataDir is where the cluster's files live.
func (s *Server) DataDir() string { return filepath.Join(s.Dir, "data") }

// SocketDir is the directory holding the server's unix socket.
func (s *Server) SocketDir() string { return filepath.Join(s.Dir, "run") }

// ConnString is the keyword/value connection string for the fleetd database.
func (s *Server) ConnString() string { return s.connString(Database) }

func (s *Server) connString(db string) string {
	return fmt.Sprintf("host=%s port=%d user=%s dbname=%s sslmode=disable", s.SocketDir(), Port, User, db)
}

// Start prepares the cluster (initdb on first use, clean-up of stale state),
// starts postgres, waits until it accepts connections, makes sure the fleetd
// database exists and then supervises the server: if postgres dies it is
// restarted with backoff until Stop is called.
func (s *Server) Start(ctx context.Context) error {
	if s.Logger == nil {
		s.Logger = slog.New(slog.DiscardHandler)
	}
	if s.StartTimeout == 0 {
		s.StartTimeout = 60 * time.Second
	}
	if s.BinDir == "" {
		return errors.New("pgserver: BinDir is empty")
	}
	abs, err := filepath.Abs(s.Dir)
	if err != nil {
		return fmt.Errorf("data dir %s: %w", s.Dir, err)
	}
	s.Dir = abs
	if n := len(filepath.Join(s.SocketDir(), ".s.PGSQL.5432")); n > maxSocketPath {
		return fmt.Errorf("data dir %s is too deep: the PostgreSQL socket path would be %d bytes, the limit is %d; choose a shorter FLEETD_DATA_DIR", s.Dir, n, maxSocketPath)
	}
	if err := s.prepareDirs(); err != nil {
		return err
	}
	if err := s.lock(); err != nil {
		return err
	}
	if err := s.initdbIfNeeded(ctx); err != nil {
		s.unlock()
		return err
	}
	if err := s.clearStaleState(ctx); err != nil {
		s.unlock()
		return err
	}
	s.lastLogs = newLogTail(20)
	if err := s.startOnce(ctx); err != nil {
		s.unlock()
		return err
	}
	if err := s.ensureDatabase(ctx); err != nil {
		_ = s.Stop(context.Background())
		return err
	}
	s.done = make(chan struct{})
	go s.supervise()
	return nil
}

// Ready reports whether postgres is running and answered its last start-up
// probe; a crashed server that the supervisor is restarting is not ready.
func (s *Server) Ready() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ready {
		return nil
	}
	if s.lastErr != nil {
		return fmt.Errorf("embedded postgres not running: %w", s.lastErr)
	}
	return errors.New("embedded postgres not running")
}

// Stop shuts postgres down with a fast shutdown (open transactions roll back,
// the cluster is consistent on disk) and escalates to immediate shutdown and
// then SIGKILL if ctx ends first.
func (s *Server) Stop(ctx context.Context) error {
	s.mu.Lock()
	s.stopping = true
	s.mu.Unlock()
	var err error
	for {
		// The supervisor may be in the middle of a restart: stop whatever
		// process is current until the supervisor has seen the stop.
		s.mu.Lock()
		cmd, exited := s.cmd, s.exited
		s.mu.Unlock()
		if cmd != nil && !isClosed(exited) {
			err = stopProcess(ctx, cmd.Process.Pid, func() bool { return isClosed(exited) })
		}
		if s.done == nil {
			break
		}
		select {
		case <-s.done:
		case <-time.After(100 * time.Millisecond):
			continue
		}
		break
	}
	s.unlock()
	return err
}

func (s *Server) prepareDirs() error {
	if err := os.MkdirAll(s.Dir, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", s.Dir, err)
	}
	if os.Geteuid() != 0 {
		return nil
	}
	// initdb and postgres refuse to run as root: run them as the postgres user,
	// which then has to own the cluster directory and reach it.
	u, err := user.Lookup("postgres")
	if err != nil {
		return fmt.Errorf("fleetd runs as root, and PostgreSQL refuses root; no 'postgres' user to run it as (%v): create one or run fleetd as an ordinary user", err)
	}
	uid, _ := strconv.ParseUint(u.Uid, 10, 32)
	gid, _ := strconv.ParseUint(u.Gid, 10, 32)
	s.cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), NoSetGroups: true}
	for _, d := range []string{s.Dir, s.SocketDir()} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return fmt.Errorf("create %s: %w", d, err)
		}
		if err := os.Chown(d, int(uid), int(gid)); err != nil {
			return fmt.Errorf("chown %s to postgres: %w", d, err)
		}
	}
	return checkReachable(filepath.Dir(s.Dir), uint32(uid), uint32(gid))
}

// checkReachable verifies that the user can traverse every directory from /
// down to dir: a root-owned 0700 parent (t.TempDir, /root) would make initdb
// fail with a much less helpful message.
func checkReachable(dir string, uid, gid uint32) error {
	for d := dir; ; d = filepath.Dir(d) {
		st, err := os.Stat(d)
		if err != nil {
			return err
		}
		sys := st.Sys().(*syscall.Stat_t)
		m := st.Mode().Perm()
		ok := m&0o001 != 0 || (sys.Uid == uid && m&0o100 != 0) || (sys.Gid == gid && m&0o010 != 0)
		if !ok {
			return fmt.Errorf("the postgres user cannot reach the data dir: %s is mode %o owned by uid %d; make it searchable (chmod o+x %s) or choose another FLEETD_DATA_DIR", d, m, sys.Uid, d)
		}
		if d == "/" || d == "." {
			return nil
		}
	}
}

// lock takes an exclusive flock on Dir so that two supervisors never run the
// same cluster. The kernel drops the lock when the process dies, so a kill -9
// leaves nothing stale here.
func (s *Server) lock() error {
	path := filepath.Join(s.Dir, "supervisor.lock")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("open %s: %w", path, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		holder, _ := os.ReadFile(path)
		f.Close()
		return fmt.Errorf("embedded database in %s is in use by another process (pid %s): stop it or choose another FLEETD_DATA_DIR", s.Dir, strings.TrimSpace(string(holder)))
	}
	_ = f.Truncate(0)
	_, _ = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	s.lockFile = f
	return nil
}

func (s *Server) unlock() {
	if s.lockFile != nil {
		s.lockFile.Close()
		s.lockFile = nil
	}
}

// initdbIfNeeded creates the cluster on first start. It runs initdb into a
// scratch directory and renames it into place, so a crash during initdb leaves
// a scratch directory (removed on the next try), never a half-made cluster.
func (s *Server) initdbIfNeeded(ctx context.Context) error {
	if _, err := os.Stat(filepath.Join(s.DataDir(), "PG_VERSION")); err == nil {
		return nil
	}
	if entries, err := os.ReadDir(s.DataDir()); err == nil && len(entries) > 0 {
		return fmt.Errorf("%s exists but holds no PostgreSQL cluster (no PG_VERSION); move it away so fleetd can create a new one", s.DataDir())
	}
	_ = os.Remove(s.DataDir())
	scratch := s.DataDir() + ".initdb"
	if err := os.RemoveAll(scratch); err != nil {
		return fmt.Errorf("remove leftover %s: %w", scratch, err)
	}
	s.Logger.Info("creating embedded PostgreSQL cluster", "dir", s.DataDir())
	cmd := exec.CommandContext(ctx, filepath.Join(s.BinDir, "initdb"),
		"-D", scratch, "-U", User, "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync")
	cmd.Dir = s.Dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: s.cred, Setpgid: true}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("initdb %s: %w: %s", scratch, err, lastLines(string(out), 5))
	}
	// --no-sync keeps first start fast; flush once before the rename makes it visible.
	syscall.Sync()
	if err := os.Rename(scratch, s.DataDir()); err != nil {
		return fmt.Errorf("move new cluster into place: %w", err)
	}
	return nil
}

// clearStaleState deals with what a killed predecessor can leave: a postmaster
// still running on this cluster (an orphan), or postmaster.pid and socket lock
// files that name a dead process. Holding the supervisor lock proves that no
// live supervisor owns that postmaster, so it is stopped, not adopted: adopting
// would leave it unsupervised.
func (s *Server) clearStaleState(ctx context.Context) error {
	pidFile := filepath.Join(s.DataDir(), "postmaster.pid")
	data, err := os.ReadFile(pidFile)
	if errors.Is(err, os.ErrNotExist) {
		s.removeSocketFiles()
		return nil
	}
	if err != nil {
		return fmt.Errorf("read %s: %w", pidFile, err)
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(strings.SplitN(string(data), "\n", 2)[0]))
	if pid > 0 && isPostmasterOf(pid, s.DataDir()) {
		s.Logger.Warn("stopping orphaned postgres left by a previous fleetd", "pid", pid, "dir", s.DataDir())
		stopCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		if err := stopProcess(stopCtx, pid, func() bool { return !processAlive(pid) }); err != nil {
			return fmt.Errorf("stop orphaned postgres (pid %d): %w", pid, err)
		}
	}
	// Either postgres removed its pid file on the way out, or it died without
	// doing so; in both cases nothing owns these files any more.
	if err := os.Remove(pidFile); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove stale %s: %w", pidFile, err)
	}
	s.removeSocketFiles()
	return nil
}

func (s *Server) removeSocketFiles() {
	matches, _ := filepath.Glob(filepath.Join(s.SocketDir(), ".s.PGSQL.*"))
	for _, m := range matches {
		_ = os.Remove(m)
	}
}

// isPostmasterOf reports whether pid is a postgres process serving dataDir.
// postgres runs with its working directory set to the data directory.
func isPostmasterOf(pid int, dataDir string) bool {
	cwd, err := os.Readlink(fmt.Sprintf("/proc/%d/cwd", pid))
	if err != nil {
		return false
	}
	comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	name := strings.TrimSpace(string(comm))
	return (name == "postgres" || name == "postmaster") && filepath.Clean(cwd) == filepath.Clean(dataDir)
}

func processAlive(pid int) bool {
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}

// stopProcess asks a postmaster for a fast shutdown (SIGINT), escalating to an
// immediate shutdown (SIGQUIT) when ctx is done and to SIGKILL five seconds
// later. gone reports whether the process has exited.
func stopProcess(ctx context.Context, pid int, gone func() bool) error {
	_ = syscall.Kill(pid, syscall.SIGINT)
	if waitGone(ctx, gone) {
		return nil
	}
	_ = syscall.Kill(pid, syscall.SIGQUIT)
	quitCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if waitGone(quitCtx, gone) {
		return fmt.Errorf("postgres (pid %d) needed an immediate shutdown: %w", pid, ctx.Err())
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
	killCtx, cancel2 := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel2()
	if waitGone(killCtx, gone) {
		return fmt.Errorf("postgres (pid %d) had to be killed", pid)
	}
	return fmt.Errorf("postgres (pid %d) did not exit", pid)
}

func waitGone(ctx context.Context, gone func() bool) bool {
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		if gone() {
			return true
		}
		select {
		case <-ctx.Done():
			return gone()
		case <-t.C:
		}
	}
}

// startOnce launches postgres and waits until it accepts connections.
func (s *Server) startOnce(ctx context.Context) error {
	args := []string{"-D", s.DataDir(),
		"-c", "listen_addresses=",
		"-c", "unix_socket_directories=" + s.SocketDir(),
		"-c", "unix_socket_permissions=0700",
		"-c", fmt.Sprintf("port=%d", Port),
		"-c", "logging_collector=off",
	}
	for k, v := range s.Settings {
		args = append(args, "-c", k+"="+v)
	}
	cmd := exec.Command(filepath.Join(s.BinDir, "postgres"), args...)
	cmd.Dir = s.DataDir()
	// Own process group: a Ctrl-C in fleetd's terminal must not reach postgres
	// directly; fleetd stops it in order, after its own clients are closed.
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: s.cred, Setpgid: true}
	if s.DieWithParent {
		cmd.SysProcAttr.Pdeathsig = syscall.SIGQUIT
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return err
	}
	cmd.Stdout = cmd.Stderr
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start postgres: %w", err)
	}
	exited := make(chan struct{})
	logsDone := make(chan struct{})
	go func() {
		defer close(logsDone)
		s.pipeLogs(stderr)
	}()
	go func() {
		<-logsDone
		_ = cmd.Wait()
		close(exited)
	}()
	s.mu.Lock()
	s.cmd, s.exited = cmd, exited
	s.mu.Unlock()

	startCtx, cancel := context.WithTimeout(ctx, s.StartTimeout)
	defer cancel()
	if err := s.waitAccepting(startCtx, exited); err != nil {
		if !isClosed(exited) {
			_ = stopProcess(context.Background(), cmd.Process.Pid, func() bool { return isClosed(exited) })
		}
		return fmt.Errorf("embedded postgres did not start: %w; last log lines: %s", err, s.lastLogs.String())
	}
	s.mu.Lock()
	s.ready, s.lastErr = true, nil
	s.mu.Unlock()
	s.Logger.Info("embedded postgres ready", "pid", cmd.Process.Pid, "socket_dir", s.SocketDir())
	return nil
}

func (s *Server) waitAccepting(ctx context.Context, exited <-chan struct{}) error {
	cfg, err := pgconn.ParseConfig(s.connString("postgres"))
	if err != nil {
		return err
	}
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for {
		probeCtx, cancel := context.WithTimeout(ctx, 2*time.Second)
		conn, err := pgconn.ConnectConfig(probeCtx, cfg)
		cancel()
		if err == nil {
			conn.Close(ctx)
			return nil
		}
		select {
		case <-exited:
			return errors.New("postgres exited during start-up")
		case <-ctx.Done():
			return fmt.Errorf("not accepting connections: %w (last error: %v)", ctx.Err(), err)
		case <-t.C:
		}
	}
}

func (s *Server) ensureDatabase(ctx context.Context) error {
	conn, err := pgx.Connect(ctx, s.connString("postgres"))
	if err != nil {
		return fmt.Errorf("connect to embedded postgres: %w", err)
	}
	defer conn.Close(ctx)
	_, err = conn.Exec(ctx, "CREATE DATABASE "+Database)
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "42P04" { // duplicate_database
		return nil
	}
	if err != nil {
		return fmt.Errorf("create database %s: %w", Database, err)
	}
	return nil
}

// supervise restarts postgres when it dies unexpectedly, with exponential
// backoff so that a server that cannot start (disk full, corrupt cluster) does
// not spin. Backoff resets after a minute of healthy running.
func (s *Server) supervise() {
	defer close(s.done)
	backoff := 500 * time.Millisecond
	for {
		s.mu.Lock()
		exited, started := s.exited, time.Now()
		s.mu.Unlock()
		<-exited
		s.mu.Lock()
		stopping := s.stopping
		state := s.cmd.ProcessState
		s.ready = false
		s.lastErr = fmt.Errorf("postgres exited (%v)", state)
		s.mu.Unlock()
		if stopping {
			return
		}
		if time.Since(started) > time.Minute {
			backoff = 500 * time.Millisecond
		}
		for {
			s.Logger.Error("embedded postgres exited unexpectedly; restarting", "state", state.String(), "backoff", backoff.String(), "last_log", s.lastLogs.String())
			time.Sleep(backoff)
			backoff = min(backoff*2, 30*time.Second)
			s.mu.Lock()
			stopping = s.stopping
			s.mu.Unlock()
			if stopping {
				return
			}
			err := s.clearStaleState(context.Background())
			if err == nil {
				err = s.startOnce(context.Background())
			}
			if err == nil {
				break
			}
			s.mu.Lock()
			s.lastErr = err
			s.mu.Unlock()
		}
	}
}

func (s *Server) pipeLogs(r io.Reader) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		line := sc.Text()
		s.lastLogs.add(line)
		level := slog.LevelDebug
		if strings.Contains(line, "FATAL:") || strings.Contains(line, "PANIC:") {
			level = slog.LevelWarn
		}
		s.Logger.Log(context.Background(), level, line, "component", "postgres")
	}
}

func isClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " | ")
}

// logTail keeps the last lines postgres printed, for error messages.
type logTail struct {
	mu    sync.Mutex
	lines []string
	max   int
}

func newLogTail(n int) *logTail { return &logTail{max: n} }

func (l *logTail) add(line string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lines = append(l.lines, line)
	if len(l.lines) > l.max {
		l.lines = l.lines[len(l.lines)-l.max:]
	}
}

func (l *logTail) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return lastLines(strings.Join(l.lines, "\n"), 5)
}
