package fleet

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/fleetd/fleetd/internal/pgtest"
)

// The event writer, the last_seen flusher and the analysis (and the same
// writers of other replicas) update overlapping device rows at once; in
// whatever order each gets its rows, none may deadlock (SQLSTATE 40P01).
func TestDeviceWritersDoNotDeadlock(t *testing.T) {
	pool := pgtest.New(t)
	s := NewStore(pool)
	ctx := context.Background()
	const n = 200
	ids := make([]string, n)
	for i := range ids {
		ids[i] = fmt.Sprintf("lock-%03d", i)
	}
	if _, err := pool.Exec(ctx, `INSERT INTO devices (id, model) SELECT unnest($1::text[]), 'gw-100'`, ids); err != nil {
		t.Fatal(err)
	}
	shuffled := func() []string {
		out := append([]string(nil), ids...)
		rand.Shuffle(len(out), func(i, j int) { out[i], out[j] = out[j], out[i] })
		return out
	}
	deadline := time.Now().Add(2 * time.Second)
	var epoch int64
	var mu sync.Mutex
	errs := make(chan error, 8)
	var wg sync.WaitGroup
	run := func(f func() error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(deadline) {
				if err := f(); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	for range 2 {
		run(func() error {
			now := time.Now()
			var evs []Event
			for _, id := range shuffled() {
				mu.Lock()
				epoch++
				e := epoch
				mu.Unlock()
				evs = append(evs, Event{ID: NewEventID(now), DeviceID: id, At: now, Kind: KindConnect, SessionEpoch: e},
					Event{ID: NewEventID(now), DeviceID: id, At: now, Kind: KindBirth, Firmware: "1.0.0"})
			}
			return s.writeEvents(ctx, evs)
		})
		run(func() error {
			seen := map[string]time.Time{}
			for _, id := range shuffled()[:n/2] {
				seen[id] = time.Now()
			}
			return s.touchLastSeen(ctx, seen)
		})
		flip := 0
		run(func() error {
			// Every group the analysis sees, flipped between compatible and
			// not, so that each round rewrites every device.
			groups, err := s.compatGroups(ctx)
			if err != nil {
				return err
			}
			flip++
			lists := make([][]Incompatibility, len(groups))
			for i := range lists {
				if flip%2 == 0 {
					lists[i] = []Incompatibility{{Reason: "firmware_flagged", Detail: "lock order"}}
				}
			}
			return s.setCompat(ctx, groups, lists)
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("concurrent device writers: %v", err)
	}
}
