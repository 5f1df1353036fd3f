package broker

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync/atomic"
	"time"
	"unicode/utf8"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"golang.org/x/time/rate"

	"github.com/fleetd/fleetd/fleet"
)

// session is what the broker keeps per live device session. It is keyed by
// the *mqtt.Client, never by device id: during a takeover the old and the new
// session of one id coexist, and their hooks run concurrently.
type session struct {
	deviceID  string
	epoch     int64
	firmware  string
	model     string
	wire      *wireConn
	start     time.Time
	keepalive uint16 // requested in CONNECT
	clean     bool

	lastFlushed atomic.Int64 // last_seen written up to (unix ns)
	takenOver   atomic.Bool  // a newer session of the id took this one over
	// takenOverRemotely: a newer session of the id on another replica
	// (TakeOverRemote); mochi here has no successor to mark.
	takenOverRemotely atomic.Bool
	denials           atomic.Int32 // ACL denials recorded for this session

	// Per-session rates: packets other than PINGREQ, and subscription
	// filters. A session over either is ended (DISCONNECT 0x96). nil is
	// unlimited (newLimiter).
	publishes, subscribes *rate.Limiter
	// rejected says what the CONNECT carried that could not be kept (an
	// MQTT 5 user property); recorded once the session is established.
	rejected []string
}

// maxDenialEvents bounds the acl_denied events one session records, so a
// device stuck in a loop of forbidden publishes cannot flood the registry.
const maxDenialEvents = 10

// hook connects mochi to the registry. Hooks run on each client's goroutine;
// only OnConnect may wait (on a credential lookup that missed the cache,
// because the protocol needs the answer). Everything else is in memory.
type hook struct {
	mqtt.HookBase
	b *Broker
}

func (h *hook) ID() string { return "fleetd" }

func (h *hook) Provides(b byte) bool {
	switch b {
	case mqtt.OnConnect, mqtt.OnConnectAuthenticate, mqtt.OnSessionEstablished, mqtt.OnDisconnect,
		mqtt.OnACLCheck, mqtt.OnSubscribed, mqtt.OnPublish, mqtt.OnPacketEncode, mqtt.OnClientExpired,
		mqtt.OnPacketRead, mqtt.OnSessionEstablish:
		return true
	}
	return false
}

// refusal is why a CONNECT is refused, independent of the protocol version.
type refusal int

const (
	refuseBadCredentials refusal = iota
	refuseNotAuthorized
	refuseRateLimited
	refuseUnavailable
	refuseBadIdentifier
	refuseBadTopic
)

// connackCode picks the CONNACK code for a refusal. MQTT 3 has only return
// codes 1-5 ([MQTT-3.2.2-5]); MQTT 5 has reason codes.
func connackCode(version byte, r refusal) packets.Code {
	if version < 5 {
		switch r {
		case refuseBadCredentials:
			return packets.ErrMalformedUsernameOrPassword // 0x04 bad user name or password
		case refuseNotAuthorized, refuseBadTopic:
			return packets.Err3NotAuthorized // 0x05
		case refuseBadIdentifier:
			return packets.Err3ClientIdentifierNotValid // 0x02
		default:
			return packets.Err3ServerUnavailable // 0x03
		}
	}
	switch r {
	case refuseBadCredentials:
		return packets.ErrBadUsernameOrPassword // 0x86
	case refuseNotAuthorized:
		return packets.ErrNotAuthorized // 0x87
	case refuseRateLimited:
		return packets.ErrConnectionRateExceeded // 0x9F
	case refuseBadIdentifier:
		return packets.ErrClientIdentifierNotValid // 0x85
	case refuseBadTopic:
		return packets.ErrTopicNameInvalid // 0x90
	default:
		return packets.ErrServerUnavailable // 0x88
	}
}

