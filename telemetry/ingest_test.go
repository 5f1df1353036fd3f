package telemetry

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fleetd/fleetd/fleet"
)

// fakeQueue keeps what it is given, up to max (0: no limit).
type fakeQueue struct {
	mu      sync.Mutex
	entries []Entry
	max     int
}

func (q *fakeQueue) Enqueue(e Entry) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.max > 0 && len(q.entries) >= q.max {
		return false
	}
	q.entries = append(q.entries, e)
	return true
}

func (q *fakeQueue) len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.entries)
}

// eventLog keeps the events it is given.
type eventLog struct {
	mu     sync.Mutex
	events []fleet.Event
}

func (l *eventLog) Record(e fleet.Event) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.events = append(l.events, e)
}

func (l *eventLog) details(prefix string) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for _, e := range l.events {
		if strings.HasPrefix(e.Detail, prefix) {
			out = append(out, e.Detail)
		}
	}
	return out
}

// fakeClock is a clock the test moves.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

func newTestIngest(opts IngestOptions) (*Ingest, *fakeQueue, *eventLog, *fakeClock) {
	clock := &fakeClock{now: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)}
	q, ev := &fakeQueue{}, &eventLog{}
	opts.Now, opts.Node = clock.Now, "n1"
	return NewIngest(q, ev, opts), q, ev, clock
}

// TestIngestSamplesAFlood: a device sending 100 messages a second for two
// and a half minutes has its burst and then one message a second stored, and
// gets one rejected event a minute counting what was dropped; another device
// at its own pace loses nothing.
func TestIngestSamplesAFlood(t *testing.T) {
	in, q, ev, clock := newTestIngest(IngestOptions{Rate: 1, Burst: 10})
	flood := Session{DeviceID: "flood", Epoch: 1, Firmware: "1.0", Model: "gw"}
	calm := Session{DeviceID: "calm", Epoch: 1}
	for tick := range 15000 { // 150 s at 100 messages/s
		if err := in.Handle(flood, []byte(`{"rssi_dbm":-60}`)); err != nil {
			t.Fatal(err)
		}
		if tick%100 == 0 {
			in.Handle(calm, []byte(`{"rssi_dbm":-50}`))
		}
		clock.Add(10 * time.Millisecond)
		if tick%1000 == 0 {
			in.Sweep(clock.Now())
		}
	}
	stored := map[string]int{}
	for _, e := range q.entries {
		stored[e.DeviceID]++
	}
	if stored["calm"] != 150 || stored["flood"] < 155 || stored["flood"] > 162 {
		t.Errorf("stored %v; want calm 150 and flood about 10 + 150", stored)
	}
	sampled := ev.details("telemetry sampled")
	if len(sampled) != 3 {
		t.Fatalf("sampled events %q; want 3 in 150 s (at the first drop, then once a minute)", sampled)
	}
	var n int
	fmt.Sscanf(sampled[1], "telemetry sampled: %d messages dropped", &n)
	if !strings.HasPrefix(sampled[0], "telemetry sampled: 1 message dropped") || n < 5900 || n > 6000 {
		t.Errorf("sampled events %q; want the first drop, then the minute's (about 5940)", sampled)
	}
	ev.mu.Lock()
	e := ev.events[0]
	ev.mu.Unlock()
	if e.Kind != fleet.KindRejected || e.DeviceID != "flood" || e.Firmware != "1.0" || e.Model != "gw" || e.SessionEpoch != 1 || e.BrokerNode != "n1" {
		t.Errorf("event %+v", e)
	}
	// The flood stops; the sweep reports the rest once the minute is up.
	clock.Add(time.Minute)
	in.Sweep(clock.Now())
	if got := ev.details("telemetry sampled"); len(got) != 4 {
		t.Errorf("after the flood: %q; want the trailing count reported", got)
	}
	in.Sweep(clock.Now().Add(2 * time.Minute))
	if got := ev.details("telemetry sampled"); len(got) != 4 {
		t.Errorf("an idle device got another report: %q", got)
	}
}

