package firmware

import (
	"bytes"
	"fmt"
	"log/slog"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// One device repeating a subscription 20 000 times cannot push another
// device's birth out of the queue: notes coalesce per device.
func TestNoteQueueNeverDrops(t *testing.T) {
	q := newNoteQueue()
	q.add(deviceNote{deviceID: "noisy", listening: true})
	for range 20000 {
		q.add(deviceNote{deviceID: "noisy", listening: true})
	}
	for i := range 5000 {
		q.add(deviceNote{deviceID: fmt.Sprintf("gw-%d", i), firmware: "1.0.0"})
	}
	q.add(deviceNote{deviceID: "gw-7", firmware: "2.0.0"})
	q.add(deviceNote{deviceID: "gw-7", listening: true})
	got := map[string][]deviceNote{}
	for _, n := range q.take() {
		got[n.deviceID] = append(got[n.deviceID], n)
	}
	if len(got) != 5001 {
		t.Fatalf("%d devices in the queue, want 5001 (none dropped)", len(got))
	}
	want := []deviceNote{{deviceID: "gw-7", firmware: "2.0.0"}, {deviceID: "gw-7", listening: true}}
	if diff := cmp.Diff(want, got["gw-7"], cmp.AllowUnexported(deviceNote{})); diff != "" {
		t.Fatalf("gw-7: birth first, latest firmware; mismatch (-want +got):\n%s", diff)
	}
	if len(got["noisy"]) != 1 {
		t.Fatalf("noisy: %d notes, want 1", len(got["noisy"]))
	}
	if n := len(q.take()); n != 0 {
		t.Fatalf("%d notes left after take", n)
	}
}

// A malformed OTA status is logged as a bounded excerpt, not whole.
func TestMalformedStatusLogIsBounded(t *testing.T) {
	var logs bytes.Buffer
	c := NewCampaigns(nil, nil, nil, nil, "http://127.0.0.1", slog.New(slog.NewTextHandler(&logs, nil)))
	for range 5 {
		if err := c.HandleStatus("gw-1", []byte(`{"job_id":`+strings.Repeat("9", 200_000))); err != nil {
			t.Fatal(err)
		}
	}
	if logs.Len() > 5*1024 {
		t.Fatalf("%d bytes of log for 5 malformed reports; want bounded excerpts", logs.Len())
	}
}