// OnConnect checks, authenticates and authorises a CONNECT. A refusal sends
// the CONNACK code itself (mochi would close the socket silently), records a
// "refused" event and returns an error so mochi ends the connection.
//
// The order is what keeps an attacker who lacks a device's token from
// locking the device out: the per-device connect rate is charged only once
// the token (or certificate) proved the device, and failed authentications
// are charged to their source address, not to the id they claimed.
func (h *hook) OnConnect(cl *mqtt.Client, pk packets.Packet) (err error) {
	defer h.recover(cl, "OnConnect", &err)
	b := h.b
	wire, _ := cl.Net.Conn.(*wireConn)
	if wire != nil {
		wire.connectRead()
	}
	// mochi's strings alias the packet buffer, which may be as large as the
	// largest packet: anything kept past this call is a copy.
	id := strings.Clone(pk.Connect.ClientIdentifier)
	recordAs := id // the device the refusal is recorded for ("" for none)
	refuse := func(reason fleet.Reason, r refusal, detail string) error {
		code := connackCode(cl.Properties.ProtocolVersion, r)
		_ = b.srv.SendConnack(cl, code, false, nil)
		b.recordRefusal(pk, recordAs, cl.Net.Listener, wire, reason, detail, code)
		return code
	}

	// The broker-wide connect rate and the cap on pending connections were
	// applied before mochi saw the connection (Broker.throttle, listener).
	if err := fleet.ValidateID(id); err != nil {
		recordAs = ""
		var ve *fleet.ValidationError
		msg := err.Error()
		if errors.As(err, &ve) {
			msg = ve.Msg
		}
		return refuse(fleet.ReasonAuthFailed, refuseBadIdentifier, fmt.Sprintf("client id %s is not a device id: it %s", excerpt(id), msg))
	}
	if err := checkWill(id, cl.Properties.Will); err != nil {
		return refuse(fleet.ReasonProtocolError, err.refusal, err.Error())
	}
	if cl.Properties.Will.Retain && !retainable(id, cl.Properties.Will.TopicName) {
		cl.Properties.Will.Retain = false
	}

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var info fleet.AuthInfo
	var failure string
	if cert := peerCertificate(wire); cert != nil {
		if !certNames(cert, id) {
			return refuse(fleet.ReasonAuthFailed, refuseNotAuthorized, fmt.Sprintf("client id does not match the certificate (CN %s)", excerpt(cert.Subject.CommonName)))
		}
		info, err = b.reg.Admit(ctx, id)
	} else if string(pk.Connect.Username) != id {
		failure = fmt.Sprintf("user name %s is not the device id", excerpt(pk.Connect.Username))
	} else {
		info, err = b.reg.Authenticate(ctx, id, pk.Connect.Password)
	}
	if err != nil {
		// Folded: when the database is slow every connect fails alike, and a
		// line per attempt would flood the log.
		b.refusals.Log(slog.LevelError, "registry-unavailable", "cannot authenticate: registry unavailable", "device_id", id, "err", err)
		return refuse(fleet.ReasonAuthFailed, refuseUnavailable, "registry unavailable")
	}
	switch {
	case failure != "":
	case info.Result == fleet.AuthUnknownDevice:
		failure = "unknown device"
	case info.Result == fleet.AuthBadToken:
		failure = "wrong token"
	case info.Result == fleet.AuthDecommissioned:
		return refuse(fleet.ReasonDecommissioned, refuseNotAuthorized, "device is decommissioned")
	}
	if failure != "" {
		if wire != nil && !b.limits.failedAuth(sourceOf(wire.RemoteAddr())) {
			return refuse(fleet.ReasonThrottled, refuseRateLimited, fleet.DetailFailedAuthPrefix+" from this address (this one: "+failure+")")
		}
		return refuse(fleet.ReasonAuthFailed, refuseBadCredentials, failure)
	}
	if !b.limits.allowClient(id) {
		return refuse(fleet.ReasonThrottled, refuseRateLimited, fleet.DetailReconnectsTooOften)
	}

	s := &session{deviceID: id, firmware: info.Firmware, model: info.Model, wire: wire, start: time.Now(),
		keepalive: pk.Connect.Keepalive, clean: pk.Connect.Clean,
		publishes:  newLimiter(b.cfg.PublishRate, b.cfg.PublishBurst),
		subscribes: newLimiter(b.cfg.SubscribeRate, b.cfg.SubscribeBurst)}
	// MQTT 5 devices may announce their firmware in the CONNECT's user
	// properties; a value that cannot be kept is recorded and ignored.
	for _, up := range pk.Properties.User {
		var field *string
		switch up.Key {
		case "firmware":
			field = &s.firmware
		case "model":
			field = &s.model
		default:
			continue
		}
		if err := checkLabel(up.Key+" user property", up.Val); err != nil {
			s.rejected = append(s.rejected, err.Error())
			continue
		}
		*field = strings.Clone(up.Val)
	}
	// The keepalive policy caps what MQTT 5 devices may ask for, through the
	// CONNACK's Server Keep Alive ([MQTT-3.2.2-21]); MQTT 3 devices cannot be
	// told, and their diagnosis says so.
	if limit := b.reg.KeepaliveFor(s.model); limit > 0 && cl.Properties.ProtocolVersion == 5 &&
		(pk.Connect.Keepalive == 0 || int(pk.Connect.Keepalive) > limit) {
		cl.State.Keepalive = uint16(limit)
		cl.State.ServerKeepalive = true
	}
	if wire != nil {
		if cl.State.Keepalive == 0 {
			if err := wire.probeIdle(); err != nil {
				b.log.Warn("cannot turn on TCP keepalive for a device without MQTT keepalive", "device_id", id, "err", err)
			}
		}
		wire.accepted.Store(true)
		// Held until the CONNACK is out (OnSessionEstablished), or until the
		// connection ends if it never gets there (listener.establish).
		wire.releaseID = b.idLocks.lock(id)
	}
	b.pending.Store(cl, s)
	return nil
}

