package main

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"math/rand/v2"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/migrations"
	"github.com/fleetd/fleetd/telemetry"
)

type loadOptions struct {
	dsn              string
	devices, events  int
	telemetryDevices int
	workers          int
	verify           bool
	now              time.Time
}

// The history covers the 30 days before the load, less an hour, so that
// fleetd's retention (30 days, whole days dropped) keeps all of it.
const (
	historyWindow = 30*24*time.Hour - time.Hour
	// pairShare is the share of the events that are a session's connect or
	// disconnect; the rest are refusals, rejected messages and ACL denials.
	pairShare = 0.95
	// A day of telemetry: a message every telemetryEvery, telemetryMetrics
	// metrics each (the day's raw points fit one answer, telemetry.MaxPoints).
	telemetryEvery = 20 * time.Second
)

type loadResult struct {
	Devices        int64              `json:"devices"`
	Events         int64              `json:"events"`
	Sessions       int64              `json:"sessions"`
	OpenSessions   int64              `json:"open_sessions"`
	Partitions     int64              `json:"partitions"`
	RollupRows     map[string]int64   `json:"rollup_rows"`
	Incompatible   int64              `json:"incompatible_devices"`
	Flagged        []string           `json:"flagged_firmware"`
	Seconds        map[string]float64 `json:"seconds"`
	LoadSeconds    float64            `json:"load_seconds"`
	Telemetry      telemetryResult    `json:"telemetry"`
	DatabaseBytes  int64              `json:"database_bytes"`
	EventsBytes    int64              `json:"device_events_bytes"`
	RollupBytes    int64              `json:"rollup_bytes"`
	TelemetryBytes int64              `json:"telemetry_bytes"`
	Verified       bool               `json:"rollups_verified"`
	order          map[string]int
}

type telemetryResult struct {
	Devices  int     `json:"devices"`
	Messages int64   `json:"messages"`
	Points   int64   `json:"points"`
	Seconds  float64 `json:"seconds"`
	PerS     float64 `json:"messages_per_s"`
	Retried  int64   `json:"enqueue_retries"`
}

// write renders the result as Markdown lines.
func (r loadResult) write(w io.Writer) {
	names := make([]string, 0, len(r.Seconds))
	for n := range r.Seconds {
		names = append(names, n)
	}
	slices.SortFunc(names, func(a, b string) int { return cmp.Compare(r.order[a], r.order[b]) })
	var parts []string
	for _, n := range names {
		if n != "telemetry" && n != "telemetry rolled up" && n != "checkpoint" {
			parts = append(parts, fmt.Sprintf("%s %.1f s", n, r.Seconds[n]))
		}
	}
	verified := ""
	if r.Verified {
		verified = "; the rollups checked equal to migration 00012's backfill of the loaded events"
	}
	fmt.Fprintf(w, "- loaded: %d devices (%d incompatible after the first analysis; flagged firmware: %s), %d connection events in %d day partitions (%d sessions, %d open), rollups: %d minute and %d hour event rows, %d session-minute rows, %d session-device rows%s\n",
		r.Devices, r.Incompatible, strings.Join(r.Flagged, ", "), r.Events, r.Partitions, r.Sessions, r.OpenSessions,
		r.RollupRows["event_rollups_minute"], r.RollupRows["event_rollups_hour"], r.RollupRows["session_rollups_minute"], r.RollupRows["session_devices"], verified)
	fmt.Fprintf(w, "- load time: %.0f s for the devices, events and rollups (%s)\n", r.LoadSeconds, strings.Join(parts, ", "))
	fmt.Fprintf(w, "- telemetry: %d messages (%d points: rssi_dbm, channel, uptime_s, heap_free_bytes, tx_retries, and the WiFi link) for %d devices, one every %s over the last day, through telemetry.Writer in %.1f s (%.0f messages/s, %d enqueue retries at a full queue), then rolled up by fleetd's rollup job until it caught up (%.1f s)\n",
		r.Telemetry.Messages, r.Telemetry.Points, r.Telemetry.Devices, fmt.Sprintf("%.0f s", telemetryEvery.Seconds()), r.Telemetry.Seconds, r.Telemetry.PerS, r.Telemetry.Retried,
		r.Seconds["telemetry rolled up"])
	b, _ := json.Marshal(r)
	fmt.Fprintf(w, "- load result: `%s`\n", b)
}

// phase runs one step of the load and records how long it took.
type phases struct {
	seconds map[string]float64
	order   map[string]int
}

func (p *phases) run(name string, f func() error) error {
	start := time.Now()
	err := f()
	p.order[name] = len(p.order)
	p.seconds[name] = math.Round(time.Since(start).Seconds()*10) / 10
	fmt.Fprintf(os.Stderr, "datascale: %s %.1f s\n", name, p.seconds[name])
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	return nil
}

