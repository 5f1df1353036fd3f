// Package e2e holds end-to-end tests: the real fleetd binary with its
// embedded PostgreSQL, devices played by fleetsim, and the REST API, as an
// operator would use them.
package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/fleetd/fleetd/firmware"
	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/fleetdtest"
	"github.com/fleetd/fleetd/sim"
	"github.com/fleetd/fleetd/web/client"
)

func secs(s float64) sim.Duration { return sim.Duration(s * float64(time.Second)) }

// fastFleetd starts fleetd with quick analysis and campaign stepping.
func fastFleetd(t *testing.T, dataDir string, env ...string) (*fleetdtest.Process, *client.Client) {
	t.Helper()
	env = append([]string{"FLEETD_ANALYSIS_INTERVAL=1s", "FLEETD_CAMPAIGN_INTERVAL=200ms"}, env...)
	p := fleetdtest.Start(t, dataDir, env...)
	p.WaitReady(15 * time.Second)
	return p, client.New(p.HTTPURL, p.Token())
}

// smallFleetPolicy lets a minute of a dozen devices teach verdicts.
var smallFleetPolicy = fleet.Policy{Verdicts: fleet.VerdictPolicy{MinDevices: 3, MinDeviceHours: 0.002, MinEvents: 5, MinRate: 1, RateRatio: 2}}

func upload(t *testing.T, api *client.Client, version string, size int) firmware.Artifact {
	t.Helper()
	image := make([]byte, size)
	rand.Read(image)
	art, err := api.UploadFirmware(context.Background(), version, []string{"gw-100"}, bytes.NewReader(image))
	if err != nil {
		t.Fatalf("upload %s: %v", version, err)
	}
	return art
}

// runFleet plays f in the background until the test ends or stop is called.
func runFleet(t *testing.T, api *client.Client, f *sim.Fleet, token string) (s *sim.Simulator, stop func() sim.Summary) {
	t.Helper()
	key, err := api.SigningKey(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	f.OTA.PublicKey = key
	if f.OTA.InstallTime == 0 {
		f.OTA.InstallTime = secs(0.2)
	}
	if err := f.Validate(); err != nil {
		t.Fatal(err)
	}
	s, err = sim.New(context.Background(), f, sim.Options{AdminToken: token})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan sim.Summary, 1)
	go func() { done <- s.Run(ctx) }()
	var summary *sim.Summary
	stop = func() sim.Summary {
		if summary == nil {
			cancel()
			sm := <-done
			summary = &sm
		}
		return *summary
	}
	t.Cleanup(func() { stop() })
	return s, stop
}

// waitCampaign polls a campaign until cond holds.
func waitCampaign(t *testing.T, api *client.Client, id string, within time.Duration, what string, cond func(firmware.CampaignView) bool) firmware.CampaignView {
	t.Helper()
	deadline := time.Now().Add(within)
	var v firmware.CampaignView
	var err error
	for time.Now().Before(deadline) {
		if v, err = api.Campaign(context.Background(), id); err == nil && cond(v) {
			return v
		}
		time.Sleep(200 * time.Millisecond)
	}
	devs, _ := api.CampaignDevices(context.Background(), id)
	t.Fatalf("campaign %s: %s not reached within %s (err %v): state %s stage %d counts %+v\ndevices %+v", id, what, within, err, v.State, v.Stage, v.Counts, devs)
	return v
}

func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// publish sends a QoS 0 PUBLISH on the raw device's connection.
func (d *rawDevice) publish(t *testing.T, topic, payload string) {
	t.Helper()
	body := append([]byte{byte(len(topic) >> 8), byte(len(topic))}, topic...)
	body = append(body, payload...)
	if _, err := d.conn.Write(append(append([]byte{0x30}, remainingLength(len(body))...), body...)); err != nil {
		t.Fatalf("publish %s: %v", topic, err)
	}
}

// streamEvents reads a replica's live stream (GET /api/v1/stream) in the
// background until the test ends, handing the data of every event named
// event to f, on the reading goroutine.
func streamEvents(t *testing.T, url, token, event string, f func(data []byte)) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url+"/api/v1/stream", nil)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("live stream: %v %v", resp, err)
	}
	go func() {
		defer resp.Body.Close()
		sc := bufio.NewScanner(resp.Body)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		name := ""
		for sc.Scan() {
			line := sc.Text()
			if n, ok := strings.CutPrefix(line, "event: "); ok {
				name = n
				continue
			}
			if data, ok := strings.CutPrefix(line, "data: "); ok && name == event {
				f([]byte(data))
			}
		}
	}()
}
