package fleet

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
	"golang.org/x/sync/errgroup"

	"github.com/fleetd/fleetd/internal/advisory"
)

// The SQL of diagnosis: policy, verdicts, firmware statistics, fleet health.

func (s *Store) loadPolicy(ctx context.Context) (Policy, bool, error) {
	var p Policy
	err := s.pool.QueryRow(ctx, `SELECT doc FROM policy`).Scan(&p)
	if errors.Is(err, pgx.ErrNoRows) {
		return Policy{}, false, nil
	}
	if err != nil {
		return Policy{}, false, fmt.Errorf("load policy: %w", err)
	}
	return p, true, nil
}

func (s *Store) savePolicy(ctx context.Context, p Policy) error {
	defer s.changed()
	_, err := s.pool.Exec(ctx, `INSERT INTO policy (doc) VALUES ($1)
		ON CONFLICT (id) DO UPDATE SET doc = EXCLUDED.doc, updated_at = now()`, p)
	if err != nil {
		return fmt.Errorf("save policy: %w", err)
	}
	return nil
}

// pingDisconnectSQL mirrors IsPingDisconnect.
const pingDisconnectSQL = `((d.reason = 'protocol_error' AND d.detail LIKE 'PINGREQ%') OR (d.reason = 'keepalive_timeout' AND d.pings = 0))`

// firmwareStats aggregates sessions since a time per (model, firmware):
// distinct devices, connected device-hours (live sessions count up to now),
// sessions ended and ping-related disconnects. A session's firmware is the
// one its disconnect recorded (set by the birth), else its connect's.
//
// It reads the rollups the writer keeps (rollUp), not the events, so that an
// analysis costs what the window holds in minutes × groups plus the open
// sessions, whatever the history kept. The window starts at the top of the
// minute of since (up to a minute longer than asked); with that start the
// numbers are the ones the self-join of connects and disconnects gives
// (TestFirmwareStatsFromRollupsMatchEvents keeps that query as the oracle).
// They differ only for histories the writer never produces in order: a
// disconnect stored before its connect, or a second disconnect of one
// session, counts no session.
func (s *Store) firmwareStats(ctx context.Context, since time.Time) ([]FirmwareStats, error) {
	return s.firmwareStatsAt(ctx, since, nil)
}

// firmwareStatsAt is firmwareStats with live sessions counted up to now
// rather than up to the database's clock, when now is not nil.
//
// Every part reads one rollup table: ended sessions by minute, open
// sessions, and the distinct devices of the window (session_devices counts
// each device's open sessions, so that no union of it with sessions_open
// has to be deduplicated: that was 0.4-1.1 s with 200 000 devices).
func (s *Store) firmwareStatsAt(ctx context.Context, since time.Time, now *time.Time) ([]FirmwareStats, error) {
	rows, err := s.pool.Query(ctx, `
		WITH ended AS (
			SELECT model, firmware, sum(ended) AS sessions, sum(ping_disconnects) AS pings,
				sum((ended - started) * (extract(epoch FROM minute - $1) * 1000000)::bigint + end_offset_us - start_offset_us) AS us
			FROM session_rollups_minute WHERE minute >= $1 AND firmware <> ''
			GROUP BY model, firmware
		), live AS (
			SELECT model, firmware, sum((extract(epoch FROM coalesce($2, now()) - greatest(started_at, $1)) * 1000000)::bigint) AS us
			FROM sessions_open WHERE firmware <> ''
			GROUP BY model, firmware
		), devices AS (
			SELECT model, firmware, count(*) AS n FROM session_devices
			WHERE (last_end >= $1 OR open_sessions > 0) AND firmware <> ''
			GROUP BY model, firmware
		)
		SELECT model, firmware, coalesce(devices.n, 0),
			((coalesce(ended.us, 0) + coalesce(live.us, 0)) / 3600000000.0)::float8,
			coalesce(ended.sessions, 0)::bigint, coalesce(ended.pings, 0)::bigint
		FROM ended FULL JOIN live USING (model, firmware) FULL JOIN devices USING (model, firmware)`,
		since.UTC().Truncate(time.Minute), now)
	if err != nil {
		return nil, fmt.Errorf("firmware statistics: %w", err)
	}
	defer rows.Close()
	var out []FirmwareStats
	for rows.Next() {
		var st FirmwareStats
		if err := rows.Scan(&st.Model, &st.Firmware, &st.Devices, &st.DeviceHours, &st.Sessions, &st.PingDisconnects); err != nil {
			return nil, fmt.Errorf("firmware statistics: %w", err)
		}
		out = append(out, st)
	}
	return out, rows.Err()
}

// utcBin is the start of a time column's UTC minute or hour (unit): date_bin
// is plain arithmetic, where date_trunc with a time zone looks the zone up
// for every row.
func utcBin(unit, col string) string {
	return `date_bin('1 ` + unit + `', ` + col + `, TIMESTAMPTZ '2000-01-01 00:00:00+00')`
}

