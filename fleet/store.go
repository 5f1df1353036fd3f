package fleet

import (
	"context"
	"errors"
	"fmt"
	"math"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Store is the registry's PostgreSQL access: all of the fleet package's SQL
// lives in this file.
type Store struct {
	pool *pgxpool.Pool
	// gen counts the changes made through this store to what fleet health
	// shows besides presence and events (devices registered, changed or
	// decommissioned, compatibility, verdicts, policy): a cached fleet
	// health older than one of them is not served.
	gen atomic.Uint64
}

// changed records a change for gen.
func (s *Store) changed() { s.gen.Add(1) }

// NewStore wraps a pool.
func NewStore(pool *pgxpool.Pool) *Store { return &Store{pool: pool} }

const deviceColumns = `id, model, tags, state, firmware, protocol_version, online, session_epoch,
	connected_at, disconnected_at, last_seen, last_disconnect, keepalive_requested, keepalive_effective,
	remote_addr, tls_version, listener, broker_node, created_at, updated_at, decommissioned_at, incompatible, incompatibilities`

func scanDevice(row pgx.Row) (Device, error) {
	var d Device
	var proto int16
	err := row.Scan(&d.ID, &d.Model, &d.Tags, &d.State, &d.Firmware, &proto, &d.Online, &d.SessionEpoch,
		&d.ConnectedAt, &d.DisconnectedAt, &d.LastSeen, &d.LastDisconnect, &d.KeepaliveRequested, &d.KeepaliveEffective,
		&d.RemoteAddr, &d.TLSVersion, &d.Listener, &d.BrokerNode, &d.CreatedAt, &d.UpdatedAt, &d.DecommissionedAt,
		&d.Incompatible, &d.Incompatibilities)
	d.ProtocolVersion = Protocol(proto)
	if d.Tags == nil {
		d.Tags = []string{}
	}
	if d.Incompatibilities == nil {
		d.Incompatibilities = []Incompatibility{}
	}
	if errors.Is(err, pgx.ErrNoRows) {
		return d, ErrNotFound
	}
	return d, err
}

// insertDevice registers a device, or reactivates a decommissioned one with a
// fresh credential and a clean presence. An active device with the same id is
// ErrConflict. session_epoch is kept so that epochs stay monotonic per id.
func (s *Store) insertDevice(ctx context.Context, n NewDevice, tokenHash []byte) (Device, error) {
	defer s.changed()
	tags := n.Tags
	if tags == nil {
		tags = []string{}
	}
	d, err := scanDevice(s.pool.QueryRow(ctx, `
		INSERT INTO devices (id, model, tags, token_hash) VALUES ($1, $2, $3, $4)
		ON CONFLICT (id) DO UPDATE SET
			model = EXCLUDED.model, tags = EXCLUDED.tags, token_hash = EXCLUDED.token_hash,
			state = 'active', firmware = '', protocol_version = 0, online = false,
			connected_at = NULL, disconnected_at = NULL, last_seen = NULL, last_disconnect = '',
			keepalive_requested = 0, keepalive_effective = 0, remote_addr = '', tls_version = '',
			listener = '', broker_node = '', created_at = now(), updated_at = now(), decommissioned_at = NULL,
			incompatible = false, incompatibilities = '[]'
		WHERE devices.state = 'decommissioned'
		RETURNING `+deviceColumns, n.ID, n.Model, tags, tokenHash))
	if errors.Is(err, ErrNotFound) {
		return d, fmt.Errorf("device %s is already registered: %w", n.ID, ErrConflict)
	}
	if err != nil {
		return d, fmt.Errorf("insert device %s: %w", n.ID, err)
	}
	return d, nil
}

func (s *Store) getDevice(ctx context.Context, id string) (Device, error) {
	d, err := scanDevice(s.pool.QueryRow(ctx, `SELECT `+deviceColumns+` FROM devices WHERE id = $1`, id))
	if errors.Is(err, ErrNotFound) {
		return d, fmt.Errorf("device %s: %w", id, ErrNotFound)
	}
	return d, err
}

// listDevices returns up to f.Limit devices with ids after f.After, in id
// order (keyset paging: stable under concurrent inserts, no OFFSET scans).
func (s *Store) listDevices(ctx context.Context, f Filter) ([]Device, error) {
	var where []string
	var args []any
	arg := func(v any) string { args = append(args, v); return fmt.Sprintf("$%d", len(args)) }
	if f.State != "all" {
		where = append(where, "state = "+arg(f.State))
	}
	switch f.Status {
	case "online":
		where = append(where, "online")
	case "offline":
		where = append(where, "NOT online")
	}
	if f.Model != "" {
		where = append(where, "model = "+arg(f.Model))
	}
	if f.Firmware != "" {
		where = append(where, "firmware = "+arg(f.Firmware))
	}
	if f.Protocol != 0 {
		where = append(where, "protocol_version = "+arg(int16(f.Protocol)))
	}
	switch f.Compat {
	case "incompatible":
		where = append(where, "incompatible")
	case "compatible":
		where = append(where, "NOT incompatible")
	}
	if f.Tag != "" {
		where = append(where, arg(f.Tag)+" = ANY(tags)")
	}
	if f.After != "" {
		where = append(where, "id > "+arg(f.After))
	}
	q := `SELECT ` + deviceColumns + ` FROM devices`
	if len(where) > 0 {
		q += " WHERE " + strings.Join(where, " AND ")
	}
	q += " ORDER BY id LIMIT " + arg(f.Limit)
	rows, err := s.pool.Query(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("list devices: %w", err)
	}
	defer rows.Close()
	out := []Device{}
	for rows.Next() {
		d, err := scanDevice(rows)
		if err != nil {
			return nil, fmt.Errorf("list devices: %w", err)
		}
		out = append(out, d)
	}
	return out, rows.Err()
}

func (s *Store) updateDevice(ctx context.Context, id string, p Patch) (Device, error) {
	defer s.changed()
	var tags *[]string
	if p.Tags != nil {
		t := *p.Tags
		if t == nil {
			t = []string{}
		}
		tags = &t
	}
	d, err := scanDevice(s.pool.QueryRow(ctx, `
		UPDATE devices SET model = COALESCE($2, model), tags = COALESCE($3, tags), updated_at = now()
		WHERE id = $1 AND state = 'active'
		RETURNING `+deviceColumns, id, p.Model, tags))
	if errors.Is(err, ErrNotFound) {
		return d, fmt.Errorf("active device %s: %w", id, ErrNotFound)
	}
	return d, err
}

func (s *Store) setTokenHash(ctx context.Context, id string, hash []byte) error {
	tag, err := s.pool.Exec(ctx, `UPDATE devices SET token_hash = $2, updated_at = now() WHERE id = $1 AND state = 'active'`, id, hash)
	if err != nil {
		return fmt.Errorf("rotate token of %s: %w", id, err)
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("active device %s: %w", id, ErrNotFound)
	}
	return nil
}

func (s *Store) decommission(ctx context.Context, id string) (Device, error) {
	defer s.changed()
	d, err := scanDevice(s.pool.QueryRow(ctx, `
		UPDATE devices SET state = 'decommissioned', token_hash = NULL, online = false,
			decommissioned_at = now(), updated_at = now()
		WHERE id = $1 AND state = 'active'
		RETURNING `+deviceColumns, id))
	if errors.Is(err, ErrNotFound) {
		return d, fmt.Errorf("active device %s: %w", id, ErrNotFound)
	}
	return d, err
}

// credential is what authentication needs to know about a device.
type credential struct {
	hash     []byte
	state    string
	firmware string
	model    string
}

func (s *Store) credential(ctx context.Context, id string) (credential, error) {
	var c credential
	err := s.pool.QueryRow(ctx, `SELECT coalesce(token_hash, ''::bytea), state, firmware, model FROM devices WHERE id = $1`, id).
		Scan(&c.hash, &c.state, &c.firmware, &c.model)
	if errors.Is(err, pgx.ErrNoRows) {
		return c, ErrNotFound
	}
	return c, err
}

// linkColumnsSQL reads the link columns of device_events, NULL as zero, in
// SessionLink's order.
const linkColumnsSQL = `coalesce(link_rssi, 0)::int, coalesce(link_channel, 0)::int, coalesce(link_bssid, ''),
	coalesce(link_first_bssid, ''), coalesce(link_roam_ms, 0)`

var eventColumns = []string{"id", "device_id", "at", "kind", "reason", "detail", "firmware", "model",
	"session_epoch", "protocol_version", "keepalive_requested", "keepalive_effective", "clean_start",
	"remote_addr", "tls_version", "listener", "broker_node", "pings", "idle_ms", "packets_in", "bytes_in", "duration_ms", "max_silence_ms",
	"link_rssi", "link_channel", "link_bssid", "link_first_bssid", "link_roam_ms"}

// eventRow is an event as the values of eventColumns.
func eventRow(e *Event) []any {
	return []any{[16]byte(e.ID), e.DeviceID, e.At, string(e.Kind), string(e.Reason), e.Detail, e.Firmware, e.Model,
		e.SessionEpoch, int16(e.ProtocolVersion), int32(e.KeepaliveRequested), int32(e.KeepaliveEffective), e.CleanStart,
		e.RemoteAddr, e.TLSVersion, e.Listener, e.BrokerNode, clamp32(e.Pings), clamp32(e.IdleMillis), clamp32(e.PacketsIn), e.BytesIn, e.DurationMillis, clamp32(e.MaxSilenceMillis),
		nullIf0(int16(max(min(e.RSSI, 0), -200))), nullIf0(int16(min(max(e.Channel, 0), 255))), nullIfEmpty(e.BSSID), nullIfEmpty(e.FirstBSSID), nullIf0(max(e.RoamMillis, 0))}
}

// nullIf0 and nullIfEmpty store an unreported link field as NULL.
func nullIf0[T int16 | int64](v T) any {
	if v == 0 {
		return nil
	}
	return v
}

func nullIfEmpty(s string) any {
	if s == "" {
		return nil
	}
	return s
}

// clamp32 fits a counter into an integer column: a session idle for 25 days
// or sending 2^31 packets must not wrap into a negative number.
func clamp32(n int) int32 {
	return int32(min(max(n, 0), math.MaxInt32))
}

// writeEvents stores a batch of events, applies their effect on presence and
// updates the rollups, in one transaction. Events are copied into a
// temporary table and inserted with ON CONFLICT DO NOTHING, so writing a
// batch twice (a replay after an outage) stores each event once; the rows
// that insert returned, and only those, feed the rollups (rollUp), so a
// replay counts nothing twice either; the presence updates are guarded by
// session epochs, so applying them twice changes nothing.
//
// device_events has a partition per day and no default partition. An event
// for a day without one (the maintenance loop has not run for a week, a
// device clock far off, a spool replayed after the retention) makes the
// insert fail with "no partition of relation found for row"; the batch is
// then retried after its days' partitions are created, so such an event is
// stored like any other (and, past the retention, dropped with its day by
// the next maintenance pass) instead of being refused as bad data and
// dead-lettered. The ordinary write pays nothing for this.
func (s *Store) writeEvents(ctx context.Context, events []Event) error {
	for attempt := 1; ; attempt++ {
		err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error { return writeEventsTx(ctx, tx, events) })
		// More than one attempt only if a partition is dropped meanwhile.
		if attempt == 3 || !isMissingPartition(err, "device_events") {
			return err
		}
		if err := s.createEventPartitions(ctx, eventDays(events)); err != nil {
			return err
		}
	}
}

