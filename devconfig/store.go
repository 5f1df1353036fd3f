package devconfig

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/fleetd/fleetd/fleet"
)

// Store keeps layers and devices' configuration in PostgreSQL (tables
// config_layers and device_config, migration 00016).
//
// Consistency rests on row locks, not on a global lock: a layer change
// marks its devices stale in the same transaction (an unconditional UPDATE,
// which waits for a resolution holding a row and marks it again once that
// commits), and a resolution locks the rows it resolves (FOR UPDATE, SKIP
// LOCKED for the background batches) and reads the layers after locking
// them. A device therefore never stays resolved against a layer older than
// the latest committed one.
type Store struct {
	pool   *pgxpool.Pool
	limits Limits
}

// NewStore returns the store on pool; l bounds effective documents.
func NewStore(pool *pgxpool.Pool, l Limits) *Store {
	return &Store{pool: pool, limits: l.withDefaults()}
}

// Device is a device's configuration as stored.
type Device struct {
	DeviceID      string
	State         string
	Model         string
	Tags          []string
	Layer         Doc
	LayerRevision int64
	Effective     Doc
	Version       int64
	Sources       []string
	Stale         bool
	Problem       string
	ChangedAt     *time.Time
	Reported      *Reported
}

const deviceColumns = `c.device_id, d.state, d.model, d.tags, c.layer, c.layer_revision, c.effective, c.version, c.sources,
	c.stale, c.problem, c.changed_at, c.reported, c.reported_version, c.reported_at`

func scanDevice(row pgx.Row) (Device, error) {
	var d Device
	var layer, eff, sources, reported []byte
	var rv *int64
	var rat *time.Time
	err := row.Scan(&d.DeviceID, &d.State, &d.Model, &d.Tags, &layer, &d.LayerRevision, &eff, &d.Version, &sources,
		&d.Stale, &d.Problem, &d.ChangedAt, &reported, &rv, &rat)
	if err != nil {
		return d, err
	}
	if d.Layer, err = decode(layer); err != nil {
		return d, fmt.Errorf("device %s: stored layer: %w", d.DeviceID, err)
	}
	if d.Effective, err = decode(eff); err != nil {
		return d, fmt.Errorf("device %s: stored effective document: %w", d.DeviceID, err)
	}
	if err = json.Unmarshal(sources, &d.Sources); err != nil {
		return d, fmt.Errorf("device %s: stored sources: %w", d.DeviceID, err)
	}
	if rv != nil && rat != nil {
		r := &Reported{Version: *rv, At: *rat}
		if r.Config, err = decode(reported); err != nil {
			return d, fmt.Errorf("device %s: stored report: %w", d.DeviceID, err)
		}
		d.Reported = r
	}
	return d, nil
}

// Get returns a device's configuration, or an error wrapping
// fleet.ErrNotFound.
func (s *Store) Get(ctx context.Context, id string) (Device, error) {
	d, err := scanDevice(s.pool.QueryRow(ctx, `SELECT `+deviceColumns+`
		FROM device_config c JOIN devices d ON d.id = c.device_id WHERE c.device_id = $1`, id))
	if errors.Is(err, pgx.ErrNoRows) {
		return d, fmt.Errorf("device %s: %w", id, fleet.ErrNotFound)
	}
	return d, err
}

// Changed is a device whose effective document got a new version.
type Changed struct {
	DeviceID string
	Version  int64
}

// resolveBatch bounds the rows one resolution statement reads and writes.
const resolveBatch = 1000

// ResolveStale re-resolves up to one batch of stale devices that no other
// replica is resolving (SKIP LOCKED) and returns how many it resolved and
// those whose version grew.
func (s *Store) ResolveStale(ctx context.Context, now time.Time) (int, []Changed, error) {
	var n int
	var changed []Changed
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		rows, err := lockedRows(ctx, tx, `WHERE c.stale ORDER BY c.device_id LIMIT $1 FOR UPDATE OF c SKIP LOCKED`, resolveBatch)
		if err != nil {
			return err
		}
		n = len(rows)
		changed, err = s.resolve(ctx, tx, rows, now)
		return err
	})
	return n, changed, err
}

