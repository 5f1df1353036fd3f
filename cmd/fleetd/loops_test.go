package main

import (
	"bytes"
	"context"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// lockedBuffer is a log sink for goroutines that log concurrently.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// TestLoopsStop: stopping the lifecycle cancels every loop and returns only
// once each has returned.
func TestLoopsStop(t *testing.T) {
	logs := &lockedBuffer{}
	lc := &lifecycle{logger: slog.New(slog.NewTextHandler(logs, nil))}
	bg := newLoops(lc)
	var mu sync.Mutex
	var ended []string
	for _, name := range []string{"first", "second"} {
		bg.start(name, func(ctx context.Context) {
			<-ctx.Done()
			time.Sleep(20 * time.Millisecond) // some last work after the cancel, which stop must wait for
			mu.Lock()
			ended = append(ended, name)
			mu.Unlock()
		})
	}
	if err := lc.stop(5 * time.Second); err != nil {
		t.Fatalf("stop: %v\n%s", err, logs)
	}
	mu.Lock()
	got := slices.Sorted(slices.Values(ended))
	mu.Unlock()
	if diff := cmp.Diff([]string{"first", "second"}, got); diff != "" {
		t.Errorf("loops ended before stop returned: mismatch (-want +got):\n%s", diff)
	}
	if strings.Contains(logs.String(), "level=ERROR") {
		t.Errorf("errors logged:\n%s", logs)
	}
}

// TestLoopsStuck: a loop that ignores its context fails its stop step when
// the deadline passes, and is named in the error and the log; the loop that
// did return is not.
func TestLoopsStuck(t *testing.T) {
	logs := &lockedBuffer{}
	lc := &lifecycle{logger: slog.New(slog.NewTextHandler(logs, nil))}
	bg := newLoops(lc)
	release := make(chan struct{})
	defer close(release)
	bg.start("prompt", func(ctx context.Context) { <-ctx.Done() })
	bg.start("stuck", func(context.Context) { <-release })
	bg.start("also prompt", func(ctx context.Context) { <-ctx.Done() })
	began := time.Now()
	err := lc.stop(200 * time.Millisecond)
	if took := time.Since(began); took > 2*time.Second {
		t.Errorf("stop took %s with a deadline of 200ms", took)
	}
	if err == nil || !strings.Contains(err.Error(), "stop stuck:") || strings.Contains(err.Error(), "prompt") {
		t.Fatalf("stop: %v, want an error naming the stuck loop only", err)
	}
	if !strings.Contains(logs.String(), `msg="stop step failed" component=stuck`) {
		t.Errorf("the stuck loop is not logged by name:\n%s", logs)
	}
}

// TestLoopsReturnEarly: a loop that returns before shutdown is logged, as
// whatever it did has stopped happening.
func TestLoopsReturnEarly(t *testing.T) {
	logs := &lockedBuffer{}
	lc := &lifecycle{logger: slog.New(slog.NewTextHandler(logs, nil))}
	bg := newLoops(lc)
	returned := make(chan struct{})
	bg.start("quitter", func(context.Context) { close(returned) })
	<-returned
	for deadline := time.Now().Add(5 * time.Second); !strings.Contains(logs.String(), "component=quitter"); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("a loop that returned before shutdown is not logged:\n%s", logs)
		}
	}
	if err := lc.stop(time.Second); err != nil {
		t.Fatalf("stop: %v", err)
	}
}
