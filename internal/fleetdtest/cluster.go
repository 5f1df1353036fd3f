package fleetdtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/haproxytest"
	"github.com/fleetd/fleetd/internal/pgserver"
	"github.com/fleetd/fleetd/web/client"
)

// ClusterOptions configure StartCluster.
type ClusterOptions struct {
	// Replicas is how many fleetd processes to run (default 3).
	Replicas int
	// Env is added to every replica's environment, after the cluster's own
	// settings, so it may override them (not the secrets: they come from
	// files, and fleetd refuses a secret set both ways).
	Env []string
	// ReplicaEnv, when set, adds settings to replica i only, after Env.
	ReplicaEnv func(i int) []string
	// DatabaseURL points the replicas at an existing database, which must be
	// empty (the replicas migrate it). Empty: a private PostgreSQL for this
	// cluster, or a fresh database on FLEETD_TEST_DATABASE_URL when that is set.
	DatabaseURL string
	// Proxy starts HAProxy in front of the replicas (Cluster.Proxy): MQTT in
	// TCP mode, the API in HTTP mode, both checked on /readyz. Every replica
	// then builds its firmware download URLs on the proxy's HTTP address.
	Proxy bool
	// ProxyOptions tune the proxy (balance, check interval); its listen
	// addresses are chosen by the cluster.
	ProxyOptions haproxytest.Options
}

// Cluster is N fleetd replicas on one PostgreSQL, each with its own data
// dir, node name and ports, and sharing what replicas must share to behave
// as one fleet: the database, the admin token, the token pepper and the
// firmware signing key. Replica i (0-based) is named Node(i), "r1" for
// replica 0. Every replica keeps its ports across Restart, so that a
// load balancer's configuration stays valid.
type Cluster struct {
	t testing.TB
	// Replicas are the running processes; Restart replaces an entry.
	Replicas []*Process
	// DatabaseURL is the database every replica uses (FLEETD_DATABASE_URL).
	DatabaseURL string
	// AdminToken, TokenPepper (hex) and SigningKey (hex ed25519 seed) are
	// the shared secrets, given to every replica through *_FILE settings
	// pointing into SecretsDir.
	AdminToken, TokenPepper, SigningKey string
	SecretsDir                          string
	// Proxy is HAProxy in front of the replicas, when ClusterOptions.Proxy
	// was set; nil otherwise.
	Proxy *haproxytest.Proxy

	bin   string
	envs  [][]string // each replica's environment, for Restart
	dirs  []string
	ports []replicaPorts

	poolOnce sync.Once
	pool     *pgxpool.Pool
}

type replicaPorts struct{ http, mqtt string }

// StartReplicas starts n replicas on one fresh database, concurrently, and
// waits until every one is ready; env is added to each replica's
// environment. See StartCluster for the rest.
func StartReplicas(t testing.TB, n int, env ...string) []*Process {
	t.Helper()
	return StartCluster(t, ClusterOptions{Replicas: n, Env: env}).Replicas
}

// StartCluster starts a database, then every replica at once (they race for
// the migrations, which take an advisory lock), waits until each answers
// /readyz, and, when asked, starts HAProxy in front of them and waits until
// it sees every replica up. Everything is stopped when the test ends.
func StartCluster(t testing.TB, opts ClusterOptions) *Cluster {
	t.Helper()
	if opts.Replicas == 0 {
		opts.Replicas = 3
	}
	c := &Cluster{t: t, bin: Binary(t)}
	c.DatabaseURL = opts.DatabaseURL
	if c.DatabaseURL == "" {
		c.DatabaseURL = clusterDatabase(t)
	}
	c.writeSecrets()

	var mqttFront, httpFront string
	if opts.Proxy {
		mqttFront, httpFront = FreeAddr(t), FreeAddr(t)
	}
	for i := range opts.Replicas {
		ports := replicaPorts{http: FreeAddr(t), mqtt: FreeAddr(t)}
		env := []string{
			"FLEETD_DATABASE_URL=" + c.DatabaseURL,
			"FLEETD_NODE=" + c.Node(i),
			"FLEETD_HTTP_ADDR=" + ports.http,
			"FLEETD_MQTT_ADDR=" + ports.mqtt,
			"FLEETD_ADMIN_TOKEN_FILE=" + filepath.Join(c.SecretsDir, "admin-token"),
			"FLEETD_TOKEN_PEPPER_FILE=" + filepath.Join(c.SecretsDir, "token-pepper"),
			"FLEETD_FIRMWARE_SIGNING_KEY_FILE=" + filepath.Join(c.SecretsDir, "firmware-signing-key"),
		}
		if opts.Proxy {
			env = append(env, "FLEETD_PUBLIC_URL=http://"+httpFront)
		}
		env = append(env, opts.Env...)
		if opts.ReplicaEnv != nil {
			env = append(env, opts.ReplicaEnv(i)...)
		}
		c.envs = append(c.envs, env)
		c.dirs = append(c.dirs, DataDir(t))
		c.ports = append(c.ports, ports)
	}
	// Launch every replica before waiting for any, so that they start (and
	// migrate) concurrently.
	var errs []error
	for i := range opts.Replicas {
		p, err := launch(t, c.bin, c.dirs[i], c.envs[i])
		if err != nil {
			errs = append(errs, fmt.Errorf("replica %s: %w", c.Node(i), err))
			continue
		}
		p.killAtEnd()
		c.Replicas = append(c.Replicas, p)
	}
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	for i, p := range c.Replicas {
		if err := p.waitListening(60 * time.Second); err != nil {
			t.Fatalf("replica %s: %v", c.Node(i), err)
		}
	}
	c.WaitReady(60 * time.Second)

	if opts.Proxy {
		po := opts.ProxyOptions
		po.MQTTAddr, po.HTTPAddr = mqttFront, httpFront
		c.Proxy = haproxytest.Start(t, c.Backends(), po)
	}
	return c
}

