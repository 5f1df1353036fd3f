// Command mqttload measures an MQTT broker from the outside, the same way
// for fleetd and for its peer (Mosquitto), so that both are measured in one
// run by bench/run.sh. It speaks raw MQTT 3.1.1 to keep its own cost low and
// predictable. Loopback only.
//
//	mqttload connect-rate -addr A -ids FILE -duration D -concurrency C [-pids name=P,…]
//	mqttload freeze       -addr A -ids FILE -keepalive S [-watch-will]
//	mqttload publish      -addr A -ids FILE -rate R -duration D
//	mqttload download     -url U [-token T] -n N      (N concurrent ranged GETs)
//	mqttload fileserver   -addr A -file F              (the peer of downloads)
//	mqttload campaign-dispatch -api U -token T -dsn DSN -devices N -per-minute R
//	mqttload storm        -addr A -n N [-api U -token T] -ready FILE [-retry D] [-sources IPs]
//	mqttload telemetry    -addr A -n N [-api U -token T] -rate R -duration D [-subscribe] [-metrics U] [-pids name=P,…]
//
// -ids is a JSON object of client id → password ("" for anonymous brokers).
// Each mode prints one JSON result line.
package main

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: mqttload connect-rate|freeze|publish [flags]")
		os.Exit(2)
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	addr := fs.String("addr", "127.0.0.1:1883", "broker address (loopback)")
	idsFile := fs.String("ids", "", "JSON object: client id → password")
	duration := fs.Duration("duration", 10*time.Second, "run time; storm: how long to wait for every device after the first drop")
	concurrency := fs.Int("concurrency", 64, "parallel connects")
	keepalive := fs.Int("keepalive", 5, "keepalive of frozen clients, seconds")
	watchWill := fs.Bool("watch-will", false, "freeze: measure will delivery (a subscriber on devices/+/status)")
	rate := fs.Int("rate", 1000, "publish: messages per second in total")
	eventsAPI := fs.String("events-api", "", "freeze: fleetd's HTTP address, to read when each keepalive_timeout was committed")
	token := fs.String("token", "", "freeze, download: fleetd's admin token")
	url := fs.String("url", "", "download: the image's URL")
	n := fs.Int("n", 1000, "download: concurrent downloads; storm: devices")
	file := fs.String("file", "", "fileserver: the file to serve")
	api := fs.String("api", "", "campaign-dispatch: fleetd's base URL")
	dsn := fs.String("dsn", "", "campaign-dispatch: fleetd's database, to register devices and read dispatch times")
	devices := fs.Int("devices", 100000, "campaign-dispatch: devices to register and upgrade")
	perMinute := fs.Int("per-minute", 60000, "campaign-dispatch: the campaign's devices_per_minute")
	ready := fs.String("ready", "", "storm: file written once every device is connected")
	retry := fs.Duration("retry", 100*time.Millisecond, "storm: mean wait between a device's reconnect attempts")
	sources := fs.String("sources", "127.0.0.1,127.0.0.2,127.0.0.3,127.0.0.4", "storm: loopback source addresses")
	subscribe := fs.Bool("subscribe", false, "telemetry: count what a subscriber on devices/+/telemetry receives (the peer)")
	metrics := fs.String("metrics", "", "telemetry: fleetd's /metrics URL, to count the messages it stored")
	pids := fs.String("pids", "", "telemetry, connect-rate: name=pid,… processes whose CPU time (children included) is measured")
	fs.Parse(os.Args[2:])
	switch os.Args[1] {
	case "download":
		json.NewEncoder(os.Stdout).Encode(download(*url, *token, *n))
		return
	case "fileserver":
		serveFile(*addr, *file)
		return
	case "campaign-dispatch":
		res, err := campaignDispatch(*api, *token, *dsn, *devices, *perMinute)
		if err != nil {
			fail(err)
		}
		json.NewEncoder(os.Stdout).Encode(res)
		return
	}
	host, _, err := net.SplitHostPort(*addr)
	if ip := net.ParseIP(host); err != nil || ip == nil || !ip.IsLoopback() {
		fail(fmt.Errorf("-addr %s: only loopback targets", *addr))
	}
	if os.Args[1] == "telemetry" {
		// Devices tl-0 … tl-(n-1), registered with fleetd when -api is
		// given, anonymous otherwise.
		ids := make([]cred, *n)
		for i := range ids {
			ids[i] = cred{id: fmt.Sprintf("tl-%d", i)}
		}
		if *api != "" {
			if ids, err = registerDevices(*api, *token, "tl-", *n); err != nil {
				fail(err)
			}
		}
		json.NewEncoder(os.Stdout).Encode(telemetryLoad(telemetryOptions{addr: *addr, ids: ids, rate: *rate, duration: *duration,
			subscribe: *subscribe, metrics: *metrics, pids: parsePids(*pids)}))
		return
	}
	if os.Args[1] == "storm" {
		// Devices storm-0 … storm-(n-1): registered with fleetd when -api
		// is given, anonymous (for the peer broker) otherwise.
		ids := make([]cred, *n)
		for i := range ids {
			ids[i] = cred{id: fmt.Sprintf("storm-%d", i)}
		}
		if *api != "" {
			if ids, err = registerDevices(*api, *token, "storm-", *n); err != nil {
				fail(err)
			}
		}
		json.NewEncoder(os.Stdout).Encode(storm(*addr, ids, strings.Split(*sources, ","), *retry, *duration, *ready))
		// Hold the sessions until the caller has looked at the broker and
		// ends this process.
		select {}
	}
	ids, err := loadIDs(*idsFile)
	if err != nil {
		fail(err)
	}
	var result any
	switch os.Args[1] {
	case "connect-rate":
		result = connectRate(*addr, ids, *duration, *concurrency, parsePids(*pids))
	case "freeze":
		result = freeze(*addr, ids, *keepalive, *watchWill, *eventsAPI, *token)
	case "publish":
		result = publish(*addr, ids, *rate, *duration)
	default:
		fail(fmt.Errorf("unknown mode %s", os.Args[1]))
	}
	json.NewEncoder(os.Stdout).Encode(result)
}

