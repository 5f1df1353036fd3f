package main

import (
	"context"
	"fmt"
)

// loops runs fleetd's background loops (campaign runner, analysis, the live
// stream's campaign watch). Each loop is started by name with a context that
// shutdown cancels, and gets a stop step in the lifecycle where it starts, so
// that it is awaited before the components it uses stop. The first of those
// steps cancels every loop at once: a loop that does not return holds up no
// other loop's stop, and the step of each one that misses the deadline names it.
type loops struct {
	lc     *lifecycle
	ctx    context.Context
	cancel context.CancelFunc
}

func newLoops(lc *lifecycle) *loops {
	ctx, cancel := context.WithCancel(context.Background())
	return &loops{lc: lc, ctx: ctx, cancel: cancel}
}

// start runs loop on its own goroutine until shutdown cancels its context,
// and registers the stop step that waits for it to return.
func (l *loops) start(name string, loop func(ctx context.Context)) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		loop(l.ctx)
		if l.ctx.Err() == nil {
			l.lc.logger.Error("background loop returned before shutdown", "component", name)
		}
	}()
	l.lc.onStop(name, func(ctx context.Context) error {
		l.cancel()
		select {
		case <-done: // preferred to an expired ctx: the loop did end
			return nil
		default:
		}
		select {
		case <-done:
			return nil
		case <-ctx.Done():
			return fmt.Errorf("loop did not return within the shutdown deadline: %w", ctx.Err())
		}
	})
}