// Node is the name of replica i: "r1" for replica 0.
func (c *Cluster) Node(i int) string { return fmt.Sprintf("r%d", i+1) }

// Index returns the replica whose node name is node (as a device's
// broker_node names it), or -1.
func (c *Cluster) Index(node string) int {
	for i := range c.Replicas {
		if c.Node(i) == node {
			return i
		}
	}
	return -1
}

// Replica returns replica i's current process.
func (c *Cluster) Replica(i int) *Process { return c.Replicas[i] }

// Client is an API client of replica i (straight to it, not through the
// proxy) with the shared admin token.
func (c *Cluster) Client(i int) *client.Client {
	return client.New("http://"+c.ports[i].http, c.AdminToken)
}

// ProxyClient is an API client that goes through HAProxy.
func (c *Cluster) ProxyClient() *client.Client {
	c.t.Helper()
	if c.Proxy == nil {
		c.t.Fatal("fleetdtest: ProxyClient needs ClusterOptions.Proxy")
	}
	return client.New("http://"+c.Proxy.HTTPAddr, c.AdminToken)
}

// MQTTAddr is replica i's MQTT TCP address (host:port), fixed for the
// cluster's life.
func (c *Cluster) MQTTAddr(i int) string { return c.ports[i].mqtt }

// HTTPAddr is replica i's HTTP address (host:port), fixed for the cluster's life.
func (c *Cluster) HTTPAddr(i int) string { return c.ports[i].http }

// Backends describes the replicas for haproxytest.
func (c *Cluster) Backends() []haproxytest.Backend {
	bs := make([]haproxytest.Backend, len(c.ports))
	for i, p := range c.ports {
		bs[i] = haproxytest.Backend{Name: c.Node(i), MQTT: p.mqtt, HTTP: p.http}
	}
	return bs
}

// WaitReady waits until every running replica answers /readyz with 200.
func (c *Cluster) WaitReady(timeout time.Duration) {
	c.t.Helper()
	for _, p := range c.Replicas {
		if !p.Exited() {
			p.WaitReady(timeout)
		}
	}
}

// Alive returns the indexes of the replicas whose process is running.
func (c *Cluster) Alive() []int {
	var alive []int
	for i, p := range c.Replicas {
		if !p.Exited() {
			alive = append(alive, i)
		}
	}
	return alive
}

// Kill ends replica i with SIGKILL, as a crash would: its sessions' sockets
// close without DISCONNECT and nothing is flushed.
func (c *Cluster) Kill(i int) { c.Replicas[i].Kill() }

// Stop shuts replica i down gracefully (SIGTERM) and waits for it.
func (c *Cluster) Stop(i int) {
	c.t.Helper()
	c.Replicas[i].Signal(syscall.SIGTERM)
	if err := c.Replicas[i].Wait(30 * time.Second); err != nil {
		c.t.Fatalf("replica %s exit: %v", c.Node(i), err)
	}
}

// Restart starts replica i again, on the same data dir, ports and
// environment, after Kill or Stop, and waits until it is ready.
func (c *Cluster) Restart(i int) *Process {
	c.t.Helper()
	if !c.Replicas[i].Exited() {
		c.t.Fatalf("fleetdtest: replica %s is still running; Kill or Stop it first", c.Node(i))
	}
	p, err := launch(c.t, c.bin, c.dirs[i], c.envs[i])
	if err != nil {
		c.t.Fatalf("replica %s: %v", c.Node(i), err)
	}
	p.killAtEnd()
	if err := p.waitListening(60 * time.Second); err != nil {
		c.t.Fatalf("replica %s: %v", c.Node(i), err)
	}
	p.WaitReady(60 * time.Second)
	c.Replicas[i] = p
	return p
}

