package e2e

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/fleetdtest"
	"github.com/fleetd/fleetd/internal/haproxytest"
	"github.com/fleetd/fleetd/sim"
)

// TestReplicasShareOneDatabase: three replicas on one PostgreSQL behind
// HAProxy behave as one registry. Devices registered through replica 1
// connect through the proxy and show online, with the replica that holds
// each session, through replicas 2 and 3; after a kill -9 of the replica
// holding a device, the device reconnects through the proxy to another
// replica within seconds and shows online there; the killed replica, started
// again, rejoins.
func TestReplicasShareOneDatabase(t *testing.T) {
	c := fleetdtest.StartCluster(t, fleetdtest.ClusterOptions{Replicas: 3, Proxy: true})
	api1 := c.Client(0)

	const devices = 6 // leastconn spreads them over the three replicas
	f := &sim.Fleet{
		Server:  sim.Server{MQTT: "tcp://" + c.Proxy.MQTTAddr, API: c.Replicas[0].HTTPURL},
		Run:     sim.RunOptions{Duration: secs(120), Register: true, Ramp: 50},
		Cohorts: []sim.Cohort{{Name: "gw", IDPrefix: "rep-", Count: devices, Model: "gw-100", Firmware: "1.0.0", Keepalive: secs(30)}},
	}
	_, stop := runFleet(t, api1, f, c.AdminToken)

	nodes := map[string]int{}
	before := map[string]fleet.Device{}
	for i := range devices {
		id := fmt.Sprintf("rep-%d", i)
		for _, r := range []int{1, 2} {
			d := c.WaitDevice(r, id, 20*time.Second, "online on a replica", func(d fleet.Device) bool {
				return d.Online && c.Index(d.BrokerNode) >= 0
			})
			before[id] = d
		}
		nodes[before[id].BrokerNode]++
	}
	t.Logf("sessions by replica: %v", nodes)
	if len(nodes) < 2 {
		t.Errorf("all %d devices are on one replica (%v); HAProxy should spread them", devices, nodes)
	}

	// Kill the replica holding rep-0's session.
	victim := c.Index(before["rep-0"].BrokerNode)
	var moved []string
	for id, d := range before {
		if d.BrokerNode == c.Node(victim) {
			moved = append(moved, id)
		}
	}
	killed := time.Now()
	c.Kill(victim)
	c.Proxy.WaitServer(haproxytest.BackendMQTT, c.Node(victim), "DOWN", 5*time.Second)

	survivors := c.Alive()
	for _, id := range moved {
		for _, r := range survivors {
			d := c.WaitDevice(r, id, 15*time.Second, "back online on another replica", func(d fleet.Device) bool {
				return d.Online && d.BrokerNode != c.Node(victim) && c.Index(d.BrokerNode) >= 0 && d.SessionEpoch != before[id].SessionEpoch
			})
			if r == survivors[0] {
				t.Logf("%s: %s → %s, %.1f s after the kill", id, before[id].BrokerNode, d.BrokerNode, time.Since(killed).Seconds())
			}
		}
	}
	// The devices on the survivors kept their sessions.
	for id, d := range before {
		if d.BrokerNode == c.Node(victim) {
			continue
		}
		got := c.WaitDevice(survivors[0], id, 5*time.Second, "still online", func(d fleet.Device) bool { return d.Online })
		if got.SessionEpoch != d.SessionEpoch {
			t.Errorf("%s on %s: session epoch %d → %d; the kill of %s moved a device it did not hold", id, d.BrokerNode, d.SessionEpoch, got.SessionEpoch, c.Node(victim))
		}
	}
	// The killed replica comes back on its ports and data dir, the proxy
	// takes it in again, and it sees the fleet as the others do.
	c.Restart(victim)
	c.Proxy.WaitServer(haproxytest.BackendMQTT, c.Node(victim), "UP", 5*time.Second)
	for _, id := range moved {
		c.WaitDevice(victim, id, 5*time.Second, "online on a survivor, seen from the restarted replica", func(d fleet.Device) bool {
			return d.Online && d.BrokerNode != c.Node(victim)
		})
	}
	summary := stop()
	for kind, n := range summary.Errors {
		if strings.HasPrefix(kind, "refused") {
			t.Errorf("%d connects refused (%s): a replica refused a device registered through another", n, kind)
		}
	}
}
