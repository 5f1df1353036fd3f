package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fleetd/fleetd/firmware"
	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/fleetdtest"
	"github.com/fleetd/fleetd/sim"
	"github.com/fleetd/fleetd/web/client"
)

// rawDevice is an MQTT 3.1.1 device on a raw socket: it connects, then only
// notes when the broker closes its connection.
type rawDevice struct {
	conn   net.Conn
	closed chan time.Time
}

// mqttConnect sends CONNECT and returns the CONNACK return code.
func mqttConnect(t *testing.T, addr, id, token string) (*rawDevice, byte) {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	str := func(b []byte, s string) []byte { return append(append(b, byte(len(s)>>8), byte(len(s))), s...) }
	body := str(nil, "MQTT")
	body = append(body, 4, 0xC2, 0, 60) // 3.1.1, user name + password + clean session, keepalive 60
	body = str(str(str(body, id), id), token)
	pkt := append([]byte{0x10}, remainingLength(len(body))...)
	conn.Write(append(pkt, body...))
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	ack := make([]byte, 4)
	if _, err := conn.Read(ack); err != nil || ack[0] != 0x20 {
		conn.Close()
		t.Fatalf("%s: no CONNACK: %x %v", id, ack, err)
	}
	conn.SetReadDeadline(time.Time{})
	d := &rawDevice{conn: conn, closed: make(chan time.Time, 1)}
	if ack[3] != 0 {
		conn.Close()
		return d, ack[3]
	}
	t.Cleanup(func() { conn.Close() })
	go func() {
		buf := make([]byte, 256)
		for {
			if _, err := conn.Read(buf); err != nil {
				d.closed <- time.Now()
				return
			}
		}
	}()
	return d, 0
}

func remainingLength(n int) []byte {
	var out []byte
	for {
		b := byte(n % 128)
		n /= 128
		if n > 0 {
			b |= 0x80
		}
		out = append(out, b)
		if n == 0 {
			return out
		}
	}
}

// presenceStream reads a replica's live stream and reports every device it
// saw come online.
func presenceStream(t *testing.T, url, token string) func() map[string]bool {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url+"/api/v1/stream", nil)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("live stream: %v %v", resp, err)
	}
	var mu sync.Mutex
	seen := map[string]bool{}
	go func() {
		defer resp.Body.Close()
		sc := bufio.NewScanner(resp.Body)
		for sc.Scan() {
			line, ok := strings.CutPrefix(sc.Text(), "data: ")
			if !ok {
				continue
			}
			var p struct {
				DeviceID string `json:"device_id"`
				Online   bool   `json:"online"`
			}
			if json.Unmarshal([]byte(line), &p) == nil && p.Online {
				mu.Lock()
				seen[p.DeviceID] = true
				mu.Unlock()
			}
		}
	}()
	return func() map[string]bool {
		mu.Lock()
		defer mu.Unlock()
		return maps(seen)
	}
}

