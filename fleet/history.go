package fleet

import (
	"context"
	"time"
)

// HistoryQuery asks for the fleet's connection history: buckets of Step
// between From and To. A zero To is now; a zero From makes 60 buckets.
type HistoryQuery struct {
	From, To time.Time
	// Step is one of HistorySteps; empty means "1m".
	Step string
}

// HistorySteps are the bucket sizes FleetHistory serves, by name.
var HistorySteps = map[string]time.Duration{"1m": time.Minute, "5m": 5 * time.Minute, "1h": time.Hour, "1d": 24 * time.Hour}

// MaxHistoryBuckets bounds one FleetHistory answer.
const MaxHistoryBuckets = 2000

// FleetHistory is the fleet's connects, disconnects and refusals over time.
type FleetHistory struct {
	// From and To are the start of the first bucket and the end of the last.
	From time.Time `json:"from"`
	To   time.Time `json:"to"`
	Step string    `json:"step"`
	// Buckets cover [From, To) in order, every one of them, empty or not.
	Buckets []HistoryBucket `json:"buckets"`
}

// HistoryBucket counts the events of one step.
type HistoryBucket struct {
	At          time.Time        `json:"at"`
	Connects    int64            `json:"connects"`
	Disconnects map[Reason]int64 `json:"disconnects"`
	Refused     map[Reason]int64 `json:"refused"`
}

// FleetHistory returns connects, disconnects by reason and refused
// connection attempts by reason, per bucket of q.Step. Buckets are aligned
// on the step in UTC (a day is a UTC day): the first holds q.From, the last
// the instant before q.To. It reads the rollups, so its cost is the number
// of buckets, not of events; history goes back as far as the rollups are
// kept (EventRetention). A bad step, a range that is empty or longer than
// MaxHistoryBuckets steps is a *ValidationError naming the field.
func (s *Service) FleetHistory(ctx context.Context, q HistoryQuery) (FleetHistory, error) {
	if q.Step == "" {
		q.Step = "1m"
	}
	step, ok := HistorySteps[q.Step]
	if !ok {
		return FleetHistory{}, invalid("step", "must be 1m, 5m, 1h or 1d, not %q", q.Step)
	}
	if q.To.IsZero() {
		q.To = s.now()
	}
	if q.From.IsZero() { // 60 buckets, the last one holding the instant before To
		q.From = q.To.Add(-time.Nanosecond).UTC().Truncate(step).Add(-59 * step)
	}
	if !q.To.After(q.From) {
		return FleetHistory{}, invalid("to", "must be after from")
	}
	start := q.From.UTC().Truncate(step)
	n := (q.To.Sub(start) + step - 1) / step
	if n > MaxHistoryBuckets {
		return FleetHistory{}, invalid("step", "%s to %s is %d buckets of %s; at most %d: use a longer step or a shorter range",
			q.From.UTC().Format(time.RFC3339), q.To.UTC().Format(time.RFC3339), n, q.Step, MaxHistoryBuckets)
	}
	h := FleetHistory{From: start, To: start.Add(time.Duration(n) * step), Step: q.Step, Buckets: make([]HistoryBucket, n)}
	for i := range h.Buckets {
		h.Buckets[i] = HistoryBucket{At: start.Add(time.Duration(i) * step), Disconnects: map[Reason]int64{}, Refused: map[Reason]int64{}}
	}
	err := s.store.historyCounts(ctx, h.From, h.To, step, func(at time.Time, kind Kind, reason Reason, count int64) {
		i := int(at.Sub(start) / step)
		if i < 0 || i >= len(h.Buckets) {
			return
		}
		b := &h.Buckets[i]
		switch kind {
		case KindConnect:
			b.Connects += count
		case KindDisconnect:
			b.Disconnects[reason] += count
		case KindRefused:
			b.Refused[reason] += count
		}
	})
	if err != nil {
		return FleetHistory{}, err
	}
	return h, nil
}