// offsetMicros is how far into its UTC minute a time column is, in µs: the
// float seconds of an interval under a minute are exact to far below a µs.
func offsetMicros(col string) string {
	return `round(date_part('epoch', ` + col + ` - ` + utcBin("minute", col) + `) * 1000000)::bigint`
}

// rollupStatements add the events an insert kept (device_events_new) to the
// rollups (migrations/00012_events_partitioned.sql says what each holds):
// connects open sessions, disconnects close them into sessions_ended_in,
// whose sessions are counted in session_rollups_minute and session_devices,
// every event is counted in event_rollups_minute and _hour and, without
// model and replica, in fleet_counts_minute and _hour, by kind and reason
// only in history_minute and _hour, and disconnects with
// a link in link_rollups_hour (migrations/00014). They run in
// this order, and each locks its rows in key order (ORDER BY), so that
// writers of several replicas queue on the rows they share (those of the
// current minute and hour) instead of deadlocking.
var rollupStatements = []string{
	`WITH opened AS (
		INSERT INTO sessions_open (device_id, session_epoch, started_at, model, firmware)
		SELECT device_id, session_epoch, at, model, firmware FROM device_events_new WHERE kind = 'connect'
		ORDER BY device_id, session_epoch, at
		ON CONFLICT (device_id, session_epoch) DO NOTHING
		RETURNING device_id, model, firmware)
	INSERT INTO sessions_opened_in SELECT * FROM opened`,

	`WITH closed AS (
		DELETE FROM sessions_open o USING device_events_new d
		WHERE d.kind = 'disconnect' AND o.device_id = d.device_id AND o.session_epoch = d.session_epoch
		RETURNING o.device_id, o.started_at, d.at, coalesce(nullif(d.model, ''), o.model), coalesce(nullif(d.firmware, ''), o.firmware),
			` + pingDisconnectSQL + `, o.model, o.firmware)
	INSERT INTO sessions_ended_in SELECT * FROM closed`,

	`INSERT INTO session_rollups_minute AS r (minute, model, firmware, ended, ping_disconnects, end_offset_us, started, start_offset_us)
	SELECT minute, model, firmware, sum(ended), sum(ping), sum(end_us), sum(started), sum(start_us) FROM (
		SELECT ` + utcBin("minute", "ended_at") + ` AS minute, model, firmware, 1 AS ended, ping::int AS ping,
			` + offsetMicros("ended_at") + ` AS end_us, 0 AS started, 0::bigint AS start_us
		FROM sessions_ended_in
		UNION ALL
		SELECT ` + utcBin("minute", "started_at") + `, model, firmware, 0, 0, 0, 1, ` + offsetMicros("started_at") + `
		FROM sessions_ended_in
	) s
	GROUP BY minute, model, firmware ORDER BY minute, model, firmware
	ON CONFLICT (minute, model, firmware) DO UPDATE SET ended = r.ended + EXCLUDED.ended,
		ping_disconnects = r.ping_disconnects + EXCLUDED.ping_disconnects, end_offset_us = r.end_offset_us + EXCLUDED.end_offset_us,
		started = r.started + EXCLUDED.started, start_offset_us = r.start_offset_us + EXCLUDED.start_offset_us`,

	// One statement for the opened and the ended sessions: two would lock
	// rows of session_devices in two passes, and two writers could then
	// each hold a row the other's second pass waits for.
	`INSERT INTO session_devices AS s (model, firmware, device_id, last_end, open_sessions)
	SELECT model, firmware, device_id, max(last_end), sum(opened) FROM (
		SELECT model, firmware, device_id, '-infinity'::timestamptz AS last_end, 1 AS opened FROM sessions_opened_in
		UNION ALL
		SELECT open_model, open_firmware, device_id, '-infinity', -1 FROM sessions_ended_in
		UNION ALL
		SELECT model, firmware, device_id, ended_at, 0 FROM sessions_ended_in
	) c
	GROUP BY model, firmware, device_id ORDER BY model, firmware, device_id
	ON CONFLICT (model, firmware, device_id) DO UPDATE SET last_end = greatest(s.last_end, EXCLUDED.last_end),
		open_sessions = s.open_sessions + EXCLUDED.open_sessions
	WHERE s.last_end < EXCLUDED.last_end OR EXCLUDED.open_sessions <> 0`,

	// A session that ended on another firmware than it opened on (a birth
	// or an upgrade in between) leaves its opening row with nothing: no
	// session ended on it, none open. The rows are those the statement above
	// locked, so this takes no new lock.
	`DELETE FROM session_devices s USING sessions_ended_in e
	WHERE s.model = e.open_model AND s.firmware = e.open_firmware AND s.device_id = e.device_id
		AND s.open_sessions = 0 AND s.last_end = '-infinity'`,

	eventRollupSQL("event_rollups_minute", "minute"),
	eventRollupSQL("event_rollups_hour", "hour"),
	fleetCountSQL("fleet_counts_minute", "minute"),
	fleetCountSQL("fleet_counts_hour", "hour"),
	historySQL("history_minute", "minute"),
	historySQL("history_hour", "hour"),

	`INSERT INTO link_rollups_hour AS r (hour, model, channel, bssid, rssi_bucket, ended, lost, roam_lost, connected_us)
	SELECT ` + utcBin("hour", "at") + `, model, coalesce(link_channel, 0), coalesce(link_bssid, ''),
		coalesce(floor(link_rssi / 5.0)::int * 5, 0), count(*), count(*) FILTER (WHERE ` + linkLostSQL + `),
		count(*) FILTER (WHERE ` + linkLostSQL + ` AND ` + roamedSQL + `), sum(duration_ms) * 1000
	FROM device_events_new
	WHERE kind = 'disconnect' AND (link_rssi IS NOT NULL OR link_channel IS NOT NULL OR link_bssid IS NOT NULL)
	GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5
	ON CONFLICT (hour, model, channel, bssid, rssi_bucket) DO UPDATE SET ended = r.ended + EXCLUDED.ended,
		lost = r.lost + EXCLUDED.lost, roam_lost = r.roam_lost + EXCLUDED.roam_lost, connected_us = r.connected_us + EXCLUDED.connected_us`,
}

