package netsource

import (
	"net"
	"testing"
)

func TestOf(t *testing.T) {
	for _, tc := range []struct {
		name string
		addr net.Addr
		want string
	}{
		{"IPv4", &net.TCPAddr{IP: net.ParseIP("192.0.2.7"), Port: 4000}, "192.0.2.7/32"},
		{"IPv4-mapped IPv6", &net.TCPAddr{IP: net.ParseIP("::ffff:192.0.2.7"), Port: 4000}, "192.0.2.7/32"},
		{"IPv6 counts by /64", &net.TCPAddr{IP: net.ParseIP("2001:db8:1:2:3:4:5:6"), Port: 4000}, "2001:db8:1:2::/64"},
		{"text address", &net.UnixAddr{Name: "198.51.100.1:1883"}, "198.51.100.1/32"},
		{"not IP", &net.UnixAddr{Name: "pipe"}, "invalid Prefix"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := OfAddr(tc.addr).String(); got != tc.want {
				t.Fatalf("OfAddr(%v) = %s, want %s", tc.addr, got, tc.want)
			}
		})
	}
	if got := OfString("[2001:db8::1]:443").String(); got != "2001:db8::/64" {
		t.Fatalf("OfString of an IPv6 host:port = %s", got)
	}
}
