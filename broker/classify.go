package broker

import (
	"github.com/fleetd/fleetd/internal/wsconn"

	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/fleetd/fleetd/fleet"
)

// codeDecommissioned ends the session of a decommissioned device. It is MQTT 5's
// 0x98 "administrative action" with a reason string that says what happened;
// being a distinct value it also tells Classify who ended the session.
var codeDecommissioned = packets.Code{Code: 0x98, Reason: "device decommissioned"}

// codeTokenRotated ends the session opened with a token that was rotated:
// 0x98 "administrative action" too, told apart by its reason string.
var codeTokenRotated = packets.Code{Code: 0x98, Reason: "device token rotated"}

// SessionEnd is what is known when a session ends.
type SessionEnd struct {
	// Cause is the client's stop cause (mochi's StopCause, or the read error).
	Cause error
	// BadHeader is the first fixed-header byte with reserved flags set that the
	// wire carried, or 0. mochi's error says "malformed flags" but not which
	// packet: this says PINGREQ.
	BadHeader byte
}

// Classify names why a session ended, with a detail for protocol errors. It is
// pure so that every broker corner case (takeover, deadline, malformed flags)
// has a table row.
func Classify(e SessionEnd) (fleet.Reason, string) {
	cause := e.Cause
	if cause == nil {
		return fleet.ReasonConnectionLost, ""
	}
	var code packets.Code
	if errors.As(cause, &code) {
		switch code {
		case packets.CodeDisconnect, packets.CodeDisconnectWillMessage:
			return fleet.ReasonClientDisconnect, ""
		case packets.ErrSessionTakenOver:
			return fleet.ReasonSessionTakeover, ""
		case packets.ErrServerShuttingDown:
			return fleet.ReasonServerShutdown, ""
		case packets.ErrPacketTooLarge:
			return fleet.ReasonPacketTooLarge, ""
		case packets.ErrMessageRateTooHigh:
			return fleet.ReasonThrottled, "message rate too high: more packets or subscriptions per second than a session may send"
		case codeDecommissioned:
			return fleet.ReasonDecommissioned, ""
		case codeTokenRotated:
			return fleet.ReasonTokenRotated, ""
		case packets.ErrMalformedFlags:
			if e.BadHeader != 0 {
				return fleet.ReasonProtocolError, describeBadHeader(e.BadHeader)
			}
		}
		return fleet.ReasonProtocolError, code.Reason
	}
	// A read deadline is the keepalive deadline (1.5 × keepalive, [MQTT-3.1.2-24]);
	// a write deadline means the client stopped reading what we send.
	if errors.Is(cause, os.ErrDeadlineExceeded) {
		var op *net.OpError
		if errors.As(cause, &op) && op.Op == "write" {
			return fleet.ReasonConnectionLost, fleet.DetailWriteTimeoutPrefix + ": the client stopped reading"
		}
		return fleet.ReasonKeepaliveTimeout, ""
	}
	switch {
	case errors.Is(cause, io.EOF), errors.Is(cause, io.ErrUnexpectedEOF):
		return fleet.ReasonConnectionLost, "closed by the client without DISCONNECT"
	case errors.Is(cause, syscall.ECONNRESET):
		return fleet.ReasonConnectionLost, "connection reset"
	case errors.Is(cause, syscall.EPIPE), errors.Is(cause, syscall.ETIMEDOUT), errors.Is(cause, net.ErrClosed):
		return fleet.ReasonConnectionLost, cause.Error()
	}
	// WebSocket connections report their deadline as a plain timeout.
	var ne net.Error
	if errors.As(cause, &ne) && ne.Timeout() {
		return fleet.ReasonKeepaliveTimeout, ""
	}
	var closeErr *wsconn.ClosedError
	if errors.As(cause, &closeErr) {
		return fleet.ReasonConnectionLost, closeErr.Error()
	}
	return fleet.ReasonProtocolError, cause.Error()
}

var packetNames = [16]string{"reserved type 0", "CONNECT", "CONNACK", "PUBLISH", "PUBACK", "PUBREC", "PUBREL",
	"PUBCOMP", "SUBSCRIBE", "SUBACK", "UNSUBSCRIBE", "UNSUBACK", "PINGREQ", "PINGRESP", "DISCONNECT", "AUTH"}

// describeBadHeader says which packet carried which reserved flags, e.g.
// "PINGREQ with reserved flags 0x2" ([MQTT-2.2.2-2]).
func describeBadHeader(b byte) string {
	return fmt.Sprintf("%s with reserved flags 0x%x", packetNames[b>>4], b&0x0f)
}

// validHeader reports whether a fixed header's flags are the ones the spec
// requires for its type ([MQTT-2.2.2-1], [MQTT-2.2.2-2]). PUBLISH flags carry
// DUP/QoS/RETAIN and are checked by mochi itself.
func validHeader(b byte) bool {
	switch typ := b >> 4; typ {
	case 0:
		return false
	case 3: // PUBLISH
		return true
	case 6, 8, 10: // PUBREL, SUBSCRIBE, UNSUBSCRIBE
		return b&0x0f == 0x02
	default:
		return b&0x0f == 0
	}
}
