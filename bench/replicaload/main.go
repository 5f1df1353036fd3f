// Command replicaload drives the replicas benchmark (bench/run.sh replicas):
// the pieces around N fleetd replicas on one PostgreSQL that a shell script
// should not do by hand. Each mode prints one JSON result line.
//
//	replicaload postgres -dir D -ready FILE          a private PostgreSQL (pgserver); its DSN in FILE; runs until SIGTERM
//	replicaload haproxy-config -replicas NAME|MQTT|HTTP,... -mqtt A -http A -socket S   haproxy.cfg on stdout (internal/haproxytest.Config)
//	replicaload haproxy-stat -socket S              sessions and state per server
//	replicaload setup -apis U,... -token T -devices N -sims K -mqtt URL|-direct A,... -dir D ...   register, write fleet files
//	replicaload wait-online -dsn D -devices N -timeout T
//	replicaload kicks -apis U,... -nodes n,... -mqtt-addrs A,... -token T -dsn D -dir D -decommission K -rotate K
//	replicaload campaign -apis U,... -token T -dsn D -per-minute R -timeout T
//	replicaload summaries FILE...                    fleetsim summaries added up
//
// Devices are named rb<sim>-<cohort>-<n>, model rbench, so that the
// benchmark's queries see only its own.
package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/fleetd/fleetd/firmware"
	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/haproxytest"
	"github.com/fleetd/fleetd/internal/pgserver"
	"github.com/fleetd/fleetd/web/client"
)

const model = "rbench"

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: replicaload postgres|haproxy-config|haproxy-stat|setup|wait-online|kicks|campaign|summaries [flags]")
		os.Exit(2)
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	dir := fs.String("dir", "", "postgres: cluster directory; setup, kicks: work directory (fleet and token files)")
	ready := fs.String("ready", "", "postgres: file to write the DSN to once it accepts connections")
	replicas := fs.String("replicas", "", "haproxy-config: NAME|MQTT_ADDR|HTTP_ADDR,... (addresses host:port)")
	mqttFront := fs.String("mqtt", "", "haproxy-config: MQTT listen address; setup: MQTT URL every device connects to (through the proxy)")
	httpFront := fs.String("http", "", "haproxy-config: HTTP listen address")
	socket := fs.String("socket", "", "haproxy-config, haproxy-stat: the runtime API socket")
	maxConn := fs.Int("maxconn", 9000, "haproxy-config: connections the proxy holds at most (2 file descriptors each)")
	apis := fs.String("apis", "", "the replicas' HTTP base URLs, comma-separated, in node order")
	nodes := fs.String("nodes", "", "kicks: the replicas' node names, in the order of -apis")
	mqttAddrs := fs.String("mqtt-addrs", "", "kicks: the replicas' MQTT addresses, in node order, to try revoked tokens on each")
	direct := fs.String("direct", "", "setup: the replicas' MQTT addresses; each sim spreads its devices over them (instead of -mqtt)")
	token := fs.String("token", "", "the admin token")
	dsn := fs.String("dsn", "", "the replicas' database")
	devices := fs.Int("devices", 200, "setup, wait-online: devices in total")
	sims := fs.Int("sims", 1, "setup: fleetsim processes")
	signingKey := fs.String("signing-key", "", "setup: base64 public key the devices trust (GET /api/v1/firmware/signing-key)")
	ramp := fs.Int("ramp", 2000, "setup: devices each fleetsim starts per second")
	keepalive := fs.Duration("keepalive", 300*time.Second, "setup: the devices' keepalive")
	timeout := fs.Duration("timeout", 60*time.Second, "wait-online, campaign: how long to wait; kicks: per operation")
	decommission := fs.Int("decommission", 20, "kicks: devices decommissioned through random replicas")
	rotate := fs.Int("rotate", 20, "kicks: devices whose token is rotated through random replicas")
	perMinute := fs.Int("per-minute", 60000, "campaign: devices_per_minute")
	fs.Parse(os.Args[2:])
	split := func(s string) []string {
		if s == "" {
			return nil
		}
		return strings.Split(s, ",")
	}

	var (
		res any
		err error
	)
	switch os.Args[1] {
	case "postgres":
		err = runPostgres(*dir, *ready)
	case "haproxy-config":
		var bs []haproxytest.Backend
		for _, r := range split(*replicas) {
			f := strings.Split(r, "|")
			if len(f) != 3 {
				fail(fmt.Errorf("-replicas: %q is not NAME|MQTT|HTTP", r))
			}
			bs = append(bs, haproxytest.Backend{Name: f[0], MQTT: f[1], HTTP: f[2]})
		}
		fmt.Print(haproxytest.Config(bs, haproxytest.Options{MQTTAddr: *mqttFront, HTTPAddr: *httpFront, MaxConn: *maxConn, CheckInterval: time.Second}, *socket))
		return
	case "haproxy-stat":
		res, err = haproxyStat(*socket)
	case "setup":
		res, err = setup(split(*apis), *token, *devices, *sims, *mqttFront, split(*direct), *signingKey, *ramp, *keepalive, *dir)
	case "wait-online":
		res, err = waitOnline(*dsn, *devices, *timeout)
	case "kicks":
		res, err = kicks(split(*apis), split(*nodes), split(*mqttAddrs), *token, *dsn, *dir, *decommission, *rotate, *timeout)
	case "campaign":
		res, err = campaign(split(*apis), *token, *dsn, *perMinute, *timeout)
	case "summaries":
		res, err = summaries(fs.Args())
	default:
		err = fmt.Errorf("unknown mode %s", os.Args[1])
	}
	if err != nil {
		fail(err)
	}
	if res != nil {
		json.NewEncoder(os.Stdout).Encode(res)
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "replicaload:", err)
	os.Exit(1)
}