// ResolveDevices re-resolves the given devices that are stale, waiting for
// any resolution of them under way, and returns those whose version grew.
func (s *Store) ResolveDevices(ctx context.Context, ids []string, now time.Time) ([]Changed, error) {
	var changed []Changed
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		rows, err := lockedRows(ctx, tx, `WHERE c.device_id = ANY($1) AND c.stale ORDER BY c.device_id FOR UPDATE OF c`, ids)
		if err != nil {
			return err
		}
		changed, err = s.resolve(ctx, tx, rows, now)
		return err
	})
	return changed, err
}

func lockedRows(ctx context.Context, tx pgx.Tx, where string, arg any) ([]Device, error) {
	rows, err := tx.Query(ctx, `SELECT `+deviceColumns+` FROM device_config c JOIN devices d ON d.id = c.device_id `+where, arg)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (Device, error) { return scanDevice(r) })
}

// resolve computes the effective documents of locked rows from the layers
// as committed now, and writes them back in one statement: a version grows
// by one where the document changed.
func (s *Store) resolve(ctx context.Context, tx pgx.Tx, rows []Device, now time.Time) ([]Changed, error) {
	if len(rows) == 0 {
		return nil, nil
	}
	var models, tags []string
	for _, r := range rows {
		if r.Model != "" && !slices.Contains(models, r.Model) {
			models = append(models, r.Model)
		}
		for _, t := range r.Tags {
			if !slices.Contains(tags, t) {
				tags = append(tags, t)
			}
		}
	}
	layers, err := queryLayers(ctx, tx, `WHERE revision > 0 AND (kind = 'fleet' OR (model <> '' AND model = ANY($1)) OR (tag <> '' AND tag = ANY($2)))`, models, tags)
	if err != nil {
		return nil, fmt.Errorf("read the layers: %w", err)
	}
	ids := make([]string, len(rows))
	docs := make([]string, len(rows))
	bumps := make([]int32, len(rows))
	sources := make([]string, len(rows))
	problems := make([]string, len(rows))
	var changed []Changed
	for i, r := range rows {
		eff, src := Resolve(layers, r.Model, r.Tags, r.Layer)
		enc, old := Encode(eff), Encode(r.Effective)
		ids[i] = r.DeviceID
		switch {
		case len(enc) > s.limits.MaxEffective:
			docs[i], problems[i] = string(old), tooLarge(len(enc), s.limits.MaxEffective)
			src = r.Sources
		case string(enc) != string(old):
			docs[i], bumps[i] = string(enc), 1
			changed = append(changed, Changed{DeviceID: r.DeviceID, Version: r.Version + 1})
		default:
			docs[i] = string(old)
		}
		b, _ := json.Marshal(src)
		sources[i] = string(b)
	}
	_, err = tx.Exec(ctx, `UPDATE device_config c SET effective = u.effective::jsonb, version = c.version + u.bump,
			sources = u.sources::jsonb, problem = u.problem, stale = false,
			changed_at = CASE WHEN u.bump > 0 THEN $6 ELSE c.changed_at END
		FROM unnest($1::text[], $2::text[], $3::int[], $4::text[], $5::text[]) AS u(device_id, effective, bump, sources, problem)
		WHERE c.device_id = u.device_id`, ids, docs, bumps, sources, problems, now)
	if err != nil {
		return nil, fmt.Errorf("write %d effective documents: %w", len(rows), err)
	}
	return changed, nil
}

// UpdateDevice changes a device's own layer with update (which gets the
// current layer and returns the new one, or an error that is returned as
// is) and re-resolves the device in the same transaction. It returns an
// error wrapping fleet.ErrNotFound for an unknown device and ErrGone for a
// decommissioned one.
func (s *Store) UpdateDevice(ctx context.Context, id string, update func(Doc) (Doc, error), now time.Time) ([]Changed, error) {
	var changed []Changed
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		rows, err := lockedRows(ctx, tx, `WHERE c.device_id = $1 FOR UPDATE OF c`, id)
		if err != nil {
			return err
		}
		if len(rows) == 0 {
			return fmt.Errorf("device %s: %w", id, fleet.ErrNotFound)
		}
		r := rows[0]
		if r.State != fleet.StateActive {
			return fmt.Errorf("device %s: %w", id, ErrGone)
		}
		if r.Layer, err = update(r.Layer); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `UPDATE device_config SET layer = $2::jsonb, layer_revision = layer_revision + 1 WHERE device_id = $1`,
			id, string(Encode(r.Layer))); err != nil {
			return err
		}
		changed, err = s.resolve(ctx, tx, []Device{r}, now)
		return err
	})
	return changed, err
}

