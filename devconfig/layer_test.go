package devconfig

import (
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestParseScope(t *testing.T) {
	for _, tt := range []struct {
		in      string
		want    Scope
		wantErr bool
	}{
		{in: "fleet", want: Scope{Kind: KindFleet}},
		{in: "model:gw-100", want: Scope{Kind: KindModel, Model: "gw-100"}},
		{in: "tag:site=lyon", want: Scope{Kind: KindTag, Tag: "site=lyon"}},
		{in: "tag:canary", want: Scope{Kind: KindTag, Tag: "canary"}},
		{in: "model:gw-100,tag:site=lyon", want: Scope{Kind: KindModelTag, Model: "gw-100", Tag: "site=lyon"}},
		{in: "", wantErr: true},
		{in: "Fleet", wantErr: true},
		{in: "model:", wantErr: true},
		{in: "model:gw 100", wantErr: true},
		{in: "tag:site=", wantErr: true},
		{in: "tag:site=lyon,model:gw-100", wantErr: true},
		{in: "model:a,model:b", wantErr: true},
		{in: "model:a,tag:b,tag:c", wantErr: true},
		{in: "device:d1", wantErr: true},
		{in: "model:" + strings.Repeat("m", 65), wantErr: true},
	} {
		t.Run(tt.in, func(t *testing.T) {
			got, err := ParseScope(tt.in)
			if (err != nil) != tt.wantErr {
				t.Fatalf("ParseScope(%q) = %v, %v", tt.in, got, err)
			}
			if err != nil {
				if ve, ok := err.(*ValidationError); !ok || ve.Field != "scope" {
					t.Fatalf("error %#v does not name the field", err)
				}
				return
			}
			if got != tt.want || got.String() != tt.in {
				t.Fatalf("ParseScope(%q) = %+v (%s), want %+v", tt.in, got, got, tt.want)
			}
		})
	}
}

// TestResolve: fleet < model < tag (by tag name) < model and tag < device,
// merged deeply; layers that do not apply are left out.
func TestResolve(t *testing.T) {
	layer := func(scope, doc string) Layer {
		sc, err := ParseScope(scope)
		if err != nil {
			t.Fatal(err)
		}
		return Layer{Scope: sc, Config: decodeAny(t, doc).(map[string]any)}
	}
	// Deliberately out of order: Resolve sorts.
	layers := []Layer{
		layer("model:gw-100,tag:site=lyon", `{"keepalive_s":25}`),
		layer("tag:site=lyon", `{"keepalive_s":40,"ntp":"lyon.pool","wifi":{"band":"5g"}}`),
		layer("tag:canary", `{"log":"debug","ntp":"canary.pool"}`),
		layer("model:gw-100", `{"keepalive_s":60,"wifi":{"band":"2g","tx_dbm":17}}`),
		layer("model:gw-200", `{"keepalive_s":90}`),
		layer("fleet", `{"keepalive_s":120,"log":"info","wifi":{"roam":true}}`),
		layer("tag:site=paris", `{"ntp":"paris.pool"}`),
	}
	for _, tt := range []struct {
		name, model string
		tags        []string
		own, want   string
		sources     []string
	}{
		{"no model, no tags: fleet only", "", nil, `{}`, `{"keepalive_s":120,"log":"info","wifi":{"roam":true}}`, []string{"fleet"}},
		{"model over fleet, deeply", "gw-100", nil, `{}`,
			`{"keepalive_s":60,"log":"info","wifi":{"band":"2g","roam":true,"tx_dbm":17}}`, []string{"fleet", "model:gw-100"}},
		{"tag over model; the model at the tag over both", "gw-100", []string{"site=lyon"}, `{}`,
			`{"keepalive_s":25,"log":"info","ntp":"lyon.pool","wifi":{"band":"5g","roam":true,"tx_dbm":17}}`,
			[]string{"fleet", "model:gw-100", "tag:site=lyon", "model:gw-100,tag:site=lyon"}},
		{"the model at the tag needs both", "gw-200", []string{"site=lyon"}, `{}`,
			`{"keepalive_s":40,"log":"info","ntp":"lyon.pool","wifi":{"band":"5g","roam":true}}`,
			[]string{"fleet", "model:gw-200", "tag:site=lyon"}},
		{"tags in name order, whatever the device's order", "", []string{"site=lyon", "canary"}, `{}`,
			`{"keepalive_s":40,"log":"debug","ntp":"lyon.pool","wifi":{"band":"5g","roam":true}}`,
			[]string{"fleet", "tag:canary", "tag:site=lyon"}},
		{"the device's own layer last", "gw-100", []string{"site=lyon"}, `{"keepalive_s":15,"wifi":{"tx_dbm":20}}`,
			`{"keepalive_s":15,"log":"info","ntp":"lyon.pool","wifi":{"band":"5g","roam":true,"tx_dbm":20}}`,
			[]string{"fleet", "model:gw-100", "tag:site=lyon", "model:gw-100,tag:site=lyon", "device"}},
		{"an array replaces whole", "", nil, `{"wifi":["x"]}`, `{"keepalive_s":120,"log":"info","wifi":["x"]}`, []string{"fleet", "device"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			own := decodeAny(t, tt.own).(map[string]any)
			got, sources := Resolve(layers, tt.model, tt.tags, own)
			if diff := cmp.Diff(decodeAny(t, tt.want), any(got)); diff != "" {
				t.Fatalf("mismatch (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(tt.sources, sources); diff != "" {
				t.Fatalf("sources mismatch (-want +got):\n%s", diff)
			}
		})
	}
	// The layers are left as they were.
	if got := Encode(layers[5].Config); string(got) != `{"keepalive_s":120,"log":"info","wifi":{"roam":true}}` {
		t.Fatalf("fleet layer modified: %s", got)
	}
}

func TestDescribe(t *testing.T) {
	doc := func(s string) Doc { return decodeAny(t, s).(map[string]any) }
	base := Device{DeviceID: "d1", Version: 3, Effective: doc(`{"keepalive_s":25}`)}
	for _, tt := range []struct {
		name     string
		reported *Reported
		want     string
	}{
		{"never reported", nil, SyncUnreported},
		{"older version", &Reported{Version: 2, Config: doc(`{"keepalive_s":25}`)}, SyncStale},
		{"current version, other value", &Reported{Version: 3, Config: doc(`{"keepalive_s":60}`)}, SyncDiffers},
		{"current version, missing key", &Reported{Version: 3, Config: doc(`{}`)}, SyncDiffers},
		{"in sync", &Reported{Version: 3, Config: doc(`{"keepalive_s":25}`)}, SyncInSync},
		{"in sync with extra keys of the device's own", &Reported{Version: 3, Config: doc(`{"keepalive_s":25,"uptime":5}`)}, SyncInSync},
	} {
		t.Run(tt.name, func(t *testing.T) {
			d := base
			d.Reported = tt.reported
			v := Describe(d)
			if v.Sync != tt.want || v.InSync != (tt.want == SyncInSync) {
				t.Fatalf("sync %s (in_sync %v), want %s; diff %+v", v.Sync, v.InSync, tt.want, v.Diff)
			}
		})
	}
}
