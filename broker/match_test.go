package broker

import "testing"

func TestMatches(t *testing.T) {
	for _, tc := range []struct {
		filter, topic string
		want          bool
	}{
		{"devices/d1/cmd/#", "devices/d1/cmd/reboot", true},
		{"devices/d1/cmd/#", "devices/d1/cmd", true},
		{"devices/d1/cmd/+", "devices/d1/cmd/reboot", true},
		{"devices/d1/cmd/+", "devices/d1/cmd/a/b", false},
		{"devices/d1/cmd/reboot", "devices/d1/cmd/reboot", true},
		{"devices/d1/cmd/reboot", "devices/d1/cmd/ping", false},
		{"devices/d1/cmd/#", "devices/d2/cmd/reboot", false},
		{"devices/d1/ota/job", "devices/d1/ota/job/x", false},
		{"devices/+/cmd/#", "devices/d1/cmd/ping", true},
		{"#", "devices/d1/cmd/ping", true},
	} {
		if got := matches(tc.filter, tc.topic); got != tc.want {
			t.Errorf("matches(%q, %q) = %v, want %v", tc.filter, tc.topic, got, tc.want)
		}
	}
}