const layerColumns = `scope, config, revision, created_at, updated_at`

func queryLayers(ctx context.Context, q interface {
	Query(context.Context, string, ...any) (pgx.Rows, error)
}, where string, args ...any) ([]Layer, error) {
	rows, err := q.Query(ctx, `SELECT `+layerColumns+` FROM config_layers `+where, args...)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (Layer, error) { return scanLayer(r) })
}

func scanLayer(row pgx.Row) (Layer, error) {
	var l Layer
	var scope string
	var config []byte
	if err := row.Scan(&scope, &config, &l.Revision, &l.CreatedAt, &l.UpdatedAt); err != nil {
		return l, err
	}
	sc, err := ParseScope(scope)
	if err != nil {
		return l, fmt.Errorf("stored layer %q: %w", scope, err)
	}
	l.Scope = sc
	if l.Config, err = decode(config); err != nil {
		return l, fmt.Errorf("stored layer %s: %w", scope, err)
	}
	return l, nil
}

// Layers returns every layer, in the order they apply.
func (s *Store) Layers(ctx context.Context) ([]Layer, error) {
	ls, err := queryLayers(ctx, s.pool, `WHERE revision > 0`)
	slices.SortFunc(ls, func(a, b Layer) int {
		switch {
		case a.Scope.before(b.Scope):
			return -1
		case b.Scope.before(a.Scope):
			return 1
		}
		return 0
	})
	return ls, err
}

// Layer returns one layer, or an error wrapping ErrNotFound.
func (s *Store) Layer(ctx context.Context, sc Scope) (Layer, error) {
	l, err := scanLayer(s.pool.QueryRow(ctx, `SELECT `+layerColumns+` FROM config_layers WHERE scope = $1 AND revision > 0`, sc.String()))
	if errors.Is(err, pgx.ErrNoRows) {
		return l, fmt.Errorf("layer %s: %w", sc, ErrNotFound)
	}
	return l, err
}

// UpdateLayer changes (or creates) a layer with update, which gets the
// current document (nil for a new layer) and returns the new one, and
// marks the devices it applies to for re-resolution in one statement. A
// new layer beyond maxLayers is refused with a *ValidationError. It returns
// the layer and how many devices were marked.
func (s *Store) UpdateLayer(ctx context.Context, sc Scope, update func(cur Doc) (Doc, error), maxLayers int, now time.Time) (Layer, int64, error) {
	var l Layer
	var marked int64
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		// A placeholder (revision 0) first, so that concurrent first
		// writers of one scope queue on its row lock like later ones.
		if _, err := tx.Exec(ctx, `INSERT INTO config_layers (scope, kind, model, tag, config, revision, created_at, updated_at)
			VALUES ($1, $2, $3, $4, '{}', 0, $5, $5) ON CONFLICT (scope) DO NOTHING`,
			sc.String(), string(sc.Kind), sc.Model, sc.Tag, now); err != nil {
			return err
		}
		cur, err := scanLayer(tx.QueryRow(ctx, `SELECT `+layerColumns+` FROM config_layers WHERE scope = $1 FOR UPDATE`, sc.String()))
		if err != nil {
			return err
		}
		var old Doc
		if cur.Revision > 0 {
			old = cur.Config
		} else {
			var n int
			if err := tx.QueryRow(ctx, `SELECT count(*) FROM config_layers WHERE revision > 0`).Scan(&n); err != nil {
				return err
			}
			if n >= maxLayers {
				return invalid("scope", "there are %d layers already; at most %d", n, maxLayers)
			}
		}
		doc, err := update(old)
		if err != nil {
			return err
		}
		l, err = scanLayer(tx.QueryRow(ctx, `UPDATE config_layers SET config = $2::jsonb, revision = revision + 1, updated_at = $3
			WHERE scope = $1 RETURNING `+layerColumns, sc.String(), string(Encode(doc)), now))
		if err != nil {
			return err
		}
		marked, err = markStale(ctx, tx, sc)
		return err
	})
	return l, marked, err
}

