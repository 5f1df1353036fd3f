package fleet

import (
	"context"
	"testing"
	"time"
)

// TestFleetHealthShared: with a TTL, fleet health is computed once per TTL;
// presence is up to the TTL late, a device registered through the service
// is counted at once.
func TestFleetHealthShared(t *testing.T) {
	ctx := context.Background()
	svc, _ := newService(t)
	now := time.Now()
	svc.now = func() time.Time { return now }
	svc.SetHealthTTL(2 * time.Second)
	register(t, svc, "gw-100", "a", "b")
	health := func() FleetHealth {
		t.Helper()
		h, err := svc.FleetHealth(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return h
	}
	if h := health(); h.Devices.Total != 2 || h.Devices.Online != 0 {
		t.Fatalf("devices %+v, want 2, none online", h.Devices)
	}
	at := now.Add(-time.Second)
	if err := svc.store.writeEvents(ctx, []Event{{ID: NewEventID(at), DeviceID: "a", At: at, Kind: KindConnect, Model: "gw-100", SessionEpoch: 1}}); err != nil {
		t.Fatal(err)
	}
	if h := health(); h.Devices.Online != 0 {
		t.Fatalf("online %d within the TTL, want the shared summary's 0", h.Devices.Online)
	}
	register(t, svc, "gw-100", "c")
	if h := health(); h.Devices.Total != 3 || h.Devices.Online != 1 {
		t.Fatalf("devices %+v after a registration, want 3 with 1 online", h.Devices)
	}
	if err := svc.store.writeEvents(ctx, []Event{{ID: NewEventID(at), DeviceID: "b", At: at, Kind: KindConnect, Model: "gw-100", SessionEpoch: 2}}); err != nil {
		t.Fatal(err)
	}
	now = now.Add(3 * time.Second)
	if h := health(); h.Devices.Online != 2 {
		t.Fatalf("online %d after the TTL, want 2", h.Devices.Online)
	}
	svc.SetHealthTTL(0)
	if err := svc.store.writeEvents(ctx, []Event{{ID: NewEventID(at), DeviceID: "c", At: at, Kind: KindConnect, Model: "gw-100", SessionEpoch: 3}}); err != nil {
		t.Fatal(err)
	}
	if h := health(); h.Devices.Online != 3 {
		t.Fatalf("online %d without a TTL, want 3", h.Devices.Online)
	}
}