// eventTempTables are the writer's temporary tables, created once per
// connection and emptied at each commit: the batch as copied, the events
// the insert kept, and the sessions those events opened and ended.
const eventTempTables = `
	CREATE TEMP TABLE IF NOT EXISTS device_events_in (LIKE device_events) ON COMMIT DELETE ROWS;
	CREATE TEMP TABLE IF NOT EXISTS device_events_new (LIKE device_events) ON COMMIT DELETE ROWS;
	CREATE TEMP TABLE IF NOT EXISTS sessions_opened_in (device_id text, model text, firmware text) ON COMMIT DELETE ROWS;
	CREATE TEMP TABLE IF NOT EXISTS sessions_ended_in (device_id text, started_at timestamptz, ended_at timestamptz,
		model text, firmware text, ping boolean, open_model text, open_firmware text) ON COMMIT DELETE ROWS`

func writeEventsTx(ctx context.Context, tx pgx.Tx, events []Event) error {
	if _, err := tx.Exec(ctx, eventTempTables); err != nil {
		return fmt.Errorf("prepare event copy: %w", err)
	}
	_, err := tx.CopyFrom(ctx, pgx.Identifier{"device_events_in"}, eventColumns, pgx.CopyFromSlice(len(events), func(i int) ([]any, error) {
		return eventRow(&events[i]), nil
	}))
	if err != nil {
		return fmt.Errorf("copy events: %w", err)
	}
	if _, err := tx.Exec(ctx, `
		WITH kept AS (INSERT INTO device_events SELECT * FROM device_events_in ON CONFLICT (id, at) DO NOTHING RETURNING *)
		INSERT INTO device_events_new SELECT * FROM kept`); err != nil {
		return fmt.Errorf("insert events: %w", err)
	}
	if err := applyPresence(ctx, tx, collapsePresence(events)); err != nil {
		return err
	}
	// Last: the rollup rows of the current minute and hour are shared by
	// every writer (every replica's), so they are locked for as short a time
	// as possible.
	return rollUp(ctx, tx)
}

