package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/fleetd/fleetd/fleet"
)

type measureOptions struct {
	dsn, api, token  string
	requests         int
	analyses         int
	telemetryDevices int
}

// Targets of issue #17.
const (
	targetQuery    = 100 * time.Millisecond
	targetAnalysis = time.Second
)

// measure writes Markdown lines: the latency of each endpoint, each analysis
// run, the pre-rollup query for contrast, and what the database holds.
func measure(ctx context.Context, out io.Writer, o measureOptions) error {
	// The analysis runs in-process on this pool: configured as fleetd's
	// (cmd/fleetd turns PostgreSQL's JIT off for its pool).
	cfg, err := pgxpool.ParseConfig(o.dsn)
	if err != nil {
		return err
	}
	if _, set := cfg.ConnConfig.RuntimeParams["jit"]; !set {
		cfg.ConnConfig.RuntimeParams["jit"] = "off"
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return err
	}
	defer pool.Close()
	var version, buffers, workMem string
	if err := pool.QueryRow(ctx, `SELECT current_setting('server_version'), current_setting('shared_buffers'), current_setting('work_mem')`).
		Scan(&version, &buffers, &workMem); err != nil {
		return err
	}
	fmt.Fprintf(out, "- database: PostgreSQL %s, shared_buffers %s, work_mem %s (fleetd's embedded-mode server, default settings; the load raised max_wal_size while it ran)\n",
		version, buffers, workMem)
	if waited, busy := waitQuiet(ctx, pool, 5*time.Minute); busy {
		fmt.Fprintf(out, "- note: the database was still busy after %s (fleetd's first analysis or autovacuum); measured anyway\n", waited.Round(time.Second))
	} else {
		fmt.Fprintf(out, "- fleetd's start-up work on the database (its first analysis round) was over %s after it was ready; measured from then on\n", waited.Round(time.Second))
	}

	now := time.Now().UTC().Truncate(time.Second)
	rfc := func(t time.Time) string { return t.Format(time.RFC3339) }
	history := func(from time.Duration, step string) string {
		return "/api/v1/fleet/history?" + url.Values{"from": {rfc(now.Add(-from))}, "to": {rfc(now)}, "step": {step}}.Encode()
	}
	// The devices load gave telemetry, in turn.
	var devices int
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM devices`).Scan(&devices); err != nil {
		return err
	}
	telemetryIDs := make([]string, min(o.telemetryDevices, devices))
	for j := range telemetryIDs {
		telemetryIDs[j] = telemetryDevice(j, devices, len(telemetryIDs))
	}
	if len(telemetryIDs) == 0 {
		return fmt.Errorf("no device has telemetry")
	}
	deviceTelemetry := func(step string) func(i int) string {
		return func(i int) string {
			q := url.Values{"metric": {"rssi_dbm"}, "from": {rfc(now.Add(-24 * time.Hour))}, "to": {rfc(now)}}
			if step != "" {
				q.Set("step", step)
			}
			return "/api/v1/devices/" + telemetryIDs[i%len(telemetryIDs)] + "/telemetry?" + q.Encode()
		}
	}
	fixed := func(path string) func(int) string { return func(int) string { return path } }
	cases := []struct {
		name string
		path func(i int) string
	}{
		{"GET /api/v1/fleet/health", fixed("/api/v1/fleet/health")},
		{"GET /api/v1/fleet/history, a day by 5m (288 buckets)", fixed(history(24*time.Hour, "5m"))},
		{"GET /api/v1/fleet/history, a day by 1m (1440 buckets)", fixed(history(24*time.Hour, "1m"))},
		{"GET /api/v1/fleet/history, a week by 1h (168 buckets)", fixed(history(7*24*time.Hour, "1h"))},
		{"GET /api/v1/fleet/history, a month by 1d (30 buckets)", fixed(history(30*24*time.Hour, "1d"))},
		{"GET /api/v1/devices/{id}/telemetry, rssi_dbm for a day, raw points", deviceTelemetry("")},
		{"GET /api/v1/devices/{id}/telemetry, rssi_dbm for a day by 1m", deviceTelemetry("1m")},
		{"GET /api/v1/devices/{id}/telemetry, rssi_dbm for a day by 1h", deviceTelemetry("1h")},
	}
	client := &http.Client{Timeout: time.Minute}
	// The telemetry was written in the past; fleetd may roll it up after the
	// fact. Wait until a day by minute is there for the last device.
	waitStart := time.Now()
	for {
		var s struct {
			Points []json.RawMessage `json:"points"`
		}
		err := getJSON(ctx, client, o.api+deviceTelemetry("1m")(len(telemetryIDs)-1), o.token, &s)
		if err != nil {
			return err
		}
		if len(s.Points) >= 1380 {
			break
		}
		if time.Since(waitStart) > 5*time.Minute {
			return fmt.Errorf("after 5 minutes fleetd answers %d minutes of telemetry for %s, not a day", len(s.Points), telemetryIDs[len(telemetryIDs)-1])
		}
		time.Sleep(time.Second)
	}
	if d := time.Since(waitStart); d > 2*time.Second {
		fmt.Fprintf(out, "- fleetd rolled up the day of telemetry written in the past within %s after the load\n", d.Round(time.Second))
	}
	fmt.Fprintf(out, "- latency over %d sequential requests each (after 3 not counted), one client, keep-alive:\n", o.requests)
	for _, c := range cases {
		var lat []time.Duration
		var size int64
		for i := -3; i < o.requests; i++ {
			d, n, err := get(ctx, client, o.api+c.path(max(i, 0)), o.token)
			if err != nil {
				return fmt.Errorf("%s: %w", c.name, err)
			}
			if i >= 0 {
				lat, size = append(lat, d), n
			}
		}
		p50, p99 := quantile(lat, 0.50), quantile(lat, 0.99)
		fmt.Fprintf(out, "  - %s: p50 %s, p99 %s, max %s (%d bytes) — target p99 ≤ %s: %s\n", c.name, ms(p50), ms(p99), ms(slices.Max(lat)), size,
			ms(targetQuery), verdict(p99 <= targetQuery))
	}

	// The analysis, in-process with the fleet package, as fleetd's loop runs it.
	svc := fleet.NewService(fleet.NewStore(pool), nil, slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	if err := svc.LoadPolicy(ctx); err != nil {
		return err
	}
	var runs []string
	worst := time.Duration(0)
	for range o.analyses {
		var dbNow time.Time
		if err := pool.QueryRow(ctx, `SELECT now()`).Scan(&dbNow); err != nil {
			return err
		}
		start := time.Now()
		if err := svc.Analyze(ctx); err != nil {
			return fmt.Errorf("analysis: %w", err)
		}
		d := time.Since(start)
		worst = max(worst, d)
		// setCompat stamps updated_at: the devices this run rewrote.
		var rewritten int64
		if err := pool.QueryRow(ctx, `SELECT count(*) FROM devices WHERE updated_at >= $1`, dbNow).Scan(&rewritten); err != nil {
			return err
		}
		runs = append(runs, fmt.Sprintf("%s (%d devices rewritten)", ms(d), rewritten))
	}
	fmt.Fprintf(out, "- analysis run (fleet.Service.Analyze: verdicts learned from the last day's rollups, every device re-judged; nothing changed between runs): %s — target ≤ %s: %s\n",
		strings.Join(runs, ", "), ms(targetAnalysis), verdict(worst <= targetAnalysis))

	// For contrast, the fleet-health disconnect counts before the rollups:
	// the same query shape on device_events (fleet/store_analysis.go before
	// e309a9c), a window of an hour and of a day.
	var peer []string
	for _, w := range []struct {
		name string
		d    time.Duration
	}{{"last hour", time.Hour}, {"last day", 24 * time.Hour}} {
		var n int64
		start := time.Now()
		err := pool.QueryRow(ctx, `SELECT count(*) FROM (SELECT firmware, protocol_version, reason, count(*) FROM device_events
			WHERE kind = 'disconnect' AND at >= $1 GROUP BY 1, 2, 3 ORDER BY 4 DESC, 1, 2, 3) c`, now.Add(-w.d)).Scan(&n)
		if err != nil {
			return err
		}
		peer = append(peer, fmt.Sprintf("%s %s (%d cells)", w.name, ms(time.Since(start)), n))
	}
	fmt.Fprintf(out, "- peer (the pre-rollup query, run once): fleet health's disconnects by firmware × protocol × reason counted on device_events: %s; the rollups answer both inside the fleet-health request above\n",
		strings.Join(peer, ", "))

	var db, events, rollups, telemetry int64
	var days int
	err = pool.QueryRow(ctx, `SELECT pg_database_size(current_database()),
		(SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree('device_events'))::bigint,
		(SELECT sum(pg_total_relation_size(t::regclass)) FROM unnest(ARRAY['event_rollups_minute', 'event_rollups_hour', 'sessions_open', 'session_rollups_minute', 'session_devices']) t)::bigint,
		(SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c WHERE c.relname LIKE 'telemetry%' AND c.relkind IN ('r', 'p'))::bigint,
		(SELECT count(*) FROM pg_inherits WHERE inhparent = 'device_events'::regclass)`).Scan(&db, &events, &rollups, &telemetry, &days)
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "- database: %s in all; device_events %s (%d day partitions, indexes included), event and session rollups %s, telemetry %s\n",
		gib(db), gib(events), days, gib(rollups), gib(telemetry))
	return nil
}

// waitQuiet waits until no other client and no autovacuum worker is
// running a statement, for 3 s in a row, and says how long it waited.
func waitQuiet(ctx context.Context, pool *pgxpool.Pool, limit time.Duration) (time.Duration, bool) {
	start := time.Now()
	quiet := 0
	for time.Since(start) < limit {
		var n int
		err := pool.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND datname = current_database()
			AND state IS DISTINCT FROM 'idle' AND backend_type IN ('client backend', 'autovacuum worker')`).Scan(&n)
		if err != nil || ctx.Err() != nil {
			return time.Since(start), true
		}
		if n == 0 {
			quiet++
			if quiet == 3 {
				return time.Since(start), false
			}
		} else {
			quiet = 0
		}
		time.Sleep(time.Second)
	}
	return time.Since(start), true
}