func load(ctx context.Context, o loadOptions) (loadResult, error) {
	res := loadResult{RollupRows: map[string]int64{}}
	ph := &phases{seconds: map[string]float64{}, order: map[string]int{}}
	cfg, err := pgxpool.ParseConfig(o.dsn)
	if err != nil {
		return res, err
	}
	cfg.MaxConns = int32(max(4, o.workers+2))
	// Bulk-load settings of the loader's own sessions only.
	cfg.ConnConfig.RuntimeParams["maintenance_work_mem"] = "512MB"
	cfg.ConnConfig.RuntimeParams["work_mem"] = "128MB"
	cfg.ConnConfig.RuntimeParams["synchronous_commit"] = "off"
	cfg.ConnConfig.RuntimeParams["max_parallel_maintenance_workers"] = "2"
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return res, err
	}
	defer pool.Close()
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	start := time.Now()
	if _, err := migrations.Up(ctx, pool, logger); err != nil {
		return res, fmt.Errorf("migrations: %w", err)
	}
	var existing int64
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM devices`).Scan(&existing); err != nil {
		return res, err
	}
	if existing > 0 {
		return res, errors.New("the database already holds devices: load into a fresh one")
	}
	// Fewer checkpoints while gigabytes are written; reset at the end.
	if _, err := pool.Exec(ctx, `ALTER SYSTEM SET max_wal_size = '8GB'`); err != nil {
		return res, err
	}
	if _, err := pool.Exec(ctx, `SELECT pg_reload_conf()`); err != nil {
		return res, err
	}

	g := newGenerator(o)
	steps := []struct {
		name string
		f    func() error
	}{
		{"devices and sessions generated", func() error { return g.generate(ctx, pool) }},
		{"partitions created, indexes set aside", func() error { return g.preparePartitions(ctx, pool) }},
		{"events inserted", func() error { return g.insertEvents(ctx, pool) }},
		{"indexes rebuilt", func() error { return g.rebuildIndexes(ctx, pool) }},
		{"event rollups", func() error { return g.eventRollups(ctx, pool) }},
		{"session rollups", func() error { return g.sessionRollups(ctx, pool) }},
		{"devices", func() error { return g.insertDevices(ctx, pool) }},
		// Hint bits, the visibility map and statistics, as autovacuum would
		// have left them, before anything reads the tables.
		{"vacuum analyze", func() error {
			_, err := pool.Exec(ctx, `VACUUM (ANALYZE) devices, device_events, event_rollups_minute, event_rollups_hour, fleet_counts_minute, fleet_counts_hour, history_minute, history_hour, sessions_open, session_rollups_minute, session_devices`)
			return err
		}},
	}
	for _, s := range steps {
		if err := ph.run(s.name, s.f); err != nil {
			return res, err
		}
	}
	if o.verify {
		if err := ph.run("rollups verified", func() error { return verifyRollups(ctx, pool) }); err != nil {
			return res, err
		}
		res.Verified = true
	}
	// Judge the fleet once, as fleetd would have: verdicts learned from the
	// month, devices marked incompatible (rules and verdicts).
	if err := ph.run("first analysis (verdicts, compatibility of every device)", func() error {
		svc := fleet.NewService(fleet.NewStore(pool), nil, logger)
		if _, err := svc.SetPolicy(ctx, benchPolicy()); err != nil {
			return err
		}
		return svc.Analyze(ctx)
	}); err != nil {
		return res, err
	}
	if err := ph.run("vacuum analyze of the judged devices", func() error {
		_, err := pool.Exec(ctx, `VACUUM (ANALYZE) devices, firmware_verdicts, firmware_verdict_history`)
		return err
	}); err != nil {
		return res, err
	}
	if _, err := pool.Exec(ctx, `DROP SCHEMA datascale CASCADE`); err != nil {
		return res, err
	}
	res.LoadSeconds = math.Round(time.Since(start).Seconds()*10) / 10
	if err := ph.run("telemetry", func() error {
		var err error
		res.Telemetry, err = loadTelemetry(ctx, pool, o)
		return err
	}); err != nil {
		return res, err
	}
	if err := ph.run("telemetry rolled up", func() error { return rollUpTelemetry(ctx, pool) }); err != nil {
		return res, err
	}
	if err := ph.run("checkpoint", func() error {
		// The whole database: the telemetry tables, whatever they are, and
		// nothing again of the pages vacuumed above (all visible).
		for _, q := range []string{`VACUUM (ANALYZE)`, `ALTER SYSTEM RESET max_wal_size`, `SELECT pg_reload_conf()`, `CHECKPOINT`} {
			if _, err := pool.Exec(ctx, q); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		return res, err
	}
	res.Seconds, res.order = ph.seconds, ph.order
	return res, g.summarise(ctx, pool, &res)
}

// benchPolicy is the operator's policy of the loaded fleet: gw-100 below
// 1.2.0 is unsupported, sensor-10 before 1.5.0 speaks MQTT 3.1.1 only.
func benchPolicy() fleet.Policy {
	return fleet.Policy{Models: map[string]fleet.ModelRules{
		"gw-100":    {MinFirmware: "1.2.0"},
		"sensor-10": {Firmware: []fleet.FirmwareRange{{Versions: "<1.5.0", Protocols: []string{"3.1.1"}}}},
	}}
}

// generator writes the fleet in SQL. Every choice is a deterministic
// function of a device's or session's number (datascale.u), so that a load
// is reproducible and the workers need no coordination.
type generator struct {
	o        loadOptions
	t0       time.Time
	window   float64 // seconds
	indexes  []indexDef
	fill     int64 // refusals, rejections and denials to reach o.events
	sessions int64
}

type indexDef struct {
	name, drop, create string
}

func newGenerator(o loadOptions) *generator {
	now := o.now.Truncate(time.Second)
	end := now.Add(-2 * time.Minute)
	return &generator{o: o, t0: end.Add(-historyWindow), window: historyWindow.Seconds()}
}

func ts(t time.Time) string {
	return "TIMESTAMPTZ '" + t.UTC().Format("2006-01-02 15:04:05.999999Z07:00") + "'"
}

// sql fills the generator's constants into a statement: {T0}, {W} (the
// window in seconds), {N} (devices), {NOW}.
func (g *generator) sql(q string) string {
	return strings.NewReplacer("{T0}", ts(g.t0), "{W}", fmt.Sprint(g.window), "{N}", fmt.Sprint(g.o.devices),
		"{NOW}", ts(g.o.now)).Replace(q)
}

func (g *generator) exec(ctx context.Context, pool *pgxpool.Pool, qs ...string) error {
	for _, q := range qs {
		if _, err := pool.Exec(ctx, g.sql(q)); err != nil {
			return fmt.Errorf("%w\n%s", err, firstLine(q))
		}
	}
	return nil
}

func firstLine(q string) string {
	q = strings.TrimSpace(q)
	if i := strings.IndexByte(q, '\n'); i > 0 {
		return q[:i]
	}
	return q
}

// parallel runs f(w) for w in [0, workers) on their own connections.
func (g *generator) parallel(f func(w int) error) error {
	var wg sync.WaitGroup
	errs := make([]error, g.o.workers)
	for w := range g.o.workers {
		wg.Add(1)
		go func() { defer wg.Done(); errs[w] = f(w) }()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// The fleet: four models, each with a few firmware versions (the newest
// most common; 40 % of the devices on a model's newest came from the one
// before during the month), MQTT 3.1 / 3.1.1 / 5, two replicas, a third of
// the devices over TLS, 65 % online now. gw-200 2.2.0-beta.1 (0.5 % of the
// fleet) never pings: its sessions end in keepalive timeouts without a
// PINGREQ, dozens a day, which the analysis learns to flag.
const devicesSQL = `
CREATE UNLOGGED TABLE datascale.dev AS
SELECT i, id, model, fw,
	CASE fw WHEN '1.4.0' THEN '1.3.0' WHEN '2.1.0' THEN '2.0.1' WHEN '1.5.0' THEN '1.4.2' WHEN '3.1.0' THEN '3.0.0' END AS prev_fw,
	datascale.u(i, 7) < 0.4 AS upgraded, datascale.u(i, 8) AS upgrade_at,
	(CASE WHEN datascale.u(i, 3) < 0.1 THEN 3 WHEN datascale.u(i, 3) < 0.65 THEN 4 ELSE 5 END)::smallint AS proto,
	CASE WHEN datascale.u(i, 4) < 0.5 THEN 'fleetd-a' ELSE 'fleetd-b' END AS node,
	datascale.u(i, 5) < 0.33 AS tls,
	CASE WHEN model = 'gw-100' THEN 120 ELSE 60 END AS keepalive,
	datascale.u(i, 6) < 0.65 AS online,
	fw = '2.2.0-beta.1' AS bad,
	0 AS n
