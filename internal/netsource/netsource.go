// Package netsource names the unit that per-source limits count, the same
// for MQTT and HTTP: an IPv4 address, or an IPv6 /64 (one host usually has a
// whole /64, so counting single IPv6 addresses would let it multiply its
// share).
package netsource

import (
	"net"
	"net/netip"
)

// Of returns the source of an address and port.
func Of(ap netip.AddrPort) netip.Prefix {
	ip := ap.Addr().Unmap()
	if !ip.IsValid() {
		return netip.Prefix{}
	}
	bits := 32
	if ip.Is6() {
		bits = 64
	}
	p, _ := ip.Prefix(bits)
	return p
}

// OfAddr returns the source of a connection's address; the zero prefix for
// an address that is not IP (net.Pipe). A *net.TCPAddr, every accepted TCP
// connection's, is read without parsing.
func OfAddr(a net.Addr) netip.Prefix {
	if ta, ok := a.(*net.TCPAddr); ok {
		return Of(ta.AddrPort())
	}
	return OfString(a.String())
}

// OfString returns the source of "host:port" (http.Request.RemoteAddr); the
// zero prefix when it is not an IP address and port.
func OfString(hostport string) netip.Prefix {
	ap, err := netip.ParseAddrPort(hostport)
	if err != nil {
		return netip.Prefix{}
	}
	return Of(ap)
}
