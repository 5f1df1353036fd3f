package devconfig

import (
	"encoding/json"
	"strings"
	"testing"

	jsonpatch "github.com/evanphx/json-patch/v5"
	"github.com/google/go-cmp/cmp"
)

func decodeAny(t *testing.T, s string) any {
	t.Helper()
	dec := json.NewDecoder(strings.NewReader(s))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		t.Fatalf("%s: %v", s, err)
	}
	return v
}

// TestMergePatchRFC7396 runs the examples of RFC 7396, appendix A, and
// checks that neither argument is modified.
func TestMergePatchRFC7396(t *testing.T) {
	for _, tt := range []struct{ target, patch, want string }{
		{`{"a":"b"}`, `{"a":"c"}`, `{"a":"c"}`},
		{`{"a":"b"}`, `{"b":"c"}`, `{"a":"b","b":"c"}`},
		{`{"a":"b"}`, `{"a":null}`, `{}`},
		{`{"a":"b","b":"c"}`, `{"a":null}`, `{"b":"c"}`},
		{`{"a":["b"]}`, `{"a":"c"}`, `{"a":"c"}`},
		{`{"a":"c"}`, `{"a":["b"]}`, `{"a":["b"]}`},
		{`{"a":{"b":"c"}}`, `{"a":{"b":"d","c":null}}`, `{"a":{"b":"d"}}`},
		{`{"a":[{"b":"c"}]}`, `{"a":[1]}`, `{"a":[1]}`},
		{`["a","b"]`, `["c","d"]`, `["c","d"]`},
		{`{"a":"b"}`, `["c"]`, `["c"]`},
		{`{"a":"foo"}`, `null`, `null`},
		{`{"a":"foo"}`, `"bar"`, `"bar"`},
		{`{"e":null}`, `{"a":1}`, `{"e":null,"a":1}`},
		{`[1,2]`, `{"a":"b","c":null}`, `{"a":"b"}`},
		{`{}`, `{"a":{"bb":{"ccc":null}}}`, `{"a":{"bb":{}}}`},
	} {
		t.Run(tt.target+"+"+tt.patch, func(t *testing.T) {
			// The library, on any JSON value.
			out, err := jsonpatch.MergePatch([]byte(tt.target), []byte(tt.patch))
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(decodeAny(t, tt.want), decodeAny(t, string(out))); diff != "" {
				t.Fatalf("jsonpatch.MergePatch mismatch (-want +got):\n%s", diff)
			}
			// MergePatch, on documents (objects), leaves its target alone.
			target, ok := decodeAny(t, tt.target).(map[string]any)
			if !ok {
				return
			}
			got, err := MergePatch(target, []byte(tt.patch))
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(decodeAny(t, tt.want), got); diff != "" {
				t.Fatalf("MergePatch mismatch (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(decodeAny(t, tt.target), any(target)); diff != "" {
				t.Fatalf("target modified (-before +after):\n%s", diff)
			}
		})
	}
}

// TestMerge: layers merge deeply; arrays and values replace; neither
// argument is modified.
func TestMerge(t *testing.T) {
	base := decodeAny(t, `{"a":1,"w":{"band":"2g","tx":17},"l":[1,2]}`).(map[string]any)
	over := decodeAny(t, `{"w":{"band":"5g"},"l":[3],"n":{"x":true}}`).(map[string]any)
	got := Merge(base, over)
	if diff := cmp.Diff(decodeAny(t, `{"a":1,"w":{"band":"5g","tx":17},"l":[3],"n":{"x":true}}`), any(got)); diff != "" {
		t.Fatalf("mismatch (-want +got):\n%s", diff)
	}
	got["n"].(map[string]any)["x"] = false
	if string(Encode(base)) != `{"a":1,"l":[1,2],"w":{"band":"2g","tx":17}}` || string(Encode(over)) != `{"l":[3],"n":{"x":true},"w":{"band":"5g"}}` {
		t.Fatalf("arguments modified: %s %s", Encode(base), Encode(over))
	}
}

// TestParseBounds: documents are JSON objects within the size, depth, key
// count and key length limits; a layer holds no null, a patch may.
func TestParseBounds(t *testing.T) {
	l := Limits{MaxDocument: 64, MaxDepth: 3, MaxKeys: 4, MaxKeyLen: 8}.withDefaults()
	for _, tt := range []struct {
		name, doc string
		kind      docKind
		wantErr   string // "" = accepted
	}{
		{"object", `{"ka": 25, "wifi": {"band": "5g"}}`, kindLayer, ""},
		{"indentation is not counted", `{` + strings.Repeat(" ", 200) + `"a":1}`, kindLayer, ""},
		{"empty object", `{}`, kindLayer, ""},
		{"array", `[1,2]`, kindLayer, "must be a JSON object"},
		{"string", `"x"`, kindLayer, "must be a JSON object"},
		{"null", `null`, kindLayer, "must be a JSON object"},
		{"empty", ``, kindLayer, "is empty"},
		{"malformed", `{"a":`, kindLayer, "not valid JSON"},
		{"trailing value", `{"a":1} {"b":2}`, kindLayer, "not valid JSON"},
		{"too large", `{"a":"` + strings.Repeat("x", 80) + `"}`, kindLayer, "at most 64"},
		{"too deep", `{"a":{"b":{"c":1}}}`, kindLayer, "deeper than 3"},
		{"arrays count as depth", `{"a":[[1]]}`, kindLayer, "deeper than 3"},
		{"too many keys", `{"a":1,"b":2,"c":{"d":3,"e":4}}`, kindLayer, "more than 4 keys"},
		{"key too long", `{"abcdefghi":1}`, kindLayer, "key of 9 bytes"},
		{"empty key", `{"":1}`, kindLayer, "empty key"},
		{"null in a layer", `{"a":{"b":null}}`, kindLayer, "null at /a/b"},
		{"null in a patch", `{"a":{"b":null}}`, kindPatch, ""},
		{"not UTF-8", "{\"a\":\"\xff\"}", kindLayer, "not UTF-8"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := parse([]byte(tt.doc), "config", tt.kind, l.MaxDocument, l)
			switch {
			case tt.wantErr == "" && err != nil:
				t.Fatalf("refused: %v", err)
			case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
				t.Fatalf("got %v, want an error containing %q", err, tt.wantErr)
			case err != nil:
				if ve, ok := err.(*ValidationError); !ok || ve.Field != "config" {
					t.Fatalf("error %#v does not name the field", err)
				}
			}
		})
	}
}