FROM (
	SELECT i, 'dev-' || lpad(i::text, 6, '0') AS id, model, CASE model
		WHEN 'gw-100' THEN CASE WHEN r < 0.08 THEN '1.0.3' WHEN r < 0.20 THEN '1.1.0' WHEN r < 0.50 THEN '1.3.0' ELSE '1.4.0' END
		WHEN 'gw-200' THEN CASE WHEN r < 0.30 THEN '2.0.1' WHEN r < 0.98 THEN '2.1.0' ELSE '2.2.0-beta.1' END
		WHEN 'sensor-10' THEN CASE WHEN r < 0.35 THEN '1.4.2' ELSE '1.5.0' END
		ELSE CASE WHEN r < 0.4 THEN '3.0.0' ELSE '3.1.0' END END AS fw
	FROM (
		SELECT i, datascale.u(i, 2) AS r, CASE WHEN datascale.u(i, 1) < 0.40 THEN 'gw-100' WHEN datascale.u(i, 1) < 0.65 THEN 'gw-200'
			WHEN datascale.u(i, 1) < 0.90 THEN 'sensor-10' ELSE 'cam-3' END AS model
		FROM generate_series(0, {N} - 1) AS i
	) a
) b`

// Each device's sessions split the window into n slots: session k starts
// early in slot k and lasts 30 to 90 % of it; the last one of an online
// device is still open. Disconnect reasons by firmware.
const sessionsSQL = `
CREATE UNLOGGED TABLE datascale.sess AS
SELECT i, id, k, model, fw, proto, node, tls, keepalive, started_at, ended_at,
	(extract(epoch FROM started_at) * 1000000)::bigint AS epoch,
	reason, detail,
	CASE WHEN reason = 'keepalive_timeout' AND (bad OR r BETWEEN 0.81 AND 0.82) THEN 0 ELSE least(dur / keepalive, 2000000000)::int END AS pings,
	CASE WHEN reason = 'keepalive_timeout' THEN keepalive * 1500 ELSE (datascale.u(x, 13) * keepalive * 1000)::int END AS idle_ms,
	(dur * 1000)::bigint AS duration_ms
