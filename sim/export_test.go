package sim

import "time"

// FlapSchedule returns the first n session lengths that device id (the first
// of a duplicate pair) of cohort c plays: what the broker should measure.
func FlapSchedule(c Cohort, id string, n int) []time.Duration {
	d := &device{cohort: &c, id: id, flapRnd: flapSource(id, 0)}
	out := make([]time.Duration, n)
	for i := range out {
		out[i] = d.flapAfter()
	}
	return out
}
