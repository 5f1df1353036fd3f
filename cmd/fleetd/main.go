// Command fleetd is the fleet manager: the embedded MQTT broker, the fleet
// registry in PostgreSQL, the REST API and the console, in one process.
package main

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/fleetd/fleetd/broker"
	"github.com/fleetd/fleetd/cluster"
	"github.com/fleetd/fleetd/firmware"
	"github.com/fleetd/fleetd/fix"
	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/pgserver"
	"github.com/fleetd/fleetd/migrations"
	"github.com/fleetd/fleetd/telemetry"
	"github.com/fleetd/fleetd/web"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	err := run(ctx, os.Args[1:], os.Getenv, os.Stderr)
	switch {
	case errors.Is(err, errHelp):
	case err != nil:
		fmt.Fprintf(os.Stderr, "fleetd: %v\n", err)
		os.Exit(1)
	}
}

// run starts every component in dependency order, waits for ctx to end and
// stops them in reverse. It returns an error only when fleetd could not start
// or could not stop cleanly.
func run(ctx context.Context, args []string, getenv func(string) string, stderr io.Writer) error {
	cfg, err := parseConfig(args, getenv, stderr)
	if err != nil {
		return err
	}
	logger := newLogger(cfg, stderr)
	applyGCPercent(cfg.GCPercent, logger)
	lc := &lifecycle{logger: logger}
	if err := start(ctx, cfg, logger, lc); err != nil {
		_ = lc.stop(cfg.ShutdownTimeout)
		return err
	}
	logger.Info("fleetd ready", "version", version, "http_addr", cfg.HTTPAddr)
	<-ctx.Done()
	logger.Info("shutting down", "timeout", cfg.ShutdownTimeout.String())
	if err := lc.stop(cfg.ShutdownTimeout); err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	logger.Info("fleetd stopped")
	return nil
}

func start(ctx context.Context, cfg Config, logger *slog.Logger, lc *lifecycle) error {
	if err := os.MkdirAll(cfg.DataDir, 0o755); err != nil {
		return fmt.Errorf("%s: %w", envName("data-dir"), err)
	}
	token, err := adminToken(cfg, logger)
	if err != nil {
		return err
	}
	// Bind every listener before the slow work, so a port conflict fails in
	// milliseconds and names its setting.
	httpLn, err := listen(cfg.HTTPAddr, "http-addr")
	if err != nil {
		return err
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		collectors.NewBuildInfoCollector(),
	)
	api := web.New(web.Options{AdminToken: token, SecureCookies: secureCookies(cfg), Logger: logger, Registry: reg, Version: version, Node: cfg.Node,
		Limits: web.Limits{
			IdleTimeout: cfg.HTTPIdleTimeout, ReadTimeout: cfg.HTTPReadTimeout, StallTimeout: cfg.HTTPStallTimeout,
			MaxStreams: cfg.HTTPMaxStreams, MaxStreamsPerToken: cfg.HTTPMaxStreamsPerToken,
			AuthFailureRate: cfg.HTTPAuthFailureRate, AuthFailureBurst: cfg.HTTPAuthFailureBurst,
		}})
	api.AddCheck(web.Check{Name: "lifecycle", Check: lc.check})
	// Idle, read and stall deadlines come from the limits above; there is
	// no WriteTimeout, which would cut long downloads and live streams.
	httpSrv := api.HTTPServer()
	// Open consoles' live streams end as soon as shutdown begins, so that
	// Shutdown does not wait for them.
	hub := web.NewHub()
	httpSrv.RegisterOnShutdown(hub.Close)
	logger.Info("http listening", "component", "http", "addr", httpLn.Addr().String())
	// Serve at once: /healthz must answer while the database starts (crash
	// recovery can take a while), and /readyz says what is still missing.
	go func() {
		if err := httpSrv.Serve(httpLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
			logger.Error("http server stopped", "err", err)
		}
	}()
	stopHTTP := func(ctx context.Context) error {
		if err := httpSrv.Shutdown(ctx); err != nil {
			return httpSrv.Close()
		}
		return nil
	}
	lc.beforeStop(func() { _ = stopHTTP(context.Background()) })

	pool, err := openDatabase(ctx, cfg, logger, lc, api)
	if err != nil {
		return err
	}
	if _, err := migrations.Up(ctx, pool, logger); err != nil {
		return err
	}
	startAccounts(cfg, logger, lc, api, pool)
	if err := startFleet(ctx, cfg, logger, lc, api, pool, reg, publicURL(cfg, httpLn.Addr()), hub); err != nil {
		return err
	}

	// The API reads the database, so it stops before the database even though
	// it started serving earlier.
	lc.onStop("http server", stopHTTP)
	lc.markStarted()
	return nil
}