func maps(m map[string]bool) map[string]bool {
	out := make(map[string]bool, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

func p99(d []time.Duration) time.Duration {
	slices.Sort(d)
	return d[(len(d)*99+99)/100-1]
}

// TestReplicasSignalEachOther: with three replicas on one database, a
// decommission or a token rotation through any replica ends the device's
// session wherever it is and its old credential is refused on every
// replica, within a second (p99 over 100 devices); a console on one replica
// sees devices come online on all of them; a device moving to another
// replica ends its session on the first.
func TestReplicasSignalEachOther(t *testing.T) {
	c := fleetdtest.StartCluster(t, fleetdtest.ClusterOptions{Replicas: 3})
	ctx := context.Background()
	const n = 100
	seen := presenceStream(t, c.Replicas[2].HTTPURL, c.AdminToken)

	tokens := make([]string, n)
	devs := make([]*rawDevice, n)
	for i := range n {
		reg, err := c.Client(i%3).RegisterDevice(ctx, fleet.NewDevice{ID: fmt.Sprintf("x-%03d", i), Model: "gw-100"})
		if err != nil {
			t.Fatal(err)
		}
		tokens[i] = reg.Token
	}
	for i := range n {
		// Registered through replica i%3, connected to replica (i+1)%3.
		d, code := mqttConnect(t, c.MQTTAddr((i+1)%3), fmt.Sprintf("x-%03d", i), tokens[i])
		if code != 0 {
			t.Fatalf("x-%03d: CONNACK %d on replica %d", i, code, (i+1)%3)
		}
		devs[i] = d
	}
	// The console on replica 3 sees every device come online, wherever.
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s", what)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	waitFor("the live stream of replica 3 to show all 100 devices online", func() bool { return len(seen()) == n })

	// Decommission the even devices and rotate the odd ones, each through
	// a replica other than the one holding its session.
	var kicks, refusals []time.Duration
	for i := range n {
		id := fmt.Sprintf("x-%03d", i)
		via := c.Client((i + 2) % 3)
		start := time.Now()
		var err error
		if i%2 == 0 {
			_, err = via.Decommission(ctx, id)
		} else {
			_, err = via.RotateToken(ctx, id)
		}
		if err != nil {
			t.Fatal(err)
		}
		select {
		case at := <-devs[i].closed:
			kicks = append(kicks, at.Sub(start))
		case <-time.After(5 * time.Second):
			t.Fatalf("%s: session on replica %d not ended 5 s after the change through replica %d", id, (i+1)%3, (i+2)%3)
		}
		// The old credential is refused on every replica.
		for r := range 3 {
			for {
				d, code := mqttConnect(t, c.MQTTAddr(r), id, tokens[i])
				if code != 0 {
					refusals = append(refusals, time.Since(start))
					break
				}
				d.conn.Close()
				if time.Since(start) > 5*time.Second {
					t.Fatalf("%s: old credential still accepted on replica %d 5 s after the change", id, r)
				}
				time.Sleep(10 * time.Millisecond)
			}
		}
	}
	t.Logf("session ended on the holding replica: p99 %s (max %s); old credential refused everywhere: p99 %s",
		p99(kicks), slices.Max(kicks), p99(refusals))
	if p99(kicks) > time.Second || p99(refusals) > time.Second {
		t.Fatalf("p99 kick %s, p99 refusal %s: want both within 1 s", p99(kicks), p99(refusals))
	}
	// The ends are recorded with their causes.
	for _, id := range []string{"x-000", "x-001"} {
		want := map[string]fleet.Reason{"x-000": fleet.ReasonDecommissioned, "x-001": fleet.ReasonTokenRotated}[id]
		page, err := c.Client(0).Events(ctx, id, "", 20)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.ContainsFunc(page.Events, func(e fleet.Event) bool { return e.Kind == fleet.KindDisconnect && e.Reason == want }) {
			t.Errorf("%s: no %s disconnect: %+v", id, want, page.Events)
		}
	}

	// A device that moves to another replica ends its session on the first,
	// recorded as a takeover.
	reg, err := c.Client(0).RegisterDevice(ctx, fleet.NewDevice{ID: "mover", Model: "gw-100"})
	if err != nil {
		t.Fatal(err)
	}
	first, _ := mqttConnect(t, c.MQTTAddr(0), "mover", reg.Token)
	mqttConnect(t, c.MQTTAddr(1), "mover", reg.Token)
	select {
	case <-first.closed:
	case <-time.After(2 * time.Second):
		t.Fatal("the session on replica 1 survived the same id connecting to replica 2")
	}
	d := c.WaitDevice(2, "mover", 5*time.Second, "online on replica 2", func(d fleet.Device) bool { return d.Online && d.BrokerNode == c.Node(1) })
	// Replica 1 records the end of its session on its own schedule.
	var page client.EventPage
	waitFor("replica 1's session_takeover of the older session", func() bool {
		page, _ = c.Client(2).Events(ctx, "mover", "", 20)
		return slices.ContainsFunc(page.Events, func(e fleet.Event) bool {
			return e.Kind == fleet.KindDisconnect && e.Reason == fleet.ReasonSessionTakeover && e.SessionEpoch < d.SessionEpoch
		})
	})
}

// TestCampaignAcrossReplicasSurvivesAKill: a campaign started through one
// replica, for an image uploaded through another, reaches every device
// wherever it is connected (through HAProxy); a kill -9 of a replica
// mid-campaign moves its devices to the others, and the campaign completes
// with one job per device, none lost, and the killed replica's sessions are
// recorded as replica_lost.
func TestCampaignAcrossReplicasSurvivesAKill(t *testing.T) {
	c := fleetdtest.StartCluster(t, fleetdtest.ClusterOptions{Replicas: 3, Proxy: true,
		Env: []string{"FLEETD_CAMPAIGN_INTERVAL=200ms", "FLEETD_REPLICA_DEAD_AFTER=3s"}})
	ctx := context.Background()
	const devices = 15
	f := &sim.Fleet{
		Server:  sim.Server{MQTT: "tcp://" + c.Proxy.MQTTAddr, API: c.Replicas[0].HTTPURL},
		Run:     sim.RunOptions{Duration: secs(180), Register: true, Ramp: 50},
		OTA:     sim.OTAOptions{InstallTime: secs(1)},
		Cohorts: []sim.Cohort{{Name: "ota", Count: devices, Model: "gw-100", Firmware: "1.0.0", Keepalive: secs(5)}},
	}
	_, stop := runFleet(t, c.Client(0), f, c.AdminToken)
	nodes := map[string]int{}
	for i := range devices {
		d := c.WaitDevice(1, fmt.Sprintf("ota-%d", i), 20*time.Second, "online", func(d fleet.Device) bool { return d.Online && d.Firmware == "1.0.0" })
		nodes[d.BrokerNode]++
	}
	t.Logf("sessions by replica: %v", nodes)
	art := upload(t, c.Client(0), "1.1.0", 256<<10)
	camp, err := c.Client(1).CreateCampaign(ctx, firmware.Spec{
		Name: "across replicas", FirmwareID: art.ID, Selector: firmware.Selector{Models: []string{"gw-100"}},
		Stages:        []firmware.Stage{{Name: "all", Percent: 100, MaxFailureRate: 0.5, MaxNotBackOnline: devices}},
		Pacing:        firmware.Pacing{MaxConcurrent: 5},
		DeviceTimeout: firmware.Duration(60 * time.Second),
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Client(1).CampaignAction(ctx, camp.ID, "start"); err != nil {
		t.Fatal(err)
	}
	// Once the first devices are done, kill the replica holding the most
	// sessions.
	waitCampaign(t, c.Client(2), camp.ID, 60*time.Second, "a first device done", func(v firmware.CampaignView) bool {
		return v.Counts[0].ByState["succeeded"] > 0
	})
	victim, most := 0, -1
	for i := range 3 {
		if nodes[c.Node(i)] > most {
			victim, most = i, nodes[c.Node(i)]
		}
	}
	// A device straight on the victim that will not come back: only the
	// other replicas can end its session.
	reg, err := c.Client(0).RegisterDevice(ctx, fleet.NewDevice{ID: "gone", Model: "gw-900"})
	if err != nil {
		t.Fatal(err)
	}
	gone, _ := mqttConnect(t, c.MQTTAddr(victim), "gone", reg.Token)
	c.WaitDevice(alive0(c, victim), "gone", 5*time.Second, "online on the victim", func(d fleet.Device) bool { return d.Online && d.BrokerNode == c.Node(victim) })
	c.Kill(victim)
	gone.conn.Close()
	killed := time.Now()
	t.Logf("killed %s (%d sessions) mid-campaign", c.Node(victim), most)
	alive := c.Alive()
	v := waitCampaign(t, c.Client(alive[0]), camp.ID, 120*time.Second, "completion", func(v firmware.CampaignView) bool {
		return v.State == firmware.StateCompleted
	})
	if v.Counts[0].ByState["succeeded"] != devices {
		t.Fatalf("campaign completed with %+v, want all %d succeeded", v.Counts[0], devices)
	}
	var jobs, distinct int
	if err := c.DB().QueryRow(ctx, `SELECT count(*), count(DISTINCT device_id) FROM ota_jobs WHERE campaign_id = $1`, camp.ID).Scan(&jobs, &distinct); err != nil {
		t.Fatal(err)
	}
	if jobs != devices || distinct != devices {
		t.Fatalf("%d jobs for %d devices, want one each for %d", jobs, distinct, devices)
	}
	summary := stop()
	t.Logf("devices received %d jobs (%d repeats of a job they had), installed %d", summary.Events["ota jobs"], summary.Events["ota duplicate jobs"], summary.Events["ota installed"])
	if summary.Events["ota installed"] != devices {
		t.Errorf("%d installs, want %d: one per device", summary.Events["ota installed"], devices)
	}
	// The session that died with the replica and never came back was ended
	// by the others, as replica_lost.
	d := c.WaitDevice(alive[0], "gone", 20*time.Second, "offline", func(d fleet.Device) bool { return !d.Online })
	page, _ := c.Client(alive[0]).Events(ctx, "gone", "", 10)
	if len(page.Events) == 0 || page.Events[0].Reason != fleet.ReasonReplicaLost {
		t.Fatalf("gone: %+v, events %+v; want its session ended as replica_lost", d, page.Events)
	}
	t.Logf("gone: %s (%.1f s after the kill)", page.Events[0].Detail, page.Events[0].At.Sub(killed).Seconds())
	var stale int
	if err := c.DB().QueryRow(ctx, `SELECT count(*) FROM devices WHERE online AND broker_node = $1`, c.Node(victim)).Scan(&stale); err != nil {
		t.Fatal(err)
	}
	if stale != 0 {
		t.Errorf("%d devices still shown online on the killed replica", stale)
	}
}

// alive0 is a replica other than i.
func alive0(c *fleetdtest.Cluster, i int) int { return (i + 1) % len(c.Replicas) }