// writeDeadLetter keeps an event PostgreSQL refused, so that an operator can
// see what a device sent and why it was refused. The event is written once:
// an event refused again (a replayed spool) keeps its first row, and added
// is false.
func (s *Store) writeDeadLetter(ctx context.Context, d deadLetter) (added bool, err error) {
	tag, err := s.pool.Exec(ctx, `
		INSERT INTO event_dead_letters (event_id, event, event_bytes, error) VALUES ($1, $2, $3, $4)
		ON CONFLICT (event_id) DO NOTHING`, [16]byte(d.EventID), d.Event, d.EventBytes, d.Error)
	if err != nil {
		return false, fmt.Errorf("insert dead letter %s: %w", d.EventID, err)
	}
	return tag.RowsAffected() == 1, nil
}

// presenceChange is the net effect of a batch of events on the devices table.
type presenceChange struct {
	connects    map[string]*Event // the newest connect per device
	disconnects map[string]*Event // the disconnect with the highest epoch per device
	births      map[string]*Event // the last birth per device
}

// collapsePresence reduces a batch to one connect, one disconnect and one
// birth per device. It is enough: a connect applies only if its epoch is newer
// than the stored one, and a disconnect only if its epoch is the stored one
// (after the connects), so older events in the batch could not apply anyway.
func collapsePresence(events []Event) presenceChange {
	pc := presenceChange{connects: map[string]*Event{}, disconnects: map[string]*Event{}, births: map[string]*Event{}}
	for i := range events {
		e := &events[i]
		switch e.Kind {
		case KindConnect:
			if cur, ok := pc.connects[e.DeviceID]; !ok || e.SessionEpoch > cur.SessionEpoch {
				pc.connects[e.DeviceID] = e
			}
		case KindDisconnect:
			if cur, ok := pc.disconnects[e.DeviceID]; !ok || e.SessionEpoch >= cur.SessionEpoch {
				pc.disconnects[e.DeviceID] = e
			}
		case KindBirth:
			pc.births[e.DeviceID] = e
		}
	}
	return pc
}

