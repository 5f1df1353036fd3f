package broker

import (
	"github.com/fleetd/fleetd/internal/wsconn"

	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"testing"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/fleetd/fleetd/fleet"
)

func TestClassify(t *testing.T) {
	readTimeout := &net.OpError{Op: "read", Net: "tcp", Err: os.ErrDeadlineExceeded}
	writeTimeout := &net.OpError{Op: "write", Net: "tcp", Err: os.ErrDeadlineExceeded}
	tests := []struct {
		name       string
		end        SessionEnd
		reason     fleet.Reason
		wantDetail string
	}{
		{"client DISCONNECT", SessionEnd{Cause: packets.CodeDisconnect}, fleet.ReasonClientDisconnect, ""},
		{"DISCONNECT with will", SessionEnd{Cause: packets.CodeDisconnectWillMessage}, fleet.ReasonClientDisconnect, ""},
		{"keepalive deadline", SessionEnd{Cause: readTimeout}, fleet.ReasonKeepaliveTimeout, ""},
		{"client not reading", SessionEnd{Cause: writeTimeout}, fleet.ReasonConnectionLost, "write timeout: the client stopped reading"},
		{"takeover", SessionEnd{Cause: packets.ErrSessionTakenOver}, fleet.ReasonSessionTakeover, ""},
		{"shutdown", SessionEnd{Cause: packets.ErrServerShuttingDown}, fleet.ReasonServerShutdown, ""},
		{"decommissioned", SessionEnd{Cause: codeDecommissioned}, fleet.ReasonDecommissioned, ""},
		{"other administrative action", SessionEnd{Cause: packets.ErrAdministrativeAction}, fleet.ReasonProtocolError, "administrative action"},
		{"too large", SessionEnd{Cause: packets.ErrPacketTooLarge}, fleet.ReasonPacketTooLarge, ""},
		{"token rotated", SessionEnd{Cause: codeTokenRotated}, fleet.ReasonTokenRotated, ""},
		{"decommissioned", SessionEnd{Cause: codeDecommissioned}, fleet.ReasonDecommissioned, ""},
		{"message rate", SessionEnd{Cause: packets.ErrMessageRateTooHigh}, fleet.ReasonThrottled, "message rate too high: more packets or subscriptions per second than a session may send"},
		{"malformed PINGREQ", SessionEnd{Cause: packets.ErrMalformedFlags, BadHeader: 0xC2}, fleet.ReasonProtocolError, "PINGREQ with reserved flags 0x2"},
		{"malformed SUBSCRIBE", SessionEnd{Cause: packets.ErrMalformedFlags, BadHeader: 0x80}, fleet.ReasonProtocolError, "SUBSCRIBE with reserved flags 0x0"},
		{"reserved type", SessionEnd{Cause: packets.ErrMalformedFlags, BadHeader: 0x00}, fleet.ReasonProtocolError, "malformed packet: flags"},
		{"malformed flags, header unknown", SessionEnd{Cause: packets.ErrMalformedFlags}, fleet.ReasonProtocolError, "malformed packet: flags"},
		{"wildcard in publish topic", SessionEnd{Cause: packets.ErrProtocolViolationSurplusWildcard}, fleet.ReasonProtocolError, packets.ErrProtocolViolationSurplusWildcard.Reason},
		{"v3 publish to a forbidden topic", SessionEnd{Cause: packets.ErrNotAuthorized}, fleet.ReasonProtocolError, "not authorized"},
		{"EOF", SessionEnd{Cause: io.EOF}, fleet.ReasonConnectionLost, "closed by the client without DISCONNECT"},
		{"reset", SessionEnd{Cause: &net.OpError{Op: "read", Err: os.NewSyscallError("read", syscall.ECONNRESET)}}, fleet.ReasonConnectionLost, "connection reset"},
		{"websocket closed", SessionEnd{Cause: &wsconn.ClosedError{Code: 1006}}, fleet.ReasonConnectionLost, "websocket connection lost"},
		{"websocket timeout", SessionEnd{Cause: timeoutErr{}}, fleet.ReasonKeepaliveTimeout, ""},
		{"unknown packet type", SessionEnd{Cause: errors.New("invalid packet type; 15")}, fleet.ReasonProtocolError, "invalid packet type; 15"},
		{"nothing known", SessionEnd{}, fleet.ReasonConnectionLost, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			reason, detail := Classify(tt.end)
			if reason != tt.reason || detail != tt.wantDetail {
				t.Fatalf("Classify = (%s, %q), want (%s, %q)", reason, detail, tt.reason, tt.wantDetail)
			}
		})
	}
}

type timeoutErr struct{}

func (timeoutErr) Error() string   { return "i/o timeout" }
func (timeoutErr) Timeout() bool   { return true }
func (timeoutErr) Temporary() bool { return true }

