package telemetry

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"testing"
	"unsafe"

	"github.com/google/go-cmp/cmp"
)

func TestValidMetric(t *testing.T) {
	for name, want := range map[string]bool{
		"rssi_dbm": true, "a": true, "uptime_s": true, "x9": true, strings.Repeat("a", 32): true,
		"": false, strings.Repeat("a", 33): false, "9a": false, "_a": false, "RSSI": false, "rssi-dbm": false,
		"rssi dbm": false, "é": false, "a\x00": false,
	} {
		if got := ValidMetric(name); got != want {
			t.Errorf("ValidMetric(%q) = %v, want %v", name, got, want)
		}
	}
}

func TestParse(t *testing.T) {
	many := func(n int) string {
		var b strings.Builder
		b.WriteString("{")
		for i := range n {
			if i > 0 {
				b.WriteString(",")
			}
			fmt.Fprintf(&b, `"m%d":%d`, i, i)
		}
		b.WriteString("}")
		return b.String()
	}
	first32 := func() []Metric {
		var ms []Metric
		for i := range MaxMetrics {
			ms = append(ms, Metric{fmt.Sprintf("m%d", i), float64(i)})
		}
		return ms
	}
	tests := []struct {
		name      string
		payload   string
		want      Message
		malformed bool   // nothing kept
		refused   string // the error mentions this ("" = no error)
	}{
		{name: "the example", payload: `{"rssi_dbm":-67,"channel":6,"uptime_s":1234,"bssid":"AA:bb:cc:dd:ee:ff","ssid":"shop","band":"2.4"}`,
			want: Message{Metrics: []Metric{{"rssi_dbm", -67}, {"channel", 6}, {"uptime_s", 1234}},
				Link: Link{BSSID: "aa:bb:cc:dd:ee:ff", SSID: "shop", Band: "2.4", Channel: 6}}},
		{name: "empty object", payload: `{}`},
		{name: "other types ignored", payload: `{"a":true,"b":"x","c":null,"d":[1,2],"e":{"f":1},"g":1.5e3}`,
			want: Message{Metrics: []Metric{{"g", 1500}}}},
		{name: "bad names ignored", payload: `{"RSSI":1,"9a":2,"a-b":3,"ok_1":4,"` + strings.Repeat("x", 33) + `":5}`,
			want: Message{Metrics: []Metric{{"ok_1", 4}}}},
		{name: "repeated name: the last counts", payload: `{"a":1,"b":2,"a":3}`, want: Message{Metrics: []Metric{{"a", 3}, {"b", 2}}}},
		{name: "beyond float64", payload: `{"big":1e400,"small":-1e400,"ok":1e308,"tiny":1e-400}`,
			want: Message{Metrics: []Metric{{"ok", 1e308}, {"tiny", 0}}}},
		{name: "too many metrics", payload: many(40), want: Message{Metrics: first32()}, refused: "8 numeric fields past the first 32"},
		{name: "bad bssid", payload: `{"rssi_dbm":-70,"bssid":"zz:zz:zz:zz:zz:zz"}`, want: Message{Metrics: []Metric{{"rssi_dbm", -70}}}, refused: "bssid"},
		{name: "bssid with dashes", payload: `{"bssid":"aa-bb-cc-dd-ee-ff"}`, refused: "not a MAC"},
		{name: "bssid not a string", payload: `{"bssid":12}`, refused: "not a string"},
		{name: "long ssid", payload: `{"ssid":"` + strings.Repeat("s", 33) + `"}`, refused: "33 bytes"},
		{name: "ssid with a control character", payload: `{"ssid":"a\u0000b"}`, refused: "not printable"},
		{name: "empty ssid", payload: `{"ssid":""}`, refused: "empty"},
		{name: "band", payload: `{"band":"5"}`, want: Message{Link: Link{Band: "5"}}},
		{name: "bad band", payload: `{"band":"60"}`, refused: "band"},
		{name: "band as a number", payload: `{"band":5}`, refused: "not a string"},
		{name: "bad channel is no metric", payload: `{"channel":6.5,"x":1}`, want: Message{Metrics: []Metric{{"x", 1}}}, refused: "channel"},
		{name: "channel out of range", payload: `{"channel":300}`, refused: "channel"},
		{name: "many bad fields, bounded", payload: `{"band":"1","band":"2","band":"3","band":"4","band":"7"}`, refused: "2 more fields refused"},
		{name: "not JSON", payload: `rssi=-67`, malformed: true},
		{name: "NaN", payload: `{"rssi_dbm":NaN}`, malformed: true},
		{name: "array", payload: `[1,2]`, malformed: true},
		{name: "string", payload: `"x"`, malformed: true},
		{name: "two objects", payload: `{"a":1}{"b":2}`, malformed: true},
		{name: "trailing garbage", payload: `{"a":1} x`, malformed: true},
		{name: "truncated", payload: `{"a":1,`, malformed: true},
		{name: "deep but within the size", payload: `{"a":` + strings.Repeat("[", 8000) + strings.Repeat("]", 8000) + `,"b":1}`,
			want: Message{Metrics: []Metric{{"b", 1}}}},
		{name: "deeper than encoding/json goes", payload: `{"a":` + strings.Repeat("[", 16000), malformed: true},
		{name: "too large", payload: `{"a":"` + strings.Repeat("x", MaxPayload) + `"}`, malformed: true},
		{name: "empty", payload: ``, malformed: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Parse([]byte(tt.payload))
			if tt.malformed {
				if !errors.Is(err, errMalformed) || !got.Empty() {
					t.Fatalf("Parse = %+v, %v; want nothing kept and errMalformed", got, err)
				}
				return
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("message mismatch (-want +got):\n%s", diff)
			}
			switch {
			case tt.refused == "" && err != nil:
				t.Errorf("unexpected error %v", err)
			case tt.refused != "" && (err == nil || !strings.Contains(err.Error(), tt.refused)):
				t.Errorf("error %v, want one mentioning %q", err, tt.refused)
			case errors.Is(err, errMalformed):
				t.Errorf("error %v marks the message malformed", err)
			}
		})
	}
}

