package telemetry

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/fleetd/fleetd/internal/pgtest"
)

// BenchmarkWriter measures messages per second the writer stores: 20 000
// devices each sending the example message (three metrics and a
// link) once a second, queued faster than the writer takes them, until all
// are committed with their rollups. Run it with a fixed count, e.g.
//
//	go test -run '^$' -bench BenchmarkWriter -benchtime 400000x ./telemetry/
func BenchmarkWriter(b *testing.B) {
	const devices = 20_000
	pool := pgtest.New(b)
	s := NewStore(pool)
	start := time.Now().UTC().Truncate(time.Second)
	if _, err := s.ensurePartitions(context.Background(), start, start.AddDate(0, 0, 1)); err != nil {
		b.Fatal(err)
	}
	ids := make([]string, devices)
	for i := range ids {
		ids[i] = fmt.Sprintf("bench-%05d", i)
	}
	w := NewWriter(s, WriterOptions{QueueSize: b.N, Writers: benchWriters()})
	b.ResetTimer()
	t0 := time.Now()
	for i := range b.N {
		at := start.Add(time.Duration(i/devices)*time.Second + time.Duration(i%devices)*time.Microsecond)
		w.Enqueue(Entry{DeviceID: ids[i%devices], At: at, Message: Message{
			Metrics: []Metric{{"rssi_dbm", float64(-40 - i%50)}, {"channel", 6}, {"uptime_s", float64(i / devices)}},
			Link:    Link{BSSID: "aa:bb:cc:dd:ee:ff", SSID: "shop", Band: "2.4", Channel: 6},
		}})
	}
	for testutil.ToFloat64(w.mWritten) < float64(b.N) {
		time.Sleep(5 * time.Millisecond)
	}
	elapsed := time.Since(t0)
	b.StopTimer()
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "msgs/s")
	b.ReportMetric(3*float64(b.N)/elapsed.Seconds(), "points/s")
	w.Close(context.Background())
}

func benchWriters() int {
	n := 0
	fmt.Sscan(os.Getenv("BENCH_WRITERS"), &n)
	return n
}
