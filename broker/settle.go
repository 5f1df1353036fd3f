package broker

import (
	"fmt"
	"log/slog"
	"runtime"
	"runtime/debug"
	"time"
)

// A connection surge (fleetd starting, a reconnect storm after a network
// cut, a replica taking over a dead one's devices) leaves memory behind that
// Go would give back only over the next ten minutes: the stacks the
// connects grew (Go halves a stack at most once per collection, and an idle
// process collects once every two minutes) and the surge's garbage, which
// keeps the heap goal high. So once a surge is over, the broker collects a
// few times and returns the free pages: a replica that has just taken
// 19 000 devices is back at its idle footprint seconds later, not minutes.
const (
	settleMinSurge  = 1000            // connects that make a surge
	settleQuietRate = 50              // connects per tick that still count as quiet
	settleQuietFor  = 3               // quiet ticks that end a surge
	settleTick      = time.Second     // how often the count is read
	settleGCs       = 3               // halvings: a stack grown to 32 KiB is back at 4 KiB
	settleMinGap    = 5 * time.Minute // between two settles, so a flapping fleet does not collect all the time
)

// surgeDetector tells, from the running count of established sessions read
// once a tick, when a surge of connects has ended.
type surgeDetector struct {
	last, surge int64
	quiet       int
	lastSettle  time.Time
}

// step takes the count at now and reports whether to settle.
func (d *surgeDetector) step(total int64, now time.Time) bool {
	n := total - d.last
	d.last = total
	d.surge += n
	if n > settleQuietRate {
		d.quiet = 0
		return false
	}
	if d.surge < settleMinSurge {
		d.surge = 0 // a trickle of connects is no surge
		return false
	}
	d.quiet++
	if d.quiet < settleQuietFor || (!d.lastSettle.IsZero() && now.Sub(d.lastSettle) < settleMinGap) {
		return false
	}
	d.surge, d.quiet, d.lastSettle = 0, 0, now
	return true
}

// settleLoop watches the established sessions and settles after a surge.
func (b *Broker) settleLoop() {
	t := time.NewTicker(settleTick)
	defer t.Stop()
	var d surgeDetector
	for {
		select {
		case <-b.stop:
			return
		case now := <-t.C:
			if d.step(b.established.Load(), now) {
				settle(b.log)
			}
		}
	}
}

// settle collects settleGCs times, shrinking every idle goroutine's stack as
// far as it goes, and returns the free memory to the operating system. The
// collections are concurrent: devices keep being served.
func settle(log *slog.Logger) {
	start := time.Now()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for range settleGCs - 1 {
		runtime.GC()
	}
	debug.FreeOSMemory() // the last collection, and the pages back
	runtime.ReadMemStats(&after)
	log.Info("gave back the memory of a connection surge",
		"stacks_mib", mib(before.StackInuse)+" → "+mib(after.StackInuse),
		"heap_mib", mib(before.HeapInuse)+" → "+mib(after.HeapInuse),
		"released_mib", mib(after.HeapReleased), "took", time.Since(start).Round(time.Millisecond).String())
}

func mib(b uint64) string { return fmt.Sprintf("%.1f", float64(b)/(1<<20)) }
