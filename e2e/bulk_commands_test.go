package e2e

import (
	"context"
	"encoding/json"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fleetd/fleetd/command"
	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/fleetdtest"
	"github.com/fleetd/fleetd/sim"
	"github.com/fleetd/fleetd/web/client"
)

// bulkStream reads a replica's live stream and returns the last
// "bulk_command" event seen per bulk id.
func bulkStream(t *testing.T, url, token string) func(id string) (command.BulkChange, int) {
	t.Helper()
	var mu sync.Mutex
	last, n := map[string]command.BulkChange{}, map[string]int{}
	streamEvents(t, url, token, "bulk_command", func(data []byte) {
		var c command.BulkChange
		if json.Unmarshal(data, &c) == nil {
			mu.Lock()
			last[c.ID], n[c.ID] = c, n[c.ID]+1
			mu.Unlock()
		}
	})
	return func(id string) (command.BulkChange, int) {
		mu.Lock()
		defer mu.Unlock()
		return last[id], n[id]
	}
}

// allBulkDevices reads every page of a bulk's devices.
func allBulkDevices(t *testing.T, api *client.Client, id, state string) []command.BulkTarget {
	t.Helper()
	var out []command.BulkTarget
	cursor := ""
	for {
		page, err := api.BulkDevices(context.Background(), id, state, cursor, 200)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, page.Devices...)
		if cursor = page.NextCursor; cursor == "" {
			return out
		}
	}
}