// parsePids reads -pids: name=pid pairs separated by commas.
func parsePids(s string) map[string]int {
	watch := map[string]int{}
	for _, p := range strings.FieldsFunc(s, func(r rune) bool { return r == ',' }) {
		name, v, _ := strings.Cut(p, "=")
		pid, err := strconv.Atoi(v)
		if err != nil {
			fail(fmt.Errorf("-pids %s: want name=pid", p))
		}
		watch[name] = pid
	}
	return watch
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "mqttload:", err)
	os.Exit(1)
}

type cred struct{ id, password string }

func loadIDs(path string) ([]cred, error) {
	if path == "" {
		return nil, errors.New("-ids is required")
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	m := map[string]string{}
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, err
	}
	out := make([]cred, 0, len(m))
	for id, pw := range m {
		out = append(out, cred{id, pw})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].id < out[j].id })
	return out, nil
}

func str(b []byte, s string) []byte {
	b = binary.BigEndian.AppendUint16(b, uint16(len(s)))
	return append(b, s...)
}

func packet(h byte, body []byte) []byte {
	out := []byte{h}
	n := len(body)
	for {
		d := byte(n % 128)
		n /= 128
		if n > 0 {
			d |= 0x80
		}
		out = append(out, d)
		if n == 0 {
			break
		}
	}
	return append(out, body...)
}

func connectPacket(c cred, keepalive int, will bool) []byte {
	body := str(nil, "MQTT")
	flags := byte(0x02)
	if c.password != "" {
		flags |= 0xC0
	}
	if will {
		flags |= 0x04 | 0x08 | 0x20 // will, QoS 1, retain
	}
	body = append(body, 4, flags)
	body = binary.BigEndian.AppendUint16(body, uint16(keepalive))
	body = str(body, c.id)
	if will {
		body = str(body, "devices/"+c.id+"/status")
		body = str(body, `{"online":false}`)
	}
	if c.password != "" {
		body = str(body, c.id)
		body = str(body, c.password)
	}
	return packet(0x10, body)
}

// connect opens a session and returns it with its CONNACK code.
func connect(addr string, c cred, keepalive int, will bool) (net.Conn, *bufio.Reader, error) {
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, nil, err
	}
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := conn.Write(connectPacket(c, keepalive, will)); err != nil {
		conn.Close()
		return nil, nil, err
	}
	r := bufio.NewReaderSize(conn, 256)
	var ack [4]byte
	if _, err := io.ReadFull(r, ack[:]); err != nil {
		conn.Close()
		return nil, nil, err
	}
	if ack[0] != 0x20 || ack[3] != 0 {
		conn.Close()
		return nil, nil, fmt.Errorf("CONNACK %x", ack)
	}
	conn.SetDeadline(time.Time{})
	return conn, r, nil
}

type percentiles struct {
	P50, P90, P99, Max float64 // milliseconds
}