// DeleteLayer removes a layer and marks its devices for re-resolution. It
// returns how many were marked, or an error wrapping ErrNotFound.
func (s *Store) DeleteLayer(ctx context.Context, sc Scope) (int64, error) {
	var marked int64
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, `DELETE FROM config_layers WHERE scope = $1 AND revision > 0`, sc.String())
		if err != nil {
			return err
		}
		if tag.RowsAffected() == 0 {
			return fmt.Errorf("layer %s: %w", sc, ErrNotFound)
		}
		marked, err = markStale(ctx, tx, sc)
		return err
	})
	return marked, err
}

// markStale marks the devices a layer applies to, in one statement. It is
// unconditional (no "AND NOT stale"): a row a resolution holds must be
// marked again once that resolution commits, and only an UPDATE that waits
// for the row's lock sees its committed state. Rows are locked in id order,
// as every resolution locks them, so that two layer changes, or a layer
// change and a device's resolution, queue instead of deadlocking.
func markStale(ctx context.Context, tx pgx.Tx, sc Scope) (int64, error) {
	var where string
	var args []any
	switch sc.Kind {
	case KindFleet:
		where = `true`
	case KindModel:
		where, args = `d.model = $1`, []any{sc.Model}
	case KindTag:
		where, args = `$1 = ANY(d.tags)`, []any{sc.Tag}
	default:
		where, args = `d.model = $1 AND $2 = ANY(d.tags)`, []any{sc.Model, sc.Tag}
	}
	tag, err := tx.Exec(ctx, `UPDATE device_config c SET stale = true
		FROM (SELECT m.device_id FROM device_config m JOIN devices d ON d.id = m.device_id WHERE `+where+`
			ORDER BY m.device_id FOR UPDATE OF m) s
		WHERE c.device_id = s.device_id`, args...)
	if err != nil {
		return 0, fmt.Errorf("mark the devices of layer %s: %w", sc, err)
	}
	return tag.RowsAffected(), nil
}

// SaveReport stores a device's report unless its version is ahead of the
// device's desired version (no such version was ever sent). It returns the
// desired version and whether the report was stored.
func (s *Store) SaveReport(ctx context.Context, id string, m Message, now time.Time) (int64, bool, error) {
	var desired int64
	err := s.pool.QueryRow(ctx, `UPDATE device_config SET reported = $2::jsonb, reported_version = $3, reported_at = $4
		WHERE device_id = $1 AND $3 <= version RETURNING version`, id, string(Encode(m.Config)), m.Version, now).Scan(&desired)
	if err == nil {
		return desired, true, nil
	}
	if !errors.Is(err, pgx.ErrNoRows) {
		return 0, false, err
	}
	err = s.pool.QueryRow(ctx, `SELECT version FROM device_config WHERE device_id = $1`, id).Scan(&desired)
	if errors.Is(err, pgx.ErrNoRows) {
		return 0, false, fmt.Errorf("device %s: %w", id, fleet.ErrNotFound)
	}
	return desired, false, err
}

// Desired is a device's current desired message, and whether it awaits
// re-resolution.
type Desired struct {
	DeviceID string
	Message
	Stale bool
}

// Desired returns the desired messages of the given devices.
func (s *Store) Desired(ctx context.Context, ids []string) ([]Desired, error) {
	rows, err := s.pool.Query(ctx, `SELECT device_id, version, effective, stale FROM device_config WHERE device_id = ANY($1)`, ids)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (Desired, error) {
		var d Desired
		var eff []byte
		if err := r.Scan(&d.DeviceID, &d.Version, &eff, &d.Stale); err != nil {
			return d, err
		}
		var err error
		d.Config, err = decode(eff)
		return d, err
	})
}
