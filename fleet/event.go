package fleet

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"sync/atomic"
	"time"
)

// Kind says what an event is.
type Kind string

// Event kinds.
const (
	KindConnect    Kind = "connect"    // a session was established
	KindDisconnect Kind = "disconnect" // a session ended; Reason says why
	KindRefused    Kind = "refused"    // a connection attempt was refused; Reason says why
	KindACLDenied  Kind = "acl_denied" // a publish or subscribe outside the device's topics
	KindBirth      Kind = "birth"      // the device announced itself (firmware, model)
	KindRejected   Kind = "rejected"   // a message from the device was refused (malformed birth, unusable user property); Detail says why
)

// Reason is why a session ended or an attempt was refused: one word from a
// fixed vocabulary, so that operators can count and compare.
type Reason string

// The vocabulary of reasons.
const (
	ReasonClientDisconnect   Reason = "client_disconnect"
	ReasonKeepaliveTimeout   Reason = "keepalive_timeout"
	ReasonProtocolError      Reason = "protocol_error"
	ReasonConnectionLost     Reason = "connection_lost"
	ReasonSessionTakeover    Reason = "session_takeover"
	ReasonAuthFailed         Reason = "auth_failed"
	ReasonTLSHandshakeFailed Reason = "tls_handshake_failed"
	ReasonDecommissioned     Reason = "decommissioned"
	ReasonThrottled          Reason = "throttled"
	ReasonPacketTooLarge     Reason = "packet_too_large"
	ReasonServerShutdown     Reason = "server_shutdown"
	ReasonTokenRotated       Reason = "token_rotated" // the session's token was rotated (on any replica)
	ReasonReplicaLost        Reason = "replica_lost"  // the replica holding the session stopped answering
)

// Reasons lists the vocabulary in a stable order.
var Reasons = []Reason{
	ReasonClientDisconnect, ReasonKeepaliveTimeout, ReasonProtocolError, ReasonConnectionLost,
	ReasonSessionTakeover, ReasonAuthFailed, ReasonTLSHandshakeFailed, ReasonDecommissioned,
	ReasonThrottled, ReasonPacketTooLarge, ReasonServerShutdown, ReasonTokenRotated, ReasonReplicaLost,
}

// EventID identifies an event. The broker assigns it when the event happens,
// so a batch written twice (replayed from the spool after a database outage)
// lands once. It is time-ordered (UUIDv7 layout) to keep the index compact.
type EventID [16]byte

var eventSeq atomic.Uint32

// NewEventID returns a fresh time-ordered id.
func NewEventID(at time.Time) EventID {
	var id EventID
	binary.BigEndian.PutUint64(id[:8], uint64(at.UnixMilli())<<16)
	binary.BigEndian.PutUint16(id[6:8], 0x7000|uint16(eventSeq.Add(1)&0x0fff))
	_, _ = rand.Read(id[8:])
	id[8] = id[8]&0x3f | 0x80
	return id
}

// String renders the canonical UUID form.
func (id EventID) String() string {
	var b [36]byte
	hex.Encode(b[0:8], id[0:4])
	b[8] = '-'
	hex.Encode(b[9:13], id[4:6])
	b[13] = '-'
	hex.Encode(b[14:18], id[6:8])
	b[18] = '-'
	hex.Encode(b[19:23], id[8:10])
	b[23] = '-'
	hex.Encode(b[24:], id[10:])
	return string(b[:])
}

// MarshalText renders the UUID.
func (id EventID) MarshalText() ([]byte, error) { return []byte(id.String()), nil }

// UnmarshalText parses the canonical UUID form.
func (id *EventID) UnmarshalText(b []byte) error {
	if len(b) != 36 || b[8] != '-' || b[13] != '-' || b[18] != '-' || b[23] != '-' {
		return fmt.Errorf("malformed event id %q", b)
	}
	hexPart := make([]byte, 0, 32)
	for i, c := range b {
		if i != 8 && i != 13 && i != 18 && i != 23 {
			hexPart = append(hexPart, c)
		}
	}
	_, err := hex.Decode(id[:], hexPart)
	return err
}

// Event is one connection event. Fields that do not apply to the kind stay zero.
type Event struct {
	ID                 EventID   `json:"id"`
	DeviceID           string    `json:"device_id"`
	At                 time.Time `json:"at"`
	Kind               Kind      `json:"kind"`
	Reason             Reason    `json:"reason,omitempty"`
	Detail             string    `json:"detail,omitempty"`
	Firmware           string    `json:"firmware,omitempty"`
	Model              string    `json:"model,omitempty"`
	SessionEpoch       int64     `json:"session_epoch,omitempty"`
	ProtocolVersion    Protocol  `json:"protocol_version,omitempty"`
	KeepaliveRequested int       `json:"keepalive_requested,omitempty"`
	KeepaliveEffective int       `json:"keepalive_effective,omitempty"`
	CleanStart         bool      `json:"clean_start,omitempty"`
	RemoteAddr         string    `json:"remote_addr,omitempty"`
	TLSVersion         string    `json:"tls_version,omitempty"`
	Listener           string    `json:"listener,omitempty"`
	BrokerNode         string    `json:"broker_node,omitempty"`
	// What the broker saw of the session, on disconnect events: PINGREQs,
	// how long the device had been silent when it ended, packets and bytes
	// the device sent, how long the session lasted, and the longest silence
	// the session survived (between two reads from the device).
	Pings            int   `json:"pings,omitempty"`
	IdleMillis       int   `json:"idle_ms,omitempty"`
	PacketsIn        int   `json:"packets_in,omitempty"`
	BytesIn          int64 `json:"bytes_in,omitempty"`
	DurationMillis   int64 `json:"duration_ms,omitempty"`
	MaxSilenceMillis int   `json:"max_silence_ms,omitempty"`
	// The radio link the session ended on, on disconnect events, from the
	// device's telemetry of that session (SessionLink); zero when it
	// reported none.
	SessionLink
}

// SessionLink is what a session's telemetry said of its radio link, as
// recorded on its disconnect: the last RSSI and channel reported, the last
// and the first access point (BSSID), and how long before the end the
// access point last changed (RoamMillis, at least 1 when it changed; 0 when
// it did not). Zero fields were not reported.
type SessionLink struct {
	RSSI       int    `json:"link_rssi_dbm,omitempty"`
	Channel    int    `json:"link_channel,omitempty"`
	BSSID      string `json:"link_bssid,omitempty"`
	FirstBSSID string `json:"link_first_bssid,omitempty"`
	RoamMillis int64  `json:"link_roam_ms,omitempty"`
}

// Reported says whether the session reported anything of its link.
func (l SessionLink) Reported() bool { return l != SessionLink{} }
