// Package pending carries device ids from code that must not block (the
// broker's hooks, the replica bus) to a loop that works on them: one entry
// per device however often it is added, so its size is bounded by the
// fleet, and a wake-up that never blocks the adder.
package pending

import "sync"

// IDs is a set of device ids waiting to be taken. The zero value is not
// ready: use New.
type IDs struct {
	mu   sync.Mutex
	ids  map[string]struct{}
	wake chan struct{}
}

// New returns an empty set.
func New() *IDs { return &IDs{ids: map[string]struct{}{}, wake: make(chan struct{}, 1)} }

// Add notes id and wakes the taker.
func (q *IDs) Add(id string) {
	q.mu.Lock()
	q.ids[id] = struct{}{}
	q.mu.Unlock()
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// Take returns the ids added since the last Take, in no order, and empties
// the set.
func (q *IDs) Take() []string {
	q.mu.Lock()
	defer q.mu.Unlock()
	out := make([]string, 0, len(q.ids))
	for id := range q.ids {
		out = append(out, id)
	}
	q.ids = map[string]struct{}{}
	return out
}

// Wake receives after an Add (once for any number of Adds before it is
// read).
func (q *IDs) Wake() <-chan struct{} { return q.wake }