FROM (
	SELECT i, id, k, x, model, fw, proto, node, tls, keepalive, bad, r, dur, started_at,
		CASE WHEN online AND k = n - 1 THEN NULL ELSE started_at + make_interval(secs => dur) END AS ended_at,
		CASE WHEN online AND k = n - 1 THEN NULL
			WHEN bad THEN CASE WHEN r < 0.85 THEN 'keepalive_timeout' WHEN r < 0.95 THEN 'connection_lost' ELSE 'client_disconnect' END
			WHEN r < 0.35 THEN 'client_disconnect' WHEN r < 0.62 THEN 'connection_lost' WHEN r < 0.82 THEN 'keepalive_timeout'
			WHEN r < 0.89 THEN 'session_takeover' WHEN r < 0.94 THEN 'server_shutdown' WHEN r < 0.965 THEN 'protocol_error'
			WHEN r < 0.98 THEN 'packet_too_large' WHEN r < 0.99 THEN 'token_rotated' ELSE 'throttled' END AS reason,
		CASE WHEN NOT bad AND r >= 0.94 AND r < 0.965 THEN 'malformed packet: remaining length exceeds the packet' ELSE '' END AS detail
	FROM (
		SELECT d.i, d.id, k, x, d.model, d.proto, d.node, d.tls, d.keepalive, d.bad, d.online, d.n,
			CASE WHEN d.upgraded AND d.prev_fw IS NOT NULL AND k < floor(d.n * d.upgrade_at) THEN d.prev_fw ELSE d.fw END AS fw,
			{T0} + make_interval(secs => (k + 0.1 * datascale.u(x, 10)) * {W} / d.n) AS started_at,
			(0.3 + 0.6 * datascale.u(x, 11)) * {W} / d.n AS dur,
			datascale.u(x, 12) AS r
		FROM datascale.dev d, generate_series(0, d.n - 1) AS k, LATERAL (SELECT d.i::bigint * 1000000 + k AS x) s
		WHERE d.i % {WORKERS} = {WORKER}
	) a
) b`

func (g *generator) generate(ctx context.Context, pool *pgxpool.Pool) error {
	if err := g.exec(ctx, pool, `DROP SCHEMA IF EXISTS datascale CASCADE`, `CREATE SCHEMA datascale`,
		// A uniform number in [0, 1) for (x, salt).
		`CREATE FUNCTION datascale.u(x bigint, salt int) RETURNS float8 LANGUAGE sql IMMUTABLE PARALLEL SAFE
			AS $$ SELECT (hashint8(x * 1000003 + salt) & 2147483647)::float8 / 2147483648.0 $$`,
		// A time-ordered event id (fleet.NewEventID's UUIDv7 layout), unique by seq.
		`CREATE FUNCTION datascale.uuid(at timestamptz, seq bigint) RETURNS uuid LANGUAGE sql STABLE PARALLEL SAFE
			AS $$ SELECT (lpad(to_hex((extract(epoch FROM at) * 1000)::bigint), 12, '0') || '7' || lpad(to_hex(seq & 4095), 3, '0')
				|| '8' || lpad(to_hex(seq >> 12), 15, '0'))::uuid $$`,
		devicesSQL, `ALTER TABLE datascale.dev ADD PRIMARY KEY (i)`); err != nil {
		return err
	}
	// Sessions: 95 % of the events are a connect or a disconnect, the last
	// session of an online device has no disconnect yet.
	var normal, bad, online int64
	if err := pool.QueryRow(ctx, `SELECT count(*) FILTER (WHERE NOT bad), count(*) FILTER (WHERE bad), count(*) FILTER (WHERE online) FROM datascale.dev`).
		Scan(&normal, &bad, &online); err != nil {
		return err
	}
	total := (pairShare*float64(g.o.events) + float64(online)) / 2
	perBad := 0.0
	if bad > 0 {
		// Enough sessions a day to be learned (MinRate: a ping disconnect
		// per device-hour), 40 times a normal device's, at most half of all.
		perBad = math.Min(math.Max(40*total/float64(normal+40*bad), 900), total/2/float64(bad))
	}
	perNormal := (total - perBad*float64(bad)) / float64(max(normal, 1))
	if err := g.exec(ctx, pool, fmt.Sprintf(`UPDATE datascale.dev SET n = greatest(1, floor(CASE WHEN bad THEN %g ELSE %g END + datascale.u(i, 9)))`, perBad, perNormal)); err != nil {
		return err
	}
	// The table first (empty: no device is worker -1's), then each worker's share.
	if err := g.exec(ctx, pool, strings.NewReplacer("{WORKERS}", "1", "{WORKER}", "-1").Replace(sessionsSQL)); err != nil {
		return err
	}
	if err := g.parallel(func(w int) error {
		q := strings.NewReplacer("{WORKERS}", fmt.Sprint(g.o.workers), "{WORKER}", fmt.Sprint(w)).Replace(sessionsSQL)
		return g.exec(ctx, pool, strings.Replace(q, "CREATE UNLOGGED TABLE datascale.sess AS", "INSERT INTO datascale.sess", 1))
	}); err != nil {
		return err
	}
	var pairs int64
	if err := pool.QueryRow(ctx, `SELECT count(*), count(*) + count(ended_at) FROM datascale.sess`).Scan(&g.sessions, &pairs); err != nil {
		return err
	}
	g.fill = max(0, int64(g.o.events)-pairs)
	return nil
}

// preparePartitions creates the day partitions of the window (and the week
// ahead, as fleetd keeps them) and drops device_events' keys and indexes,
// to be rebuilt after the insert as migration 00012 does: building an index
// over a partition is much faster than maintaining it row by row. The
// definitions are read from the catalogue, so whatever indexes the
// migrations made are the ones rebuilt.
func (g *generator) preparePartitions(ctx context.Context, pool *pgxpool.Pool) error {
	rows, err := pool.Query(ctx, `
		SELECT i.indexrelid::regclass::text, c.conname, pg_get_indexdef(i.indexrelid), pg_get_constraintdef(c.oid)
		FROM pg_index i LEFT JOIN pg_constraint c ON c.conindid = i.indexrelid AND c.conrelid = i.indrelid
		WHERE i.indrelid = 'device_events'::regclass ORDER BY c.conname IS NULL, 1`)
	if err != nil {
		return err
	}
	for rows.Next() {
		var name string
		var con, def, condef *string
		if err := rows.Scan(&name, &con, &def, &condef); err != nil {
			return err
		}
		d := indexDef{name: name}
		if con != nil {
			d.drop = `ALTER TABLE device_events DROP CONSTRAINT ` + pgx.Identifier{*con}.Sanitize()
			d.create = `ALTER TABLE device_events ADD CONSTRAINT ` + pgx.Identifier{*con}.Sanitize() + ` ` + *condef
		} else {
			d.drop = `DROP INDEX ` + name
			d.create = strings.Replace(*def, " ON ONLY ", " ON ", 1)
		}
		g.indexes = append(g.indexes, d)
	}
	if err := rows.Err(); err != nil {
		return err
	}
	for _, d := range g.indexes {
		if err := g.exec(ctx, pool, d.drop); err != nil {
			return err
		}
	}
	first := time.Date(g.t0.Year(), g.t0.Month(), g.t0.Day(), 0, 0, 0, 0, time.UTC)
	last := time.Date(g.o.now.Year(), g.o.now.Month(), g.o.now.Day(), 0, 0, 0, 0, time.UTC).AddDate(0, 0, 7)
	for d := first; !d.After(last); d = d.AddDate(0, 0, 1) {
		name := "device_events_p" + d.Format("20060102")
		if err := g.exec(ctx, pool, fmt.Sprintf(`CREATE TABLE IF NOT EXISTS %s PARTITION OF device_events FOR VALUES FROM ('%s') TO ('%s')`,
			name, d.Format("2006-01-02")+" 00:00:00+00", d.AddDate(0, 0, 1).Format("2006-01-02")+" 00:00:00+00")); err != nil {
			return err
		}
	}
	return nil
}

const eventColumns = `id, device_id, at, kind, reason, detail, firmware, model, session_epoch, protocol_version,
	keepalive_requested, keepalive_effective, clean_start, remote_addr, tls_version, listener, broker_node,
	pings, idle_ms, packets_in, bytes_in, duration_ms, max_silence_ms`

// A session's connect and, once it ended, its disconnect.
const sessionEventsSQL = `
INSERT INTO device_events (` + eventColumns + `)
SELECT datascale.uuid(e.at, (s.i::bigint * 1000000 + s.k) * 2 + e.j), s.id, e.at, e.kind,
	CASE WHEN e.j = 1 THEN s.reason ELSE '' END, CASE WHEN e.j = 1 THEN s.detail ELSE '' END,
	s.fw, s.model, s.epoch, s.proto, s.keepalive, s.keepalive, s.proto = 5 AND s.k % 3 = 0,
	'10.' || ((s.i >> 16) & 255) || '.' || ((s.i >> 8) & 255) || '.' || (s.i & 255) || ':' || (30000 + s.k % 30000),
	CASE WHEN s.tls THEN 'TLS 1.3' ELSE '' END, CASE WHEN s.tls THEN 'tls' ELSE 'tcp' END, s.node,
	CASE WHEN e.j = 1 THEN s.pings ELSE 0 END, CASE WHEN e.j = 1 THEN s.idle_ms ELSE 0 END,
	CASE WHEN e.j = 1 THEN s.pings + 3 + (s.duration_ms / 300000)::int ELSE 0 END,
	CASE WHEN e.j = 1 THEN (s.pings + 3 + s.duration_ms / 300000) * 48 ELSE 0 END,
	CASE WHEN e.j = 1 THEN s.duration_ms ELSE 0 END,
	CASE WHEN e.j = 1 AND s.pings > 0 THEN s.keepalive * 900 ELSE 0 END
