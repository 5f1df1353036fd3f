package telemetry

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/fleetd/fleetd/fleet"
)

// invalid returns the error naming a query field that is wrong; it is the
// registry's validation error, which the API renders as a 400 naming field.
func invalid(field, format string, a ...any) error {
	return &fleet.ValidationError{Field: field, Msg: fmt.Sprintf(format, a...)}
}

// Steps a series can be read at: raw points ("") or the rollups.
const (
	StepRaw    = ""
	StepMinute = "1m"
	StepHour   = "1h"
)

// MaxPoints bounds the points of one series answer; a query that would
// return more is refused, naming the range to narrow.
const MaxPoints = 5000

// DefaultWindow is the range a query without from and to covers: the hour up
// to now. It is also how recently a device must have been seen to count in
// the fleet view.
const DefaultWindow = time.Hour

// SeriesQuery asks for one metric of one device over [From, To).
type SeriesQuery struct {
	DeviceID string
	Metric   string
	// From and To default to the DefaultWindow up to now (either may be set
	// alone).
	From, To time.Time
	Step     string
}

// Series is a device's metric over time.
type Series struct {
	DeviceID string    `json:"device_id"`
	Metric   string    `json:"metric"`
	From     time.Time `json:"from"`
	To       time.Time `json:"to"`
	Step     string    `json:"step"`
	// Points are in time order: raw points, or one per bucket (by its start)
	// that holds data.
	Points []Point `json:"points"`
}

// Point is one value of a series: a raw point, or a bucket whose Value is
// its mean and whose Rollup says the rest.
type Point struct {
	At    time.Time `json:"at"`
	Value float64   `json:"value"`
	*Rollup
}

// Rollup is what a bucket knows of its points.
type Rollup struct {
	Count int64   `json:"count"`
	Min   float64 `json:"min"`
	Max   float64 `json:"max"`
	Sum   float64 `json:"sum"`
	Last  float64 `json:"last"`
}

// Groupings of the fleet view.
var groupings = map[string]string{
	"":         "''",
	"firmware": "d.firmware",
	"model":    "d.model",
	"channel":  "coalesce(k.channel::text, '')",
	"bssid":    "coalesce(k.bssid, '')",
}

// MaxGroups bounds the groups of one fleet view; the largest are kept.
const MaxGroups = 1000

// SummaryQuery asks for the latest value of a metric per device, aggregated
// per group, over the active devices online or seen in the last
// DefaultWindow.
type SummaryQuery struct {
	Metric  string
	GroupBy string // "", firmware, model, channel or bssid
}

// Summary is the fleet view of one metric.
type Summary struct {
	Metric  string `json:"metric"`
	GroupBy string `json:"group_by"`
	// Since: devices online, or seen since this time, count.
	Since   time.Time `json:"since"`
	Devices int64     `json:"devices"`
	// Groups are by device count, largest first; Key is "" for devices that
	// did not report what they are grouped by (or for the whole fleet when
	// not grouped).
	Groups    []Group `json:"groups"`
	Truncated bool    `json:"truncated"`
}

// Group is the latest values of one group's devices.
type Group struct {
	Key   string  `json:"key"`
	Count int64   `json:"count"`
	Mean  float64 `json:"mean"`
	Min   float64 `json:"min"`
	Max   float64 `json:"max"`
}

// SetClock replaces the store's clock (tests).
func (s *Store) SetClock(now func() time.Time) { s.now = now }

func (s *Store) clock() time.Time {
	if s.now != nil {
		return s.now()
	}
	return time.Now()
}

// window applies the defaults to a query's range and checks it.
func window(from, to, now time.Time) (time.Time, time.Time, error) {
	switch {
	case from.IsZero() && to.IsZero():
		to = now
		from = to.Add(-DefaultWindow)
	case to.IsZero():
		to = from.Add(DefaultWindow)
	case from.IsZero():
		from = to.Add(-DefaultWindow)
	}
	if !from.Before(to) {
		return from, to, invalid("from", "must be before to (%s)", to.Format(time.RFC3339))
	}
	return from, to, nil
}

// rawSeriesSQL reads one metric of a device from the raw rows.
const rawSeriesSQL = `SELECT at, v FROM (
	SELECT at, vals[array_position(names, $2)] AS v FROM telemetry_raw
	WHERE device_id = $1 AND at >= $3 AND at < $4
) r WHERE v IS NOT NULL ORDER BY at LIMIT $5`

// seriesSQL reads one metric of a device from the tier's rollups and, for
// what is not rolled up yet (the rows after rolled_to that are not late:
// see RollupJob), from the raw rows, and combines the two per bucket. One
// statement, so that the watermark and the rows it divides are of one
// snapshot.
func (t tier) seriesSQL() string {
	return fmt.Sprintf(`SELECT bucket, sum(count)::bigint, min(min), max(max), sum(sum), (array_agg(last ORDER BY last_at DESC))[1] FROM (
	SELECT bucket, count, min, max, sum, last, last_at FROM %[1]s
	WHERE device_id = $1 AND metric = $2 AND bucket >= $3 AND bucket < $4
	UNION ALL
	SELECT date_trunc('%[2]s', at, 'UTC'), count(*), min(v), max(v), sum(v), (array_agg(v ORDER BY at DESC))[1], max(at) FROM (
		SELECT at, vals[array_position(names, $2)] AS v FROM telemetry_raw
		WHERE device_id = $1 AND at >= greatest($3, (SELECT rolled_to FROM telemetry_rollup_state)) AND at < $4 AND NOT late
	) r WHERE v IS NOT NULL GROUP BY 1
) b GROUP BY 1 ORDER BY 1`, t.table, t.unit)
}