// runPostgres runs the replicas' database with fleetd's own embedded-mode
// code (as the postgres user when run as root), with room for N pools.
func runPostgres(dir, ready string) error {
	bin, err := pgserver.FindBinDir(os.Getenv("FLEETD_PG_BIN"))
	if err != nil {
		return err
	}
	srv := &pgserver.Server{Dir: dir, BinDir: bin, DieWithParent: true, Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
		Settings: map[string]string{"max_connections": "500"}}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := srv.Start(ctx); err != nil {
		return err
	}
	if err := os.WriteFile(ready, []byte(srv.ConnString()), 0o644); err != nil {
		return err
	}
	<-ctx.Done()
	sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return srv.Stop(sctx)
}

func haproxyStat(socket string) (any, error) {
	st, err := haproxytest.Status(socket)
	if err != nil {
		return nil, err
	}
	out := map[string]string{}
	for k, s := range st {
		out[k] = fmt.Sprintf("%s %d", s.Status, s.Sessions)
	}
	return out, nil
}

// fleetFile is the subset of a fleetsim fleet file written here.
type fleetFile struct {
	Server  map[string]any   `json:"server"`
	Run     map[string]any   `json:"run"`
	OTA     map[string]any   `json:"ota"`
	Cohorts []map[string]any `json:"cohorts"`
}

type setupResult struct {
	Mode       string         `json:"mode"`
	Registered int            `json:"registered"`
	Seconds    float64        `json:"seconds"`
	PerSecond  float64        `json:"per_s"`
	ByReplica  map[string]int `json:"registered_through"`
	Sims       int            `json:"sims"`
	Via        string         `json:"via"`
}