func TestACL(t *testing.T) {
	tests := []struct {
		topic          string
		pub, sub, keep bool
	}{
		{"devices/a/status", true, false, true},
		{"devices/a/telemetry", true, false, false},
		{"devices/a/ota/status", true, false, false},
		{"devices/a/ota/job", false, true, false},
		{"devices/a/cmd/reboot", false, true, false},
		{"devices/a/cmd/#", false, true, false},
		{"devices/a/cmd/+/x", false, true, false},
		{"devices/a/cmd/#/x", false, false, false},
		{"devices/a/cmd/re#", false, false, false},
		// A device answers commands on cmd/response and never receives it
		// (neither by that filter nor, at delivery, through cmd/#).
		{"devices/a/cmd/response", true, false, false},
		{"devices/b/cmd/response", false, false, false},
		{"devices/a/cmd/response/x", false, true, false},
		// A device gets its desired configuration (by name or by a
		// wildcard inside config/) and reports on config/reported, which it
		// never receives; it reaches no other device's.
		{"devices/a/config/desired", false, true, false},
		{"devices/a/config/#", false, true, false},
		{"devices/a/config/+", false, true, false},
		{"devices/a/config/reported", true, false, false},
		{"devices/a/config/desired/x", false, false, false},
		{"devices/a/config", false, false, false},
		{"devices/b/config/desired", false, false, false},
		{"devices/b/config/reported", false, false, false},
		{"devices/+/config/desired", false, false, false},
		{"devices/a/#", false, false, false},
		{"devices/+/ota/job", false, false, false},
		{"devices/ab/telemetry", false, false, false},
		{"devices/b/telemetry", false, false, false},
		{"devices/b/ota/job", false, false, false},
		{"#", false, false, false},
		{"$SYS/broker/clients", false, false, false},
		{"devices/a/telemetry/extra", false, false, false},
		// Near misses of the prefix "devices/a/".
		{"devices/a", false, false, false},
		{"devices/a/", false, false, false},
		{"devices/astatus", false, false, false},
		{"devices//a/status", false, false, false},
		{"devicesa/status", false, false, false},
		{"device/a/status", false, false, false},
	}
	for _, tt := range tests {
		t.Run(tt.topic, func(t *testing.T) {
			if got := canPublish("a", tt.topic); got != tt.pub {
				t.Errorf("canPublish = %v, want %v", got, tt.pub)
			}
			if got := canSubscribe("a", tt.topic); got != tt.sub {
				t.Errorf("canSubscribe = %v, want %v", got, tt.sub)
			}
			if got := retainable("a", tt.topic); got != tt.keep {
				t.Errorf("retainable = %v, want %v", got, tt.keep)
			}
		})
	}
}

// TestWireScan feeds the framing parser packets split at every possible
// boundary: it must find the same malformed header and ping count wherever
// the reads fall.
func TestWireScan(t *testing.T) {
	big := make([]byte, 300) // a two-byte remaining length
	stream := append(connectPacket(4, "a", "a", "t", 30), publishPacket("devices/a/telemetry", big, false, 4)...)
	stream = append(stream, 0xC0, 0x00) // PINGREQ
	stream = append(stream, 0xC0, 0x00) // PINGREQ
	stream = append(stream, 0xC2, 0x00) // PINGREQ with a reserved flag
	stream = append(stream, 0x82, 0x00) // SUBSCRIBE with wrong flags (after the first bad one)
	for split := 1; split < len(stream); split++ {
		w := &wireConn{}
		w.scan(stream[:split])
		w.scan(stream[split:])
		if got := w.BadHeader(); got != 0xC2 {
			t.Fatalf("split %d: BadHeader = 0x%02x, want 0xc2", split, got)
		}
		if got := w.pings.Load(); got != 3 {
			t.Fatalf("split %d: pings = %d, want 3", split, got)
		}
	}
	w := &wireConn{}
	w.scan(stream[:len(stream)-4])
	if w.BadHeader() != 0 {
		t.Fatalf("well-formed stream flagged: 0x%02x", w.BadHeader())
	}
	if got := fmt.Sprint(describeBadHeader(0xC2)); got != "PINGREQ with reserved flags 0x2" {
		t.Fatalf("describeBadHeader = %q", got)
	}
}

func TestConnackCodes(t *testing.T) {
	tests := []struct {
		v    byte
		r    refusal
		want byte
	}{
		{3, refuseBadCredentials, 0x04}, {4, refuseBadCredentials, 0x04}, {5, refuseBadCredentials, 0x86},
		{3, refuseNotAuthorized, 0x05}, {4, refuseNotAuthorized, 0x05}, {5, refuseNotAuthorized, 0x87},
		{4, refuseRateLimited, 0x03}, {5, refuseRateLimited, 0x9F},
		{4, refuseUnavailable, 0x03}, {5, refuseUnavailable, 0x88},
	}
	for _, tt := range tests {
		if got := connackCode(tt.v, tt.r).Code; got != tt.want {
			t.Errorf("connackCode(v%d, %d) = 0x%02x, want 0x%02x", tt.v, tt.r, got, tt.want)
		}
	}
}

func TestSourceOf(t *testing.T) {
	for _, tc := range []struct {
		name string
		addr net.Addr
		want string
	}{
		{"IPv4", &net.TCPAddr{IP: net.ParseIP("192.0.2.7"), Port: 4000}, "192.0.2.7/32"},
		{"IPv4-mapped IPv6", &net.TCPAddr{IP: net.ParseIP("::ffff:192.0.2.7"), Port: 4000}, "192.0.2.7/32"},
		{"IPv6 counts by /64", &net.TCPAddr{IP: net.ParseIP("2001:db8:1:2:3:4:5:6"), Port: 4000}, "2001:db8:1:2::/64"},
		{"text address", addrString("198.51.100.1:1883"), "198.51.100.1/32"},
		{"not IP", addrString("pipe"), "invalid Prefix"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := sourceOf(tc.addr).String(); got != tc.want {
				t.Fatalf("sourceOf(%v) = %s, want %s", tc.addr, got, tc.want)
			}
		})
	}
}
