package sim

import (
	"fmt"
	"io"
	"sort"
	"sync"
	"sync/atomic"
	"time"
)

// stats counts what the fleet did; Summary renders it.
type stats struct {
	attempts  atomic.Int64
	connects  atomic.Int64
	online    atomic.Int64
	messages  atomic.Int64
	started   time.Time
	mu        sync.Mutex
	latencies []time.Duration // connect latencies (reservoir once full)
	seen      int64
	errors    map[string]int64
	counts    map[string]int64
}

const maxLatencySamples = 200_000

func newStats() *stats {
	return &stats{started: time.Now(), errors: map[string]int64{}, counts: map[string]int64{}}
}

func (s *stats) connected(latency time.Duration) {
	s.attempts.Add(1)
	s.connects.Add(1)
	s.online.Add(1)
	s.mu.Lock()
	s.seen++
	if len(s.latencies) < maxLatencySamples {
		s.latencies = append(s.latencies, latency)
	} else if i := randN(s.seen); i < maxLatencySamples {
		s.latencies[i] = latency
	}
	s.mu.Unlock()
}

func (s *stats) connectFailed(kind string) {
	s.attempts.Add(1)
	s.mu.Lock()
	s.errors[kind]++
	s.mu.Unlock()
}

func (s *stats) disconnected() { s.online.Add(-1) }
func (s *stats) sent()         { s.messages.Add(1) }

func (s *stats) count(what string) {
	s.mu.Lock()
	s.counts[what]++
	s.mu.Unlock()
}

func (s *stats) errorTotal() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	var n int64
	for _, v := range s.errors {
		n += v
	}
	return n
}

// Summary is the JSON summary printed at the end of a run.
type Summary struct {
	Devices          int              `json:"devices"`
	Online           int64            `json:"online_at_end"`
	ConnectAttempts  int64            `json:"connect_attempts"`
	Connects         int64            `json:"connects"`
	ConnectLatencyMS Percentiles      `json:"connect_latency_ms"`
	MessagesSent     int64            `json:"messages_sent"`
	Errors           map[string]int64 `json:"errors"`
	Events           map[string]int64 `json:"events"`
	DurationSeconds  float64          `json:"duration_s"`
}

// Percentiles of connect latency in milliseconds.
type Percentiles struct {
	P50 float64 `json:"p50"`
	P90 float64 `json:"p90"`
	P99 float64 `json:"p99"`
	Max float64 `json:"max"`
}

func (s *stats) summary(devices int) Summary {
	s.mu.Lock()
	defer s.mu.Unlock()
	lat := append([]time.Duration(nil), s.latencies...)
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	pct := func(p float64) float64 {
		if len(lat) == 0 {
			return 0
		}
		return float64(lat[min(len(lat)-1, int(p*float64(len(lat))))].Microseconds()) / 1000
	}
	errs, counts := map[string]int64{}, map[string]int64{}
	for k, v := range s.errors {
		errs[k] = v
	}
	for k, v := range s.counts {
		counts[k] = v
	}
	out := Summary{Devices: devices, Online: s.online.Load(), ConnectAttempts: s.attempts.Load(), Connects: s.connects.Load(),
		MessagesSent: s.messages.Load(), Errors: errs, Events: counts, DurationSeconds: time.Since(s.started).Seconds()}
	out.ConnectLatencyMS = Percentiles{P50: pct(0.5), P90: pct(0.9), P99: pct(0.99)}
	if len(lat) > 0 {
		out.ConnectLatencyMS.Max = float64(lat[len(lat)-1].Microseconds()) / 1000
	}
	return out
}

// progressLine prints "connected/target, connects/s, errors" once per interval.
func (s *stats) progressLine(w io.Writer, target int, prevConnects *int64, interval time.Duration) {
	c := s.connects.Load()
	rate := float64(c-*prevConnects) / interval.Seconds()
	*prevConnects = c
	fmt.Fprintf(w, "\r%6.0fs  online %d/%d  connects/s %.0f  errors %d   ",
		time.Since(s.started).Seconds(), s.online.Load(), target, rate, s.errorTotal())
}