// setup registers the devices through random replicas and writes, for each
// fleetsim process, a fleet file and its tokens file. Through the proxy every
// device connects to -mqtt; -direct spreads each process's devices over the
// replicas, one cohort each (so no replica gets more than its share).
func setup(apis []string, token string, devices, sims int, mqttURL string, direct []string, signingKey string, ramp int, keepalive time.Duration, dir string) (any, error) {
	if len(apis) == 0 || token == "" || dir == "" {
		return nil, errors.New("setup needs -apis, -token and -dir")
	}
	if (mqttURL == "") == (len(direct) == 0) {
		return nil, errors.New("setup needs one of -mqtt (through the proxy) and -direct")
	}
	targets := []string{mqttURL}
	via := "haproxy " + mqttURL
	if len(direct) > 0 {
		targets = nil
		for _, a := range direct {
			targets = append(targets, "tcp://"+a)
		}
		via = "direct, each fleetsim spread over the replicas"
	}
	// Device ids per sim and cohort, contiguous, so that the cohorts' id
	// prefixes name them.
	type cohort struct {
		prefix, url string
		count       int
	}
	plan := make([][]cohort, sims)
	for s := range sims {
		n := devices/sims + boolInt(s < devices%sims)
		for c, u := range targets {
			m := n/len(targets) + boolInt(c < n%len(targets))
			if m > 0 {
				plan[s] = append(plan[s], cohort{prefix: fmt.Sprintf("rb%d-%d-", s, c), url: u, count: m})
			}
		}
	}
	var ids []string
	for _, cs := range plan {
		for _, c := range cs {
			for i := range c.count {
				ids = append(ids, fmt.Sprintf("%s%d", c.prefix, i))
			}
		}
	}
	clients := make([]*client.Client, len(apis))
	for i, a := range apis {
		clients[i] = client.New(a, token)
	}
	tokens := make([]string, len(ids))
	through := make([]atomic.Int64, len(apis))
	start := time.Now()
	err := parallel(len(ids), 32, func(i int) error {
		r := mrand.IntN(len(apis))
		reg, err := clients[r].RegisterDevice(context.Background(), fleet.NewDevice{ID: ids[i], Model: model})
		if err != nil {
			return fmt.Errorf("register %s through %s: %w", ids[i], apis[r], err)
		}
		through[r].Add(1)
		tokens[i] = reg.Token
		return nil
	})
	if err != nil {
		return nil, err
	}
	elapsed := time.Since(start)
	all := map[string]string{}
	k := 0
	for s, cs := range plan {
		mine := map[string]string{}
		var cohorts []map[string]any
		for _, c := range cs {
			for range c.count {
				mine[ids[k]], all[ids[k]] = tokens[k], tokens[k]
				k++
			}
			cohorts = append(cohorts, map[string]any{"name": strings.TrimSuffix(c.prefix, "-"), "id_prefix": c.prefix, "count": c.count,
				"model": model, "firmware": "1.0.0", "keepalive": keepalive.String(), "url": c.url})
		}
		tokFile := filepath.Join(dir, fmt.Sprintf("tokens-%d.json", s))
		if err := writeJSON(tokFile, mine); err != nil {
			return nil, err
		}
		f := fleetFile{
			Server: map[string]any{"mqtt": targets[0], "api": apis[0]},
			Run: map[string]any{"duration": "24h", "ramp": ramp, "tokens_file": tokFile,
				"source_addrs": []string{"127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6", "127.0.0.7", "127.0.0.8"}},
			OTA:     map[string]any{"public_key": signingKey, "install_time": "1s"},
			Cohorts: cohorts,
		}
		if err := writeJSON(filepath.Join(dir, fmt.Sprintf("fleet-%d.json", s)), f); err != nil {
			return nil, err
		}
	}
	if err := writeJSON(filepath.Join(dir, "tokens-all.json"), all); err != nil {
		return nil, err
	}
	res := setupResult{Mode: "setup", Registered: len(ids), Seconds: round(elapsed.Seconds()), PerSecond: round(float64(len(ids)) / elapsed.Seconds()),
		ByReplica: map[string]int{}, Sims: sims, Via: via}
	for i := range apis {
		res.ByReplica[fmt.Sprintf("r%d", i+1)] = int(through[i].Load())
	}
	return res, nil
}

type onlineResult struct {
	Mode    string         `json:"mode"`
	Online  int            `json:"online"`
	Devices int            `json:"devices"`
	Seconds float64        `json:"seconds"`
	ByNode  map[string]int `json:"online_by_node"`
}

