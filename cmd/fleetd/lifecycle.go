package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"
)

// lifecycle collects the stop step of every component as it starts and runs
// them in reverse order on shutdown, all within one deadline.
type lifecycle struct {
	logger   *slog.Logger
	steps    []stopStep
	first    []func()
	started  atomic.Bool
	stopping atomic.Bool
}

type stopStep struct {
	name string
	stop func(context.Context) error
}

// onStop registers the stop step of a component that has just started.
func (l *lifecycle) onStop(name string, stop func(context.Context) error) {
	l.steps = append(l.steps, stopStep{name, stop})
}

// beforeStop registers a fallback run first when start-up fails half way, for
// components whose ordered stop step is registered only once start-up is
// complete.
func (l *lifecycle) beforeStop(f func()) { l.first = append(l.first, f) }

// markStarted records that every component has started.
func (l *lifecycle) markStarted() { l.started.Store(true) }

// check is a readiness check: the replica is ready only between the end of
// start-up and the beginning of shutdown, so load balancers neither send work
// to a half-started replica nor keep sending it to one that is draining.
func (l *lifecycle) check(context.Context) error {
	switch {
	case l.stopping.Load():
		return errors.New("shutting down")
	case !l.started.Load():
		return errors.New("starting")
	}
	return nil
}

func (l *lifecycle) stop(timeout time.Duration) error {
	if l.stopping.Swap(true) {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	// Start-up failed half way: components whose ordered stop step was not
	// registered yet are stopped by their fallbacks.
	if !l.started.Load() {
		for _, f := range l.first {
			f()
		}
	}
	var errs []error
	for i := len(l.steps) - 1; i >= 0; i-- {
		s := l.steps[i]
		started := time.Now()
		if err := s.stop(ctx); err != nil {
			l.logger.Error("stop step failed", "component", s.name, "err", err)
			errs = append(errs, fmt.Errorf("stop %s: %w", s.name, err))
			continue
		}
		l.logger.Info("stopped", "component", s.name, "duration_ms", time.Since(started).Milliseconds())
	}
	return errors.Join(errs...)
}
