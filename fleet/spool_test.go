package fleet

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestSpoolFileAppendCap checks what an append keeps at the spool's cap: the
// longest prefix of the events that fits, never a line cut at the cap, and
// the first event of an empty spool whatever its size.
func TestSpoolFileAppendCap(t *testing.T) {
	at := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	ev := func(i int, device string) Event {
		return Event{ID: NewEventID(at), DeviceID: device, At: at.Add(time.Duration(i) * time.Second), Kind: KindRefused}
	}
	small := func(n int) []Event {
		var out []Event
		for i := range n {
			out = append(out, ev(i, fmt.Sprintf("d%d", i)))
		}
		return out
	}
	line := int64(len(mustJSONLine(t, ev(0, "d0")))) // every small event's line is this long
	tests := []struct {
		name      string
		max       int64
		before    []Event // already spooled
		events    []Event
		wantN     int
		wantFull  bool
		wantLines int
		overCap   bool // the one event of the spool is longer than the cap
	}{
		{name: "no cap", events: small(5), wantN: 5, wantLines: 5},
		{name: "all fit", max: 5 * line, events: small(5), wantN: 5, wantLines: 5},
		{name: "cut at the cap", max: 3*line + line/2, events: small(5), wantN: 3, wantFull: true, wantLines: 3},
		{name: "already full", max: 2 * line, before: small(2), events: small(3), wantN: 0, wantFull: true, wantLines: 2},
		{name: "room for one more", max: 3 * line, before: small(2), events: small(3), wantN: 1, wantFull: true, wantLines: 3},
		{name: "empty spool takes an event longer than the cap", max: line,
			events: []Event{ev(0, strings.Repeat("x", 500)), ev(1, "d1")}, wantN: 1, wantFull: true, wantLines: 1, overCap: true},
		{name: "non-empty spool refuses it", max: 3 * line, before: small(1),
			events: []Event{ev(0, strings.Repeat("x", 500))}, wantN: 0, wantFull: true, wantLines: 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := &spoolFile{path: filepath.Join(t.TempDir(), "events.jsonl"), max: tt.max}
			if len(tt.before) > 0 {
				if _, err := (&spoolFile{path: s.path}).append(tt.before); err != nil {
					t.Fatal(err)
				}
				if err := s.open(); err != nil {
					t.Fatal(err)
				}
			}
			n, err := s.append(tt.events)
			if n != tt.wantN || errors.Is(err, errSpoolFull) != tt.wantFull || (err != nil && !tt.wantFull) {
				t.Fatalf("append = %d, %v; want %d, full %v", n, err, tt.wantN, tt.wantFull)
			}
			data, err := os.ReadFile(s.path)
			if err != nil && !errors.Is(err, os.ErrNotExist) {
				t.Fatal(err)
			}
			if got := strings.Count(string(data), "\n"); got != tt.wantLines || len(data) > 0 && data[len(data)-1] != '\n' {
				t.Errorf("spool holds %d lines (%d bytes), want %d whole lines", got, len(data), tt.wantLines)
			}
			if s.size != int64(len(data)) {
				t.Errorf("size %d, file %d bytes", s.size, len(data))
			}
			if tt.max > 0 && s.size > tt.max && !tt.overCap {
				t.Errorf("spool of %d bytes is over its cap of %d", s.size, tt.max)
			}
		})
	}
}

func mustJSONLine(t *testing.T, e Event) []byte {
	t.Helper()
	s := &spoolFile{path: filepath.Join(t.TempDir(), "line.jsonl")}
	if _, err := s.append([]Event{e}); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(s.path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