// startFleet starts the registry, the event recorder and the broker, and
// mounts the device API. The broker stops before the recorder, so that every
// session's server_shutdown event is recorded and flushed.
func startFleet(ctx context.Context, cfg Config, logger *slog.Logger, lc *lifecycle, api *web.Server, pool *pgxpool.Pool, reg *prometheus.Registry, baseURL string, hub *web.Hub) error {
	pepper, err := tokenPepper(cfg, logger)
	if err != nil {
		return err
	}
	hasher, err := fleet.NewHasher(pepper)
	if err != nil {
		return fmt.Errorf("%s: %w", envName("token-pepper"), err)
	}
	store := fleet.NewStore(pool)
	svc := fleet.NewService(store, hasher, logger)
	svc.SetCacheTTL(cfg.CredentialCacheTTL)
	// Fleet health's counts are O(fleet): consoles polling it share one
	// computation every 2 s per replica.
	svc.SetHealthTTL(2 * time.Second)
	if err := svc.LoadPolicy(ctx); err != nil {
		return err
	}
	svc.RegisterMetrics(reg)
	rs, err := newReplicaSignals(ctx, cfg, pool, logger, reg, lc)
	if err != nil {
		return err
	}
	rec, err := fleet.NewRecorder(store, fleet.RecorderOptions{
		SpoolPath: filepath.Join(cfg.DataDir, "spool", "events.jsonl"), Logger: logger.With("component", "events"), Registerer: reg,
		Observe: rs.observer(hub), BehindAfter: cfg.RecorderBehindAfter, MaxSpoolBytes: cfg.EventSpoolMaxBytes,
	})
	if err != nil {
		return err
	}
	lc.onStop("event recorder", rec.Close)
	api.AddCheck(web.Check{Name: "recorder", Check: rec.Ready})

	// Disconnects carry the radio link their session's telemetry reported
	// (the ingest is set below, before the broker starts).
	linked := &telemetry.Stamper{Next: rec}
	b, err := broker.New(broker.Config{
		TCPAddr: cfg.MQTTAddr, TLSAddr: cfg.MQTTTLSAddr, WSAddr: cfg.MQTTWSAddr,
		TLSCertFile: cfg.TLSCertFile, TLSKeyFile: cfg.TLSKeyFile, TLSClientCAFile: cfg.TLSClientCAFile,
		MaxPacket: cfg.MQTTMaxPacket, ConnectTimeout: cfg.ConnectTimeout,
		ConnectRate: cfg.ConnectRate, ConnectBurst: cfg.ConnectBurst,
		ClientConnectRate: cfg.ClientRate, ClientConnectBurst: cfg.ClientBurst,
		AuthFailureRate: cfg.AuthFailureRate, AuthFailureBurst: cfg.AuthFailureBurst,
		MaxPendingConnects: cfg.MaxPending, MaxPendingConnectsPerSource: cfg.MaxPendingPerSrc,
		PublishRate: cfg.PublishRate, PublishBurst: cfg.PublishBurst,
		SubscribeRate: cfg.SubscribeRate, SubscribeBurst: cfg.SubscribeBurst,
		SessionExpiry: cfg.SessionExpiry, Node: cfg.Node, Clock: rs.clock.Now,
	}, svc, linked, logger.With("component", "mqtt"), reg)
	if err != nil {
		return err
	}
	svc.OnRevoke(b.Kick)
	svc.OnRotate(b.EndRotated)

	keys, err := firmwareKeys(cfg, logger)
	if err != nil {
		return err
	}
	urlKey := hmac.New(sha256.New, pepper)
	urlKey.Write([]byte("firmware download URLs"))
	arts, err := firmware.NewArtifacts(pool, filepath.Join(cfg.DataDir, "firmware"), keys, urlKey.Sum(nil),
		firmware.WithLogger(logger.With("component", "firmware")))
	if err != nil {
		return err
	}
	router := cluster.NewRouter(b, rs.bus, pool, logger.With("component", "cluster"))
	camps := firmware.NewCampaigns(pool, arts, svc, router, baseURL, logger.With("component", "ota"))
	camps.SetFollowInterval(cfg.CampaignFollowInterval)
	deltas := firmware.DeltaOptions{MaxImage: int64(cfg.DeltaMaxImageMB) << 20, Wait: cfg.DeltaWait}
	camps.SetDeltaOptions(deltas)
	b.Handle("ota/status", camps.HandleStatus)
	linked.Links = startTelemetry(cfg, logger, lc, api, pool, reg, b, rec)
	b.OnSubscribe("ota/job", camps.DeviceListening)
	b.OnBirth(func(id, fw, _ string) { camps.DeviceBirth(id, fw) })
	camps.OnChange(rs.campaignChanged(hub))
	startCommands(cfg, logger, lc, api, pool, reg, b, router, rs, hub, rec, svc)
	config := startDeviceConfig(cfg, logger, lc, api, pool, reg, b, rs, rec)
	api.MountFixes(fix.NewService(svc, remedies{config}))
	startNotifications(cfg, logger, lc, api, pool, reg, rec.Ready)

	// Listen to the other replicas before the cache is loaded, so that no
	// change made meanwhile is missed; then load it.
	if err := rs.start(ctx, svc, b, hub, lc); err != nil {
		return err
	}
	n, err := svc.WarmCache(ctx)
	if err != nil {
		return err
	}
	logger.Info("device credentials loaded", "devices", n)
	api.MountFirmware(arts, camps, web.FirmwareOptions{MaxDownloads: cfg.OTAMaxDownloads, MaxDownloadsPerSource: cfg.OTAMaxDownloadsPerSource})
	api.MountStream(hub)
	api.MountOpenAPI()
	bg := newLoops(lc)
	bg.start("campaign watch", func(ctx context.Context) { hub.WatchCampaigns(ctx, camps) })

	startedEpoch := rs.clock.Now().UnixMicro() // sessions of this node older than this are a previous run's
	if err := b.Start(); err != nil {
		return fmt.Errorf("start mqtt broker: %w", err)
	}
	lc.onStop("mqtt broker", b.Close)
	for id, addr := range b.Addrs() {
		logger.Info("mqtt listening", "component", "mqtt-"+id, "addr", addr)
	}
	api.AddCheck(web.Check{Name: "mqtt", Check: b.Ready})
	api.MountDevices(svc)
	api.MountDiagnosis(svc)

	bg.start("campaigns", func(ctx context.Context) { camps.Run(ctx, cfg.CampaignInterval) })
	bg.start("firmware deltas", func(ctx context.Context) { arts.BuildDeltas(ctx, deltas, 2*time.Second) })
	bg.start("analysis", func(ctx context.Context) { svc.RunAnalysis(ctx, cfg.AnalysisInterval) })
	bg.start("event partitions", func(ctx context.Context) { svc.RunEventMaintenance(ctx, cfg.eventRetention()) })
	bg.start("database clock", func(ctx context.Context) { rs.clock.Run(ctx, 30*time.Second) })
	bg.start("credential prefetch", svc.RunPrefetch)
	heartbeat := &cluster.Heartbeat{Pool: rs.pool, Node: cfg.Node, Recorder: rec, Clock: rs.clock.Now, StartedEpoch: startedEpoch,
		DeadAfter: cfg.ReplicaDeadAfter, Log: logger.With("component", "cluster")}
	bg.start("replica heartbeat", heartbeat.Run)
	return nil
}