// willError is why a CONNECT's will is refused, with the refusal it gets.
type willError struct {
	refusal refusal
	msg     string
}

func (e *willError) Error() string { return e.msg }

// checkWill applies to a will the rules a publish obeys, because the broker
// publishes it with the device's authority when the device drops, without
// asking the ACL: the topic must be one the device may publish to, and a
// retained will is kept only on its status topic (as for a publish, the
// retain flag is cleared elsewhere). The size is bounded by the CONNECT's.
func checkWill(id string, w mqtt.Will) *willError {
	if atomic.LoadUint32(&w.Flag) == 0 {
		return nil
	}
	switch {
	case w.TopicName == "" || !utf8.ValidString(w.TopicName) || strings.ContainsAny(w.TopicName, "+#\x00"):
		return &willError{refuseBadTopic, fmt.Sprintf("will topic %s is not a valid topic name", excerpt(w.TopicName))}
	case !canWill(id, w.TopicName):
		return &willError{refuseNotAuthorized, fmt.Sprintf("will topic %s is outside the device's topics (devices/%s/status, telemetry, ota/status)", excerpt(w.TopicName), id)}
	}
	return nil
}

// OnConnectAuthenticate admits what OnConnect accepted (mochi requires some
// hook to say yes).
func (h *hook) OnConnectAuthenticate(*mqtt.Client, packets.Packet) bool { return true }

// OnSessionEstablished records the connect. It runs after the CONNACK, so
// a session whose CONNACK could not be written is never counted online.
func (h *hook) OnSessionEstablished(cl *mqtt.Client, pk packets.Packet) {
	defer h.recover(cl, "OnSessionEstablished", nil)
	b := h.b
	v, ok := b.pending.LoadAndDelete(cl)
	if !ok {
		return
	}
	s := v.(*session)
	s.epoch = b.nextEpoch()
	b.sessions.Store(cl, s)
	if s.wire != nil {
		s.wire.session.Store(s)
	}
	// Released once the session is indexed: the next CONNECT of this id
	// finds it there and marks it taken over (OnSessionEstablish).
	if s.wire != nil {
		s.wire.releaseConnectLock()
	}
	b.m.connects.WithLabelValues("ok").Inc()
	b.established.Add(1)
	now := time.Now()
	b.events.Record(fleet.Event{ID: fleet.NewEventID(now), DeviceID: s.deviceID, At: now, Kind: fleet.KindConnect,
		Firmware: s.firmware, Model: s.model, SessionEpoch: s.epoch, ProtocolVersion: fleet.Protocol(cl.Properties.ProtocolVersion),
		KeepaliveRequested: int(s.keepalive), KeepaliveEffective: int(cl.State.Keepalive), CleanStart: s.clean,
		RemoteAddr: cl.Net.Remote, TLSVersion: tlsVersion(s.wire), Listener: cl.Net.Listener, BrokerNode: b.cfg.Node})
	for _, why := range s.rejected {
		b.reject(s, why)
	}
	b.log.Debug("device connected", "device_id", s.deviceID, "session_epoch", s.epoch, "protocol", fleet.Protocol(cl.Properties.ProtocolVersion).String(),
		"keepalive", cl.State.Keepalive, "remote", cl.Net.Remote, "listener", cl.Net.Listener)

	// A decommission that raced this connect (it ran after OnConnect's check,
	// before the client was registered) must still end the session.
	if info, err := b.reg.Admit(context.Background(), s.deviceID); err == nil && info.Result != fleet.AuthOK {
		atomic.StoreUint32(&cl.Properties.Will.Flag, 0)
		b.endSession(cl, codeDecommissioned)
	}
}

