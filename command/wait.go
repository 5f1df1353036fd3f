package command

import (
	"context"
	"sync"
	"time"
)

// waiters are the requests waiting for a command to change, by command id.
type waiters struct {
	mu sync.Mutex
	m  map[string]map[chan struct{}]struct{}
}

func (w *waiters) add(id string) (chan struct{}, func()) {
	ch := make(chan struct{}, 1)
	w.mu.Lock()
	if w.m[id] == nil {
		w.m[id] = map[chan struct{}]struct{}{}
	}
	w.m[id][ch] = struct{}{}
	w.mu.Unlock()
	return ch, func() {
		w.mu.Lock()
		delete(w.m[id], ch)
		if len(w.m[id]) == 0 {
			delete(w.m, id)
		}
		w.mu.Unlock()
	}
}

func (w *waiters) wake(id string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for ch := range w.m[id] {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
}

// WaitLimit is how long a request may wait for a command: what it asked
// for, at most MaxWait, and no longer than the command can stay unanswered
// once delivered (its timeout, plus two sweeps to see it time out).
func (s *Service) WaitLimit(c Command, asked time.Duration) time.Duration {
	return max(0, min(asked, s.opts.MaxWait, c.Timeout.D()+2*s.opts.SweepInterval))
}

// Wait returns a device's command once its state is final, or when wait
// (bounded by WaitLimit) is over, or ctx ends, whichever comes first. A
// change made on this replica, or signalled by another (Changed), wakes it
// at once; it also reads the database every PollInterval, since signals
// between replicas can be lost. It returns an error wrapping ErrNotFound
// for an unknown command.
func (s *Service) Wait(ctx context.Context, deviceID, id string, wait time.Duration) (Command, error) {
	woken, done := s.waiters.add(id)
	defer done()
	c, err := s.store.Get(ctx, deviceID, id)
	if err != nil || c.State.Final() {
		return c, err
	}
	limit := s.WaitLimit(c, wait)
	if limit <= 0 {
		return c, nil
	}
	timer := time.NewTimer(limit)
	defer timer.Stop()
	poll := time.NewTicker(s.opts.PollInterval)
	defer poll.Stop()
	for {
		select {
		case <-ctx.Done():
			return c, nil
		case <-timer.C:
			return s.reread(ctx, c)
		case <-woken:
		case <-poll.C:
		}
		if c, err = s.reread(ctx, c); err != nil || c.State.Final() {
			return c, err
		}
	}
}

func (s *Service) reread(ctx context.Context, c Command) (Command, error) {
	cur, err := s.store.Get(ctx, c.DeviceID, c.ID)
	if err != nil {
		if ctx.Err() != nil {
			return c, nil
		}
		return c, err
	}
	return cur, nil
}