func getJSON(ctx context.Context, c *http.Client, u, token string, v any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 500))
		return fmt.Errorf("GET %s: %s: %s", u, resp.Status, b)
	}
	return json.NewDecoder(resp.Body).Decode(v)
}

func get(ctx context.Context, c *http.Client, u, token string) (time.Duration, int64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return 0, 0, err
	}
	req.Header.Set("Authorization", "Bearer "+token)
	start := time.Now()
	resp, err := c.Do(req)
	if err != nil {
		return 0, 0, err
	}
	defer resp.Body.Close()
	n, err := io.Copy(io.Discard, resp.Body)
	d := time.Since(start)
	if err != nil {
		return 0, 0, err
	}
	if resp.StatusCode != http.StatusOK {
		return 0, 0, fmt.Errorf("GET %s: %s", u, resp.Status)
	}
	return d, n, nil
}

// quantile is the nearest-rank quantile q of ds.
func quantile(ds []time.Duration, q float64) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	i := int(float64(len(s))*q+0.999999) - 1
	return s[min(max(i, 0), len(s)-1)]
}

func ms(d time.Duration) string {
	switch {
	case d >= 10*time.Second:
		return fmt.Sprintf("%.1f s", d.Seconds())
	case d >= 100*time.Millisecond:
		return fmt.Sprintf("%.0f ms", float64(d)/1e6)
	default:
		return fmt.Sprintf("%.1f ms", float64(d)/1e6)
	}
}

func gib(b int64) string {
	if b >= 1<<30 {
		return fmt.Sprintf("%.1f GiB", float64(b)/(1<<30))
	}
	return fmt.Sprintf("%.0f MiB", float64(b)/(1<<20))
}

func verdict(ok bool) string {
	if ok {
		return "met"
	}
	return "**missed**"
}
