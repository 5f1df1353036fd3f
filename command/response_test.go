package command

import (
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

const testID = "cmd_0123456789abcdef0123456789abcdef"

func TestParseResponse(t *testing.T) {
	other := "cmd_ffffffffffffffffffffffffffffffff"
	tests := []struct {
		name        string
		payload     string
		correlation string
		want        Response
		err         string // a substring of the error; "" = valid
	}{
		{"mqtt 3", `{"id":"` + testID + `","status":"succeeded","result":{ "pong" : true }}`, "", Response{ID: testID, Status: StateSucceeded, Result: []byte(`{"pong":true}`)}, ""},
		{"mqtt 5, id in correlation only", `{"status":"failed"}`, testID, Response{ID: testID, Status: StateFailed}, ""},
		{"mqtt 5, both agree", `{"id":"` + testID + `","status":"failed","result":"no such file"}`, testID, Response{ID: testID, Status: StateFailed, Result: []byte(`"no such file"`)}, ""},
		{"null result", `{"id":"` + testID + `","status":"succeeded","result":null}`, "", Response{ID: testID, Status: StateSucceeded}, ""},
		{"ids disagree", `{"id":"` + other + `","status":"succeeded"}`, testID, Response{}, "differs"},
		{"no id", `{"status":"succeeded"}`, "", Response{}, "names no command"},
		{"bad id", `{"id":"../../x","status":"succeeded"}`, "", Response{}, "not a command id"},
		{"bad correlation", `{"status":"succeeded"}`, "hello", Response{}, "correlation data"},
		{"no status", `{"id":"` + testID + `"}`, "", Response{}, "no status"},
		{"status ok", `{"id":"` + testID + `","status":"ok"}`, "", Response{}, `status "ok"`},
		{"status timed_out", `{"id":"` + testID + `","status":"timed_out"}`, "", Response{}, "want succeeded or failed"},
		{"not JSON", `reboot done`, "", Response{}, "not a JSON object"},
		{"array", `[1,2]`, "", Response{}, "not a JSON object"},
		{"two values", `{"id":"` + testID + `","status":"succeeded"} {}`, "", Response{}, "more than one"},
		{"not UTF-8", "{\"id\":\"\xff\"}", "", Response{}, "UTF-8"},
		{"oversized", `{"id":"` + testID + `","status":"succeeded","result":"` + strings.Repeat("x", 40<<10) + `"}`, "", Response{}, "at most"},
		{"result too big", `{"id":"` + testID + `","status":"succeeded","result":"` + strings.Repeat("x", 20<<10) + `"}`, "", Response{}, "result of"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var corr []byte
			if tt.correlation != "" {
				corr = []byte(tt.correlation)
			}
			got, err := ParseResponse([]byte(tt.payload), corr, Limits{})
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("error %v, want one saying %q", err, tt.err)
				}
				if len(err.Error()) > 200 {
					t.Fatalf("error of %d bytes: untrusted input must be excerpted", len(err.Error()))
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

func TestJudge(t *testing.T) {
	mine := Command{ID: testID, DeviceID: "a", State: StateDelivered}
	tests := []struct {
		name   string
		found  bool
		c      Command
		device string
		want   Refusal
	}{
		{"pending, own", true, mine, "a", RefuseNone},
		{"queued, own (answered before the delivery was recorded)", true, Command{DeviceID: "a", State: StateQueued}, "a", RefuseNone},
		{"unknown", false, Command{}, "a", RefuseUnknown},
		{"another device's", true, mine, "b", RefuseOther},
		{"another device's, finished", true, Command{DeviceID: "a", State: StateSucceeded}, "b", RefuseOther},
		{"timed out", true, Command{DeviceID: "a", State: StateTimedOut}, "a", RefuseFinished},
		{"expired", true, Command{DeviceID: "a", State: StateExpired}, "a", RefuseFinished},
		{"answered", true, Command{DeviceID: "a", State: StateFailed}, "a", RefuseFinished},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Judge(tt.found, tt.c, tt.device); got != tt.want {
				t.Fatalf("Judge = %q, want %q", got, tt.want)
			}
		})
	}
}
