package broker

import (
	"errors"
	"testing"
	"unicode/utf8"
)

// FuzzParseBirth: whatever a device publishes on its status topic, a birth
// that is accepted carries only firmware and model strings that can be
// stored (bounded, UTF-8, no control characters), and nothing panics.
func FuzzParseBirth(f *testing.F) {
	for _, seed := range []string{
		`{"online":true,"firmware":"1.2.0","model":"gw-100"}`,
		`{"online":false}`,
		`{"online":true}`,
		`{"online":true,"firmware":"1.\u0000"}`,
		`{"online":true,"firmware":"` + string(make([]byte, 100)) + `"}`,
		`{"online":"yes"}`,
		`[1,2,3]`,
		``,
		"{\"online\":true,\"model\":\"\xff\xfe\"}",
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, payload []byte) {
		msg, err := parseBirth(payload)
		if err != nil {
			if !errors.Is(err, errNotBirth) && len(err.Error()) > 400 {
				t.Fatalf("error of %d bytes: %.100s…", len(err.Error()), err)
			}
			return
		}
		for _, s := range []string{msg.Firmware, msg.Model} {
			if len(s) > maxLabelLen || !utf8.ValidString(s) || checkLabel("x", s) != nil {
				t.Fatalf("accepted a label that cannot be stored: %q", s)
			}
		}
	})
}
