package main

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// telemetryOptions are the telemetry mode's flags.
type telemetryOptions struct {
	addr     string
	ids      []cred
	rate     int           // messages per second, in total
	duration time.Duration // of sending
	// subscribe: a subscriber on devices/+/telemetry counts what the broker
	// delivers (the peer, which stores nothing).
	subscribe bool
	// metrics: fleetd's /metrics, to read the messages it committed.
	metrics string
	// pids: processes, by name, whose CPU time (with their children's) is
	// measured from the first message to the last one stored or delivered.
	pids map[string]int
}

// telemetryLoad connects every id, then sends QoS 0 telemetry messages (three
// metrics and a link, as the example) at the total rate, spread
// evenly over the devices, for the duration. It then waits
// until the broker has finished with them: fleetd's committed count
// (fleetd_telemetry_written_total) or the subscriber's deliveries stop
// growing for 2 s. It reports messages sent, stored or delivered, both per
// second over the time from the first message to the last one stored or
// delivered, and the CPU time of the watched processes per message.
func telemetryLoad(o telemetryOptions) any {
	conns := make([]net.Conn, len(o.ids))
	if err := inParallel(len(o.ids), 64, func(i int) error {
		conn, r, err := connect(o.addr, o.ids[i], 300, false)
		if err != nil {
			return fmt.Errorf("connect %s: %w", o.ids[i].id, err)
		}
		go io.Copy(io.Discard, r)
		conns[i] = conn
		return nil
	}); err != nil {
		fail(err)
	}
	var delivered atomic.Int64
	if o.subscribe {
		sub, r, err := connect(o.addr, cred{id: "mqttload-subscriber"}, 300, false)
		if err != nil {
			fail(err)
		}
		body := []byte{0, 1}
		body = str(body, "devices/+/telemetry")
		body = append(body, 0)
		sub.Write(packet(0x82, body))
		r.Discard(5) // SUBACK
		go countPublishes(r, &delivered)
	}
	// Four variants of each device's message, so that values move.
	const variants = 4
	msgs := make([][][]byte, len(o.ids))
	for i, c := range o.ids {
		for v := range variants {
			payload := fmt.Sprintf(`{"rssi_dbm":%d,"channel":6,"uptime_s":%d,"bssid":"aa:bb:cc:dd:ee:%02x","ssid":"shop","band":"2.4"}`,
				-45-(i+v*7)%40, 3600+v*10, i%16)
			msgs[i] = append(msgs[i], packet(0x30, append(str(nil, "devices/"+c.id+"/telemetry"), payload...)))
		}
	}
	written := func() float64 { return fleetdCounter(o.metrics, "fleetd_telemetry_written_total") }
	written0 := written()
	cpu0 := cpuTicks(o.pids)
	start := time.Now()

	// Four senders, each for a quarter of the devices. A sender wakes up
	// every tick and writes each of its devices the messages due by then in
	// one write: at most 100 ms apart, and so that a device sending often
	// gets about four messages per write (fewer system calls on both sides,
	// as a gateway batching its reports would do).
	const senders = 4
	perDevice := float64(o.rate) / float64(max(1, len(conns)))
	tick := min(100*time.Millisecond, max(time.Millisecond, time.Duration(4/perDevice*float64(time.Second))))
	var sent atomic.Int64
	var wg sync.WaitGroup
	for s := range senders {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var mine []int
			for i := s; i < len(conns); i += senders {
				mine = append(mine, i)
			}
			if len(mine) == 0 {
				return
			}
			n := make([]int, len(mine)) // messages sent per device
			total := 0
			var buf []byte
			for time.Since(start) < o.duration {
				// Device k of mine is due floor(t × perDevice + k/len)
				// messages by t: spread over the tick.
				t := time.Since(start).Seconds()
				for k, i := range mine {
					due := int(t*perDevice + float64(k)/float64(len(mine)))
					buf = buf[:0]
					for ; n[k] < due; n[k]++ {
						buf = append(buf, msgs[i][n[k]%variants]...)
						total++
					}
					if len(buf) > 0 {
						if _, err := conns[i].Write(buf); err != nil {
							fail(fmt.Errorf("publish: %w", err))
						}
					}
				}
				time.Sleep(tick)
			}
			sent.Add(int64(total))
		}()
	}
	wg.Wait()
	sendEnd := time.Since(start)

	// Wait until the count stops growing for 2 s.
	count := func() float64 {
		if o.subscribe {
			return float64(delivered.Load())
		}
		return written() - written0
	}
	last, lastAt := count(), time.Now()
	for time.Since(lastAt) < 2*time.Second && last < float64(sent.Load()) {
		time.Sleep(100 * time.Millisecond)
		if n := count(); n != last {
			last, lastAt = n, time.Now()
		}
	}
	cpu := cpuTicks(o.pids)
	elapsed := lastAt.Sub(start)
	for _, c := range conns {
		c.Write([]byte{0xE0, 0x00})
		c.Close()
	}
	out := map[string]any{"mode": "telemetry", "devices": len(conns), "sent": sent.Load(), "write_every_ms": tick.Milliseconds(),
		"sent_per_s": round1(float64(sent.Load()) / sendEnd.Seconds()), "seconds": round1(elapsed.Seconds())}
	done := "stored"
	if o.subscribe {
		done = "delivered"
	}
	out[done], out[done+"_per_s"] = int64(last), round1(last/elapsed.Seconds())
	if len(o.pids) > 0 && last > 0 {
		perMsg, secs := map[string]float64{}, map[string]float64{}
		for name := range o.pids {
			d := cpu[name] - cpu0[name]
			perMsg[name], secs[name] = round1(d.Seconds()*1e6/last), round1(d.Seconds())
		}
		out["cpu_us_per_message"], out["cpu_seconds"] = perMsg, secs
	}
	return out
}

