package fleet

import (
	"context"
	"time"
)

// The credentials other replicas change (a fleet registered in bulk through
// them, a wave of rotations) are loaded here in batches, as the signals
// arrive, rather than one query per device at its first connect: with a
// fleet that connects right after it was registered, those single lookups
// queue behind each other in the pool and time out, and the devices are
// refused as "registry unavailable".

// maxPrefetch bounds one batch (and the ids waiting: past it an id is left
// to its first connect's lookup).
const maxPrefetch = 4096

// prefetchLater asks for the device's credential to be loaded soon.
func (s *Service) prefetchLater(id string) {
	s.pmu.Lock()
	if s.prefetch == nil {
		s.prefetch = map[string]struct{}{}
	}
	if len(s.prefetch) < 4*maxPrefetch {
		s.prefetch[id] = struct{}{}
	}
	s.pmu.Unlock()
	select {
	case s.prefetchWake <- struct{}{}:
	default:
	}
}

// RunPrefetch loads the credentials asked for, in batches, until ctx ends.
func (s *Service) RunPrefetch(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.prefetchWake:
		}
		select { // let a burst of signals gather into one batch
		case <-ctx.Done():
			return
		case <-time.After(20 * time.Millisecond):
		}
		for {
			ids := s.takePrefetch()
			if len(ids) == 0 {
				break
			}
			if err := s.loadBatch(ctx, ids); err != nil {
				if ctx.Err() != nil {
					return
				}
				s.logger.Warn("cannot load changed credentials; they are looked up at connect", "devices", len(ids), "err", err)
				break
			}
		}
	}
}

func (s *Service) takePrefetch() []string {
	s.pmu.Lock()
	defer s.pmu.Unlock()
	ids := make([]string, 0, min(len(s.prefetch), maxPrefetch))
	for id := range s.prefetch {
		if len(ids) == maxPrefetch {
			break
		}
		ids = append(ids, id)
		delete(s.prefetch, id)
	}
	return ids
}

// loadBatch caches the credentials of those ids that still have no entry:
// an entry written meanwhile (by this replica, or by a connect's lookup) is
// at least as fresh as the row read here, and is kept.
func (s *Service) loadBatch(ctx context.Context, ids []string) error {
	loaded, err := s.queryCredentials(ctx, `SELECT id, coalesce(token_hash, ''::bytea), state, firmware, model FROM devices WHERE id = ANY($1)`, ids)
	if err != nil {
		return err
	}
	s.mu.Lock()
	for id, c := range loaded {
		if _, ok := s.cache[id]; !ok {
			s.cache[id] = c
		}
	}
	s.mu.Unlock()
	for id := range loaded {
		s.unknown.Remove(id)
	}
	return nil
}