// OnDisconnect classifies why the session ended and records it. The epoch
// ties the event to its session, so a takeover's late disconnect does not
// mark the new session offline.
func (h *hook) OnDisconnect(cl *mqtt.Client, err error, expire bool) {
	defer h.recover(cl, "OnDisconnect", nil)
	b := h.b
	v, ok := b.sessions.LoadAndDelete(cl)
	if !ok {
		return
	}
	s := v.(*session)
	if s.wire != nil {
		s.wire.session.Store(nil)
	}
	b.dropRetained(s.deviceID)
	cause := cl.StopCause()
	if cause == nil {
		cause = err
	}
	switch {
	case s.takenOver.Load():
		cause = packets.ErrSessionTakenOver
		awaitTakeover(cl)
	case s.takenOverRemotely.Load():
		cause = packets.ErrSessionTakenOver
	}
	end := SessionEnd{Cause: cause}
	var pings, packets int
	var bytes int64
	var idle, silence time.Duration
	if s.wire != nil {
		end.BadHeader = s.wire.BadHeader()
		pings, packets, bytes = int(s.wire.pings.Load()), int(s.wire.packets.Load()), s.wire.bytes.Load()
		idle, silence = time.Since(s.wire.LastRead()), time.Duration(s.wire.maxSilence.Load())
	}
	reason, detail := Classify(end)
	if reason == fleet.ReasonPacketTooLarge {
		detail = fmt.Sprintf("a packet above the maximum packet size of %d bytes", b.cfg.MaxPacket)
	}
	b.m.disconnects.WithLabelValues(string(reason)).Inc()
	now := time.Now()
	b.events.Record(fleet.Event{ID: fleet.NewEventID(now), DeviceID: s.deviceID, At: now, Kind: fleet.KindDisconnect,
		Reason: reason, Detail: detail, Firmware: s.firmware, Model: s.model, SessionEpoch: s.epoch,
		ProtocolVersion: fleet.Protocol(cl.Properties.ProtocolVersion), KeepaliveRequested: int(s.keepalive),
		KeepaliveEffective: int(cl.State.Keepalive), CleanStart: s.clean, RemoteAddr: cl.Net.Remote,
		TLSVersion: tlsVersion(s.wire), Listener: cl.Net.Listener, BrokerNode: b.cfg.Node, Pings: pings, IdleMillis: int(idle.Milliseconds()),
		PacketsIn: packets, BytesIn: bytes, DurationMillis: now.Sub(s.start).Milliseconds(), MaxSilenceMillis: int(silence.Milliseconds())})
	level := slog.LevelInfo
	if reason == fleet.ReasonClientDisconnect || reason == fleet.ReasonServerShutdown {
		level = slog.LevelDebug
	}
	b.log.Log(context.Background(), level, "device disconnected", "device_id", s.deviceID, "reason", reason, "detail", detail,
		"session_epoch", s.epoch, "firmware", s.firmware, "duration", time.Since(s.start).Round(time.Millisecond).String())
}

// OnACLCheck confines a device to its own topics. It runs for every publish
// and for every delivery, so it only compares strings.
func (h *hook) OnACLCheck(cl *mqtt.Client, topic string, write bool) (ok bool) {
	if cl.Net.Inline {
		return true
	}
	if !write {
		return canSubscribe(cl.ID, topic)
	}
	if canPublish(cl.ID, topic) {
		return true
	}
	h.denied(cl, "publish to "+topic)
	return false
}