func applyPresence(ctx context.Context, tx pgx.Tx, pc presenceChange) error {
	// Every writer of device rows (this one, last_seen, the analysis, other
	// replicas' writers) takes their locks in id order first, so that two of
	// them updating overlapping devices queue instead of deadlocking.
	if err := lockDevices(ctx, tx, pc.deviceIDs()); err != nil {
		return err
	}
	if n := len(pc.connects); n > 0 {
		ids, epochs, ats := make([]string, 0, n), make([]int64, 0, n), make([]time.Time, 0, n)
		protos, kaReq, kaEff := make([]int16, 0, n), make([]int32, 0, n), make([]int32, 0, n)
		remotes, tlss, listeners, nodes, firmwares := make([]string, 0, n), make([]string, 0, n), make([]string, 0, n), make([]string, 0, n), make([]string, 0, n)
		for _, e := range pc.connects {
			ids, epochs, ats = append(ids, e.DeviceID), append(epochs, e.SessionEpoch), append(ats, e.At)
			protos, kaReq, kaEff = append(protos, int16(e.ProtocolVersion)), append(kaReq, int32(e.KeepaliveRequested)), append(kaEff, int32(e.KeepaliveEffective))
			remotes, tlss, listeners, nodes, firmwares = append(remotes, e.RemoteAddr), append(tlss, e.TLSVersion), append(listeners, e.Listener), append(nodes, e.BrokerNode), append(firmwares, e.Firmware)
		}
		_, err := tx.Exec(ctx, `
			UPDATE devices d SET online = true, session_epoch = c.epoch, connected_at = c.at,
				last_seen = GREATEST(d.last_seen, c.at), protocol_version = c.proto,
				keepalive_requested = c.ka_req, keepalive_effective = c.ka_eff, remote_addr = c.remote,
				tls_version = c.tls, listener = c.listener, broker_node = c.node,
				firmware = CASE WHEN c.firmware <> '' THEN c.firmware ELSE d.firmware END, updated_at = now()
			FROM unnest($1::text[], $2::bigint[], $3::timestamptz[], $4::smallint[], $5::int[], $6::int[],
				$7::text[], $8::text[], $9::text[], $10::text[], $11::text[])
				AS c(id, epoch, at, proto, ka_req, ka_eff, remote, tls, listener, node, firmware)
			WHERE d.id = c.id AND d.session_epoch < c.epoch AND d.state = 'active'`,
			ids, epochs, ats, protos, kaReq, kaEff, remotes, tlss, listeners, nodes, firmwares)
		if err != nil {
			return fmt.Errorf("apply connects: %w", err)
		}
	}
	if n := len(pc.births); n > 0 {
		ids, firmwares, models := make([]string, 0, n), make([]string, 0, n), make([]string, 0, n)
		for _, e := range pc.births {
			ids, firmwares, models = append(ids, e.DeviceID), append(firmwares, e.Firmware), append(models, e.Model)
		}
		// The registered model wins; a birth fills it in only when it was left empty.
		_, err := tx.Exec(ctx, `
			UPDATE devices d SET firmware = b.firmware,
				model = CASE WHEN d.model = '' THEN b.model ELSE d.model END, updated_at = now()
			FROM unnest($1::text[], $2::text[], $3::text[]) AS b(id, firmware, model)
			WHERE d.id = b.id AND d.state = 'active'`, ids, firmwares, models)
		if err != nil {
			return fmt.Errorf("apply births: %w", err)
		}
	}
	if n := len(pc.disconnects); n > 0 {
		ids, epochs, ats, reasons := make([]string, 0, n), make([]int64, 0, n), make([]time.Time, 0, n), make([]string, 0, n)
		for _, e := range pc.disconnects {
			ids, epochs, ats, reasons = append(ids, e.DeviceID), append(epochs, e.SessionEpoch), append(ats, e.At), append(reasons, string(e.Reason))
		}
		_, err := tx.Exec(ctx, `
			UPDATE devices d SET online = false, disconnected_at = x.at, last_disconnect = x.reason,
				last_seen = GREATEST(d.last_seen, x.at), updated_at = now()
			FROM unnest($1::text[], $2::bigint[], $3::timestamptz[], $4::text[]) AS x(id, epoch, at, reason)
			WHERE d.id = x.id AND d.session_epoch = x.epoch`, ids, epochs, ats, reasons)
		if err != nil {
			return fmt.Errorf("apply disconnects: %w", err)
		}
	}
	return nil
}

