package telemetry

import (
	"context"
	"math"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// TestCopyRoundTrip: what the binary COPY (copyRaw) writes reads back as
// the entries were, through the fast way and the checked one (writeBatch
// again after a lost commit): names and values in order, negative zero and
// extremes, a link with and without each field, microseconds, UTF-8.
func TestCopyRoundTrip(t *testing.T) {
	s, pool := newTestStore(t)
	base := at(10, 0, 0).Add(123456 * time.Microsecond)
	in := []Entry{
		{DeviceID: "d1", At: base, Message: Message{
			Metrics: []Metric{{"rssi_dbm", -67}, {"zero", math.Copysign(0, -1)}, {"big", math.MaxFloat64}, {"tiny", 5e-324}},
			Link:    Link{BSSID: "aa:bb:cc:dd:ee:ff", SSID: "café ☕", Band: "2.4", Channel: 233}}},
		{DeviceID: "d1", At: base.Add(time.Microsecond), Message: Message{Link: Link{Channel: 1}}},
		{DeviceID: "d2", At: base, Message: Message{Metrics: []Metric{{"uptime_s", 3600}}}},
	}
	write(t, s, in...)
	write(t, s, in...) // stored once (the checked way, through telemetry_in)
	rows, err := pool.Query(context.Background(), `SELECT device_id, at, names, vals, coalesce(bssid, ''), coalesce(ssid, ''), coalesce(band, ''), coalesce(channel, 0)
		FROM telemetry_raw ORDER BY device_id, at`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var got []Entry
	for rows.Next() {
		var e Entry
		var names []string
		var vals []float64
		var channel int16
		if err := rows.Scan(&e.DeviceID, &e.At, &names, &vals, &e.Link.BSSID, &e.Link.SSID, &e.Link.Band, &channel); err != nil {
			t.Fatal(err)
		}
		e.Link.Channel = int(channel)
		for i := range names {
			e.Metrics = append(e.Metrics, Metric{names[i], vals[i]})
		}
		got = append(got, e)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(in, got, cmp.Comparer(func(a, b time.Time) bool { return a.Equal(b) }),
		cmp.Comparer(func(a, b float64) bool { return a == b && math.Signbit(a) == math.Signbit(b) })); diff != "" {
		t.Errorf("rows mismatch (-want +got):\n%s", diff)
	}
}