func pct(lat []time.Duration) percentiles {
	if len(lat) == 0 {
		return percentiles{}
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	at := func(p float64) float64 {
		return float64(lat[min(len(lat)-1, int(p*float64(len(lat))))].Microseconds()) / 1000
	}
	return percentiles{at(0.5), at(0.9), at(0.99), float64(lat[len(lat)-1].Microseconds()) / 1000}
}

// connectRate runs CONNECT → CONNACK → DISCONNECT as fast as the broker
// admits them, from concurrency workers cycling through the ids. With pids
// it reports the CPU time each named process spent per connect.
func connectRate(addr string, ids []cred, d time.Duration, concurrency int, pids map[string]int) any {
	var ok, failed atomic.Int64
	var mu sync.Mutex
	var lat []time.Duration
	var next atomic.Int64
	cpu0 := cpuTicks(pids)
	end := time.Now().Add(d)
	var wg sync.WaitGroup
	for range concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var mine []time.Duration
			for time.Now().Before(end) {
				c := ids[int(next.Add(1))%len(ids)]
				start := time.Now()
				conn, _, err := connect(addr, c, 30, false)
				if err != nil {
					failed.Add(1)
					continue
				}
				mine = append(mine, time.Since(start))
				conn.Write([]byte{0xE0, 0x00})
				conn.Close()
				ok.Add(1)
			}
			mu.Lock()
			lat = append(lat, mine...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	cpu := cpuTicks(pids)
	out := map[string]any{"mode": "connect-rate", "connects": ok.Load(), "failed": failed.Load(),
		"connects_per_s": float64(ok.Load()) / d.Seconds(), "latency_ms": pct(lat)}
	if n := ok.Load(); len(pids) > 0 && n > 0 {
		perConnect := map[string]float64{}
		for name := range pids {
			perConnect[name] = round1((cpu[name] - cpu0[name]).Seconds() * 1e6 / float64(n))
		}
		out["cpu_us_per_connect"] = perConnect
	}
	return out
}

// freeze connects every id with a will, then goes silent with the sockets
// open. With -watch-will it measures, from the moment of silence, when each
// will arrives (Mosquitto's offline detection); otherwise it holds the
// sockets for 1.5 × keepalive + 10 s and reports when it went silent, so the
// caller can read the broker's own records (fleetd's keepalive_timeout events).
func freeze(addr string, ids []cred, keepalive int, watchWill bool, eventsAPI, token string) any {
	var sub net.Conn
	var subR *bufio.Reader
	var err error
	if watchWill {
		sub, subR, err = connect(addr, cred{id: "mqttload-watcher"}, 600, false)
		if err != nil {
			fail(err)
		}
		body := []byte{0, 1}
		body = str(body, "devices/+/status")
		body = append(body, 1)
		sub.Write(packet(0x82, body))
		subR.Discard(5) // SUBACK
	}
	conns := make([]net.Conn, 0, len(ids))
	for _, c := range ids {
		conn, _, err := connect(addr, c, keepalive, true)
		if err != nil {
			fail(fmt.Errorf("connect %s: %w", c.id, err))
		}
		conns = append(conns, conn)
	}
	silent := time.Now()
	// Wills may wait for the broker's own keepalive sweep (Mosquitto's runs
	// every few seconds); fleetd's deadline needs only a margin for the write.
	hold := time.Duration(keepalive)*1500*time.Millisecond + 3*time.Second
	if watchWill {
		hold += 7 * time.Second
	}
	var lat []time.Duration
	if watchWill {
		sub.SetReadDeadline(silent.Add(hold))
		for len(lat) < len(ids) {
			h, err := subR.ReadByte()
			if err != nil {
				break
			}
			n, mult := 0, 1
			for {
				b, _ := subR.ReadByte()
				n += int(b&0x7f) * mult
				mult *= 128
				if b&0x80 == 0 {
					break
				}
			}
			body := make([]byte, n)
			io.ReadFull(subR, body)
			if h>>4 == 3 && len(body) > 2 {
				tl := int(binary.BigEndian.Uint16(body))
				if h&0x06 != 0 { // QoS > 0: acknowledge
					pid := body[2+tl : 4+tl]
					sub.Write([]byte{0x40, 0x02, pid[0], pid[1]})
				}
				if h&0x01 == 0 { // not a retained replay
					lat = append(lat, time.Since(silent))
				}
			}
		}
	} else {
		time.Sleep(hold)
	}
	for _, c := range conns {
		c.Close()
	}
	out := map[string]any{"mode": "freeze", "clients": len(ids), "keepalive_s": keepalive, "limit_ms": float64(keepalive)*1500 + 1000}
	if watchWill {
		out["detected"], out["latency_ms"] = len(lat), pct(lat)
		return out
	}
	if eventsAPI != "" {
		lat = committedTimeouts(eventsAPI, token, ids, silent)
		out["detected"], out["latency_ms"] = len(lat), pct(lat)
	}
	return out
}

// committedTimeouts reads, for each device, when fleetd committed its
// keepalive_timeout after silent: the time an operator could first see it.
func committedTimeouts(api, token string, ids []cred, silent time.Time) []time.Duration {
	var lat []time.Duration
	for _, c := range ids {
		req, _ := http.NewRequest(http.MethodGet, api+"/api/v1/devices/"+c.id+"/events?limit=20", nil)
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			continue
		}
		var page struct {
			Events []struct {
				At     time.Time
				Kind   string
				Reason string
			}
		}
		json.NewDecoder(resp.Body).Decode(&page)
		resp.Body.Close()
		for _, e := range page.Events {
			if e.Kind == "disconnect" && e.Reason == "keepalive_timeout" && e.At.After(silent) {
				lat = append(lat, e.At.Sub(silent))
				break
			}
		}
	}
	return lat
}

// publish connects every id and sends QoS 0 telemetry at the given total
// rate, spread over the clients.
func publish(addr string, ids []cred, rate int, d time.Duration) any {
	conns := make([]net.Conn, 0, len(ids))
	for _, c := range ids {
		conn, r, err := connect(addr, c, 300, false)
		if err != nil {
			fail(fmt.Errorf("connect %s: %w", c.id, err))
		}
		go io.Copy(io.Discard, r)
		conns = append(conns, conn)
	}
	msgs := make([][]byte, len(ids))
	for i, c := range ids {
		body := str(nil, "devices/"+c.id+"/telemetry")
		body = append(body, `{"rssi_dbm":-67,"channel":6,"uptime_s":3600}`...)
		msgs[i] = packet(0x30, body)
	}
	interval := time.Second / time.Duration(max(1, rate))
	var sent int64
	start := time.Now()
	t := time.NewTicker(max(interval, time.Millisecond))
	defer t.Stop()
	perTick := max(1, int(time.Millisecond/interval))
	for time.Since(start) < d {
		<-t.C
		for range perTick {
			i := int(sent) % len(conns)
			if _, err := conns[i].Write(msgs[i]); err != nil {
				fail(fmt.Errorf("publish: %w", err))
			}
			sent++
		}
	}
	elapsed := time.Since(start)
	time.Sleep(500 * time.Millisecond) // let the broker finish what is in flight
	for _, c := range conns {
		c.Write([]byte{0xE0, 0x00})
		c.Close()
	}
	return map[string]any{"mode": "publish", "clients": len(conns), "messages": sent, "messages_per_s": float64(sent) / elapsed.Seconds()}
}

// download runs n concurrent GETs of the image, each asking for a range
// that starts at a different offset (as resuming devices do) and runs to the
// end, and reports the aggregate throughput.
func download(url, token string, n int) any {
	client := &http.Client{Transport: &http.Transport{MaxConnsPerHost: n, MaxIdleConnsPerHost: n}, Timeout: 5 * time.Minute}
	head, err := http.NewRequest(http.MethodHead, url, nil)
	if err != nil {
		fail(err)
	}
	if token != "" {
		head.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := client.Do(head)
	if err != nil {
		fail(err)
	}
	resp.Body.Close()
	size := resp.ContentLength
	var bytes, failed, retried atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			from := int64(i) * 4096 % max(1, size/2)
			for attempt := 0; attempt < 20; attempt++ {
				req, _ := http.NewRequest(http.MethodGet, url, nil)
				if token != "" {
					req.Header.Set("Authorization", "Bearer "+token)
				}
				req.Header.Set("Range", fmt.Sprintf("bytes=%d-", from))
				resp, err := client.Do(req)
				if err != nil {
					failed.Add(1)
					return
				}
				if resp.StatusCode == http.StatusServiceUnavailable {
					resp.Body.Close()
					retried.Add(1)
					time.Sleep(100 * time.Millisecond)
					continue
				}
				got, _ := io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusPartialContent || got != size-from {
					failed.Add(1)
					return
				}
				bytes.Add(got)
				return
			}
			failed.Add(1)
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	return map[string]any{"mode": "download", "downloads": n, "failed": failed.Load(), "busy_retries": retried.Load(),
		"bytes": bytes.Load(), "seconds": elapsed.Seconds(), "mib_per_s": float64(bytes.Load()) / (1 << 20) / elapsed.Seconds()}
}

// serveFile is the plain file server downloads are compared with: Go's
// http.ServeContent, no authentication, no limits.
func serveFile(addr, file string) {
	f, err := os.Open(file)
	if err != nil {
		fail(err)
	}
	st, _ := f.Stat()
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fh, err := os.Open(file)
		if err != nil {
			http.Error(w, err.Error(), 500)
			return
		}
		defer fh.Close()
		http.ServeContent(w, r, "fw.bin", st.ModTime(), fh)
	})
	fail(http.ListenAndServe(addr, h))
}