FROM datascale.sess s CROSS JOIN LATERAL (VALUES (0, 'connect', s.started_at), (1, 'disconnect', s.ended_at)) AS e(j, kind, at)
WHERE e.at IS NOT NULL AND s.i % {WORKERS} = {WORKER}`

// The other events, at random times of random devices: refused connects
// (wrong tokens, ids never registered, the connect rate, failed TLS
// handshakes), rejected births and ACL denials.
const otherEventsSQL = `
INSERT INTO device_events (` + eventColumns + `)
SELECT datascale.uuid(g.at, 4503599627370496 + g.j),
	CASE WHEN g.r >= 0.45 AND g.r < 0.55 THEN 'unknown-' || (g.j % 5000) ELSE d.id END, g.at,
	CASE WHEN g.r < 0.80 THEN 'refused' WHEN g.r < 0.97 THEN 'rejected' ELSE 'acl_denied' END,
	CASE WHEN g.r < 0.55 THEN 'auth_failed' WHEN g.r < 0.75 THEN 'throttled' WHEN g.r < 0.80 THEN 'tls_handshake_failed' ELSE '' END,
	CASE WHEN g.r < 0.80 THEN '' WHEN g.r < 0.97 THEN 'birth: firmware must be at most 64 bytes of UTF-8 without control characters'
		ELSE 'publish to devices/dev-000000/status' END,
	CASE WHEN g.r < 0.80 THEN '' ELSE d.fw END, CASE WHEN g.r >= 0.45 AND g.r < 0.55 THEN '' ELSE d.model END,
	0, d.proto, 0, 0, false,
	'10.' || ((d.i >> 16) & 255) || '.' || ((d.i >> 8) & 255) || '.' || (d.i & 255) || ':' || (30000 + g.j % 30000),
	CASE WHEN d.tls OR (g.r >= 0.75 AND g.r < 0.80) THEN 'TLS 1.3' ELSE '' END,
	CASE WHEN d.tls OR (g.r >= 0.75 AND g.r < 0.80) THEN 'tls' ELSE 'tcp' END, d.node,
	0, 0, 0, 0, 0, 0
