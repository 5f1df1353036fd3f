package pending

import (
	"slices"
	"testing"
)

func TestIDs(t *testing.T) {
	q := New()
	q.Add("b")
	q.Add("a")
	q.Add("b")
	select {
	case <-q.Wake():
	default:
		t.Fatal("no wake-up after Add")
	}
	select {
	case <-q.Wake():
		t.Fatal("a second wake-up for Adds before one read")
	default:
	}
	got := q.Take()
	slices.Sort(got)
	if !slices.Equal(got, []string{"a", "b"}) {
		t.Errorf("Take = %v, want each id once", got)
	}
	if got := q.Take(); len(got) != 0 {
		t.Errorf("second Take = %v, want nothing", got)
	}
}