// OnSubscribed records subscriptions the ACL refused and tells the
// subscription callbacks about granted ones.
func (h *hook) OnSubscribed(cl *mqtt.Client, pk packets.Packet, codes []byte) {
	for i, f := range pk.Filters {
		if i < len(codes) && codes[i] >= 0x80 {
			h.denied(cl, "subscribe to "+f.Filter)
			continue
		}
		sub, ok := deviceTopic(cl.ID, f.Filter)
		if !ok {
			continue
		}
		h.b.notifyMu.RLock()
		fs := h.b.onSubscribe[sub]
		h.b.notifyMu.RUnlock()
		for _, fn := range fs {
			fn(cl.ID)
		}
	}
}

func (h *hook) denied(cl *mqtt.Client, what string) {
	v, ok := h.b.sessions.Load(cl)
	if !ok {
		return
	}
	s := v.(*session)
	n := s.denials.Add(1)
	h.b.m.aclDenials.Inc()
	if n > maxDenialEvents {
		return
	}
	now := time.Now()
	h.b.events.Record(fleet.Event{ID: fleet.NewEventID(now), DeviceID: s.deviceID, At: now, Kind: fleet.KindACLDenied,
		Detail: what, Firmware: s.firmware, Model: s.model, SessionEpoch: s.epoch, BrokerNode: h.b.cfg.Node})
	h.b.log.Warn("topic access denied", "device_id", s.deviceID, "what", what)
}

// OnPublish reads birth messages and keeps retained messages to the status
// topic only.
func (h *hook) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if cl.Net.Inline {
		return pk, nil
	}
	if pk.FixedHeader.Retain && !retainable(cl.ID, pk.TopicName) {
		pk.FixedHeader.Retain = false
	}
	sub, ok := deviceTopic(cl.ID, pk.TopicName)
	if !ok {
		return pk, nil
	}
	if handler, ok := h.b.handlers.Load(sub); ok {
		if err := h.handle(cl, handler, pk); err != nil {
			h.b.log.Warn("device message not accepted; it stays unacknowledged", "device_id", cl.ID, "topic", pk.TopicName, "err", err)
			return pk, packets.ErrRejectPacket
		}
		return pk, nil
	}
	if sub != "status" {
		return pk, nil
	}
	msg, err := parseBirth(pk.Payload)
	if errors.Is(err, errNotBirth) {
		return pk, nil // the will, or a device announcing it is going away
	}
	s, ok := h.b.sessionOf(cl)
	if !ok {
		return pk, nil
	}
	if err != nil {
		// The device's previous firmware and model stay.
		h.b.reject(s, "status message refused: "+err.Error())
		if cl.Properties.ProtocolVersion == 5 && pk.FixedHeader.Qos > 0 {
			return pk, packets.ErrPayloadFormatInvalid
		}
		return pk, packets.CodeSuccessIgnore // acknowledged, neither delivered nor retained
	}
	// json.Unmarshal copies strings, so these do not alias the packet.
	if msg.Firmware != "" {
		s.firmware = msg.Firmware
	}
	if msg.Model != "" {
		s.model = msg.Model
	}
	h.b.reg.NoteBirth(s.deviceID, s.firmware, s.model)
	h.b.notifyMu.RLock()
	births := h.b.onBirth
	h.b.notifyMu.RUnlock()
	for _, fn := range births {
		fn(s.deviceID, s.firmware, s.model)
	}
	now := time.Now()
	h.b.events.Record(fleet.Event{ID: fleet.NewEventID(now), DeviceID: s.deviceID, At: now, Kind: fleet.KindBirth,
		Firmware: s.firmware, Model: s.model, SessionEpoch: s.epoch, ProtocolVersion: fleet.Protocol(cl.Properties.ProtocolVersion),
		BrokerNode: h.b.cfg.Node})
	return pk, nil
}

// handle runs a handler registered with Handle, HandleSession or
// HandleMessage.
func (h *hook) handle(cl *mqtt.Client, handler any, pk packets.Packet) error {
	if fn, ok := handler.(DeviceHandler); ok {
		return fn(cl.ID, pk.Payload)
	}
	s, ok := h.b.sessionOf(cl)
	if !ok {
		return nil // a publish racing the session's set-up or end: dropped
	}
	sess := Session{DeviceID: s.deviceID, Epoch: s.epoch, Firmware: s.firmware, Model: s.model}
	switch fn := handler.(type) {
	case SessionHandler:
		return fn(sess, pk.Payload)
	case MessageHandler:
		return fn(sess, Message{Payload: pk.Payload, CorrelationData: pk.Properties.CorrelationData})
	}
	return nil
}