// waitOnline polls the registry until every device is online (or the
// timeout) and says where their sessions are.
func waitOnline(dsn string, devices int, timeout time.Duration) (any, error) {
	ctx := context.Background()
	db, err := pgxpool.New(ctx, dsn)
	if err != nil {
		return nil, err
	}
	defer db.Close()
	start := time.Now()
	res := onlineResult{Mode: "wait-online", Devices: devices}
	for {
		if err := db.QueryRow(ctx, `SELECT count(*) FROM devices WHERE model = $1 AND state = 'active' AND online`, model).Scan(&res.Online); err != nil {
			return nil, err
		}
		if res.Online >= devices || time.Since(start) > timeout {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	res.Seconds = round(time.Since(start).Seconds())
	res.ByNode, err = byNode(ctx, db)
	return res, err
}

func byNode(ctx context.Context, db *pgxpool.Pool) (map[string]int, error) {
	rows, err := db.Query(ctx, `SELECT broker_node, count(*) FROM devices WHERE model = $1 AND state = 'active' AND online GROUP BY 1`, model)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := map[string]int{}
	for rows.Next() {
		var node string
		var n int
		if err := rows.Scan(&node, &n); err != nil {
			return nil, err
		}
		out[node] = n
	}
	return out, rows.Err()
}

// kickStats are the kicks of one kind of operation.
type kickStats struct {
	Operations int `json:"operations"`
	// CrossReplica counts the operations sent to a replica other than the
	// one holding the session.
	CrossReplica int `json:"cross_replica"`
	// Kicked counts the sessions that ended (a disconnect event) within the
	// timeout; the latencies are from the API call to that event, for the
	// cross-replica and the same-replica operations.
	Kicked      int         `json:"kicked"`
	KickedCross int         `json:"kicked_cross"`
	Cross       Percentiles `json:"latency_cross_ms"`
	Same        Percentiles `json:"latency_same_ms"`
	// OldTokenAccepted counts, 1 s after the call, the replicas that still
	// accepted the device's old token (CONNACK 0), over all operations;
	// OldTokenTried is how many tries that was.
	OldTokenAccepted int `json:"old_token_accepted"`
	OldTokenTried    int `json:"old_token_tried"`
	Errors           int `json:"errors"`
}

// Percentiles of a sample, in milliseconds.
type Percentiles struct {
	N   int     `json:"n"`
	P50 float64 `json:"p50"`
	P99 float64 `json:"p99"`
	Max float64 `json:"max"`
}

func percentiles(ms []float64) Percentiles {
	if len(ms) == 0 {
		return Percentiles{}
	}
	sort.Float64s(ms)
	at := func(q float64) float64 { return round(ms[min(len(ms)-1, int(math.Ceil(q*float64(len(ms))))-1)]) }
	return Percentiles{N: len(ms), P50: at(0.5), P99: at(0.99), Max: round(ms[len(ms)-1])}
}

type kicksResult struct {
	Mode         string    `json:"mode"`
	Decommission kickStats `json:"decommission"`
	Rotate       kickStats `json:"rotate"`
}

// kicks decommissions and rotates online devices through random replicas,
// several at a time, and measures each from the API call to the session's
// disconnect event (recorded by the replica that held it), then tries the
// old token on every replica.
func kicks(apis, nodes, mqttAddrs []string, token, dsn, dir string, decommission, rotate int, timeout time.Duration) (any, error) {
	if len(nodes) != len(apis) || len(mqttAddrs) != len(apis) {
		return nil, errors.New("kicks needs -apis, -nodes and -mqtt-addrs of the same length")
	}
	ctx := context.Background()
	db, err := pgxpool.New(ctx, dsn)
	if err != nil {
		return nil, err
	}
	defer db.Close()
	var all map[string]string
	data, err := os.ReadFile(filepath.Join(dir, "tokens-all.json"))
	if err != nil {
		return nil, err
	}
	if err := json.Unmarshal(data, &all); err != nil {
		return nil, err
	}
	type target struct{ id, node string }
	rows, err := db.Query(ctx, `SELECT id, broker_node FROM devices WHERE model = $1 AND state = 'active' AND online ORDER BY random() LIMIT $2`, model, decommission+rotate)
	if err != nil {
		return nil, err
	}
	var targets []target
	for rows.Next() {
		var t target
		if err := rows.Scan(&t.id, &t.node); err != nil {
			return nil, err
		}
		targets = append(targets, t)
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	clients := make([]*client.Client, len(apis))
	for i, a := range apis {
		clients[i] = client.New(a, token)
	}
	res := kicksResult{Mode: "kicks"}
	var mu sync.Mutex
	var crossMS, sameMS [2][]float64
	err = parallel(len(targets), 8, func(i int) error {
		t := targets[i]
		kind := 0 // decommission
		if i >= decommission {
			kind = 1
		}
		r := mrand.IntN(len(apis))
		cross := nodes[r] != t.node
		t0 := time.Now()
		var opErr error
		if kind == 0 {
			_, opErr = clients[r].Decommission(ctx, t.id)
		} else {
			_, opErr = clients[r].RotateToken(ctx, t.id)
		}
		var at time.Time
		if opErr == nil {
			deadline := t0.Add(timeout)
			for time.Now().Before(deadline) {
				var got *time.Time
				if err := db.QueryRow(ctx, `SELECT min(at) FROM device_events WHERE device_id = $1 AND kind = 'disconnect' AND at >= $2`, t.id, t0).Scan(&got); err != nil {
					return err
				}
				if got != nil {
					at = *got
					break
				}
				time.Sleep(20 * time.Millisecond)
			}
		}
		// The old token, tried on every replica once a second has passed.
		time.Sleep(time.Until(t0.Add(time.Second)))
		accepted, tried := 0, 0
		if opErr == nil {
			for _, a := range mqttAddrs {
				ok, err := tryConnect(a, t.id, all[t.id])
				if err == nil {
					tried++
					accepted += boolInt(ok)
				}
			}
		}
		mu.Lock()
		defer mu.Unlock()
		st := &res.Decommission
		if kind == 1 {
			st = &res.Rotate
		}
		st.Operations++
		st.CrossReplica += boolInt(cross)
		st.OldTokenAccepted += accepted
		st.OldTokenTried += tried
		if opErr != nil {
			st.Errors++
			return nil
		}
		if !at.IsZero() {
			st.Kicked++
			st.KickedCross += boolInt(cross)
			ms := float64(at.Sub(t0).Microseconds()) / 1000
			if cross {
				crossMS[kind] = append(crossMS[kind], ms)
			} else {
				sameMS[kind] = append(sameMS[kind], ms)
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	res.Decommission.Cross, res.Decommission.Same = percentiles(crossMS[0]), percentiles(sameMS[0])
	res.Rotate.Cross, res.Rotate.Same = percentiles(crossMS[1]), percentiles(sameMS[1])
	return res, nil
}

// tryConnect sends an MQTT 3.1.1 CONNECT with the device's id and token and
// reports whether the broker accepted it (CONNACK 0); an accepted session is
// ended at once with DISCONNECT.
func tryConnect(addr, id, token string) (bool, error) {
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return false, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	str := func(b *bytes.Buffer, s string) {
		_ = binary.Write(b, binary.BigEndian, uint16(len(s)))
		b.WriteString(s)
	}
	var body bytes.Buffer
	str(&body, "MQTT")
	body.WriteByte(4)    // 3.1.1
	body.WriteByte(0xC2) // username, password, clean session
	_ = binary.Write(&body, binary.BigEndian, uint16(30))
	str(&body, id)
	str(&body, id)
	str(&body, token)
	var pkt bytes.Buffer
	pkt.WriteByte(0x10)
	for n := body.Len(); ; {
		b := byte(n % 128)
		n /= 128
		if n > 0 {
			b |= 0x80
		}
		pkt.WriteByte(b)
		if n == 0 {
			break
		}
	}
	pkt.Write(body.Bytes())
	if _, err := c.Write(pkt.Bytes()); err != nil {
		return false, err
	}
	ack := make([]byte, 4)
	if _, err := io.ReadFull(c, ack); err != nil {
		return false, nil // closed without CONNACK: not accepted
	}
	if ack[0] != 0x20 {
		return false, fmt.Errorf("unexpected packet 0x%x instead of CONNACK", ack[0])
	}
	if ack[3] == 0 {
		_, _ = c.Write([]byte{0xE0, 0})
		return true, nil
	}
	return false, nil
}

type campaignResult struct {
	Mode string `json:"mode"`
	// Selected is the campaign's total; OnlineAtStart how many of them were
	// online when it started (the devices a job can reach at once).
	Selected      int `json:"selected"`
	OnlineAtStart int `json:"online_at_start"`
	// StartSeconds is how long the start request took (it selects every
	// device in one transaction).
	StartSeconds float64 `json:"start_seconds"`
	Dispatched   int     `json:"dispatched"`
	Delivered    int     `json:"delivered"`
	Seconds      float64 `json:"seconds"`
	// DeliveredByNode counts the delivered jobs by the replica that held
	// the device's session at the start; OnlineByNode the online devices.
	DeliveredByNode map[string]int `json:"delivered_by_node"`
	OnlineByNode    map[string]int `json:"online_by_node"`
	UploadedTo      string         `json:"uploaded_to"`
	StartedThrough  string         `json:"started_through"`
	State           string         `json:"state"`
}

// campaign uploads an image through one random replica, starts a one-stage
// campaign over every benchmark device through another, and waits until each
// job is dispatched and the deliveries stop growing.
func campaign(apis []string, token, dsn string, perMinute int, timeout time.Duration) (any, error) {
	ctx := context.Background()
	db, err := pgxpool.New(ctx, dsn)
	if err != nil {
		return nil, err
	}
	defer db.Close()
	up, st := mrand.IntN(len(apis)), mrand.IntN(len(apis))
	image := make([]byte, 4<<10)
	rand.Read(image)
	art, err := client.New(apis[up], token).UploadFirmware(ctx, "2.0.0", []string{model}, bytes.NewReader(image))
	if err != nil {
		return nil, fmt.Errorf("upload firmware through %s: %w", apis[up], err)
	}
	cl := client.New(apis[st], token)
	camp, err := cl.CreateCampaign(ctx, firmware.Spec{Name: "replicas benchmark", FirmwareID: art.ID, Selector: firmware.Selector{Models: []string{model}},
		Stages:        []firmware.Stage{{Name: "all", Percent: 100, MaxFailureRate: 1, MaxNotBackOnline: -1}},
		Pacing:        firmware.Pacing{DevicesPerMinute: perMinute},
		DeviceTimeout: firmware.Duration(time.Hour)})
	if err != nil {
		return nil, fmt.Errorf("create campaign: %w", err)
	}
	type dev struct{ id, node string }
	rows, err := db.Query(ctx, `SELECT id, broker_node FROM devices WHERE model = $1 AND state = 'active' AND online`, model)
	if err != nil {
		return nil, err
	}
	nodeOf := map[string]string{}
	res := campaignResult{Mode: "campaign", DeliveredByNode: map[string]int{}, OnlineByNode: map[string]int{},
		UploadedTo: fmt.Sprintf("r%d", up+1), StartedThrough: fmt.Sprintf("r%d", st+1)}
	for rows.Next() {
		var d dev
		if err := rows.Scan(&d.id, &d.node); err != nil {
			return nil, err
		}
		nodeOf[d.id] = d.node
		res.OnlineByNode[d.node]++
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	res.OnlineAtStart = len(nodeOf)
	start := time.Now()
	// The start selects and records every device in one transaction: on
	// this loaded machine it can outlast the API client's 30 s timeout, so
	// it is sent with a timeout of its own.
	total, err := startCampaign(apis[st], token, camp.ID)
	if err != nil {
		return nil, fmt.Errorf("start campaign: %w", err)
	}
	res.StartSeconds = time.Since(start).Seconds()
	res.Selected = total
	defer cl.CampaignAction(ctx, camp.ID, "abort")
	last, lastChange := -1, time.Now()
	for time.Since(start) < timeout {
		if err := db.QueryRow(ctx, `SELECT count(dispatched_at), count(delivered_at) FROM ota_jobs WHERE campaign_id = $1 AND kind = 'forward'`, camp.ID).Scan(&res.Dispatched, &res.Delivered); err != nil {
			return nil, err
		}
		if res.Delivered != last {
			last, lastChange = res.Delivered, time.Now()
		}
		if res.Dispatched == res.Selected && (res.Delivered >= res.OnlineAtStart || time.Since(lastChange) > 5*time.Second) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	res.Seconds = round(time.Since(start).Seconds())
	jobs, err := db.Query(ctx, `SELECT device_id FROM ota_jobs WHERE campaign_id = $1 AND kind = 'forward' AND delivered_at IS NOT NULL`, camp.ID)
	if err != nil {
		return nil, err
	}
	for jobs.Next() {
		var id string
		if err := jobs.Scan(&id); err != nil {
			return nil, err
		}
		res.DeliveredByNode[nodeOf[id]]++
	}
	if err := jobs.Err(); err != nil {
		return nil, err
	}
	if v, err := cl.Campaign(ctx, camp.ID); err == nil {
		res.State = string(v.State)
	}
	return res, nil
}

type summaryTotal struct {
	Mode             string           `json:"mode"`
	Sims             int              `json:"sims"`
	Devices          int              `json:"devices"`
	Connects         int64            `json:"connects"`
	ConnectAttempts  int64            `json:"connect_attempts"`
	ConnectP99PerSim []float64        `json:"connect_p99_ms_per_sim"`
	Errors           map[string]int64 `json:"errors"`
	Events           map[string]int64 `json:"events"`
}

// summaries adds up fleetsim summaries (connect counts, errors, events such
// as "ota jobs" and "ota duplicate jobs").
func summaries(files []string) (any, error) {
	tot := summaryTotal{Mode: "summaries", Errors: map[string]int64{}, Events: map[string]int64{}}
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			return nil, err
		}
		var s struct {
			Devices          int                   `json:"devices"`
			ConnectAttempts  int64                 `json:"connect_attempts"`
			Connects         int64                 `json:"connects"`
			ConnectLatencyMS struct{ P99 float64 } `json:"connect_latency_ms"`
			Errors           map[string]int64      `json:"errors"`
			Events           map[string]int64      `json:"events"`
		}
		if err := json.Unmarshal(data, &s); err != nil {
			return nil, fmt.Errorf("%s: %w", f, err)
		}
		tot.Sims++
		tot.Devices += s.Devices
		tot.Connects += s.Connects
		tot.ConnectAttempts += s.ConnectAttempts
		tot.ConnectP99PerSim = append(tot.ConnectP99PerSim, s.ConnectLatencyMS.P99)
		for k, v := range s.Errors {
			tot.Errors[k] += v
		}
		for k, v := range s.Events {
			tot.Events[k] += v
		}
	}
	return tot, nil
}

// parallel runs f(0..n-1) on workers goroutines and returns the first error.
func parallel(n, workers int, f func(i int) error) error {
	var (
		next     atomic.Int64
		firstErr error
		once     sync.Once
		wg       sync.WaitGroup
	)
	for range min(workers, max(n, 1)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				if err := f(i); err != nil {
					once.Do(func() { firstErr = err })
					return
				}
			}
		}()
	}
	wg.Wait()
	return firstErr
}

func writeJSON(path string, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return os.WriteFile(path, data, 0o600)
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

func round(x float64) float64 { return math.Round(x*10) / 10 }

// startCampaign starts a campaign with a 10-minute timeout and returns how
// many devices it selected.
func startCampaign(api, token, id string) (int, error) {
	req, err := http.NewRequest(http.MethodPost, api+"/api/v1/campaigns/"+id+"/start", nil)
	if err != nil {
		return 0, err
	}
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := (&http.Client{Timeout: 10 * time.Minute}).Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	var v firmware.CampaignView
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return 0, fmt.Errorf("%s: %s", resp.Status, b)
	}
	if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
		return 0, err
	}
	return v.Total, nil
}