// linkLostSQL is LostOnLink as SQL over device_events, roamedSQL a lost
// session's end RoamedAtEnd.
var (
	linkLostSQL = `reason IN ('` + string(ReasonConnectionLost) + `', '` + string(ReasonKeepaliveTimeout) + `')`
	roamedSQL   = fmt.Sprintf(`coalesce(link_roam_ms, 0) BETWEEN 1 AND %d`, RoamDropWindow.Milliseconds())
)

func eventRollupSQL(table, unit string) string {
	return `INSERT INTO ` + table + ` AS r (` + unit + `, firmware, model, protocol_version, broker_node, kind, reason, count)
	SELECT ` + utcBin(unit, "at") + `, firmware, model, protocol_version, broker_node, kind, reason, count(*)
	FROM device_events_new GROUP BY 1, 2, 3, 4, 5, 6, 7 ORDER BY 1, 2, 3, 4, 5, 6, 7
	ON CONFLICT (` + unit + `, firmware, model, protocol_version, broker_node, kind, reason) DO UPDATE SET count = r.count + EXCLUDED.count`
}

func fleetCountSQL(table, unit string) string {
	return `INSERT INTO ` + table + ` AS r (` + unit + `, kind, reason, firmware, protocol_version, count)
	SELECT ` + utcBin(unit, "at") + `, kind, reason, firmware, protocol_version, count(*)
	FROM device_events_new GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5
	ON CONFLICT (` + unit + `, kind, reason, firmware, protocol_version) DO UPDATE SET count = r.count + EXCLUDED.count`
}

func historySQL(table, unit string) string {
	return `INSERT INTO ` + table + ` AS r (` + unit + `, kind, reason, count)
	SELECT ` + utcBin(unit, "at") + `, kind, reason, count(*)
	FROM device_events_new GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
	ON CONFLICT (` + unit + `, kind, reason) DO UPDATE SET count = r.count + EXCLUDED.count`
}

// rollUp runs rollupStatements in the writer's transaction, in one round trip.
func rollUp(ctx context.Context, tx pgx.Tx) error {
	b := &pgx.Batch{}
	for _, q := range rollupStatements {
		b.Queue(q)
	}
	if err := tx.SendBatch(ctx, b).Close(); err != nil {
		return fmt.Errorf("update rollups: %w", err)
	}
	return nil
}

// disconnectCounts counts disconnects since a time by firmware, protocol and
// reason, from the top of since's minute: the minute rollups up to the next
// full hour, the hourly ones from there. Both are current to the last batch
// written, so the hour under way is complete too.
func (s *Store) disconnectCounts(ctx context.Context, since time.Time) ([]DisconnectCount, error) {
	from := since.UTC().Truncate(time.Minute)
	hour := from.Truncate(time.Hour)
	if hour.Before(from) {
		hour = hour.Add(time.Hour)
	}
	rows, err := s.pool.Query(ctx, `
		SELECT firmware, protocol_version, reason, sum(count)::bigint FROM (
			SELECT firmware, protocol_version, reason, count FROM fleet_counts_minute
			WHERE kind = 'disconnect' AND minute >= $1 AND minute < $2
			UNION ALL
			SELECT firmware, protocol_version, reason, count FROM fleet_counts_hour
			WHERE kind = 'disconnect' AND hour >= $2
		) r GROUP BY 1, 2, 3 ORDER BY 4 DESC, 1, 2, 3`, from, hour)
	if err != nil {
		return nil, fmt.Errorf("disconnect counts: %w", err)
	}
	defer rows.Close()
	out := []DisconnectCount{}
	for rows.Next() {
		var c DisconnectCount
		var proto int16
		var reason string
		if err := rows.Scan(&c.Firmware, &proto, &reason, &c.Count); err != nil {
			return nil, fmt.Errorf("disconnect counts: %w", err)
		}
		c.Protocol, c.Reason = Protocol(proto), Reason(reason)
		out = append(out, c)
	}
	return out, rows.Err()
}

