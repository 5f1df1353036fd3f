// Package untrusted renders bytes that came from a device or an HTTP client
// so that they can be logged or stored: bounded, printable, valid UTF-8.
package untrusted

import (
	"fmt"
	"strconv"
	"strings"
	"unicode"
)

// Excerpt renders at most n bytes of s, quoted and escaped, and says how long
// s was when it was cut, so that a log line or an event detail stays small
// and printable whatever the sender sent.
func Excerpt[T string | []byte](s T, n int) string {
	if len(s) <= n {
		return strconv.Quote(string(s))
	}
	return fmt.Sprintf("%s… (%d bytes)", strconv.Quote(string(s[:n])), len(s))
}

// Text makes s storable as text: invalid UTF-8 and control characters (a NUL
// byte makes PostgreSQL refuse the whole row) become U+FFFD, and it is cut to
// at most n bytes on a character boundary.
func Text(s string, n int) string {
	s = strings.ToValidUTF8(s, "\uFFFD")
	s = strings.Map(func(r rune) rune {
		if unicode.IsControl(r) && r != '\n' && r != '\t' {
			return '\uFFFD'
		}
		return r
	}, s)
	if len(s) <= n {
		return s
	}
	cut := n
	for cut > 0 && !utf8RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "…"
}

func utf8RuneStart(b byte) bool { return b&0xC0 != 0x80 }
