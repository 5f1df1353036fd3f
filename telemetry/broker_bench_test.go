package telemetry_test

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/fleetd/fleetd/broker"
	"github.com/fleetd/fleetd/internal/brokertest"
	"github.com/fleetd/fleetd/telemetry"
)

// BenchmarkPublishQoS0 is the regression guard of the per-message path
// (issue #21, "CPU per QoS 0 message"; issue #17, telemetry ingest): 100
// devices on raw TCP publish QoS 0 telemetry (the telemetry-ingest
// benchmark's message, three metrics and a link, four packets to a TCP
// write) through a real broker with fleetd's hooks, its wire sniffer and
// telemetry wired as cmd/fleetd wires it. An op is one message, counted once
// the ingest took it, and, in "stored", once the writer committed it, so
// ns/op and allocs/op are the whole process's cost of a message: broker,
// hooks, parse, queue and COPY (PostgreSQL's own CPU is not in them);
// cpu-ns/op is the process's CPU time per message, the 100 devices' writes
// included.
//
//   - sampled: the default telemetry rate (1/s per device): nearly every
//     message is dropped by the ingest's sampling, as in bench/run.sh
//     per-message;
//   - stored: an unlimited telemetry rate, every message parsed, queued and
//     written, as in bench/run.sh telemetry-ingest;
//   - paced: sampled, but each device writes one message at a time, 200 a
//     second (20 000/s in all), as bench/run.sh per-message 20 20000 does:
//     every message is then a read of its own, and the broker's goroutines
//     wait and wake for each, which the two others, reading several
//     messages a time, do not show. Its ns/op is the pace; cpu-ns/op counts.
//
// Run it with a fixed count of at most a million messages, e.g.
//
//	go test -run '^$' -bench BenchmarkPublishQoS0 -benchtime 200000x -cpuprofile cpu.out -memprofile mem.out ./telemetry/
func BenchmarkPublishQoS0(b *testing.B) {
	const devices, pacedRate = 100, 200
	env := brokertest.Start(b, func(c *broker.Config) { c.PublishRate = -1 })
	store := telemetry.NewStore(env.Pool)
	if _, err := (&telemetry.Retention{}).Apply(context.Background(), store); err != nil {
		b.Fatal(err)
	}
	// The handler stays registered across sub-benchmarks; each run swaps in
	// its own ingest.
	var current atomic.Pointer[telemetry.Ingest]
	var handled atomic.Int64
	env.Broker.HandleSession("telemetry", func(s broker.Session, payload []byte) error {
		err := current.Load().Handle(telemetry.Session{DeviceID: s.DeviceID, Epoch: s.Epoch, Firmware: s.Firmware, Model: s.Model}, payload)
		handled.Add(1)
		return err
	})
	conns := make([]*mqttConn, devices)
	packets := make([][]byte, devices)
	for i := range conns {
		id := fmt.Sprintf("bench-%03d", i)
		conns[i] = dialDevice(b, env.Addrs["tcp"], id, env.Register(b, id, "gw"))
		payload := fmt.Sprintf(`{"rssi_dbm":-67,"channel":6,"uptime_s":3600,"bssid":"aa:bb:cc:dd:ee:%02x","ssid":"shop","band":"2.4"}`, i)
		p := frame(0x30, append(lenPrefixed(nil, "devices/"+id+"/telemetry"), payload...))
		for range 4 {
			packets[i] = append(packets[i], p...)
		}
	}
	// One writer for every run, as in fleetd: its queue's memory is touched
	// once, not by every run. The queue holds a run of up to a million
	// messages, sent faster than a database takes them.
	reg := prometheus.NewRegistry()
	w := telemetry.NewWriter(store, telemetry.WriterOptions{QueueSize: 1_000_000, Registerer: reg})
	b.Cleanup(func() { w.Close(context.Background()) })
	for _, c := range []struct {
		name  string
		rate  float64
		paced bool
	}{{"sampled", 1, false}, {"stored", -1, false}, {"paced", 1, true}} {
		b.Run(c.name, func(b *testing.B) {
			current.Store(telemetry.NewIngest(w, env.Recorder, telemetry.IngestOptions{Rate: c.rate, Node: "bench"}))
			start := handled.Load()
			written := func() float64 {
				return counter(b, reg, "fleetd_telemetry_written_total") + counter(b, reg, "fleetd_telemetry_dropped_total")
			}
			stored, dropped := written(), counter(b, reg, "fleetd_telemetry_dropped_total")
			b.ReportAllocs()
			cpu0 := cpuTime(b)
			b.ResetTimer()
			var wg sync.WaitGroup
			for i, conn := range conns {
				n := b.N / devices
				if i < b.N%devices {
					n++
				}
				wg.Add(1)
				go func() {
					defer wg.Done()
					one := len(packets[i]) / 4
					if c.paced {
						t := time.NewTicker(time.Second / pacedRate)
						defer t.Stop()
						for ; n > 0; n-- {
							<-t.C
							if _, err := conn.conn.Write(packets[i][:one]); err != nil {
								b.Error(err)
								return
							}
						}
						return
					}
					for n > 0 {
						k := min(n, 4)
						if _, err := conn.conn.Write(packets[i][:k*one]); err != nil {
							b.Error(err)
							return
						}
						n -= k
					}
				}()
			}
			wg.Wait()
			waitFor(b, func() bool { return handled.Load()-start >= int64(b.N) })
			if c.rate < 0 {
				waitFor(b, func() bool { return written()-stored >= float64(b.N) })
			}
			b.StopTimer()
			b.ReportMetric(float64(cpuTime(b)-cpu0)/float64(b.N), "cpu-ns/op")
			if d := counter(b, reg, "fleetd_telemetry_dropped_total") - dropped; d > 0 {
				b.Logf("%g messages dropped at the writer's queue (1 000 000)", d)
			}
		})
	}
}

// waitFor polls cond until it holds, for at most a minute. It polls every
// 10 ms: a Gather of the registry per millisecond was 4 % of the profile.
func waitFor(b *testing.B, cond func() bool) {
	b.Helper()
	deadline := time.Now().Add(time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			b.Fatal("the broker did not take every message within a minute")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// cpuTime is the CPU time the process used so far, user and system: on a
// shared machine a message's CPU is steadier than its wall time (ns/op),
// which includes waiting for PostgreSQL and for the other processes.
func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// counter sums the samples of a counter in reg.
func counter(b *testing.B, reg *prometheus.Registry, name string) float64 {
	b.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		b.Fatal(err)
	}
	sum := 0.0
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			sum += m.GetCounter().GetValue()
		}
	}
	return sum
}