// TestNumber: the whole numbers read without strconv are read as strconv
// reads them, signed zero included; the others go to strconv.
func TestNumber(t *testing.T) {
	for _, raw := range []string{"0", "-0", "7", "-67", "3600", "999999999999999", "-999999999999999",
		"9999999999999999", "12345678901234567890", "1.5", "-0.0", "1e3", "1E-2", "-1e400", "2.5e-324"} {
		want, err := strconv.ParseFloat(raw, 64)
		wantOK := err == nil && !math.IsInf(want, 0)
		got, ok := number([]byte(raw))
		if ok != wantOK || (ok && (got != want || math.Signbit(got) != math.Signbit(want))) {
			t.Errorf("number(%s) = %v, %v; want %v, %v", raw, got, ok, want, wantOK)
		}
	}
}

// TestParseShares: a device's known names and link strings are shared by
// the messages that repeat them, and new link strings become known.
func TestParseShares(t *testing.T) {
	k := &known{names: []string{"rssi_dbm"}}
	payload := `{"rssi_dbm":-60,"uptime_s":1,"bssid":"AA:BB:CC:DD:EE:FF","ssid":"shop","band":"5"}`
	msg, err := parse([]byte(payload), k)
	if err != nil {
		t.Fatal(err)
	}
	want := Message{Metrics: []Metric{{"rssi_dbm", -60}, {"uptime_s", 1}}, Link: Link{BSSID: "aa:bb:cc:dd:ee:ff", SSID: "shop", Band: "5"}}
	if diff := cmp.Diff(want, msg); diff != "" {
		t.Fatalf("message mismatch (-want +got):\n%s", diff)
	}
	if unsafe.StringData(msg.Metrics[0].Name) != unsafe.StringData(k.names[0]) {
		t.Error("known metric name copied, not shared")
	}
	if k.bssid != "aa:bb:cc:dd:ee:ff" || k.ssid != "shop" {
		t.Errorf("known link %q %q; want the message's", k.bssid, k.ssid)
	}
	again, _ := parse([]byte(payload), k)
	if unsafe.StringData(again.Link.BSSID) != unsafe.StringData(k.bssid) || unsafe.StringData(again.Link.SSID) != unsafe.StringData(k.ssid) {
		t.Error("known link strings copied, not shared")
	}
	if _, err := parse([]byte(`{"ssid":"bad\u0007"}`), k); err == nil || k.ssid != "shop" {
		t.Errorf("refused ssid: %v, known %q; want an error and the known one kept", err, k.ssid)
	}
}
