package fleet

import (
	"context"
	"sync"
	"time"
)

// linkStatsTTL is how long the fleet's link stats serve device diagnoses
// before they are read again: they move with hours of sessions, and a
// console opening many devices must not read the rollups for each.
const linkStatsTTL = 30 * time.Second

// linkCache holds the latest LinkStats of the default window. It is derived
// data that every replica reads from the database, so a replica's copy is at
// most linkStatsTTL behind the others'.
type linkCache struct {
	mu     sync.Mutex
	at     time.Time
	window time.Duration
	stats  LinkStats
}

// FleetLinks returns the fleet's radio links over the window (0: the
// policy's link window): lost sessions per device-hour by channel and by
// access point, the flagged ones, and which causes explain the lost
// sessions.
func (s *Service) FleetLinks(ctx context.Context, window time.Duration) (LinkStats, error) {
	lp := s.currentPolicy().LinkPolicy()
	if window <= 0 {
		window = time.Duration(lp.WindowSeconds) * time.Second
	}
	lp.WindowSeconds = int(window.Seconds())
	now := s.now()
	cells, live, current, pings, err := s.store.linkInputs(ctx, now.Add(-window), now)
	if err != nil {
		return LinkStats{}, err
	}
	return judgeLinks(cells, live, current, pings, lp), nil
}

// cachedFleetLinks is FleetLinks of the policy's window, read at most once
// per linkStatsTTL.
func (s *Service) cachedFleetLinks(ctx context.Context) (LinkStats, error) {
	lp := s.currentPolicy().LinkPolicy()
	window := time.Duration(lp.WindowSeconds) * time.Second
	c := &s.links
	c.mu.Lock()
	defer c.mu.Unlock()
	if now := s.now(); c.at.IsZero() || now.Sub(c.at) > linkStatsTTL || now.Before(c.at) || c.window != window {
		st, err := s.FleetLinks(ctx, window)
		if err != nil {
			return LinkStats{}, err
		}
		c.at, c.window, c.stats = now, window, st
	}
	return c.stats, nil
}
