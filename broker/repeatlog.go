package broker

import (
	"context"
	"log/slog"
	"sync"
	"time"
)

// repeatLog logs the first occurrence of a key (a device id, a source
// address) at once and folds the repeats that follow within an interval into
// one line with a count, so that a device or an attacker repeating the same
// refused attempt at the broker's connect rate cannot flood the log.
type repeatLog struct {
	log      *slog.Logger
	interval time.Duration

	mu       sync.Mutex
	seen     map[string]*repeated
	overflow int // lines not logged because seen was full
}

type repeated struct {
	level slog.Level
	msg   string
	attrs []any // of the latest repeat
	n     int   // repeats since the first line
}

// maxRepeatKeys bounds the memory of a flood of distinct keys (random ids):
// past it, lines are only counted.
const maxRepeatKeys = 4096

func newRepeatLog(log *slog.Logger, interval time.Duration) *repeatLog {
	return &repeatLog{log: log, interval: interval, seen: map[string]*repeated{}}
}

// Log writes msg now if key has not been logged in this interval, and
// otherwise counts it for the summary line.
func (r *repeatLog) Log(level slog.Level, key, msg string, attrs ...any) {
	r.mu.Lock()
	if e, ok := r.seen[key]; ok {
		e.n++
		e.attrs = attrs
		r.mu.Unlock()
		return
	}
	if len(r.seen) >= maxRepeatKeys {
		r.overflow++
		r.mu.Unlock()
		return
	}
	r.seen[key] = &repeated{level: level, msg: msg}
	r.mu.Unlock()
	r.log.Log(context.Background(), level, msg, attrs...)
}

// flush writes one summary line per key that repeated, and starts a new
// interval.
func (r *repeatLog) flush() {
	r.mu.Lock()
	seen, overflow := r.seen, r.overflow
	r.seen, r.overflow = map[string]*repeated{}, 0
	r.mu.Unlock()
	for _, e := range seen {
		if e.n > 0 {
			r.log.Log(context.Background(), e.level, e.msg+" (repeated)", append(e.attrs, "repeats", e.n, "interval", r.interval.String())...)
		}
	}
	if overflow > 0 {
		r.log.Warn("more log lines of refused connections than distinct keys kept; counted only", "lines", overflow, "interval", r.interval.String())
	}
}

func (r *repeatLog) loop(stop <-chan struct{}) {
	t := time.NewTicker(r.interval)
	defer t.Stop()
	for {
		select {
		case <-stop:
			r.flush()
			return
		case <-t.C:
			r.flush()
		}
	}
}
