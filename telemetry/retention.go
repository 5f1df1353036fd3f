package telemetry

import (
	"context"
	"errors"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/fleetd/fleetd/internal/advisory"
)

// Retention keeps each storage tier within its setting. Raw rows live in
// daily partitions: the partitions of the coming days are created ahead, and
// a day is dropped whole once it ended more than Raw ago, so raw rows are
// kept at least Raw and at most a day longer — and never before they are
// rolled up (RollupJob): a day the rollup has not passed is kept, and the
// run says so. Rollup rows, one per device,
// metric and bucket, are deleted by bucket time in bounded batches (Batch
// rows per DELETE, at most Rounds per tier per run), so that a large backlog
// is worked off over several runs without one long transaction. The latest
// values and links of devices silent for longer than Hour go too. With
// several replicas, the one that takes the advisory lock does the work.
type Retention struct {
	Raw, Minute, Hour time.Duration
	// Ahead is how many days of partitions exist after today. Default 2.
	Ahead int
	// Batch and Rounds bound the deletes of one run. Default 10 000 and 50.
	Batch, Rounds int
	// Every is how often Run works. Default a minute.
	Every      time.Duration
	Now        func() time.Time
	Logger     *slog.Logger
	Registerer prometheus.Registerer

	mDropped prometheus.Counter
	mDeleted *prometheus.CounterVec
	mErrors  prometheus.Counter
}

// retentionLock is the advisory lock of a retention run.
const retentionLock = advisory.TelemetryRetention

// Defaults of the tiers' retention.
const (
	DefaultRawRetention    = 48 * time.Hour
	DefaultMinuteRetention = 30 * 24 * time.Hour
	DefaultHourRetention   = 400 * 24 * time.Hour
)

func (r *Retention) defaults() {
	orDefault(&r.Raw, DefaultRawRetention)
	orDefault(&r.Minute, DefaultMinuteRetention)
	orDefault(&r.Hour, DefaultHourRetention)
	orDefault(&r.Every, time.Minute)
	orDefault(&r.Ahead, 2)
	orDefault(&r.Batch, 10_000)
	orDefault(&r.Rounds, 50)
	orDefault(&r.Logger, slog.New(slog.DiscardHandler))
	if r.Now == nil {
		r.Now = time.Now
	}
	if r.mDropped == nil {
		r.mDropped = prometheus.NewCounter(prometheus.CounterOpts{Name: "fleetd_telemetry_partitions_dropped_total", Help: "Daily partitions of raw telemetry (telemetry_raw) dropped after their retention."})
		r.mDeleted = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "fleetd_telemetry_rows_expired_total", Help: "Telemetry rows deleted after their retention, by table."}, []string{"table"})
		r.mErrors = prometheus.NewCounter(prometheus.CounterOpts{Name: "fleetd_telemetry_retention_errors_total", Help: "Telemetry retention runs that failed."})
		if r.Registerer != nil {
			r.Registerer.MustRegister(r.mDropped, r.mDeleted, r.mErrors)
		}
	}
}

// Run applies retention now and then every r.Every until ctx ends.
func (r *Retention) Run(ctx context.Context, s *Store) {
	r.defaults()
	t := time.NewTicker(r.Every)
	defer t.Stop()
	for {
		if _, err := r.Apply(ctx, s); err != nil && ctx.Err() == nil {
			r.mErrors.Inc()
			r.Logger.Error("telemetry retention failed; retrying at the next run", "err", err, "every", r.Every.String())
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Report is what one retention run did.
type Report struct {
	Ran     bool // false: another replica holds the lock
	Created []string
	Dropped []string
	Deleted map[string]int64 // by table
}

// Apply runs retention once at r.Now(), if no other replica is running it.
func (r *Retention) Apply(ctx context.Context, s *Store) (Report, error) {
	r.defaults()
	now := r.Now()
	rep := Report{Deleted: map[string]int64{}}
	ran, err := s.withLock(ctx, retentionLock, func() error {
		var errs []error
		var err error
		if rep.Created, err = s.ensurePartitions(ctx, now, now.AddDate(0, 0, r.Ahead)); err != nil {
			errs = append(errs, err)
		}
		var kept []string
		if rolled, err := s.rolledTo(ctx); err != nil {
			errs = append(errs, err)
		} else if rep.Dropped, kept, err = s.dropPartitions(ctx, now.Add(-r.Raw), rolled); err != nil {
			errs = append(errs, err)
		}
		if len(kept) > 0 {
			r.Logger.Error("telemetry partitions past their retention are kept: the rollup has not reached them (is it failing?)",
				"partitions", kept, "raw_retention", r.Raw.String())
		}
		r.mDropped.Add(float64(len(rep.Dropped)))
		for _, t := range []struct {
			table, column string
			keep          time.Duration
		}{
			{minuteTier.table, "bucket", r.Minute}, {hourTier.table, "bucket", r.Hour},
			{"telemetry_latest", "at", r.Hour}, {"telemetry_link", "at", r.Hour},
		} {
			for range r.Rounds {
				n, err := s.deleteBefore(ctx, t.table, t.column, now.Add(-t.keep), r.Batch)
				rep.Deleted[t.table] += n
				r.mDeleted.WithLabelValues(t.table).Add(float64(n))
				if err != nil {
					errs = append(errs, err)
				}
				if err != nil || n < int64(r.Batch) {
					break
				}
			}
		}
		return errors.Join(errs...)
	})
	rep.Ran = ran
	if len(rep.Created)+len(rep.Dropped) > 0 {
		r.Logger.Info("telemetry partitions maintained", "created", rep.Created, "dropped", rep.Dropped, "raw_retention", r.Raw.String())
	}
	return rep, err
}