// Series reads one metric of a device: raw points, or rollups, which include
// the minutes not rolled up yet (computed from the raw rows), so that a
// message is in every step's answer as soon as it is stored. It returns a *fleet.ValidationError for a
// bad metric name, step or range, or for a range holding more than MaxPoints
// points at that step, and an error wrapping fleet.ErrNotFound for a device
// that is not registered.
func (s *Store) Series(ctx context.Context, q SeriesQuery) (Series, error) {
	from, to, err := window(q.From, q.To, s.clock())
	if err != nil {
		return Series{}, err
	}
	out := Series{DeviceID: q.DeviceID, Metric: q.Metric, From: from, To: to, Step: q.Step, Points: []Point{}}
	if !ValidMetric(q.Metric) {
		return out, invalid("metric", "must be a metric name (a lower-case letter, then up to 31 lower-case letters, digits or _)")
	}
	var t tier
	switch q.Step {
	case StepRaw:
	case StepMinute:
		t = minuteTier
	case StepHour:
		t = hourTier
	default:
		return out, invalid("step", "must be empty (raw points), 1m or 1h, not %q", q.Step)
	}
	if t.table != "" {
		if n := to.Sub(from.Truncate(t.step)) / t.step; n > MaxPoints {
			return out, invalid("from", "the range holds %d buckets of %s; at most %d are returned: narrow from and to, or use a longer step", n, q.Step, MaxPoints)
		}
	}
	if err := s.deviceExists(ctx, q.DeviceID); err != nil {
		return out, err
	}
	var rows pgx.Rows
	if t.table == "" {
		rows, err = s.pool.Query(ctx, rawSeriesSQL, q.DeviceID, q.Metric, from, to, MaxPoints+1)
	} else {
		// A bucket that starts in the range is returned whole.
		first, end := from.Truncate(t.step), to.Truncate(t.step)
		if end.Before(to) {
			end = end.Add(t.step)
		}
		rows, err = s.pool.Query(ctx, t.seriesSQL(), q.DeviceID, q.Metric, first, end)
	}
	if err != nil {
		return out, fmt.Errorf("read telemetry of %s: %w", q.DeviceID, err)
	}
	defer rows.Close()
	for rows.Next() {
		var p Point
		if t.table == "" {
			err = rows.Scan(&p.At, &p.Value)
		} else {
			p.Rollup = &Rollup{}
			err = rows.Scan(&p.At, &p.Count, &p.Min, &p.Max, &p.Sum, &p.Last)
			p.Value = p.Sum / float64(p.Count)
		}
		if err != nil {
			return out, fmt.Errorf("read telemetry of %s: %w", q.DeviceID, err)
		}
		out.Points = append(out.Points, p)
	}
	if err := rows.Err(); err != nil {
		return out, fmt.Errorf("read telemetry of %s: %w", q.DeviceID, err)
	}
	if len(out.Points) > MaxPoints {
		return Series{}, invalid("from", "the range holds more than %d raw points: narrow from and to, or use step=1m", MaxPoints)
	}
	return out, nil
}

// Summary aggregates the latest value of a metric per device by group, over
// the active devices online or seen in the last DefaultWindow. The latest
// values and links are copied from the raw rows by RollupJob, so they are
// current to within its interval (RollupJob.Every). It returns a
// *fleet.ValidationError for a bad metric name or grouping.
func (s *Store) Summary(ctx context.Context, q SummaryQuery) (Summary, error) {
	since := s.clock().Add(-DefaultWindow)
	out := Summary{Metric: q.Metric, GroupBy: q.GroupBy, Since: since, Groups: []Group{}}
	if !ValidMetric(q.Metric) {
		return out, invalid("metric", "must be a metric name (a lower-case letter, then up to 31 lower-case letters, digits or _)")
	}
	key, ok := groupings[q.GroupBy]
	if !ok {
		return out, invalid("group_by", "must be firmware, model, channel or bssid (or empty for the whole fleet), not %q", q.GroupBy)
	}
	rows, err := s.pool.Query(ctx, fmt.Sprintf(`SELECT %s AS key, count(*), avg(l.value), min(l.value), max(l.value)
		FROM telemetry_latest l
		JOIN devices d ON d.id = l.device_id
		LEFT JOIN telemetry_link k ON k.device_id = l.device_id
		WHERE l.metric = $1 AND d.state = 'active' AND (d.online OR d.last_seen >= $2)
		GROUP BY 1 ORDER BY 2 DESC, 1`, key), q.Metric, since)
	if err != nil {
		return out, fmt.Errorf("summarise telemetry: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var g Group
		if err := rows.Scan(&g.Key, &g.Count, &g.Mean, &g.Min, &g.Max); err != nil {
			return out, fmt.Errorf("summarise telemetry: %w", err)
		}
		out.Devices += g.Count
		if len(out.Groups) == MaxGroups {
			out.Truncated = true
			continue
		}
		out.Groups = append(out.Groups, g)
	}
	if err := rows.Err(); err != nil {
		return out, fmt.Errorf("summarise telemetry: %w", err)
	}
	return out, nil
}
