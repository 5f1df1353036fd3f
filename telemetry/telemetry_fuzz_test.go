package telemetry

import (
	"encoding/json"
	"errors"
	"math"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/google/go-cmp/cmp"
)

// FuzzParseTelemetry: whatever a device publishes on its telemetry topic,
// Parse never panics, and what it keeps is bounded and storable: at most
// MaxMetrics metrics with valid, distinct names and finite values; link
// strings that are a lower-case MAC, a printable SSID of at most 32 bytes, a
// known band; a channel in range; an error of bounded length.
func FuzzParseTelemetry(f *testing.F) {
	for _, seed := range []string{
		`{"rssi_dbm":-67,"channel":6,"uptime_s":1234,"bssid":"aa:bb:cc:dd:ee:ff","ssid":"shop","band":"2.4"}`,
		`{}`, `[]`, `null`, ``, `{"a":1e400}`, `{"a":NaN}`, `{"a":-0}`, `{"a":1,"a":2}`,
		`{"bssid":"AA:BB:CC:DD:EE:FF","ssid":"caf\u00e9","band":"6","channel":233}`,
		`{"ssid":"\u0000","bssid":"zz","band":5,"channel":0}`,
		`{"a":[[[[[[[[[[]]]]]]]]]]}`, `{"a":{"b":{"c":1}}}`,
		"{\"ssid\":\"\xff\xfe\"}",
		`{"m0":0,"m1":1,"m2":2,"m3":3,"m4":4,"m5":5,"m6":6,"m7":7,"m8":8,"m9":9,"m10":10,"m11":11,"m12":12,"m13":13,"m14":14,"m15":15,"m16":16,"m17":17,"m18":18,"m19":19,"m20":20,"m21":21,"m22":22,"m23":23,"m24":24,"m25":25,"m26":26,"m27":27,"m28":28,"m29":29,"m30":30,"m31":31,"m32":32}`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, payload []byte) {
		msg, err := Parse(payload)
		if err != nil {
			if len(err.Error()) > 1000 {
				t.Fatalf("error of %d bytes: %.100s…", len(err.Error()), err)
			}
			if errors.Is(err, errMalformed) && !msg.Empty() {
				t.Fatalf("malformed message kept %+v", msg)
			}
		}
		if len(msg.Metrics) > MaxMetrics {
			t.Fatalf("%d metrics kept", len(msg.Metrics))
		}
		seen := map[string]bool{}
		for _, m := range msg.Metrics {
			if !ValidMetric(m.Name) || seen[m.Name] || math.IsNaN(m.Value) || math.IsInf(m.Value, 0) {
				t.Fatalf("kept metric %+v", m)
			}
			seen[m.Name] = true
		}
		l := msg.Link
		if l.BSSID != "" {
			if mac := [17]byte{}; !parseMAC([]byte(l.BSSID), &mac) || string(mac[:]) != l.BSSID {
				t.Fatalf("kept bssid %q", l.BSSID)
			}
		}
		if l.SSID != "" && (len(l.SSID) > maxSSID || !utf8.ValidString(l.SSID) || strings.ContainsRune(l.SSID, 0) || checkSSID(l.SSID) != nil) {
			t.Fatalf("kept ssid %q", l.SSID)
		}
		if l.Band != "" && l.Band != "2.4" && l.Band != "5" && l.Band != "6" {
			t.Fatalf("kept band %q", l.Band)
		}
		if l.Channel < 0 || l.Channel > 233 {
			t.Fatalf("kept channel %d", l.Channel)
		}
		// Parse reads what encoding/json reads: every numeric member with a
		// metric's name (the last of a repeated name) is kept, with its value,
		// unless the message carries more than MaxMetrics of them.
		var ref map[string]any
		if err != nil && errors.Is(err, errMalformed) || json.Unmarshal(payload, &ref) != nil ||
			len(msg.Metrics) == MaxMetrics || l.Channel == 0 && ref["channel"] != nil {
			return
		}
		want := map[string]float64{}
		for k, v := range ref {
			if f, ok := v.(float64); ok && ValidMetric(k) && k != "bssid" && k != "ssid" && k != "band" {
				want[k] = f
			}
		}
		got := map[string]float64{}
		for _, m := range msg.Metrics {
			got[m.Name] = m.Value
		}
		if diff := cmp.Diff(want, got); diff != "" {
			t.Fatalf("metrics of %q differ from encoding/json's (-json +Parse):\n%s", payload, diff)
		}
	})
}