// TestBulkCommand1000: a bulk command over 1 000 simulated devices is paced
// and summarised. 1 000 devices connect to a real fleetd: 800 gw-100 on
// 1.x (the selector's: model, version range and tag), 150 gw-100 on 2.1.0
// and 50 ap-7 that must get nothing, and one more matching device that is
// offline, whose command expires. The bulk never has more than
// max_concurrent commands in flight (from each device's sent_at and
// finished_at), its summary equals the per-device results (800 succeeded,
// 1 expired), the live stream carries its progress, and fleetctl sends a
// second bulk to the ap-7 (an unknown command: all failed) and shows it.
func TestBulkCommand1000(t *testing.T) {
	p, api := fastFleetd(t, fleetdtest.DataDir(t))
	ctx := context.Background()
	progress := bulkStream(t, p.HTTPURL, p.Token())
	f := &sim.Fleet{
		Server: sim.Server{MQTT: "tcp://" + p.Addr("mqtt-tcp"), API: p.HTTPURL},
		Run:    sim.RunOptions{Duration: secs(300), Register: true, Ramp: 500},
		Cohorts: []sim.Cohort{
			{Name: "lyon", Count: 800, Model: "gw-100", Firmware: "1.4.2", Keepalive: secs(60)},
			{Name: "lyon-new", Count: 150, Model: "gw-100", Firmware: "2.1.0", Keepalive: secs(60)},
			{Name: "ap", Count: 50, Model: "ap-7", Firmware: "1.0.0", Keepalive: secs(60)},
		},
	}
	// The offline one: its birth message says it is a 1.x gw-100 of the
	// cohort, then it goes away.
	reg, err := api.RegisterDevice(ctx, fleet.NewDevice{ID: "lyon-away", Model: "gw-100", Tags: []string{"sim=lyon"}})
	if err != nil {
		t.Fatal(err)
	}
	away, _ := pahoDevice(t, p.Addr("mqtt-tcp"), "lyon-away", reg.Token)
	away.Publish("devices/lyon-away/status", 1, true, `{"online":true,"firmware":"1.0.0","model":"gw-100"}`).Wait()
	waitUntil(t, 10*time.Second, "lyon-away's birth", func() bool {
		d, err := api.Device(ctx, "lyon-away")
		return err == nil && d.Firmware == "1.0.0"
	})
	away.Disconnect(100)

	runFleet(t, api, f, p.Token())
	waitUntil(t, 50*time.Second, "1 000 simulated devices online", func() bool {
		h, err := api.FleetHealth(ctx)
		return err == nil && h.Devices.Online == 1000
	})
	// Their birth messages' firmware is recorded a moment after they are
	// online.
	waitUntil(t, 20*time.Second, "800 devices on 1.4.2", func() bool {
		n, cursor := 0, ""
		for {
			page, err := api.Devices(ctx, client.DeviceQuery{Model: "gw-100", Firmware: "1.4.2", Cursor: cursor, Limit: 500})
			if err != nil {
				return false
			}
			n += len(page.Devices)
			if cursor = page.NextCursor; cursor == "" {
				return n == 800
			}
		}
	})

	const maxConcurrent = 50
	b, err := api.SendBulk(ctx, command.BulkRequest{
		Request:  command.Request{Name: "ping", Timeout: command.Duration(10 * time.Second), ExpiresIn: command.Duration(2 * time.Second)},
		Selector: command.Selector{Models: []string{"gw-100"}, Version: "<2.0.0", Tags: []string{"sim=lyon"}},
		Pacing:   command.Pacing{MaxConcurrent: maxConcurrent, DevicesPerMinute: 60000},
	})
	if err != nil {
		t.Fatal(err)
	}
	if b.Total != 801 || b.State != command.BulkRunning {
		t.Fatalf("created %+v, want 801 devices running", b)
	}
	deadline := time.Now().Add(45 * time.Second)
	for b.State == command.BulkRunning {
		if time.Now().After(deadline) {
			t.Fatalf("bulk still running: %+v", b.Counts)
		}
		time.Sleep(200 * time.Millisecond)
		if b, err = api.Bulk(ctx, b.ID); err != nil {
			t.Fatal(err)
		}
	}
	want := command.Counts{Succeeded: 800, Expired: 1}
	if b.State != command.BulkCompleted || b.Counts != want || b.FinishedAt == nil || b.FinishedAt.Before(b.CreatedAt) {
		t.Fatalf("finished %s %+v (finished_at %v), want completed with %+v", b.State, b.Counts, b.FinishedAt, want)
	}

	// The per-device results say what the summary says.
	ts := allBulkDevices(t, api, b.ID, "")
	byState := map[string]int{}
	for _, x := range ts {
		byState[x.State]++
		if x.State == "succeeded" && !strings.Contains(string(x.Result), "pong") {
			t.Fatalf("%s answered %s", x.DeviceID, x.Result)
		}
		if !strings.HasPrefix(x.DeviceID, "lyon-") || strings.HasPrefix(x.DeviceID, "lyon-new") {
			t.Fatalf("%s was selected", x.DeviceID)
		}
	}
	if len(ts) != 801 || byState["succeeded"] != 800 || byState["expired"] != 1 {
		t.Fatalf("per-device results: %d devices, %v", len(ts), byState)
	}
	if exp := allBulkDevices(t, api, b.ID, "expired"); len(exp) != 1 || exp[0].DeviceID != "lyon-away" {
		t.Fatalf("expired: %+v", exp)
	}
	// The others got nothing.
	for _, id := range []string{"lyon-new-0", "lyon-new-149", "ap-0", "ap-49"} {
		if page, err := api.Commands(ctx, id, "", 10); err != nil || len(page.Commands) != 0 {
			t.Fatalf("%s got commands: %+v %v", id, page, err)
		}
	}

	// Pacing: at no instant were more than max_concurrent commands in
	// flight (sent, not finished). A millisecond of slack covers the
	// replica's clock being re-synced to the database's.
	type edge struct {
		at    time.Time
		delta int
	}
	var edges []edge
	sentAt := map[time.Time]bool{}
	for _, x := range ts {
		if x.SentAt == nil || x.FinishedAt == nil {
			t.Fatalf("%s: sent %v finished %v", x.DeviceID, x.SentAt, x.FinishedAt)
		}
		sentAt[*x.SentAt] = true
		edges = append(edges, edge{*x.SentAt, +1}, edge{x.FinishedAt.Add(-time.Millisecond), -1})
	}
	sort.Slice(edges, func(i, j int) bool {
		if !edges[i].at.Equal(edges[j].at) {
			return edges[i].at.Before(edges[j].at)
		}
		return edges[i].delta < edges[j].delta // a slot freed at an instant is free at that instant
	})
	inFlight, peak := 0, 0
	for _, e := range edges {
		inFlight += e.delta
		peak = max(peak, inFlight)
	}
	if peak > maxConcurrent {
		t.Fatalf("%d commands in flight at once, max_concurrent %d", peak, maxConcurrent)
	}
	if len(sentAt) < 801/maxConcurrent {
		t.Fatalf("commands sent in %d batches; max_concurrent %d needs at least %d", len(sentAt), maxConcurrent, 801/maxConcurrent)
	}
	if testing.Verbose() {
		var times []time.Time
		for at := range sentAt {
			times = append(times, at)
		}
		sort.Slice(times, func(i, j int) bool { return times[i].Before(times[j]) })
		for i, at := range times {
			n, lastDel, lastFin := 0, time.Time{}, time.Time{}
			for _, x := range ts {
				if x.SentAt.Equal(at) {
					n++
					if x.DeliveredAt != nil && x.DeliveredAt.After(lastDel) {
						lastDel = *x.DeliveredAt
					}
					if x.FinishedAt.After(lastFin) {
						lastFin = *x.FinishedAt
					}
				}
			}
			t.Logf("batch %d at +%s: %d, last delivered +%s, last finished +%s", i, at.Sub(times[0]).Round(time.Millisecond), n,
				lastDel.Sub(times[0]).Round(time.Millisecond), lastFin.Sub(times[0]).Round(time.Millisecond))
		}
	}
	t.Logf("801 commands in %d batches, at most %d in flight, %s from creation to completion",
		len(sentAt), peak, b.FinishedAt.Sub(b.CreatedAt).Round(time.Millisecond))

	waitUntil(t, 5*time.Second, "the live stream to show the bulk completed", func() bool {
		c, _ := progress(b.ID)
		return c.State == command.BulkCompleted && c.Counts == want
	})
	if _, n := progress(b.ID); n < 3 {
		t.Fatalf("%d progress events on the live stream", n)
	}

	// fleetctl: a bulk of an unknown command (every ap-7 answers failed),
	// then its summary.
	bin := fleetdtest.Build(t, "fleetctl")
	env := []string{"FLEETD_URL=" + p.HTTPURL, "FLEETD_ADMIN_TOKEN_FILE=" + filepath.Join(p.DataDir, "admin-token")}
	cmd := exec.Command(bin, "-output", "json", "commands", "send", "-model", "ap-7", "-firmware", ">=1.0.0", "-max-concurrent", "20", "self_destruct", `{"now":true}`)
	cmd.Env = env
	out, err := cmd.Output()
	var sent command.Bulk
	if err != nil || json.Unmarshal(out, &sent) != nil || sent.Total != 50 {
		t.Fatalf("fleetctl commands send: %v\n%s", err, out)
	}
	id := sent.ID
	waitUntil(t, 20*time.Second, "the second bulk to complete", func() bool {
		b, err := api.Bulk(ctx, id)
		return err == nil && b.State == command.BulkCompleted
	})
	cmd = exec.Command(bin, "commands", "show", id)
	cmd.Env = env
	out, err = cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "completed") || !strings.Contains(string(out), "failed") || !strings.Contains(string(out), "50") {
		t.Fatalf("fleetctl commands show: %v\n%s", err, out)
	}
	if b2, _ := api.Bulk(ctx, id); b2.Counts != (command.Counts{Failed: 50}) {
		t.Fatalf("second bulk: %+v", b2.Counts)
	}
}