// touchLastSeen records when devices were last heard from, in one statement
// for the whole batch. Times only move forward.
func (s *Store) touchLastSeen(ctx context.Context, seen map[string]time.Time) error {
	ids, times := make([]string, 0, len(seen)), make([]time.Time, 0, len(seen))
	for id, t := range seen {
		ids, times = append(ids, id), append(times, t)
	}
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		if err := lockDevices(ctx, tx, ids); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, `
			UPDATE devices d SET last_seen = s.at
			FROM unnest($1::text[], $2::timestamptz[]) AS s(id, at)
			WHERE d.id = s.id AND (d.last_seen IS NULL OR d.last_seen < s.at)`, ids, times)
		return err
	})
	if err != nil {
		return fmt.Errorf("update last_seen: %w", err)
	}
	return nil
}

// lockDevices takes the row locks of the given devices in id order. An
// UPDATE … FROM locks rows in whatever order its join produces them, so two
// of them over overlapping devices can deadlock (SQLSTATE 40P01); taking the
// locks first, in one order, makes them queue instead.
func lockDevices(ctx context.Context, tx pgx.Tx, ids []string) error {
	if len(ids) == 0 {
		return nil
	}
	_, err := tx.Exec(ctx, `SELECT 1 FROM devices WHERE id = ANY($1) ORDER BY id FOR UPDATE`, ids)
	if err != nil {
		return fmt.Errorf("lock devices: %w", err)
	}
	return nil
}

