package cluster

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// Clock tells the time of the database server, which every replica shares,
// from this replica's own clock and their measured offset. Session epochs
// come from it, so that a device that moves from one replica to another gets
// a later epoch there even when the replicas' clocks disagree (a later epoch
// is how every replica and the presence writer tell the newer session). The
// offset is measured with the round trip's midpoint, so replicas agree to
// within half a round trip: far less than a device needs to reconnect.
type Clock struct {
	pool   *pgxpool.Pool
	offset atomic.Int64 // database time minus local time, in nanoseconds
}

// NewClock measures the offset once.
func NewClock(ctx context.Context, pool *pgxpool.Pool) (*Clock, error) {
	c := &Clock{pool: pool}
	if err := c.Sync(ctx); err != nil {
		return nil, err
	}
	return c, nil
}

// Now is the database server's time.
func (c *Clock) Now() time.Time { return time.Now().Add(time.Duration(c.offset.Load())) }

// Offset is the last measured offset of the database clock from the local one.
func (c *Clock) Offset() time.Duration { return time.Duration(c.offset.Load()) }

// Sync measures the offset again: the best of three round trips.
func (c *Clock) Sync(ctx context.Context) error {
	best := time.Duration(-1)
	var offset time.Duration
	for range 3 {
		t0 := time.Now()
		var db time.Time
		if err := c.pool.QueryRow(ctx, "SELECT clock_timestamp()").Scan(&db); err != nil {
			return fmt.Errorf("read the database clock: %w", err)
		}
		rtt := time.Since(t0)
		if best < 0 || rtt < best {
			best, offset = rtt, db.Sub(t0.Add(rtt/2))
		}
	}
	c.offset.Store(int64(offset))
	return nil
}

// Run re-measures the offset every interval until ctx ends, so that local
// clock drift (or a step) does not accumulate.
func (c *Clock) Run(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			_ = c.Sync(ctx)
		}
	}
}
