package command

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func TestNormalize(t *testing.T) {
	big := `{"x":"` + strings.Repeat("a", 5000) + `"}`
	tests := []struct {
		name  string
		req   Request
		field string // "" = valid
		want  Request
	}{
		{"defaults", Request{Name: "reboot"}, "", Request{Name: "reboot", Params: json.RawMessage(`{}`), Timeout: Duration(30 * time.Second), ExpiresIn: Duration(10 * time.Minute)}},
		{"params compacted", Request{Name: "get_logs", Params: json.RawMessage(` { "lines" : 5 } `), Timeout: Duration(5 * time.Second)}, "",
			Request{Name: "get_logs", Params: json.RawMessage(`{"lines":5}`), Timeout: Duration(5 * time.Second), ExpiresIn: Duration(10 * time.Minute)}},
		{"null params", Request{Name: "ping", Params: json.RawMessage(`null`)}, "", Request{Name: "ping", Params: json.RawMessage(`{}`), Timeout: Duration(30 * time.Second), ExpiresIn: Duration(10 * time.Minute)}},
		{"no name", Request{}, "name", Request{}},
		{"upper case", Request{Name: "Reboot"}, "name", Request{}},
		{"slash", Request{Name: "a/b"}, "name", Request{}},
		{"wildcard", Request{Name: "#"}, "name", Request{}},
		{"too long", Request{Name: "a" + strings.Repeat("b", 32)}, "name", Request{}},
		{"reserved", Request{Name: "response"}, "name", Request{}},
		{"params array", Request{Name: "ping", Params: json.RawMessage(`[1]`)}, "params", Request{}},
		{"params string", Request{Name: "ping", Params: json.RawMessage(`"x"`)}, "params", Request{}},
		{"params broken", Request{Name: "ping", Params: json.RawMessage(`{"a":`)}, "params", Request{}},
		{"params too big", Request{Name: "ping", Params: json.RawMessage(big)}, "params", Request{}},
		{"timeout too short", Request{Name: "ping", Timeout: Duration(time.Millisecond)}, "timeout", Request{}},
		{"timeout too long", Request{Name: "ping", Timeout: Duration(time.Hour)}, "timeout", Request{}},
		{"timeout negative", Request{Name: "ping", Timeout: Duration(-time.Second)}, "timeout", Request{}},
		{"expiry too long", Request{Name: "ping", ExpiresIn: Duration(48 * time.Hour)}, "expires_in", Request{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := tt.req.Normalize(Limits{})
			if tt.field != "" {
				var ve *ValidationError
				if !errors.As(err, &ve) || ve.Field != tt.field {
					t.Fatalf("error %v, want a validation error on %s", err, tt.field)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Fatalf("mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

func TestDurationJSON(t *testing.T) {
	for in, want := range map[string]time.Duration{`"30s"`: 30 * time.Second, `1.5`: 1500 * time.Millisecond, `"2m"`: 2 * time.Minute} {
		var d Duration
		if err := json.Unmarshal([]byte(in), &d); err != nil || d.D() != want {
			t.Errorf("%s: %v %v, want %v", in, d, err, want)
		}
	}
	for _, in := range []string{`"soon"`, `true`, `1e300`, `{}`} {
		var d Duration
		if err := d.UnmarshalJSON([]byte(in)); err == nil {
			t.Errorf("%s accepted as %v", in, d)
		}
	}
}