// historyCounts sums connects, disconnects and refusals per bucket of step
// (aligned on UTC; from is the start of a bucket) in [from, to): from the
// minute rollups for steps under an hour, else from the hourly ones. It
// calls add for each (bucket, kind, reason) with events.
func (s *Store) historyCounts(ctx context.Context, from, to time.Time, step time.Duration, add func(bucket time.Time, kind Kind, reason Reason, n int64)) error {
	table, col := "history_minute", "minute"
	if step >= time.Hour {
		table, col = "history_hour", "hour"
	}
	rows, err := s.pool.Query(ctx, `
		SELECT date_bin(make_interval(secs => $3), `+col+`, TIMESTAMPTZ '2000-01-01 00:00:00+00'), kind, reason, sum(count)::bigint
		FROM `+table+`
		WHERE `+col+` >= $1 AND `+col+` < $2 AND kind IN ('connect', 'disconnect', 'refused')
		GROUP BY 1, 2, 3`, from, to, step.Seconds())
	if err != nil {
		return fmt.Errorf("fleet history: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var at time.Time
		var kind, reason string
		var n int64
		if err := rows.Scan(&at, &kind, &reason, &n); err != nil {
			return fmt.Errorf("fleet history: %w", err)
		}
		add(at, Kind(kind), Reason(reason), n)
	}
	return rows.Err()
}

// pingSamples returns recent ping-related disconnects of a firmware, as evidence.
func (s *Store) pingSamples(ctx context.Context, model, firmware string, since time.Time, n int) ([]Event, error) {
	rows, err := s.pool.Query(ctx, `SELECT d.device_id, d.at, d.reason, d.detail, d.pings, d.protocol_version, d.keepalive_effective
		FROM device_events d
		WHERE d.kind = 'disconnect' AND d.model = $1 AND d.firmware = $2 AND d.at >= $3 AND `+pingDisconnectSQL+`
		ORDER BY d.at DESC LIMIT $4`, model, firmware, since, n)
	if err != nil {
		return nil, fmt.Errorf("ping samples: %w", err)
	}
	defer rows.Close()
	var out []Event
	for rows.Next() {
		e := Event{Kind: KindDisconnect, Model: model, Firmware: firmware}
		var reason string
		var proto int16
		if err := rows.Scan(&e.DeviceID, &e.At, &reason, &e.Detail, &e.Pings, &proto, &e.KeepaliveEffective); err != nil {
			return nil, err
		}
		e.Reason, e.ProtocolVersion = Reason(reason), Protocol(proto)
		out = append(out, e)
	}
	return out, rows.Err()
}

// verdictsLock is the advisory lock that serialises saveLearned across
// replicas ("verdict" in ASCII), so that a flip is recorded once.
const verdictsLock = 0x76657264696374

// History kept per (model, firmware, flag), and shown with each verdict.
const (
	verdictHistoryKept  = 50
	verdictHistoryShown = 20
)

// learnedFirmware returns the groups whose learned verdict is in force: the
// flagged set LearnVerdicts starts from.
func (s *Store) learnedFirmware(ctx context.Context) (map[FirmwareKey]bool, error) {
	return learnedFirmware(ctx, s.pool)
}

func learnedFirmware(ctx context.Context, q interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}) (map[FirmwareKey]bool, error) {
	rows, err := q.Query(ctx, `SELECT model, firmware FROM firmware_verdicts WHERE learned AND flag = $1`, IncompatRejectsPings)
	if err != nil {
		return nil, fmt.Errorf("learned verdicts: %w", err)
	}
	defer rows.Close()
	out := map[FirmwareKey]bool{}
	for rows.Next() {
		var k FirmwareKey
		if err := rows.Scan(&k.Model, &k.Firmware); err != nil {
			return nil, fmt.Errorf("learned verdicts: %w", err)
		}
		out[k] = true
	}
	return out, rows.Err()
}

