package firmware

import (
	"strings"
	"testing"
	"unicode/utf8"
)

// FuzzParseStatus: whatever a device publishes on ota/status, an accepted
// report has a bounded job id, a known state, a progress in 0..100 and a
// failure reason that can be stored and shown.
func FuzzParseStatus(f *testing.F) {
	for _, seed := range []string{
		`{"job_id":"job_0123","state":"downloading","progress":40}`,
		`{"job_id":"job_0123","state":"failed","error":"checksum mismatch"}`,
		`{"job_id":"job_0123","state":"failed","error":"a\u0000b"}`,
		`{"job_id":"job_0123","state":"installing","progress":-5}`,
		`{"job_id":"","state":"failed"}`,
		`{"job_id":"camp:gw:1:rollback","state":"rebooting","progress":100}`,
		`{"state":"exploded"}`,
		`[]`,
		``,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, payload []byte) {
		st, err := parseStatus(payload)
		if err != nil {
			return
		}
		switch {
		case st.JobID == "" || len(st.JobID) > maxJobIDLen:
			t.Fatalf("accepted job id %q", st.JobID)
		case !map[string]bool{"downloading": true, "verifying": true, "installing": true, "rebooting": true, "succeeded": true, "failed": true}[st.State]:
			t.Fatalf("accepted state %q", st.State)
		case st.Progress < 0 || st.Progress > 100:
			t.Fatalf("accepted progress %d", st.Progress)
		case len(st.Error) > maxReportedError+len("…") || !utf8.ValidString(st.Error) || strings.ContainsRune(st.Error, 0):
			t.Fatalf("accepted an error that cannot be stored: %q", st.Error)
		}
	})
}