FROM (
	SELECT j, {T0} + make_interval(secs => datascale.u(j, 21) * {W}) AS at, floor(datascale.u(j, 20) * {N})::int AS di, datascale.u(j, 22) AS r
	FROM generate_series({FROM}, {TO}) AS j
) g JOIN datascale.dev d ON d.i = g.di`

func (g *generator) insertEvents(ctx context.Context, pool *pgxpool.Pool) error {
	return g.parallel(func(w int) error {
		r := strings.NewReplacer("{WORKERS}", fmt.Sprint(g.o.workers), "{WORKER}", fmt.Sprint(w),
			"{FROM}", fmt.Sprint(1+int64(w)*g.fill/int64(g.o.workers)), "{TO}", fmt.Sprint(int64(w+1)*g.fill/int64(g.o.workers)))
		return g.exec(ctx, pool, r.Replace(sessionEventsSQL), r.Replace(otherEventsSQL))
	})
}

// rebuildIndexes recreates device_events' keys first (they lock the table
// whole), then its other indexes, two at a time.
func (g *generator) rebuildIndexes(ctx context.Context, pool *pgxpool.Pool) error {
	var plain []string
	for _, d := range g.indexes {
		if strings.HasPrefix(d.create, "ALTER TABLE") {
			if err := g.exec(ctx, pool, d.create); err != nil {
				return err
			}
			continue
		}
		plain = append(plain, d.create)
	}
	next := make(chan string, len(plain))
	for _, q := range plain {
		next <- q
	}
	close(next)
	return g.parallel(func(int) error {
		for q := range next {
			if err := g.exec(ctx, pool, q); err != nil {
				return err
			}
		}
		return nil
	})
}

// eventRollups counts the events into the minute and hour rollups with the
// statements of migration 00012's backfill, one day at a time (no minute
// or hour crosses a UTC day).
func (g *generator) eventRollups(ctx context.Context, pool *pgxpool.Pool) error {
	days := make(chan time.Time, 64)
	first := time.Date(g.t0.Year(), g.t0.Month(), g.t0.Day(), 0, 0, 0, 0, time.UTC)
	for d := first; d.Before(g.o.now); d = d.AddDate(0, 0, 1) {
		days <- d
	}
	close(days)
	return g.parallel(func(int) error {
		for d := range days {
			where := fmt.Sprintf(`WHERE at >= %s AND at < %s`, ts(d), ts(d.AddDate(0, 0, 1)))
			if err := g.exec(ctx, pool,
				`INSERT INTO event_rollups_minute
				SELECT date_trunc('minute', at, 'UTC'), firmware, model, protocol_version, broker_node, kind, reason, count(*)
				FROM device_events `+where+` GROUP BY 1, 2, 3, 4, 5, 6, 7`,
				`INSERT INTO event_rollups_hour
				SELECT date_trunc('hour', at, 'UTC'), firmware, model, protocol_version, broker_node, kind, reason, count(*)
				FROM device_events `+where+` GROUP BY 1, 2, 3, 4, 5, 6, 7`,
				// Migration 00014's narrower counts, from the day's rows.
				`INSERT INTO fleet_counts_minute
				SELECT minute, firmware, protocol_version, kind, reason, sum(count) FROM event_rollups_minute
				WHERE minute >= `+ts(d)+` AND minute < `+ts(d.AddDate(0, 0, 1))+` GROUP BY 1, 2, 3, 4, 5`,
				`INSERT INTO fleet_counts_hour
				SELECT hour, firmware, protocol_version, kind, reason, sum(count) FROM event_rollups_hour
				WHERE hour >= `+ts(d)+` AND hour < `+ts(d.AddDate(0, 0, 1))+` GROUP BY 1, 2, 3, 4, 5`,
				`INSERT INTO history_minute
				SELECT minute, kind, reason, sum(count) FROM event_rollups_minute
				WHERE minute >= `+ts(d)+` AND minute < `+ts(d.AddDate(0, 0, 1))+` GROUP BY 1, 2, 3`,
				`INSERT INTO history_hour
				SELECT hour, kind, reason, sum(count) FROM event_rollups_hour
				WHERE hour >= `+ts(d)+` AND hour < `+ts(d.AddDate(0, 0, 1))+` GROUP BY 1, 2, 3`); err != nil {
				return err
			}
		}
		return nil
	})
}

// endedSQL is migration 00012's backfill_ended for the generated sessions:
// every session has one connect and at most one disconnect, with the same
// model and firmware, so pairing them in device_events gives these rows.
const endedSQL = `(SELECT id AS device_id, started_at, ended_at, model, fw AS firmware,
	(reason = 'protocol_error' AND detail LIKE 'PINGREQ%') OR (reason = 'keepalive_timeout' AND pings = 0) AS ping
	FROM datascale.sess WHERE ended_at IS NOT NULL)`

// sessionRollups fills sessions_open, session_rollups_minute and
// session_devices with migration 00012's statements (and 00018's open
// sessions), from the sessions the
// events were made of (the self-join of 20 million events is what the
// generator already knows).
func (g *generator) sessionRollups(ctx context.Context, pool *pgxpool.Pool) error {
	// Three tables, three statements at once.
	qs := []string{
		`INSERT INTO sessions_open (device_id, session_epoch, started_at, model, firmware)
		SELECT id, epoch, started_at, model, fw FROM datascale.sess WHERE ended_at IS NULL`,

		`INSERT INTO session_rollups_minute (minute, model, firmware, ended, ping_disconnects, end_offset_us, started, start_offset_us)
		SELECT minute, model, firmware, sum(ended), sum(ping), sum(end_offset_us), sum(started), sum(start_offset_us)
		FROM (
			SELECT date_trunc('minute', ended_at, 'UTC') AS minute, model, firmware, 1 AS ended, ping::int AS ping,
				(extract(epoch FROM ended_at - date_trunc('minute', ended_at, 'UTC')) * 1000000)::bigint AS end_offset_us,
				0 AS started, 0::bigint AS start_offset_us
			FROM ` + endedSQL + ` e1
			UNION ALL
			SELECT date_trunc('minute', started_at, 'UTC'), model, firmware, 0, 0, 0, 1,
				(extract(epoch FROM started_at - date_trunc('minute', started_at, 'UTC')) * 1000000)::bigint
			FROM ` + endedSQL + ` e2
		) s
		GROUP BY minute, model, firmware`,

		`INSERT INTO session_devices (model, firmware, device_id, last_end, open_sessions)
		SELECT model, firmware, device_id, coalesce(max(ended_at), '-infinity'), count(*) FILTER (WHERE ended_at IS NULL) FROM (
			SELECT model, firmware, device_id, ended_at FROM ` + endedSQL + ` e
			UNION ALL
			SELECT model, fw, id, NULL FROM datascale.sess WHERE ended_at IS NULL
		) s GROUP BY model, firmware, device_id`,
	}
	errs := make([]error, len(qs))
	var wg sync.WaitGroup
	for i, q := range qs {
		wg.Add(1)
		go func() { defer wg.Done(); errs[i] = g.exec(ctx, pool, q) }()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// insertDevices registers the devices with the presence their last session
// left: online with its epoch, or offline since its disconnect. Their
// tokens are never used (no device connects in this benchmark).
func (g *generator) insertDevices(ctx context.Context, pool *pgxpool.Pool) error {
	return g.exec(ctx, pool, `
		INSERT INTO devices (id, model, tags, state, token_hash, firmware, protocol_version, online, session_epoch,
			connected_at, disconnected_at, last_seen, last_disconnect, keepalive_requested, keepalive_effective,
			remote_addr, tls_version, listener, broker_node, created_at, updated_at)
		SELECT d.id, d.model, ARRAY['site-' || (d.i % 40)], 'active', decode(md5(d.id), 'hex'), s.fw, d.proto, s.ended_at IS NULL, s.epoch,
			s.started_at, s.ended_at, coalesce(s.ended_at, {NOW} - make_interval(secs => 15 * datascale.u(d.i, 30))), coalesce(s.reason, ''),
			d.keepalive, d.keepalive, '10.' || ((d.i >> 16) & 255) || '.' || ((d.i >> 8) & 255) || '.' || (d.i & 255) || ':' || (30000 + s.k % 30000),
			CASE WHEN d.tls THEN 'TLS 1.3' ELSE '' END, CASE WHEN d.tls THEN 'tls' ELSE 'tcp' END, d.node,
			{T0} - make_interval(days => (300 * datascale.u(d.i, 31))::int), {NOW}
		FROM datascale.dev d JOIN datascale.sess s ON s.i = d.i AND s.k = d.n - 1`)
}

// verifyRollups checks that the loaded rollups are what migration 00012's
// backfill computes from device_events (its statements, verbatim but for the
// target tables): a small load (--smoke) proves the generator right.
func verifyRollups(ctx context.Context, pool *pgxpool.Pool) error {
	conn, err := pool.Acquire(ctx)
	if err != nil {
		return err
	}
	defer conn.Release()
	for _, q := range []string{
		`CREATE TEMP TABLE v_minute AS SELECT date_trunc('minute', at, 'UTC') AS minute, firmware, model, protocol_version, broker_node, kind, reason, count(*) AS count
			FROM device_events GROUP BY 1, 2, 3, 4, 5, 6, 7`,
		`CREATE TEMP TABLE v_hour AS SELECT date_trunc('hour', at, 'UTC') AS hour, firmware, model, protocol_version, broker_node, kind, reason, count(*) AS count
			FROM device_events GROUP BY 1, 2, 3, 4, 5, 6, 7`,
		`CREATE TEMP TABLE v_fminute AS SELECT date_trunc('minute', at, 'UTC') AS minute, firmware, protocol_version, kind, reason, count(*) AS count
			FROM device_events GROUP BY 1, 2, 3, 4, 5`,
		`CREATE TEMP TABLE v_fhour AS SELECT date_trunc('hour', at, 'UTC') AS hour, firmware, protocol_version, kind, reason, count(*) AS count
			FROM device_events GROUP BY 1, 2, 3, 4, 5`,
		`CREATE TEMP TABLE v_hminute AS SELECT date_trunc('minute', at, 'UTC') AS minute, kind, reason, count(*) AS count
			FROM device_events GROUP BY 1, 2, 3`,
		`CREATE TEMP TABLE v_hhour AS SELECT date_trunc('hour', at, 'UTC') AS hour, kind, reason, count(*) AS count
			FROM device_events GROUP BY 1, 2, 3`,
		`CREATE TEMP TABLE backfill_connects AS
			SELECT DISTINCT ON (device_id, session_epoch) device_id, session_epoch, at, model, firmware
			FROM device_events WHERE kind = 'connect' ORDER BY device_id, session_epoch, at, id`,
		`CREATE TEMP TABLE backfill_ended AS
			SELECT c.device_id, c.at AS started_at, d.at AS ended_at,
				coalesce(nullif(d.model, ''), c.model) AS model, coalesce(nullif(d.firmware, ''), c.firmware) AS firmware,
				(d.reason = 'protocol_error' AND d.detail LIKE 'PINGREQ%') OR (d.reason = 'keepalive_timeout' AND d.pings = 0) AS ping
			FROM backfill_connects c
			JOIN (SELECT DISTINCT ON (device_id, session_epoch) device_id, session_epoch, at, model, firmware, reason, detail, pings
				FROM device_events WHERE kind = 'disconnect' ORDER BY device_id, session_epoch, at, id) d
			USING (device_id, session_epoch)`,
		`CREATE TEMP TABLE v_open AS SELECT c.device_id, c.session_epoch, c.at AS started_at, c.model, c.firmware FROM backfill_connects c
			WHERE NOT EXISTS (SELECT 1 FROM device_events d
				WHERE d.kind = 'disconnect' AND d.device_id = c.device_id AND d.session_epoch = c.session_epoch)`,
		`CREATE TEMP TABLE v_sessions AS SELECT minute, model, firmware, sum(ended) AS ended, sum(ping) AS ping_disconnects, sum(end_offset_us) AS end_offset_us,
				sum(started) AS started, sum(start_offset_us) AS start_offset_us
			FROM (
				SELECT date_trunc('minute', ended_at, 'UTC') AS minute, model, firmware, 1 AS ended, ping::int AS ping,
					(extract(epoch FROM ended_at - date_trunc('minute', ended_at, 'UTC')) * 1000000)::bigint AS end_offset_us,
					0 AS started, 0::bigint AS start_offset_us
				FROM backfill_ended
				UNION ALL
				SELECT date_trunc('minute', started_at, 'UTC'), model, firmware, 0, 0, 0, 1,
					(extract(epoch FROM started_at - date_trunc('minute', started_at, 'UTC')) * 1000000)::bigint
				FROM backfill_ended
			) s GROUP BY minute, model, firmware`,
		`CREATE TEMP TABLE v_devices AS SELECT model, firmware, device_id, coalesce(max(ended_at), '-infinity') AS last_end,
				count(*) FILTER (WHERE ended_at IS NULL) AS open_sessions
			FROM (SELECT model, firmware, device_id, ended_at FROM backfill_ended
				UNION ALL SELECT model, firmware, device_id, NULL FROM v_open) s
			GROUP BY model, firmware, device_id`,
	} {
		if _, err := conn.Exec(ctx, q); err != nil {
			return fmt.Errorf("%w\n%s", err, firstLine(q))
		}
	}
	for _, c := range []struct{ loaded, cols, want string }{
		{"event_rollups_minute", "minute, firmware, model, protocol_version, broker_node, kind, reason, count", "v_minute"},
		{"event_rollups_hour", "hour, firmware, model, protocol_version, broker_node, kind, reason, count", "v_hour"},
		{"fleet_counts_minute", "minute, firmware, protocol_version, kind, reason, count", "v_fminute"},
		{"fleet_counts_hour", "hour, firmware, protocol_version, kind, reason, count", "v_fhour"},
		{"history_minute", "minute, kind, reason, count", "v_hminute"},
		{"history_hour", "hour, kind, reason, count", "v_hhour"},
		{"sessions_open", "device_id, session_epoch, started_at, model, firmware", "v_open"},
		{"session_rollups_minute", "minute, model, firmware, ended, ping_disconnects, end_offset_us, started, start_offset_us", "v_sessions"},
		{"session_devices", "model, firmware, device_id, last_end, open_sessions", "v_devices"},
	} {
		var missing, extra int64
		err := conn.QueryRow(ctx, fmt.Sprintf(`SELECT (SELECT count(*) FROM (SELECT %[1]s FROM %[3]s EXCEPT ALL SELECT %[1]s FROM %[2]s) a),
			(SELECT count(*) FROM (SELECT %[1]s FROM %[2]s EXCEPT ALL SELECT %[1]s FROM %[3]s) b)`, c.cols, c.loaded, c.want)).Scan(&missing, &extra)
		if err != nil {
			return err
		}
		if missing > 0 || extra > 0 {
			return fmt.Errorf("%s does not match the migration's backfill of device_events: %d rows missing, %d extra", c.loaded, missing, extra)
		}
	}
	return nil
}

func (g *generator) summarise(ctx context.Context, pool *pgxpool.Pool, res *loadResult) error {
	res.Sessions = g.sessions
	err := pool.QueryRow(ctx, `SELECT (SELECT count(*) FROM devices), (SELECT count(*) FROM device_events), (SELECT count(*) FROM sessions_open),
		(SELECT count(*) FROM pg_inherits WHERE inhparent = 'device_events'::regclass),
		(SELECT count(*) FROM devices WHERE incompatible), pg_database_size(current_database()),
		(SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree('device_events'))::bigint,
		(SELECT sum(pg_total_relation_size(t::regclass)) FROM unnest(ARRAY['event_rollups_minute', 'event_rollups_hour', 'fleet_counts_minute', 'fleet_counts_hour', 'history_minute', 'history_hour', 'sessions_open', 'session_rollups_minute', 'session_devices']) t)::bigint,
		(SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c WHERE c.relname LIKE 'telemetry%' AND c.relkind IN ('r', 'p'))::bigint`).
		Scan(&res.Devices, &res.Events, &res.OpenSessions, &res.Partitions, &res.Incompatible, &res.DatabaseBytes, &res.EventsBytes, &res.RollupBytes, &res.TelemetryBytes)
	if err != nil {
		return err
	}
	for _, t := range []string{"event_rollups_minute", "event_rollups_hour", "session_rollups_minute", "session_devices"} {
		var n int64
		if err := pool.QueryRow(ctx, `SELECT count(*) FROM `+t).Scan(&n); err != nil {
			return err
		}
		res.RollupRows[t] = n
	}
	rows, err := pool.Query(ctx, `SELECT model || ' ' || firmware FROM firmware_verdicts WHERE learned ORDER BY 1`)
	if err != nil {
		return err
	}
	res.Flagged, err = pgx.CollectRows(rows, pgx.RowTo[string])
	if res.Flagged == nil {
		res.Flagged = []string{}
	}
	return err
}

// loadTelemetry writes a day of telemetry for o.telemetryDevices devices
// through telemetry.Writer, the way fleetd's ingest does, with Entry.At in
// the past: RSSI (a random walk), uptime, free heap and retries every
// telemetryEvery, and the WiFi link (channel, access point).
func loadTelemetry(ctx context.Context, pool *pgxpool.Pool, o loadOptions) (telemetryResult, error) {
	res := telemetryResult{Devices: min(o.telemetryDevices, o.devices)}
	if res.Devices == 0 {
		return res, nil
	}
	reg := prometheus.NewRegistry()
	w := telemetry.NewWriter(telemetry.NewStore(pool), telemetry.WriterOptions{Registerer: reg})
	steps := int(24 * time.Hour / telemetryEvery)
	end := o.now.Truncate(time.Second).Add(-time.Minute)
	type dev struct {
		id   string
		rssi float64
		ch   int
	}
	devs := make([]dev, res.Devices)
	rng := rand.New(rand.NewPCG(1, 2))
	channels := []int{1, 6, 11, 36, 44}
	for j := range devs {
		devs[j] = dev{id: telemetryDevice(j, o.devices, res.Devices), rssi: -55 - 20*rng.Float64(), ch: channels[j%len(channels)]}
	}
	start := time.Now()
	for s := range steps {
		at := end.Add(-time.Duration(steps-s) * telemetryEvery)
		for j := range devs {
			d := &devs[j]
			d.rssi = math.Max(-95, math.Min(-35, d.rssi+rng.NormFloat64()))
			band := "2.4"
			if d.ch > 14 {
				band = "5"
			}
			e := telemetry.Entry{DeviceID: d.id, At: at, Message: telemetry.Message{
				Metrics: []telemetry.Metric{
					{Name: "rssi_dbm", Value: math.Round(d.rssi)},
					{Name: "channel", Value: float64(d.ch)},
					{Name: "uptime_s", Value: float64(s) * telemetryEvery.Seconds()},
					{Name: "heap_free_bytes", Value: float64(60000 + rng.IntN(20000))},
					{Name: "tx_retries", Value: float64(rng.IntN(5))},
				},
				Link: telemetry.Link{BSSID: fmt.Sprintf("aa:bb:cc:00:%02x:%02x", j/256, j%256), SSID: "fleet", Band: band, Channel: d.ch},
			}}
			for !w.Enqueue(e) {
				res.Retried++
				select {
				case <-ctx.Done():
					return res, ctx.Err()
				case <-time.After(5 * time.Millisecond):
				}
			}
			res.Messages++
			res.Points += int64(len(e.Metrics))
		}
	}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	if err := w.Close(cctx); err != nil {
		return res, err
	}
	res.Seconds = math.Round(time.Since(start).Seconds()*10) / 10
	res.PerS = math.Round(float64(res.Messages) / time.Since(start).Seconds())
	written, err := counter(reg, "fleetd_telemetry_written_total")
	if err != nil {
		return res, err
	}
	if int64(written) != res.Messages {
		return res, fmt.Errorf("the telemetry writer stored %d of %d messages", int64(written), res.Messages)
	}
	return res, nil
}

// rollUpTelemetry runs fleetd's telemetry rollup job until it has caught up
// with the loaded day, as a running fleetd keeps it: the benchmark measures
// queries on rollups that are current, not on the backlog of a day loaded a
// moment ago (a running job works that off at an hour of raw time per run).
func rollUpTelemetry(ctx context.Context, pool *pgxpool.Pool) error {
	job := &telemetry.RollupJob{}
	store := telemetry.NewStore(pool)
	for range 10_000 {
		rep, err := job.Apply(ctx, store)
		if err != nil {
			return err
		}
		if rep.Ran && !rep.RolledTo.Before(rep.SealedTo) {
			return nil
		}
	}
	return fmt.Errorf("the telemetry rollups did not catch up")
}

// telemetryDevice is the id of the j-th of d devices with telemetry among n.
func telemetryDevice(j, n, d int) string { return fmt.Sprintf("dev-%06d", j*n/d) }

func counter(g prometheus.Gatherer, name string) (float64, error) {
	mfs, err := g.Gather()
	if err != nil {
		return 0, err
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) > 0 {
			return mf.GetMetric()[0].GetCounter().GetValue(), nil
		}
	}
	return 0, fmt.Errorf("no metric %s", name)
}