// TestIngestRefusedOncePerSession: malformed messages, however many, make
// one rejected event per session; the next session reports again.
func TestIngestRefusedOncePerSession(t *testing.T) {
	in, q, ev, clock := newTestIngest(IngestOptions{Rate: -1})
	for epoch := int64(1); epoch <= 2; epoch++ {
		s := Session{DeviceID: "d1", Epoch: epoch}
		for i := range 500 {
			in.Handle(s, []byte(fmt.Sprintf(`{"rssi_dbm":%d,"bssid":"nope"`, i))) // unclosed: malformed
			in.Handle(s, []byte(`{"rssi_dbm":-1,"bssid":"nope"}`))                // partly kept
			clock.Add(time.Millisecond)
		}
	}
	got := ev.details("telemetry")
	if len(got) != 2 || !strings.Contains(got[0], "message not kept") || !strings.Contains(got[0], "once per session") {
		t.Fatalf("rejected events %q; want one per session", got)
	}
	if q.len() != 1000 {
		t.Errorf("%d messages queued; want the 1000 partly kept ones", q.len())
	}
}

// TestIngestBoundsNames: a device inventing metric names keeps at most
// MaxNames of them.
func TestIngestBoundsNames(t *testing.T) {
	in, q, ev, _ := newTestIngest(IngestOptions{Rate: -1, MaxNames: 4})
	s := Session{DeviceID: "d1", Epoch: 1}
	for i := range 10 {
		in.Handle(s, []byte(fmt.Sprintf(`{"a":1,"n%d":%d}`, i, i)))
	}
	names := map[string]bool{}
	for _, e := range q.entries {
		for _, m := range e.Metrics {
			names[m.Name] = true
		}
	}
	if len(names) != 4 || !names["a"] {
		t.Errorf("names kept %v; want a and the first three others", names)
	}
	if got := ev.details("telemetry"); len(got) != 1 || !strings.Contains(got[0], "metric names past the 4") {
		t.Errorf("rejected events %q", got)
	}
}

// TestIngestTimesIncrease: a device's entries have distinct, increasing
// times at PostgreSQL's precision even when they arrive in the same
// microsecond.
func TestIngestTimesIncrease(t *testing.T) {
	in, q, _, clock := newTestIngest(IngestOptions{Rate: -1})
	clock.Add(123 * time.Nanosecond)
	for range 5 {
		in.Handle(Session{DeviceID: "d1"}, []byte(`{"a":1}`))
	}
	for i, e := range q.entries {
		if e.At.Nanosecond()%1000 != 0 || (i > 0 && !e.At.After(q.entries[i-1].At)) {
			t.Fatalf("entry times %v", q.entries)
		}
	}
}

// TestIngestQueueFull: a full queue drops, and the handler still returns
// at once without error.
func TestIngestQueueFull(t *testing.T) {
	in, q, _, _ := newTestIngest(IngestOptions{Rate: -1})
	q.max = 3
	for range 10 {
		if err := in.Handle(Session{DeviceID: "d1"}, []byte(`{"a":1}`)); err != nil {
			t.Fatal(err)
		}
	}
	if q.len() != 3 {
		t.Errorf("%d queued", q.len())
	}
}

func BenchmarkHandle(b *testing.B) {
	in := NewIngest(&discardQueue{}, &eventLog{}, IngestOptions{Rate: -1})
	payload := []byte(`{"rssi_dbm":-67,"channel":6,"uptime_s":1234,"bssid":"aa:bb:cc:dd:ee:ff","ssid":"shop","band":"2.4"}`)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			i++
			in.Handle(Session{DeviceID: fmt.Sprint("d", i%1000)}, payload)
		}
	})
}

type discardQueue struct{}

func (discardQueue) Enqueue(Entry) bool { return true }