// deviceIDs lists every device the change touches, once.
func (pc presenceChange) deviceIDs() []string {
	seen := make(map[string]struct{}, len(pc.connects)+len(pc.disconnects)+len(pc.births))
	for _, m := range []map[string]*Event{pc.connects, pc.disconnects, pc.births} {
		for id := range m {
			seen[id] = struct{}{}
		}
	}
	ids := make([]string, 0, len(seen))
	for id := range seen {
		ids = append(ids, id)
	}
	return ids
}

// EventCursor positions a page of events: events strictly older than it.
type EventCursor struct {
	At time.Time
	ID EventID
}

func (s *Store) listEvents(ctx context.Context, deviceID string, before *EventCursor, limit int) ([]Event, error) {
	q := `SELECT id, device_id, at, kind, reason, detail, firmware, model, session_epoch, protocol_version,
		keepalive_requested, keepalive_effective, clean_start, remote_addr, tls_version, listener, broker_node, pings, idle_ms,
		packets_in, bytes_in, duration_ms, max_silence_ms, ` + linkColumnsSQL + `
		FROM device_events WHERE device_id = $1`
	args := []any{deviceID}
	if before != nil {
		q += ` AND (at, id) < ($2, $3)`
		args = append(args, before.At, [16]byte(before.ID))
	}
	q += fmt.Sprintf(` ORDER BY at DESC, id DESC LIMIT %d`, limit)
	rows, err := s.pool.Query(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("list events of %s: %w", deviceID, err)
	}
	defer rows.Close()
	out := []Event{}
	for rows.Next() {
		var e Event
		var id [16]byte
		var kind, reason string
		var proto int16
		if err := rows.Scan(&id, &e.DeviceID, &e.At, &kind, &reason, &e.Detail, &e.Firmware, &e.Model, &e.SessionEpoch, &proto,
			&e.KeepaliveRequested, &e.KeepaliveEffective, &e.CleanStart, &e.RemoteAddr, &e.TLSVersion, &e.Listener, &e.BrokerNode, &e.Pings, &e.IdleMillis,
			&e.PacketsIn, &e.BytesIn, &e.DurationMillis, &e.MaxSilenceMillis, &e.RSSI, &e.Channel, &e.BSSID, &e.FirstBSSID, &e.RoamMillis); err != nil {
			return nil, fmt.Errorf("list events of %s: %w", deviceID, err)
		}
		e.ID, e.Kind, e.Reason, e.ProtocolVersion = EventID(id), Kind(kind), Reason(reason), Protocol(proto)
		out = append(out, e)
	}
	return out, rows.Err()
}