// publicURL is where devices download firmware: the configured URL, or the
// HTTP listener's address (loopback when it listens on every address).
func publicURL(cfg Config, addr net.Addr) string {
	if cfg.PublicURL != "" {
		return cfg.PublicURL
	}
	host, port, _ := net.SplitHostPort(addr.String())
	if ip := net.ParseIP(host); ip == nil || ip.IsUnspecified() {
		host = "127.0.0.1"
	}
	return "http://" + net.JoinHostPort(host, port)
}

// openDatabase connects to FLEETD_DATABASE_URL, or starts the embedded
// PostgreSQL when none is set, and registers the readiness check and stop
// steps for what it started.
func openDatabase(ctx context.Context, cfg Config, logger *slog.Logger, lc *lifecycle, api *web.Server) (*pgxpool.Pool, error) {
	dsn := cfg.DatabaseURL
	var embedded *pgserver.Server
	if dsn == "" {
		bin, err := pgserver.FindBinDir(cfg.PGBin)
		if err != nil {
			return nil, err
		}
		embedded = &pgserver.Server{
			Dir:    filepath.Join(cfg.DataDir, "postgres"),
			BinDir: bin,
			Logger: logger.With("component", "postgres"),
		}
		logger.Info("starting embedded PostgreSQL", "bin", bin, "dir", embedded.Dir)
		if err := embedded.Start(ctx); err != nil {
			return nil, err
		}
		lc.onStop("embedded postgres", embedded.Stop)
		dsn = embedded.ConnString()
	}
	poolCfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", envName("database-url"), err)
	}
	// fleetd's queries are short and many: PostgreSQL's JIT compiles a
	// query when its cost estimate is high (a large fleet's counts), which
	// costs 100-250 ms each time and saves nothing on queries that read
	// rollups. A jit=on parameter in the DSN keeps it on.
	if _, set := poolCfg.ConnConfig.RuntimeParams["jit"]; !set {
		poolCfg.ConnConfig.RuntimeParams["jit"] = "off"
	}
	// pgxpool's default (4 connections on this machine) is shared by the
	// event writer, two telemetry writers, the telemetry rollup job (2 while
	// it runs), campaign stepping, the analysis, the command sweep and the
	// API: too few, and a birth or an OTA status waits behind a rollup. A
	// pool_max_conns in the DSN keeps the operator's choice.
	if !strings.Contains(dsn, "pool_max_conns") {
		poolCfg.MaxConns = 16
	}
	pool, err := pgxpool.NewWithConfig(ctx, poolCfg)
	if err != nil {
		return nil, fmt.Errorf("open database: %w", err)
	}
	lc.onStop("database pool", func(context.Context) error { pool.Close(); return nil })
	if err := waitForDatabase(ctx, pool, logger); err != nil {
		return nil, err
	}
	api.AddCheck(web.Check{Name: "database", Check: func(ctx context.Context) error {
		if embedded != nil {
			if err := embedded.Ready(); err != nil {
				return err
			}
		}
		return pool.Ping(ctx)
	}})
	return pool, nil
}