// OnPacketRead applies the session's message and subscription rates. It runs
// for every packet, so it only takes a token; a session over its rate is
// ended with DISCONNECT 0x96 (MQTT 5; MQTT 3 has no server DISCONNECT, so the
// socket is closed) and its disconnect is recorded as throttled.
func (h *hook) OnPacketRead(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if cl.Net.Inline {
		return pk, nil
	}
	var lim *rate.Limiter
	n := 1
	s, ok := h.b.sessionOf(cl)
	if !ok {
		return pk, nil // CONNECT, or a packet racing the session's set-up
	}
	switch pk.FixedHeader.Type {
	case packets.Pingreq, packets.Disconnect:
		return pk, nil
	case packets.Subscribe, packets.Unsubscribe:
		lim, n = s.subscribes, max(1, len(pk.Filters))
	default:
		lim = s.publishes
	}
	if allow(lim, n) {
		return pk, nil
	}
	h.b.endSession(cl, packets.ErrMessageRateTooHigh)
	return pk, packets.ErrRejectPacket
}

// sessionOf returns the established session of cl. The hooks of every
// packet ask it, so it reads the session from the client's connection (one
// atomic load, wireConn.session) rather than from b.sessions, whose lookup
// hashes the client's interface value; a connection that is not a wireConn
// is looked up there.
func (b *Broker) sessionOf(cl *mqtt.Client) (*session, bool) {
	if w, ok := cl.Net.Conn.(*wireConn); ok {
		s := w.session.Load()
		return s, s != nil
	}
	v, ok := b.sessions.Load(cl)
	if !ok {
		return nil, false
	}
	return v.(*session), true
}

// reject records that something a device sent was refused and why.
func (b *Broker) reject(s *session, why string) {
	now := time.Now()
	b.events.Record(fleet.Event{ID: fleet.NewEventID(now), DeviceID: s.deviceID, At: now, Kind: fleet.KindRejected,
		Detail: why, Firmware: s.firmware, Model: s.model, SessionEpoch: s.epoch, BrokerNode: b.cfg.Node})
	b.refusals.Log(slog.LevelWarn, "rejected:"+s.deviceID, "device message refused", "device_id", s.deviceID, "why", why)
}

// OnPacketEncode advertises the broker's maximum packet size to MQTT 5
// clients, which mochi enforces but does not announce ([MQTT-3.2.2-15]).
func (h *hook) OnPacketEncode(cl *mqtt.Client, pk packets.Packet) packets.Packet {
	if pk.FixedHeader.Type == packets.Connack && cl.Properties.ProtocolVersion == 5 && pk.ReasonCode == 0 {
		pk.Properties.MaximumPacketSize = uint32(h.b.cfg.MaxPacket)
	}
	return pk
}

// OnClientExpired removes an expired session's subscriptions, which mochi
// leaves in its topic index: a later client with the same id would otherwise
// receive messages for them.
func (h *hook) OnClientExpired(cl *mqtt.Client) {
	h.b.srv.UnsubscribeClient(cl)
}

// recover keeps a bug in a hook from taking the whole broker down (mochi has
// no recover of its own); the client is disconnected instead.
func (h *hook) recover(cl *mqtt.Client, where string, errp *error) {
	if v := recover(); v != nil {
		h.b.log.Error("panic in broker hook", "hook", where, "device_id", cl.ID, "panic", fmt.Sprint(v))
		if errp != nil {
			*errp = packets.ErrUnspecifiedError
		}
	}
}

func tlsVersion(w *wireConn) string {
	if w == nil {
		return ""
	}
	return w.TLSVersion()
}

func peerCertificate(w *wireConn) *x509.Certificate {
	if w == nil || w.tls == nil {
		return nil
	}
	certs := w.tls.ConnectionState().PeerCertificates
	if len(certs) == 0 {
		return nil
	}
	return certs[0]
}

// certNames reports whether the certificate names the device: its CN or one
// of its DNS subject alternative names is the device id.
func certNames(cert *x509.Certificate, id string) bool {
	if cert.Subject.CommonName == id {
		return true
	}
	for _, n := range cert.DNSNames {
		if n == id {
			return true
		}
	}
	return false
}
