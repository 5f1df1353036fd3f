package broker

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/fleetd/fleetd/fleet"
)

// throttle applies the broker-wide connect rate to a new connection before
// mochi sees it. When the rate has no room, it answers the connection itself
// and reports true: it reads the CONNECT, sends CONNACK 0x9F (MQTT 5) or
// 0x03 (MQTT 3), records the refusal and closes, all on the listener's
// goroutine. Under a reconnect storm most attempts end here, so each must be
// cheap: handed to mochi, a refused attempt would cost a client with two
// goroutines and their buffers, and the churn of those goroutines' stacks
// alone left a restarted broker 70 MB larger (bench/RESULTS.md).
func (b *Broker) throttle(listener string, w *wireConn) bool {
	if b.limits.allowGlobal() {
		return false
	}
	defer w.Close()
	pk, err := readConnect(w, b.cfg.MaxPacket)
	if err != nil {
		// Not even a CONNECT within the connect timeout: nothing names the
		// device, so there is no device event to record.
		b.m.connects.WithLabelValues(string(fleet.ReasonThrottled)).Inc()
		b.log.Debug("throttled connection closed before a CONNECT", "listener", listener, "remote", w.RemoteAddr().String(), "err", err)
		return true
	}
	code := connackCode(pk.ProtocolVersion, refuseRateLimited)
	ack := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connack}, ProtocolVersion: pk.ProtocolVersion,
		ReasonCode: code.Code, Properties: packets.Properties{ReasonString: code.Reason}}
	var buf bytes.Buffer
	if err := ack.ConnackEncode(&buf); err == nil {
		_ = w.SetWriteDeadline(time.Now().Add(time.Second))
		_, _ = w.Write(buf.Bytes())
	}
	id := strings.Clone(pk.Connect.ClientIdentifier)
	if fleet.ValidateID(id) != nil {
		id = "" // not a device id: recorded under no device (OnConnect says why for admitted attempts)
	}
	b.recordRefusal(pk, id, listener, w, fleet.ReasonThrottled, "broker connect rate exceeded", code)
	return true
}

// readConnect reads one CONNECT packet (and nothing after it) from r.
func readConnect(r io.Reader, maxPacket int) (packets.Packet, error) {
	br := bufio.NewReaderSize(r, 64)
	var pk packets.Packet
	hb, err := br.ReadByte()
	if err != nil {
		return pk, err
	}
	if err := pk.FixedHeader.Decode(hb); err != nil {
		return pk, err
	}
	if pk.FixedHeader.Type != packets.Connect {
		return pk, fmt.Errorf("first packet is type %d, not CONNECT", pk.FixedHeader.Type)
	}
	var lenBytes int
	if pk.FixedHeader.Remaining, lenBytes, err = packets.DecodeLength(br); err != nil {
		return pk, err
	}
	if lenBytes > 4 { // [MQTT-1.5.5]: at most four bytes; mochi's decoder takes more
		return pk, packets.ErrMalformedVariableByteInteger
	}
	if pk.FixedHeader.Remaining+1 > maxPacket {
		return pk, packets.ErrPacketTooLarge
	}
	body := make([]byte, pk.FixedHeader.Remaining)
	if _, err := io.ReadFull(br, body); err != nil {
		return pk, err
	}
	return pk, pk.ConnectDecode(body)
}

// recordRefusal records a refused CONNECT as a "refused" event of deviceID
// ("" when the attempt named no valid device id), counts it and logs it with
// the CONNACK code sent; repeats of one id or address within the log interval
// are folded into one line. A refused attempt is unauthenticated by
// definition: whoever sent it, the event says only which id it claimed and
// where it came from, and the diagnosis compares that address with the
// device's own (fleet.Diagnose).
func (b *Broker) recordRefusal(pk packets.Packet, deviceID, listener string, w *wireConn, reason fleet.Reason, detail string, code packets.Code) {
	remote := ""
	if w != nil {
		remote = w.RemoteAddr().String()
	}
	now := time.Now()
	b.events.Record(fleet.Event{ID: fleet.NewEventID(now), DeviceID: deviceID, At: now, Kind: fleet.KindRefused, Reason: reason,
		Detail: detail, ProtocolVersion: fleet.Protocol(pk.ProtocolVersion), KeepaliveRequested: int(pk.Connect.Keepalive),
		CleanStart: pk.Connect.Clean, RemoteAddr: remote, TLSVersion: tlsVersion(w), Listener: listener, BrokerNode: b.cfg.Node})
	b.m.connects.WithLabelValues(string(reason)).Inc()
	key := deviceID
	if key == "" && w != nil {
		key = sourceOf(w.RemoteAddr()).String()
	}
	b.refusals.Log(slog.LevelInfo, "refused:"+key, "connection refused", "device_id", deviceID, "reason", reason, "detail", detail,
		"remote", remote, "listener", listener, "connack", fmt.Sprintf("0x%02x", code.Code))
}
