package firmware

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/fleetd/fleetd/fleet"
)

// registerTagged adds devices on 1.0.0 with tags.
func (d *dispatcher) registerTagged(tags map[string][]string) {
	d.t.Helper()
	ctx := context.Background()
	for id, ts := range tags {
		if _, _, err := d.svc.Register(ctx, fleet.NewDevice{ID: id, Model: "gw-100", Tags: ts}); err != nil {
			d.t.Fatal(err)
		}
	}
	if _, err := d.pool.Exec(ctx, `UPDATE devices SET firmware = '1.0.0'`); err != nil {
		d.t.Fatal(err)
	}
}

// devicesSent lists the devices the dispatcher has sent jobs to, sorted.
func (d *dispatcher) devicesSent() []string {
	var ids []string
	for _, j := range d.send.jobs() {
		ids = append(ids, j.Manifest.DeviceID)
	}
	slices.Sort(ids)
	return ids
}

func (d *dispatcher) wantSent(when string, want ...string) {
	d.t.Helper()
	slices.Sort(want)
	if got := d.devicesSent(); !slices.Equal(got, want) {
		d.t.Fatalf("%s (%s UTC): jobs sent to %v, want %v", when, d.now.Format("Jan 2 15:04:05"), got, want)
	}
}

// TestDispatcherWindows runs a campaign with a nightly window (02:00–04:00)
// in Paris, whose devices may name their own zone in the tag tz, on the
// dispatcher's clock: each device's job goes out only inside its own zone's
// window — a device tagged Tokyo while Paris is outside its window, the
// untagged ones and the one whose tag names no zone with Paris, one tagged
// New York not while Paris is inside its window — and entering a window
// does not send the backlog at once.
func TestDispatcherWindows(t *testing.T) {
	d := newDispatcher(t, "paris-1", "paris-2", "paris-3") // untagged: the campaign's zone
	d.registerTagged(map[string][]string{
		"tokyo-1":  {"tz=Asia/Tokyo", "site=kyoto"},
		"ny-1":     {"tz=America/New_York"},
		"typo-1":   {"tz=Europe/Pariss"}, // names no zone: the campaign's
		"berlin-1": {"tz=Europe/Berlin"}, // another zone whose clock is Paris's
	})
	// 12:00 UTC on 1 June: 14:00 in Paris (CEST), 21:00 in Tokyo, 08:00 in New York.
	v := d.start(Spec{Name: "nightly", Stages: oneStage(Stage{MaxFailureRate: 1, MaxNotBackOnline: -1}),
		Pacing:  Pacing{DevicesPerMinute: 60},
		Windows: []Window{{Cron: "0 2 * * *", Duration: Duration(2 * time.Hour)}}, Timezone: "Europe/Paris", TimezoneTag: "tz",
		DeviceTimeout: Duration(time.Hour)})
	d.step(time.Second)
	d.step(time.Hour)
	d.wantSent("outside every window")
	got, err := d.c.Get(context.Background(), v.ID)
	if err != nil {
		t.Fatal(err)
	}
	tokyoOpens := time.Date(2026, 6, 1, 17, 0, 0, 0, time.UTC) // 02:00 on 2 June in Tokyo
	if got.Window == nil || got.Window.Open || !got.Window.NextWindow.Equal(tokyoOpens) {
		t.Fatalf("campaign view's window %+v, want closed with next_window %s", got.Window, tokyoOpens)
	}
	zones := map[string]int{}
	for _, z := range got.Window.Zones {
		zones[z.Zone] = z.Pending
	}
	if want := map[string]int{"Europe/Paris": 4, "Asia/Tokyo": 1, "America/New_York": 1, "Europe/Berlin": 1}; !mapsEqual(zones, want) {
		t.Fatalf("view's zones %v, want %v", zones, want)
	}

	// Tokyo's window opens; Paris's is shut.
	d.now = tokyoOpens
	d.step(500 * time.Millisecond)
	d.wantSent("Tokyo's window", "tokyo-1")
	d.step(time.Hour)
	d.wantSent("Tokyo's window, an hour on", "tokyo-1")

	// Paris's (and Berlin's) window opens at 00:00 UTC: five devices, paced
	// at one a second from the opening, not a catch-up burst; New York
	// (20:00) waits.
	d.now = time.Date(2026, 6, 2, 0, 0, 0, 0, time.UTC)
	d.step(500 * time.Millisecond)
	if n := len(d.devicesSent()); n != 2 {
		t.Fatalf("half a second into Paris's window: %d jobs sent, want 2 (one new: the pacing restarts at the opening)", n)
	}
	for range 8 {
		d.step(time.Second)
	}
	d.wantSent("Paris's window", "tokyo-1", "paris-1", "paris-2", "paris-3", "typo-1", "berlin-1")
	if got, _ := d.c.Get(context.Background(), v.ID); got.Window == nil || got.Window.Open || got.Window.Zones[0].Zone != "America/New_York" {
		t.Fatalf("with only New York's device left: window %+v, want closed, for America/New_York", got.Window)
	}

	// Paris's window closes at 02:00 UTC; New York's opens at 06:00 UTC.
	d.now = time.Date(2026, 6, 2, 5, 59, 59, 0, time.UTC)
	d.step(0)
	d.wantSent("before New York's window", "tokyo-1", "paris-1", "paris-2", "paris-3", "typo-1", "berlin-1")
	d.step(2 * time.Second)
	d.wantSent("New York's window", "tokyo-1", "paris-1", "paris-2", "paris-3", "typo-1", "berlin-1", "ny-1")
}

func mapsEqual(a, b map[string]int) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}