// DB is a pool on the cluster's database, for what a test checks beneath
// the API (jobs, events). It is closed when the test ends.
func (c *Cluster) DB() *pgxpool.Pool {
	c.t.Helper()
	c.poolOnce.Do(func() {
		pool, err := pgxpool.New(context.Background(), c.DatabaseURL)
		if err != nil {
			c.t.Fatalf("fleetdtest: open pool: %v", err)
		}
		c.pool = pool
		c.t.Cleanup(pool.Close)
	})
	return c.pool
}

// WaitDevice polls device id through replica i's API until cond holds and
// returns it; it fails the test after within, naming what was awaited and
// the device as last seen.
func (c *Cluster) WaitDevice(i int, id string, within time.Duration, what string, cond func(fleet.Device) bool) fleet.Device {
	c.t.Helper()
	api := c.Client(i)
	deadline := time.Now().Add(within)
	var (
		d   fleet.Device
		err error
	)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		d, err = api.Device(ctx, id)
		cancel()
		if err == nil && cond(d) {
			return d
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("device %s through %s: %s not reached within %s (last: online %v on %q epoch %d, err %v)",
				id, c.Node(i), what, within, d.Online, d.BrokerNode, d.SessionEpoch, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// writeSecrets creates the shared secrets and their files. The directory is
// world-readable on purpose: only the test's own processes use it.
func (c *Cluster) writeSecrets() {
	c.t.Helper()
	dir, err := os.MkdirTemp("", "fleetd-secrets-")
	if err != nil {
		c.t.Fatal(err)
	}
	c.t.Cleanup(func() { os.RemoveAll(dir) })
	c.SecretsDir = dir
	c.AdminToken, c.TokenPepper, c.SigningKey = randomHex(32), randomHex(32), randomHex(32)
	for name, v := range map[string]string{"admin-token": c.AdminToken, "token-pepper": c.TokenPepper, "firmware-signing-key": c.SigningKey} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(v), 0o600); err != nil {
			c.t.Fatal(err)
		}
	}
}

// clusterDatabase returns the URL of an empty database for one cluster: a
// fresh database on FLEETD_TEST_DATABASE_URL's server when that is set,
// otherwise a private PostgreSQL (the embedded mode's code, run as the
// postgres user when the tests run as root). Either is dropped when the
// test ends.
func clusterDatabase(t testing.TB) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if admin := os.Getenv("FLEETD_TEST_DATABASE_URL"); admin != "" {
		name := "fleetdtest_cluster_" + randomHex(6)
		if err := execSQL(ctx, admin, "CREATE DATABASE "+name); err != nil {
			t.Fatalf("fleetdtest: create database: %v", err)
		}
		t.Cleanup(func() {
			_ = execSQL(context.Background(), admin, fmt.Sprintf("DROP DATABASE IF EXISTS %s WITH (FORCE)", name))
		})
		return withDatabase(admin, name)
	}
	bin, err := pgserver.FindBinDir(os.Getenv("FLEETD_PG_BIN"))
	if err != nil {
		t.Fatalf("fleetdtest: %v", err)
	}
	// Not t.TempDir: its 0700 parents would keep the postgres user out.
	dir, err := os.MkdirTemp("", "fleetd-cluster-pg-")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	srv := &pgserver.Server{
		Dir: dir, BinDir: bin, DieWithParent: true, Logger: slog.New(slog.DiscardHandler),
		// Durability buys nothing in a throwaway cluster; each replica holds a
		// pool, a listener and the tests' own connections.
		Settings: map[string]string{"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off", "max_connections": "300"},
	}
	if err := srv.Start(ctx); err != nil {
		os.RemoveAll(dir)
		t.Fatalf("fleetdtest: start PostgreSQL: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_ = srv.Stop(ctx)
		os.RemoveAll(dir)
	})
	return srv.ConnString()
}

func execSQL(ctx context.Context, connString, sql string) error {
	conn, err := pgx.Connect(ctx, connString)
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	_, err = conn.Exec(ctx, sql)
	return err
}

// withDatabase points a connection string (URL or keyword/value) at another
// database on the same server.
func withDatabase(connString, db string) string {
	if strings.HasPrefix(connString, "postgres://") || strings.HasPrefix(connString, "postgresql://") {
		u, err := url.Parse(connString)
		if err != nil {
			panic(fmt.Sprintf("fleetdtest: bad connection URL: %v", err))
		}
		u.Path = "/" + db
		return u.String()
	}
	return connString + " dbname=" + db // the last occurrence of a keyword wins
}

// FreeAddr returns a loopback address with a port nothing listens on now.
func FreeAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