func TestEncodeIsCanonical(t *testing.T) {
	a := decodeAny(t, `{"b":{"y":1,"x":[1,"<a>"]},"a":25}`).(map[string]any)
	b := decodeAny(t, `{"a":25,"b":{"x":[1,"<a>"],"y":1}}`).(map[string]any)
	if string(Encode(a)) != string(Encode(b)) || string(Encode(a)) != `{"a":25,"b":{"x":[1,"<a>"],"y":1}}` {
		t.Fatalf("Encode: %s and %s", Encode(a), Encode(b))
	}
	if string(Encode(nil)) != "{}" {
		t.Fatalf("Encode(nil) = %s", Encode(nil))
	}
}

func TestDiff(t *testing.T) {
	for _, tt := range []struct {
		name, desired, reported string
		want                    []Difference
	}{
		{"equal", `{"a":1,"b":{"c":[1,2]}}`, `{"b":{"c":[1,2]},"a":1}`, nil},
		{"numbers by value", `{"a":25}`, `{"a":25.0}`, nil},
		{"changed", `{"a":1}`, `{"a":2}`, []Difference{{Path: "/a", Kind: DiffChanged, Desired: json.Number("1"), Reported: json.Number("2")}}},
		{"missing and extra, nested", `{"w":{"band":"5g","ch":6}}`, `{"w":{"band":"5g","tx":20}}`, []Difference{
			{Path: "/w/ch", Kind: DiffMissing, Desired: json.Number("6")},
			{Path: "/w/tx", Kind: DiffExtra, Reported: json.Number("20")},
		}},
		{"object against value", `{"w":{"a":1}}`, `{"w":3}`, []Difference{{Path: "/w", Kind: DiffChanged,
			Desired: map[string]any{"a": json.Number("1")}, Reported: json.Number("3")}}},
		{"pointer escaping", `{"a/b":1,"c~d":2}`, `{}`, []Difference{
			{Path: "/a~1b", Kind: DiffMissing, Desired: json.Number("1")},
			{Path: "/c~0d", Kind: DiffMissing, Desired: json.Number("2")},
		}},
		{"arrays whole", `{"a":[1,2]}`, `{"a":[2,1]}`, []Difference{{Path: "/a", Kind: DiffChanged,
			Desired: []any{json.Number("1"), json.Number("2")}, Reported: []any{json.Number("2"), json.Number("1")}}}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got := Diff(decodeAny(t, tt.desired).(map[string]any), decodeAny(t, tt.reported).(map[string]any))
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Fatalf("mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

func TestParseReport(t *testing.T) {
	l := Limits{MaxReport: 128}
	for _, tt := range []struct {
		name, payload, wantErr string
		want                   int64
	}{
		{"report", `{"version":7,"config":{"keepalive_s":25}}`, "", 7},
		{"version 0", `{"version":0,"config":{}}`, "", 0},
		{"unknown fields ignored", `{"version":3,"config":{},"fw":"1.2"}`, "", 3},
		{"negative", `{"version":-1,"config":{}}`, "non-negative integer", 0},
		{"fraction", `{"version":1.5,"config":{}}`, "non-negative integer", 0},
		{"string version", `{"version":"7","config":{}}`, "non-negative integer", 0},
		{"too big a number", `{"version":99999999999999999999,"config":{}}`, "non-negative integer", 0},
		{"no version", `{"config":{}}`, "no version", 0},
		{"no config", `{"version":1}`, "no config", 0},
		{"config not an object", `{"version":1,"config":[1]}`, "must be a JSON object", 0},
		{"not an object", `[1]`, "not a JSON object", 0},
		{"two values", `{"version":1,"config":{}} {}`, "more than one JSON value", 0},
		{"oversized", `{"version":1,"config":{"a":"` + strings.Repeat("x", 200) + `"}}`, "at most 128", 0},
		{"not UTF-8", "{\"version\":1,\"config\":{\"a\":\"\xfe\"}}", "not UTF-8", 0},
		{"too deep", `{"version":1,"config":{"a":{"b":{"c":{"d":{"e":{"f":{"g":{"h":1}}}}}}}}}`, "deeper than 8", 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			m, err := ParseReport([]byte(tt.payload), l)
			switch {
			case tt.wantErr == "" && err != nil:
				t.Fatalf("refused: %v", err)
			case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
				t.Fatalf("got %v, want an error containing %q", err, tt.wantErr)
			case err == nil && m.Version != tt.want:
				t.Fatalf("version %d, want %d", m.Version, tt.want)
			}
		})
	}
}