// saveLearned records what the analysis learned from the flagged set
// before: the verdicts in force now are stored learned, the others expire
// (kept with learned=false), and each flip is appended to the history —
// "flagged" for a group not learned before, "cleared" for one no longer
// learned — whose oldest rows beyond verdictHistoryKept are deleted.
//
// It saves nothing and returns false when the learned set in the database
// is no longer before: another replica saved its analysis in between, and
// one learned from a stale set would undo its flips.
func (s *Store) saveLearned(ctx context.Context, before map[FirmwareKey]bool, l Learned) (saved bool, err error) {
	defer s.changed()
	err = pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1)`, verdictsLock); err != nil {
			return fmt.Errorf("lock verdicts: %w", err)
		}
		prev, err := learnedFirmware(ctx, tx)
		if err != nil {
			return err
		}
		if !maps.Equal(prev, trueKeys(before)) {
			return nil
		}
		models, firmwares := make([]string, 0, len(l.Flagged)), make([]string, 0, len(l.Flagged))
		for _, v := range l.Flagged {
			models, firmwares = append(models, v.Model), append(firmwares, v.Firmware)
		}
		if _, err := tx.Exec(ctx, `
			UPDATE firmware_verdicts v SET learned = false, updated_at = now()
			WHERE v.learned AND v.flag = $3 AND NOT EXISTS (
				SELECT 1 FROM unnest($1::text[], $2::text[]) AS l(model, firmware)
				WHERE l.model = v.model AND l.firmware = v.firmware)`, models, firmwares, IncompatRejectsPings); err != nil {
			return fmt.Errorf("expire verdicts: %w", err)
		}
		for _, v := range l.Flagged {
			if _, err := tx.Exec(ctx, `
				INSERT INTO firmware_verdicts (model, firmware, flag, learned, evidence, learned_at)
				VALUES ($1, $2, $3, true, $4, now())
				ON CONFLICT (model, firmware, flag) DO UPDATE SET learned = true, evidence = EXCLUDED.evidence,
					learned_at = CASE WHEN firmware_verdicts.learned THEN firmware_verdicts.learned_at ELSE now() END,
					updated_at = now()`, v.Model, v.Firmware, v.Flag, v); err != nil {
				return fmt.Errorf("save verdict: %w", err)
			}
		}
		if err := appendFlips(ctx, tx, prev, l); err != nil {
			return err
		}
		saved = true
		return nil
	})
	return saved, err
}

// appendFlips appends a history row for each group whose learned state
// differs from prev and bounds the history of those groups.
func appendFlips(ctx context.Context, tx pgx.Tx, prev map[FirmwareKey]bool, l Learned) error {
	var models, firmwares, flags, changes, docs []string
	var rates, baselines []float64
	add := func(change string, v Verdict) {
		v.Samples = nil // the verdict row keeps the latest; history keeps the numbers
		doc, _ := json.Marshal(v)
		models, firmwares, flags = append(models, v.Model), append(firmwares, v.Firmware), append(flags, IncompatRejectsPings)
		changes, rates, baselines, docs = append(changes, change), append(rates, v.Rate), append(baselines, v.FleetRate), append(docs, string(doc))
	}
	now := map[FirmwareKey]bool{}
	for _, v := range l.Flagged {
		k := FirmwareKey{v.Model, v.Firmware}
		now[k] = true
		if !prev[k] {
			add("flagged", v)
		}
	}
	cleared := map[FirmwareKey]Verdict{}
	for _, v := range l.Cleared {
		cleared[FirmwareKey{v.Model, v.Firmware}] = v
	}
	gone := slices.SortedFunc(maps.Keys(prev), func(a, b FirmwareKey) int {
		return cmp.Or(cmp.Compare(a.Model, b.Model), cmp.Compare(a.Firmware, b.Firmware))
	})
	for _, k := range gone {
		if now[k] {
			continue
		}
		v, ok := cleared[k]
		if !ok {
			v = Verdict{Model: k.Model, Firmware: k.Firmware, Flag: IncompatRejectsPings, Evidence: "no longer learned"}
		}
		add("cleared", v)
	}
	if len(changes) == 0 {
		return nil
	}
	if _, err := tx.Exec(ctx, `
		INSERT INTO firmware_verdict_history (model, firmware, flag, change, rate, baseline, evidence)
		SELECT model, firmware, flag, change, rate, baseline, evidence::jsonb
		FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::float8[], $6::float8[], $7::text[])
			AS c(model, firmware, flag, change, rate, baseline, evidence)`,
		models, firmwares, flags, changes, rates, baselines, docs); err != nil {
		return fmt.Errorf("append verdict history: %w", err)
	}
	if _, err := tx.Exec(ctx, `
		DELETE FROM firmware_verdict_history h USING (
			SELECT id, row_number() OVER (PARTITION BY model, firmware, flag ORDER BY at DESC, id DESC) AS n
			FROM firmware_verdict_history
			WHERE (model, firmware, flag) IN (SELECT * FROM unnest($1::text[], $2::text[], $3::text[]))) old
		WHERE h.id = old.id AND old.n > $4`, models, firmwares, flags, verdictHistoryKept); err != nil {
		return fmt.Errorf("trim verdict history: %w", err)
	}
	return nil
}

// trueKeys drops the false entries of a set.
func trueKeys(set map[FirmwareKey]bool) map[FirmwareKey]bool {
	out := make(map[FirmwareKey]bool, len(set))
	for k, ok := range set {
		if ok {
			out[k] = true
		}
	}
	return out
}

// FirmwareVerdict is a verdict row: what was learned and what the operator
// decided.
type FirmwareVerdict struct {
	Model     string     `json:"model"`
	Firmware  string     `json:"firmware"`
	Flag      string     `json:"flag"`
	Learned   bool       `json:"learned"`
	Decision  string     `json:"decision"`
	Active    bool       `json:"active"`
	Evidence  *Verdict   `json:"evidence,omitempty"`
	LearnedAt *time.Time `json:"learned_at,omitempty"`
	UpdatedAt time.Time  `json:"updated_at"`
	// History holds the newest flips of the learned verdict, newest first
	// (at most 20; the database keeps 50).
	History []VerdictChange `json:"history"`
}

// VerdictChange is one flip of a learned verdict.
type VerdictChange struct {
	At time.Time `json:"at"`
	// Change is "flagged" or "cleared".
	Change string `json:"change"`
	// Rate and Baseline are the firmware's ping-related disconnects per
	// device-hour and what they were compared with (Verdict.FleetRate).
	Rate     float64 `json:"rate"`
	Baseline float64 `json:"baseline"`
	// Evidence is the verdict at the flip, without sample events; for a
	// "cleared" change its sentence says why it cleared.
	Evidence Verdict `json:"evidence"`
}

func (s *Store) verdicts(ctx context.Context) ([]FirmwareVerdict, error) {
	rows, err := s.pool.Query(ctx, `SELECT model, firmware, flag, learned, decision, evidence, learned_at, updated_at
		FROM firmware_verdicts ORDER BY model, firmware, flag`)
	if err != nil {
		return nil, fmt.Errorf("list verdicts: %w", err)
	}
	defer rows.Close()
	out := []FirmwareVerdict{}
	type key struct{ model, firmware, flag string }
	idx := map[key]int{}
	for rows.Next() {
		v := FirmwareVerdict{History: []VerdictChange{}}
		if err := rows.Scan(&v.Model, &v.Firmware, &v.Flag, &v.Learned, &v.Decision, &v.Evidence, &v.LearnedAt, &v.UpdatedAt); err != nil {
			return nil, fmt.Errorf("list verdicts: %w", err)
		}
		v.Active = v.Decision == "confirmed" || (v.Learned && v.Decision != "overridden")
		idx[key{v.Model, v.Firmware, v.Flag}] = len(out)
		out = append(out, v)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list verdicts: %w", err)
	}
	rows.Close()
	rows, err = s.pool.Query(ctx, `
		SELECT v.model, v.firmware, v.flag, h.at, h.change, h.rate, h.baseline, h.evidence
		FROM firmware_verdicts v CROSS JOIN LATERAL (
			SELECT id, at, change, rate, baseline, evidence FROM firmware_verdict_history h
			WHERE h.model = v.model AND h.firmware = v.firmware AND h.flag = v.flag
			ORDER BY h.at DESC, h.id DESC LIMIT $1) h
		ORDER BY v.model, v.firmware, v.flag, h.at DESC, h.id DESC`, verdictHistoryShown)
	if err != nil {
		return nil, fmt.Errorf("list verdict history: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var k key
		var c VerdictChange
		if err := rows.Scan(&k.model, &k.firmware, &k.flag, &c.At, &c.Change, &c.Rate, &c.Baseline, &c.Evidence); err != nil {
			return nil, fmt.Errorf("list verdict history: %w", err)
		}
		if i, ok := idx[k]; ok { // a row added between the two queries has no entry
			out[i].History = append(out[i].History, c)
		}
	}
	return out, rows.Err()
}

func (s *Store) decideVerdict(ctx context.Context, model, firmware, decision string) error {
	defer s.changed()
	_, err := s.pool.Exec(ctx, `
		INSERT INTO firmware_verdicts (model, firmware, flag, decision) VALUES ($1, $2, $3, $4)
		ON CONFLICT (model, firmware, flag) DO UPDATE SET decision = EXCLUDED.decision, updated_at = now()`,
		model, firmware, IncompatRejectsPings, decision)
	if err != nil {
		return fmt.Errorf("decide verdict: %w", err)
	}
	return nil
}

// compatGroup is what device evaluation reads: the active devices that
// share a model, a firmware, a protocol and the incompatibilities stored for
// them. A device's verdict depends on nothing else (judge), so the analysis
// judges a few hundred groups, not every device, and rewrites only the
// groups whose verdict changed.
type compatGroup struct {
	model, firmware string
	protocol        Protocol
	current         []byte // stored incompatibilities JSON, as PostgreSQL renders it
	devices         int
}

func (s *Store) compatGroups(ctx context.Context) ([]compatGroup, error) {
	rows, err := s.pool.Query(ctx, `SELECT model, firmware, protocol_version, incompatibilities::text, count(*)
		FROM devices WHERE state = 'active' GROUP BY 1, 2, 3, 4`)
	if err != nil {
		return nil, fmt.Errorf("load devices for compatibility: %w", err)
	}
	defer rows.Close()
	var out []compatGroup
	for rows.Next() {
		var g compatGroup
		var proto int16
		var cur string
		if err := rows.Scan(&g.model, &g.firmware, &proto, &cur, &g.devices); err != nil {
			return nil, fmt.Errorf("load devices for compatibility: %w", err)
		}
		g.protocol, g.current = Protocol(proto), []byte(cur)
		out = append(out, g)
	}
	return out, rows.Err()
}

// setCompat stores lists[i] as the incompatibilities of the devices still
// in groups[i]: a device whose model, firmware, protocol or stored verdict
// changed since the groups were read is left for the next analysis, which
// judges it as it is then. The devices are locked in id order first, as
// every writer of several devices does.
func (s *Store) setCompat(ctx context.Context, groups []compatGroup, lists [][]Incompatibility) error {
	defer s.changed()
	n := len(groups)
	models, firmware, protos, current := make([]string, n), make([]string, n), make([]int16, n), make([]string, n)
	flags, docs := make([]bool, n), make([]string, n)
	for i, g := range groups {
		l := nonNil(lists[i])
		b, _ := json.Marshal(l)
		models[i], firmware[i], protos[i], current[i] = g.model, g.firmware, int16(g.protocol), string(g.current)
		flags[i], docs[i] = len(l) > 0, string(b)
	}
	// One scan of devices finds and locks the rows (in id order, the
	// locking rows leave the sort in), the update then reaches them by id.
	// Devices that were compatible and are not any more are told of in the
	// same statement (the devices.incompatible notification, one per model
	// and firmware, with a sample of ids), so no change goes untold.
	_, err := s.pool.Exec(ctx, `
		WITH locked AS (
			SELECT d.id, d.model, d.firmware, d.incompatible AS was, g.inc, g.doc FROM devices d,
				unnest($1::text[], $2::text[], $3::int2[], $4::text[], $5::bool[], $6::text[]) AS g(model, firmware, proto, cur, inc, doc)
			WHERE d.state = 'active' AND d.model = g.model AND d.firmware = g.firmware AND d.protocol_version = g.proto
				AND d.incompatibilities::text = g.cur
			ORDER BY d.id FOR UPDATE OF d),
		upd AS (
			UPDATE devices d SET incompatible = l.inc, incompatibilities = l.doc::jsonb, updated_at = now()
			FROM locked l WHERE d.id = l.id
			RETURNING l.id, l.model, l.firmware, l.was, l.inc, l.doc)
		INSERT INTO notifications (type, payload)
		SELECT 'devices.incompatible', jsonb_build_object('model', model, 'firmware', firmware, 'devices', count(*),
			'sample', (array_agg(id ORDER BY id))[1:20], 'incompatibilities', (array_agg(doc))[1]::jsonb)
		FROM upd WHERE inc AND NOT was GROUP BY model, firmware`, models, firmware, protos, current, flags, docs)
	if err != nil {
		return fmt.Errorf("update compatibility: %w", err)
	}
	return nil
}

func (s *Store) eventsSince(ctx context.Context, deviceID string, since time.Time) ([]Event, error) {
	rows, err := s.pool.Query(ctx, `SELECT device_id, at, kind, reason, detail, firmware, model, session_epoch, protocol_version,
		keepalive_requested, keepalive_effective, remote_addr, pings, idle_ms, packets_in, bytes_in, duration_ms, max_silence_ms,
		`+linkColumnsSQL+`
		FROM device_events WHERE device_id = $1 AND at >= $2 ORDER BY at DESC LIMIT 5000`, deviceID, since)
	if err != nil {
		return nil, fmt.Errorf("events of %s: %w", deviceID, err)
	}
	defer rows.Close()
	var out []Event
	for rows.Next() {
		var e Event
		var kind, reason string
		var proto int16
		if err := rows.Scan(&e.DeviceID, &e.At, &kind, &reason, &e.Detail, &e.Firmware, &e.Model, &e.SessionEpoch, &proto,
			&e.KeepaliveRequested, &e.KeepaliveEffective, &e.RemoteAddr, &e.Pings, &e.IdleMillis,
			&e.PacketsIn, &e.BytesIn, &e.DurationMillis, &e.MaxSilenceMillis, &e.RSSI, &e.Channel, &e.BSSID, &e.FirstBSSID, &e.RoamMillis); err != nil {
			return nil, err
		}
		e.Kind, e.Reason, e.ProtocolVersion = Kind(kind), Reason(reason), Protocol(proto)
		out = append(out, e)
	}
	return out, rows.Err()
}

// FleetHealth is the fleet at a glance.
type FleetHealth struct {
	Devices struct {
		Total   int `json:"total"`
		Online  int `json:"online"`
		Offline int `json:"offline"`
	} `json:"devices"`
	// Disconnects counts disconnect reasons by firmware × protocol version,
	// from the rollups: each window starts at the top of its minute.
	Disconnects struct {
		LastHour []DisconnectCount `json:"last_hour"`
		LastDay  []DisconnectCount `json:"last_day"`
	} `json:"disconnects"`
	Incompatible struct {
		Devices  int            `json:"devices"`
		ByReason map[string]int `json:"by_reason"`
	} `json:"incompatible"`
	Flapping        []FlappingDevice  `json:"flapping"`
	FlaggedFirmware []FirmwareVerdict `json:"flagged_firmware"`
}

// DisconnectCount is one cell of the disconnects table.
type DisconnectCount struct {
	Firmware string   `json:"firmware"`
	Protocol Protocol `json:"protocol_version"`
	Reason   Reason   `json:"reason"`
	Count    int      `json:"count"`
}

// FlappingDevice is a device with too many sessions in the flapping window.
type FlappingDevice struct {
	ID             string `json:"id"`
	Sessions       int    `json:"sessions"`
	DominantReason Reason `json:"dominant_reason"`
}

func (s *Store) fleetHealth(ctx context.Context, now time.Time, p DiagnosisPolicy) (FleetHealth, error) {
	var h FleetHealth
	// Five independent reads, run side by side (on at most three pooled
	// connections, so that the event writer keeps one): the request costs
	// the slowest of them rather than their sum.
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(3)
	g.Go(func() error {
		err := s.pool.QueryRow(gctx, `SELECT count(*), count(*) FILTER (WHERE online), count(*) FILTER (WHERE incompatible)
			FROM devices WHERE state = 'active'`).Scan(&h.Devices.Total, &h.Devices.Online, &h.Incompatible.Devices)
		if err != nil {
			return fmt.Errorf("count devices: %w", err)
		}
		h.Devices.Offline = h.Devices.Total - h.Devices.Online
		return nil
	})
	// From the rollups: a day of disconnects costs a few thousand rows,
	// however many events the day had.
	g.Go(func() (err error) {
		h.Disconnects.LastHour, err = s.disconnectCounts(gctx, now.Add(-time.Hour))
		return err
	})
	g.Go(func() (err error) {
		h.Disconnects.LastDay, err = s.disconnectCounts(gctx, now.Add(-24*time.Hour))
		return err
	})
	g.Go(func() error {
		h.Incompatible.ByReason = map[string]int{}
		rows, err := s.pool.Query(gctx, `SELECT r->>'reason', count(DISTINCT d.id) FROM devices d, jsonb_array_elements(d.incompatibilities) r
			WHERE d.incompatible AND d.state = 'active' GROUP BY 1`)
		if err != nil {
			return fmt.Errorf("incompatible devices: %w", err)
		}
		defer rows.Close()
		for rows.Next() {
			var reason string
			var n int
			if err := rows.Scan(&reason, &n); err != nil {
				return fmt.Errorf("incompatible devices: %w", err)
			}
			h.Incompatible.ByReason[reason] = n
		}
		return rows.Err()
	})
	// Per device, so from the events; bounded by the flapping window (ten
	// minutes), which the partitions and the at index keep small.
	g.Go(func() error {
		rows, err := s.pool.Query(gctx, `
			SELECT device_id, count(*) FILTER (WHERE kind = 'connect'),
				coalesce(mode() WITHIN GROUP (ORDER BY reason) FILTER (WHERE kind = 'disconnect'), '')
			FROM device_events WHERE at >= $1 AND kind IN ('connect', 'disconnect')
			GROUP BY device_id HAVING count(*) FILTER (WHERE kind = 'connect') > $2
			ORDER BY 2 DESC, 1 LIMIT 100`, now.Add(-p.FlapWindow), p.FlapSessions)
		if err != nil {
			return fmt.Errorf("flapping devices: %w", err)
		}
		defer rows.Close()
		h.Flapping = []FlappingDevice{}
		for rows.Next() {
			var f FlappingDevice
			var reason string
			if err := rows.Scan(&f.ID, &f.Sessions, &reason); err != nil {
				return fmt.Errorf("flapping devices: %w", err)
			}
			f.DominantReason = Reason(reason)
			h.Flapping = append(h.Flapping, f)
		}
		return rows.Err()
	})
	return h, g.Wait()
}

func (s *Store) candidates(ctx context.Context, models, tags []string, incompatibleOnly bool) ([]Candidate, error) {
	if tags == nil {
		tags = []string{}
	}
	rows, err := s.pool.Query(ctx, `SELECT id, model, firmware FROM devices
		WHERE state = 'active' AND (cardinality($1::text[]) = 0 OR model = ANY($1)) AND tags @> $2::text[]
			AND (NOT $3 OR incompatible)
		ORDER BY id`, models, tags, incompatibleOnly)
	if err != nil {
		return nil, fmt.Errorf("select candidates: %w", err)
	}
	defer rows.Close()
	var out []Candidate
	for rows.Next() {
		var c Candidate
		if err := rows.Scan(&c.ID, &c.Model, &c.Firmware); err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	return out, rows.Err()
}

// tryAdvisoryLock takes a session advisory lock on one pooled connection if
// it is free; release gives it and the connection back. A replica that dies
// holding it loses it with its connection.
func (s *Store) tryAdvisoryLock(ctx context.Context, key advisory.Key) (release func(), ok bool, err error) {
	conn, err := s.pool.Acquire(ctx)
	if err != nil {
		return nil, false, fmt.Errorf("advisory lock: %w", err)
	}
	if err := conn.QueryRow(ctx, `SELECT pg_try_advisory_lock($1)`, int64(key)).Scan(&ok); err != nil || !ok {
		conn.Release()
		if err != nil {
			return nil, false, fmt.Errorf("advisory lock: %w", err)
		}
		return nil, false, nil
	}
	return func() {
		if _, err := conn.Exec(context.Background(), `SELECT pg_advisory_unlock($1)`, int64(key)); err != nil {
			conn.Conn().Close(context.Background()) // the lock goes with the session
		}
		conn.Release()
	}, true, nil
}

func (s *Store) countIncompatible(ctx context.Context) (int, error) {
	var n int
	err := s.pool.QueryRow(ctx, `SELECT count(*) FROM devices WHERE incompatible AND state = 'active'`).Scan(&n)
	if err != nil {
		return 0, fmt.Errorf("count incompatible devices: %w", err)
	}
	return n, nil
}
