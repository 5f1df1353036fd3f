package broker

import (
	"testing"
	"time"
)

func TestSurgeDetector(t *testing.T) {
	t0 := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	tick := func(i int) time.Time { return t0.Add(time.Duration(i) * settleTick) }
	run := func(d *surgeDetector, from int, totals ...int64) []int {
		var settled []int
		for i, n := range totals {
			if d.step(n, tick(from+i)) {
				settled = append(settled, from+i)
			}
		}
		return settled
	}
	t.Run("a surge settles once it has been quiet for settleQuietFor ticks", func(t *testing.T) {
		var d surgeDetector
		got := run(&d, 0, 500, 1000, 1500, 1510, 1520, 1530, 1540, 1550)
		if len(got) != 1 || got[0] != 5 {
			t.Fatalf("settled at ticks %v, want [5]", got)
		}
	})
	t.Run("a trickle is no surge", func(t *testing.T) {
		var d surgeDetector
		totals := make([]int64, 600)
		for i := range totals {
			totals[i] = int64(i * 10) // 6 000 connects over ten minutes
		}
		if got := run(&d, 0, totals...); len(got) != 0 {
			t.Fatalf("settled at %v", got)
		}
	})
	t.Run("a second surge within settleMinGap waits for the gap", func(t *testing.T) {
		var d surgeDetector
		if got := run(&d, 0, 2000, 2000, 2000, 2000); len(got) != 1 {
			t.Fatalf("first surge settled at %v", got)
		}
		if got := run(&d, 4, 4000, 4000, 4000, 4000, 4000); len(got) != 0 {
			t.Fatalf("second surge settled at %v, within the gap", got)
		}
		gap := int(settleMinGap / settleTick)
		if got := run(&d, 3+gap, 4000); len(got) != 1 { // the first settled at tick 3
			t.Fatalf("second surge did not settle after the gap: %v", got)
		}
	})
}