// waitForDatabase pings until the server answers: an external server may
// still be starting (compose, a failover). It gives up after a minute.
func waitForDatabase(ctx context.Context, pool *pgxpool.Pool, logger *slog.Logger) error {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	backoff := 200 * time.Millisecond
	for {
		pingCtx, pingCancel := context.WithTimeout(ctx, 5*time.Second)
		err := pool.Ping(pingCtx)
		pingCancel()
		if err == nil {
			return nil
		}
		logger.Warn("database not answering yet", "err", err, "retry_in", backoff.String())
		select {
		case <-ctx.Done():
			return fmt.Errorf("database did not answer: %w", err)
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 5*time.Second)
	}
}

// listen binds addr and, when the address is taken, says which setting
// controls it.
func listen(addr, setting string) (net.Listener, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen on %s (set by %s or -%s): %w", addr, envName(setting), setting, err)
	}
	return ln, nil
}

func newLogger(cfg Config, w io.Writer) *slog.Logger {
	opts := &slog.HandlerOptions{Level: cfg.LogLevel}
	var h slog.Handler = slog.NewJSONHandler(w, opts)
	if cfg.LogFormat == "text" {
		h = slog.NewTextHandler(w, opts)
	}
	return slog.New(h).With("node", cfg.Node)
}

// applyGCPercent sets Go's collection target from -gc-percent, unless the
// operator set GOGC, which the runtime has already applied and which wins.
// An idle device's memory is mostly heap and stacks that live for the
// connection, so the default GOGC of 100 keeps about as much again in
// headroom for every device; fleetd's allocation rate per device is low, so
// a lower target costs little CPU (bench/RESULTS.md).
func applyGCPercent(percent int, logger *slog.Logger) {
	if percent == -1 || os.Getenv("GOGC") != "" {
		return
	}
	debug.SetGCPercent(percent)
	logger.Debug("garbage collection target set", "gc_percent", percent)
}
