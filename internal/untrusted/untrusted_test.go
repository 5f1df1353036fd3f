package untrusted

import (
	"strings"
	"testing"
	"unicode/utf8"
)

func TestExcerpt(t *testing.T) {
	for _, tc := range []struct {
		name, in, want string
	}{
		{"short", "abc", `"abc"`},
		{"escaped", "a\x00\nb", `"a\x00\nb"`},
		{"cut", strings.Repeat("x", 10), `"xxxx"… (10 bytes)`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := Excerpt(tc.in, 4); got != tc.want {
				t.Fatalf("Excerpt(%q) = %s, want %s", tc.in, got, tc.want)
			}
		})
	}
}

func TestText(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		n        int
		want     string
	}{
		{"plain", "checksum mismatch", 100, "checksum mismatch"},
		{"nul", "bad\x00byte", 100, "bad\uFFFDbyte"},
		{"invalid utf-8", "a\xffb", 100, "a\uFFFDb"},
		{"cut on a character boundary", "ééé", 3, "é…"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := Text(tc.in, tc.n)
			if got != tc.want || !utf8.ValidString(got) {
				t.Fatalf("Text(%q, %d) = %q, want %q", tc.in, tc.n, got, tc.want)
			}
		})
	}
}
