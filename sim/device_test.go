package sim

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// devicesOf lays out a fleet's devices as New would, without connecting.
func devicesOf(t *testing.T, f Fleet) []*device {
	t.Helper()
	if err := f.Validate(); err != nil {
		t.Fatal(err)
	}
	s := &Simulator{fleet: &f}
	if err := s.buildDevices(); err != nil {
		t.Fatal(err)
	}
	return s.devices
}

func flapFleet(c Cohort) Fleet {
	return Fleet{Server: Server{MQTT: "tcp://127.0.0.1:1883", API: "http://127.0.0.1:8080"}, Run: RunOptions{Register: true},
		Cohorts: []Cohort{c}}
}

func TestFlapJitter(t *testing.T) {
	every, jitter := 3*time.Second, 3*time.Second
	c := Cohort{Name: "j", Count: 3, FlapEvery: Duration(every), FlapJitter: Duration(jitter)}
	schedules := func() [][]time.Duration {
		var out [][]time.Duration
		for _, d := range devicesOf(t, flapFleet(c)) {
			var s []time.Duration
			for range 200 {
				s = append(s, d.flapAfter())
			}
			out = append(out, s)
		}
		return out
	}
	first, second := schedules(), schedules()
	if diff := cmp.Diff(first, second); diff != "" {
		t.Fatalf("two runs of the same fleet flap at different times (-first +second):\n%s", diff)
	}
	if cmp.Equal(first[0], first[1]) {
		t.Fatal("devices j-0 and j-1 flap in lockstep: the jitter is not per device")
	}
	for i, s := range first {
		lo, hi := s[0], s[0]
		for _, v := range s {
			if v < every || v >= every+jitter {
				t.Fatalf("device %d: session of %s, want within [%s, %s)", i, v, every, every+jitter)
			}
			lo, hi = min(lo, v), max(hi, v)
		}
		// 200 uniform draws cover most of the range.
		if lo > every+jitter/10 || hi < every+jitter*9/10 {
			t.Errorf("device %d: sessions only span %s–%s of %s–%s", i, lo, hi, every, every+jitter)
		}
	}

	steady := devicesOf(t, flapFleet(Cohort{Name: "s", Count: 1, FlapEvery: Duration(every)}))[0]
	if got := steady.flapAfter(); got != every {
		t.Errorf("without flap_jitter: session of %s, want %s", got, every)
	}
	none := devicesOf(t, flapFleet(Cohort{Name: "n", Count: 1}))[0]
	if got := none.flapAfter(); got != 0 {
		t.Errorf("without flap_every: %s, want 0 (no flap)", got)
	}
	twins := devicesOf(t, flapFleet(Cohort{Name: "t", Count: 2, DuplicateIDs: true, FlapEvery: Duration(every), FlapJitter: Duration(jitter)}))
	a, b := twins[0].flapAfter(), twins[1].flapAfter()
	for range 5 {
		if a != b {
			break
		}
		a, b = twins[0].flapAfter(), twins[1].flapAfter()
	}
	if a == b {
		t.Error("the two devices of a duplicate pair flap in lockstep")
	}
}

func TestDuplicateFrom(t *testing.T) {
	two := []string{"127.0.0.1", "127.0.0.3"}
	three := []string{"127.0.0.1", "127.0.0.3", "127.0.0.4"}
	tests := []struct {
		name string
		from string
		srcs []string
		want []string // source address of each device, "" = the system's choice
	}{
		{"default", "", nil, []string{"", "127.0.0.2", "", "127.0.0.2"}},
		{"different addresses, two sources", "different_addresses", two, []string{"127.0.0.1", "127.0.0.3", "127.0.0.1", "127.0.0.3"}},
		{"different addresses, three sources", "different_addresses", three, []string{"127.0.0.1", "127.0.0.3", "127.0.0.4", "127.0.0.1"}},
		{"same address", "same_address", nil, []string{"", "", "", ""}},
		{"same address, three sources", "same_address", three, []string{"127.0.0.1", "127.0.0.1", "127.0.0.4", "127.0.0.4"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := flapFleet(Cohort{Name: "clone", Count: 4, DuplicateIDs: true, DuplicateFrom: tt.from})
			f.Run.SourceAddrs = tt.srcs
			var got, ids []string
			for _, d := range devicesOf(t, f) {
				s := ""
				if d.src != nil {
					s = d.src.String()
				}
				got = append(got, s)
				ids = append(ids, d.id)
			}
			if diff := cmp.Diff([]string{"clone-0", "clone-0", "clone-1", "clone-1"}, ids); diff != "" {
				t.Errorf("ids mismatch (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("source addresses mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

func TestOversizedPayload(t *testing.T) {
	for _, n := range []int{minOversizedBytes, defaultOversizedBytes} {
		p := oversizedPayload(n)
		var v map[string]string
		if len(p) != n || json.Unmarshal(p, &v) != nil {
			t.Errorf("oversizedPayload(%d): %d bytes, valid JSON %v", n, len(p), json.Unmarshal(p, &v) == nil)
		}
	}
	ds := devicesOf(t, flapFleet(Cohort{Name: "big", Count: 2, OversizedEvery: Duration(time.Second)}))
	if len(ds[0].oversize) != defaultOversizedBytes || &ds[0].oversize[0] != &ds[1].oversize[0] {
		t.Errorf("oversized payload: %d bytes, shared %v; want %d bytes, one per cohort",
			len(ds[0].oversize), &ds[0].oversize[0] == &ds[1].oversize[0], defaultOversizedBytes)
	}
}