func round1(v float64) float64 { return float64(int64(v*10+0.5)) / 10 }

// countPublishes reads a subscriber's packets and counts the PUBLISHes.
func countPublishes(r *bufio.Reader, n *atomic.Int64) {
	for {
		h, err := r.ReadByte()
		if err != nil {
			return
		}
		size, mult := 0, 1
		for {
			b, err := r.ReadByte()
			if err != nil {
				return
			}
			size += int(b&0x7f) * mult
			mult *= 128
			if b&0x80 == 0 {
				break
			}
		}
		if _, err := r.Discard(size); err != nil {
			return
		}
		if h>>4 == 3 {
			n.Add(1)
		}
	}
}

// fleetdCounter reads one counter from a Prometheus text endpoint (0 when
// url is empty or the counter is absent).
func fleetdCounter(url, name string) float64 {
	if url == "" {
		return 0
	}
	resp, err := http.Get(url)
	if err != nil {
		fail(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	for line := range bytes.Lines(b) {
		if rest, ok := bytes.CutPrefix(line, []byte(name+" ")); ok {
			v, _ := strconv.ParseFloat(strings.TrimSpace(string(rest)), 64)
			return v
		}
	}
	return 0
}

// cpuTicks is the CPU time each named process and its children used so far:
// its own and its reaped children's (utime, stime, cutime, cstime), and that
// of its live children (PostgreSQL's backends are the postmaster's).
func cpuTicks(pids map[string]int) map[string]time.Duration {
	out := map[string]time.Duration{}
	if len(pids) == 0 {
		return out
	}
	names := map[int]string{}
	for name, p := range pids {
		names[p] = name
	}
	stats, _ := filepath.Glob("/proc/[0-9]*/stat")
	for _, path := range stats {
		b, err := os.ReadFile(path)
		if err != nil {
			continue
		}
		// Fields after the command name, which is in parentheses.
		i := bytes.LastIndexByte(b, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(string(b[i+1:]))
		if len(f) < 15 {
			continue
		}
		pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(path)))
		ppid, _ := strconv.Atoi(f[1])
		num := func(k int) time.Duration {
			v, _ := strconv.ParseInt(f[k], 10, 64)
			return time.Duration(v) * time.Second / clockTicks
		}
		if name, ok := names[pid]; ok { // utime, stime, cutime, cstime are fields 14–17
			out[name] += num(11) + num(12) + num(13) + num(14)
		} else if name, ok := names[ppid]; ok {
			out[name] += num(11) + num(12)
		}
	}
	return out
}

// clockTicks is USER_HZ, the unit of /proc's CPU times: 100 on every Linux
// architecture Go supports.
const clockTicks = 100
