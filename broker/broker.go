// Package broker is fleetd's MQTT edge: the embedded mochi-mqtt broker, its
// listeners (TCP, TLS with client certificates, WebSocket), device
// authentication and topic ACLs, connection-rate limiting, presence capture
// and disconnect classification. It is the only package that imports mochi.
package broker

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/untrusted"
)

// addrString is a net.Addr of an address already rendered as text.
type addrString string

func (a addrString) Network() string { return "tcp" }
func (a addrString) String() string  { return string(a) }

// Registry is what the broker needs from the device registry.
type Registry interface {
	// Authenticate checks a device's token.
	Authenticate(ctx context.Context, id string, token []byte) (fleet.AuthInfo, error)
	// Admit checks a device that proved its identity with a certificate.
	Admit(ctx context.Context, id string) (fleet.AuthInfo, error)
	// NoteBirth remembers the firmware and model a device announced.
	NoteBirth(id, firmware, model string)
	// TouchLastSeen records when devices were last heard from.
	TouchLastSeen(ctx context.Context, seen map[string]time.Time) error
	// KeepaliveFor returns the keepalive cap of a model in seconds (0 = none).
	KeepaliveFor(model string) int
}

// EventSink takes connection events without blocking.
type EventSink interface {
	Record(fleet.Event)
}

// Config is the broker's configuration. Empty addresses turn listeners off.
type Config struct {
	TCPAddr string
	TLSAddr string
	WSAddr  string
	// TLS listener: server certificate, and the CA that signs device
	// certificates (when set, a client certificate is required and names the
	// device).
	TLSCertFile, TLSKeyFile, TLSClientCAFile string

	// MaxPacket is the largest packet accepted, in bytes; it is advertised to
	// MQTT 5 clients in CONNACK.
	MaxPacket int
	// ConnectTimeout bounds the time from accept to CONNECT (TLS handshake included).
	ConnectTimeout time.Duration
	// ConnectRate and ConnectBurst bound connection attempts per second for the
	// whole broker (0 = unlimited), so a reconnect storm is admitted at a pace
	// the server can take.
	ConnectRate  float64
	ConnectBurst int
	// ClientConnectRate and ClientConnectBurst bound attempts per client id, so
	// one flapping device cannot use up the broker's rate.
	ClientConnectRate  float64
	ClientConnectBurst int
	// AuthFailureRate and AuthFailureBurst bound failed authentications per
	// source address (IPv4 address, IPv6 /64); past them a failed attempt is
	// answered "connection rate exceeded". Successful ones are not charged.
	AuthFailureRate  float64
	AuthFailureBurst int
	// MaxPendingConnects and MaxPendingConnectsPerSource cap the sockets that
	// have not finished their CONNECT (0 = no cap); more are closed at once.
	MaxPendingConnects          int
	MaxPendingConnectsPerSource int
	// PublishRate and PublishBurst bound the packets (other than PINGREQ) a
	// session may send per second; SubscribeRate and SubscribeBurst the
	// subscription filters (SUBSCRIBE and UNSUBSCRIBE). A session over
	// either is ended with DISCONNECT 0x96 (message rate too high).
	PublishRate    float64
	PublishBurst   int
	SubscribeRate  float64
	SubscribeBurst int
	// LogInterval is the period over which repeated refusals of one device
	// id or address are folded into one log line.
	LogInterval time.Duration
	// SessionExpiry caps how long a disconnected persistent session (MQTT 3
	// clean-session=false, or MQTT 5 session expiry) is kept.
	SessionExpiry time.Duration
	// LastSeenInterval is how often last_seen is written for devices that sent
	// something.
	LastSeenInterval time.Duration
	// Node names this replica in events.
	Node string
	// Clock gives session epochs their time. Replicas sharing a database
	// pass its clock (cluster.Clock), so that a device's session on one
	// replica is later than its previous one on another; nil is the local
	// clock.
	Clock func() time.Time
}

func (c *Config) defaults() {
	if c.MaxPacket == 0 {
		c.MaxPacket = 256 << 10
	}
	if c.ConnectTimeout == 0 {
		c.ConnectTimeout = 10 * time.Second
	}
	if c.ConnectBurst == 0 {
		c.ConnectBurst = max(1, int(c.ConnectRate))
	}
	if c.ClientConnectBurst == 0 {
		c.ClientConnectBurst = 10
	}
	if c.AuthFailureBurst == 0 {
		c.AuthFailureBurst = 20
	}
	if c.PublishRate == 0 {
		c.PublishRate = 100
	}
	if c.PublishBurst == 0 {
		c.PublishBurst = 500
	}
	if c.SubscribeRate == 0 {
		c.SubscribeRate = 5
	}
	if c.SubscribeBurst == 0 {
		c.SubscribeBurst = 50
	}
	if c.LogInterval == 0 {
		c.LogInterval = time.Minute
	}
	if c.SessionExpiry == 0 {
		c.SessionExpiry = time.Hour
	}
	if c.LastSeenInterval == 0 {
		c.LastSeenInterval = 15 * time.Second
	}
}

// Broker is the embedded MQTT broker.
type Broker struct {
	cfg       Config
	srv       *mqtt.Server
	reg       Registry
	events    EventSink
	log       *slog.Logger
	m         *metrics
	listeners []*listener
	limits    *connectLimits
	hook      *hook
	refusals  *repeatLog // refused connections and device messages
	idLocks   idLocks    // one CONNECT per client id at a time (takeover.go)

	pending  sync.Map // *mqtt.Client → *session, from OnConnect to OnSessionEstablished
	sessions sync.Map // *mqtt.Client → *session
	handlers sync.Map // topic suffix ("ota/status") → DeviceHandler
	retained sync.Map // topic suffixes of the server's retained messages (SendRetained)

	notifyMu    sync.RWMutex
	onSubscribe map[string][]func(deviceID string) // topic suffix → callbacks
	onBirth     []func(deviceID, firmware, model string)
	lastEpoch   atomic.Int64
	established atomic.Int64 // sessions established since start (settle.go)

	closeOnce sync.Once
	started   atomic.Bool   // Start launched the last-seen flusher, which closes done
	stop      chan struct{} // closed by Close: the background loops end
	done      chan struct{} // closed by the last-seen flusher after its last write
}

// New builds the broker and binds its listeners, so that a taken address
// fails here, before the rest of fleetd starts. Nothing is served until Start.
func New(cfg Config, reg Registry, events EventSink, logger *slog.Logger, registerer prometheus.Registerer) (*Broker, error) {
	cfg.defaults()
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	b := &Broker{cfg: cfg, reg: reg, events: events, log: logger, m: newMetrics(), stop: make(chan struct{}), done: make(chan struct{})}
	b.limits = newConnectLimits(cfg)
	b.refusals = newRepeatLog(logger, cfg.LogInterval)
	if registerer != nil {
		b.m.register(registerer, b)
	}

	caps := mqtt.NewDefaultServerCapabilities()
	caps.MaximumPacketSize = uint32(cfg.MaxPacket)
	// mochi deletes retained messages after 24 h by default; a device's
	// retained status must stay until the device replaces it.
	caps.MaximumMessageExpiryInterval = 0
	caps.MaximumSessionExpiryInterval = uint32(cfg.SessionExpiry / time.Second)
	// Memory per connection is a product property: mochi's defaults allocate an
	// 8192-slot outbound queue (64 KiB) per client. Devices receive a few OTA
	// jobs and commands, not streams.
	caps.MaximumClientWritesPending = 64
	caps.MaximumInflight = 64
	caps.ReceiveMaximum = 64
	mqttLevel := slog.LevelError
	if logger.Enabled(context.Background(), slog.LevelDebug) {
		mqttLevel = slog.LevelDebug
	}
	b.srv = mqtt.New(&mqtt.Options{
		Capabilities: caps,
		// Every connection holds its read buffer for life, idle or not, and a
		// device's packets are small (birth, telemetry, acknowledgements):
		// a larger packet is read past the buffer into its own slice.
		ClientNetReadBufferSize:  512,
		ClientNetWriteBufferSize: 1024,
		InlineClient:             true, // server-side publishes (OTA jobs, commands)
		SysTopicResendInterval:   60,
		Logger:                   slog.New(levelHandler{logger.Handler(), mqttLevel}).With("component", "mochi"),
	})
	b.hook = &hook{b: b}
	if err := b.srv.AddHook(b.hook, nil); err != nil {
		return nil, err
	}

	var tlsCfg *tls.Config
	if cfg.TLSAddr != "" {
		var err error
		if tlsCfg, err = loadTLS(cfg); err != nil {
			return nil, err
		}
		tlsCfg = serverTLSConfig(tlsCfg) // one for the listener, shared by its connections
	}
	for _, spec := range []struct {
		id, addr, setting string
		tls               *tls.Config
		ws                bool
	}{
		{"tcp", cfg.TCPAddr, "FLEETD_MQTT_ADDR", nil, false},
		{"tls", cfg.TLSAddr, "FLEETD_MQTT_TLS_ADDR", tlsCfg, false},
		{"ws", cfg.WSAddr, "FLEETD_MQTT_WS_ADDR", nil, true},
	} {
		if spec.addr == "" {
			continue
		}
		// No TCP keepalive by default: MQTT's keepalive finds dead devices,
		// and Go's default costs four setsockopt calls per accepted
		// connection. A device that asks for no MQTT keepalive gets TCP
		// keepalive probes instead (hook.OnConnect, wireConn.probeIdle).
		ln, err := (&net.ListenConfig{KeepAlive: -1}).Listen(context.Background(), "tcp", spec.addr)
		if err != nil {
			b.closeListeners()
			return nil, fmt.Errorf("listen on %s (set by %s): %w", spec.addr, spec.setting, err)
		}
		l := &listener{id: spec.id, ln: ln, tlsConfig: spec.tls, ws: spec.ws, connectTimeout: cfg.ConnectTimeout,
			maxPacket: cfg.MaxPacket, log: logger, m: b.m, onHandshakeError: b.handshakeFailed, throttle: b.throttle,
			limits: b.limits, refusals: b.refusals, closeV3: b.closeV3Clients}
		b.listeners = append(b.listeners, l)
	}
	return b, nil
}

func loadTLS(cfg Config) (*tls.Config, error) {
	if cfg.TLSCertFile == "" || cfg.TLSKeyFile == "" {
		return nil, errors.New("FLEETD_MQTT_TLS_ADDR is set: FLEETD_TLS_CERT_FILE and FLEETD_TLS_KEY_FILE are required")
	}
	cert, err := tls.LoadX509KeyPair(cfg.TLSCertFile, cfg.TLSKeyFile)
	if err != nil {
		return nil, fmt.Errorf("FLEETD_TLS_CERT_FILE/FLEETD_TLS_KEY_FILE: %w", err)
	}
	t := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if cfg.TLSClientCAFile != "" {
		pem, err := os.ReadFile(cfg.TLSClientCAFile)
		if err != nil {
			return nil, fmt.Errorf("FLEETD_TLS_CLIENT_CA_FILE: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("FLEETD_TLS_CLIENT_CA_FILE: %s holds no PEM certificate", cfg.TLSClientCAFile)
		}
		t.ClientCAs = pool
		t.ClientAuth = tls.RequireAndVerifyClientCert
	}
	return t, nil
}

// Addrs maps each listener ("tcp", "tls", "ws") to the address it bound.
func (b *Broker) Addrs() map[string]string {
	out := map[string]string{}
	for _, l := range b.listeners {
		out[l.id] = l.Address()
	}
	return out
}

// Start serves every listener and starts the last-seen flusher.
func (b *Broker) Start() error {
	for _, l := range b.listeners {
		if err := b.srv.AddListener(l); err != nil {
			return err
		}
	}
	if err := b.srv.Serve(); err != nil {
		return err
	}
	b.started.Store(true)
	go b.flushLastSeenLoop()
	go b.limits.pruneLoop(b.stop)
	go b.refusals.loop(b.stop)
	go b.settleLoop()
	return nil
}

// Ready reports whether every listener is accepting.
func (b *Broker) Ready(context.Context) error {
	for _, l := range b.listeners {
		if !l.serving.Load() {
			return fmt.Errorf("mqtt listener %s (%s) is not serving", l.id, l.Address())
		}
	}
	return nil
}

// Close stops accepting, sends MQTT 5 clients DISCONNECT 0x8B (server
// shutting down), waits for every session to end (each records its
// server_shutdown event) and writes the last last_seen values. It releases
// the listeners' addresses whether or not Start ran, and waits no longer than
// ctx: when ctx ends first it returns an error wrapping ctx.Err() and the
// remaining work goes on in the background. Only the first call does anything.
func (b *Broker) Close(ctx context.Context) error {
	var errs []error
	b.closeOnce.Do(func() {
		closed := make(chan struct{})
		go func() {
			_ = b.srv.Close()
			// Without Start, mochi does not know the listeners: their sockets,
			// bound by New, are closed here.
			b.closeListeners()
			close(closed)
		}()
		select {
		case <-closed:
		case <-ctx.Done():
			errs = append(errs, fmt.Errorf("mqtt sessions still closing: %w", ctx.Err()))
		}
		close(b.stop)
		if !b.started.Load() {
			return
		}
		select {
		case <-b.done:
		case <-ctx.Done():
			errs = append(errs, fmt.Errorf("last_seen still being written: %w", ctx.Err()))
		}
	})
	return errors.Join(errs...)
}

func (b *Broker) closeListeners() {
	for _, l := range b.listeners {
		l.ln.Close()
	}
}

// Kick ends a device's live session because its credential was revoked: the
// client gets DISCONNECT 0x98 (MQTT 5), its will is not published, and the
// broker forgets everything it held for the device: session, subscriptions,
// queued messages and retained messages.
func (b *Broker) Kick(deviceID string) {
	if cl, ok := b.srv.Clients.Get(deviceID); ok && !cl.Net.Inline {
		atomic.StoreUint32(&cl.Properties.Will.Flag, 0)
		if !cl.Closed() {
			b.endSession(cl, codeDecommissioned)
		}
		b.srv.UnsubscribeClient(cl)
		cl.ClearInflights()
		if cur, ok := b.srv.Clients.Get(deviceID); ok && cur == cl {
			b.srv.Clients.Delete(deviceID)
		}
	}
	for _, pk := range b.srv.Topics.Messages(devicePrefix(deviceID) + "#") {
		b.srv.Topics.RetainMessage(packets.Packet{TopicName: pk.TopicName, FixedHeader: packets.FixedHeader{Type: packets.Publish, Retain: true}})
	}
	b.limits.forget(deviceID)
	b.log.Info("device session ended: decommissioned", "device_id", deviceID)
}

// EndRotated ends a device's live session because its token was rotated:
// MQTT 5 clients get DISCONNECT 0x98 "device token rotated", MQTT 3 clients
// have their socket closed, and the end is recorded as token_rotated. The
// device keeps its subscriptions and retained birth; it reconnects with its
// new token.
func (b *Broker) EndRotated(deviceID string) {
	if cl, ok := b.srv.Clients.Get(deviceID); ok && !cl.Net.Inline && !cl.Closed() {
		b.endSession(cl, codeTokenRotated)
		b.log.Info("device session ended: token rotated", "device_id", deviceID)
	}
}

// closeV3Clients closes the sockets of a listener's MQTT 3 clients at
// shutdown, before mochi sends every client DISCONNECT 0x8B, which MQTT 3
// does not define from the server.
func (b *Broker) closeV3Clients(listener string) {
	for _, cl := range b.srv.Clients.GetByListener(listener) {
		if cl.Properties.ProtocolVersion < 5 && !cl.Closed() {
			cl.Stop(packets.ErrServerShuttingDown)
		}
	}
}

// endSession ends a client's session with a reason: MQTT 5 clients get a
// DISCONNECT with the reason code; MQTT 3.1 and 3.1.1 define no DISCONNECT
// from the server, so their socket is closed ([MQTT-3.14.0-1]: the client
// sends DISCONNECT, the server closes the network connection).
func (b *Broker) endSession(cl *mqtt.Client, code packets.Code) {
	if cl.Properties.ProtocolVersion == 5 {
		_ = b.srv.DisconnectClient(cl, code)
		return
	}
	cl.Stop(code)
}

// Send publishes a message to one device on devices/{id}/{sub} with QoS 1.
// A device that is offline with a persistent session gets it when it comes
// back; fleetd's own redelivery (OTA jobs) does not rely on that.
func (b *Broker) Send(deviceID, sub string, payload []byte) error {
	return b.srv.Publish(devicePrefix(deviceID)+sub, payload, false, 1)
}

// SendRequest publishes a request to one device on devices/{id}/{sub} with
// QoS 1, the MQTT 5 way: the message carries devices/{id}/{responseSub} as
// its Response Topic and correlation as its Correlation Data
// ([MQTT-4.10.0-1]). They reach MQTT 5 sessions only (MQTT 3 has no
// properties: the payload must name the request too).
func (b *Broker) SendRequest(deviceID, sub string, payload []byte, responseSub string, correlation []byte) error {
	// mochi's Publish sets no properties; its inline client is what
	// server-side publishes come from.
	cl, ok := b.srv.Clients.Get(mqtt.InlineClientId)
	if !ok || !cl.Net.Inline {
		return errors.New("broker: no inline client to publish from")
	}
	return b.srv.InjectPacket(cl, packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1},
		TopicName:   devicePrefix(deviceID) + sub,
		Payload:     payload,
		PacketID:    1, // as Publish: inline publishes are never acknowledged
		Properties:  packets.Properties{ResponseTopic: devicePrefix(deviceID) + responseSub, CorrelationData: correlation},
	})
}

// SendRetained publishes a message to one device on devices/{id}/{sub}
// with QoS 1 and the retain flag, so that the device gets it again when it
// subscribes again within its session ([MQTT-3.3.1-6]). The broker keeps it
// only while the device's session lasts here: when the session ends it is
// dropped, so a device that comes back (here or on another replica) is not
// handed a copy older than what the caller publishes on its subscribe, and
// the store holds no more than one message per device with a session.
func (b *Broker) SendRetained(deviceID, sub string, payload []byte) error {
	b.retained.Store(sub, struct{}{})
	return b.srv.Publish(devicePrefix(deviceID)+sub, payload, true, 1)
}

// dropRetained removes the server's retained messages of a device whose
// session ended here.
func (b *Broker) dropRetained(deviceID string) {
	b.retained.Range(func(k, _ any) bool {
		topic := devicePrefix(deviceID) + k.(string)
		if _, ok := b.srv.Topics.Retained.Get(topic); ok {
			// An empty retained payload deletes ([MQTT-3.3.1-10]).
			b.srv.Topics.RetainMessage(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Retain: true}, TopicName: topic})
		}
		return true
	})
}

// DeviceHandler takes a message a device published on one of its topics. It
// runs on the device's connection goroutine before the message is
// acknowledged: an error leaves it unacknowledged (the device sends it again),
// so a handler that stores the message must return only once it is stored.
type DeviceHandler func(deviceID string, payload []byte) error

// Handle registers the handler for devices/{id}/{sub} (e.g. "ota/status").
func (b *Broker) Handle(sub string, h DeviceHandler) { b.handlers.Store(sub, h) }

// Session is what a SessionHandler learns of the session a message came on:
// its device, its epoch (a later session has a larger one) and the firmware
// and model it announced, as the broker's own events record them.
type Session struct {
	DeviceID        string
	Epoch           int64
	Firmware, Model string
}

// SessionHandler takes a message like a DeviceHandler, with the session it
// came on, for handlers that keep per-session state (telemetry reports a
// malformed message once per session) or record events about the session.
// The payload is valid only during the call.
type SessionHandler func(s Session, payload []byte) error

// HandleSession registers a SessionHandler for devices/{id}/{sub}.
func (b *Broker) HandleSession(sub string, h SessionHandler) { b.handlers.Store(sub, h) }

// Message is a device's publish as a MessageHandler sees it: the payload
// and the MQTT 5 Correlation Data (nil for MQTT 3). Both are valid only
// during the call.
type Message struct {
	Payload         []byte
	CorrelationData []byte
}

// MessageHandler takes a message like a SessionHandler, with the publish's
// MQTT 5 properties, for the answers to requests (SendRequest).
type MessageHandler func(s Session, m Message) error

// HandleMessage registers a MessageHandler for devices/{id}/{sub}.
func (b *Broker) HandleMessage(sub string, h MessageHandler) { b.handlers.Store(sub, h) }

// OnSubscribe calls f when a device subscribes to devices/{id}/{sub}, so that
// messages waiting for it (an OTA job dispatched while it was offline) can be
// sent now that it listens. f runs on the device's goroutine: it must not block.
func (b *Broker) OnSubscribe(sub string, f func(deviceID string)) {
	b.notifyMu.Lock()
	defer b.notifyMu.Unlock()
	if b.onSubscribe == nil {
		b.onSubscribe = map[string][]func(string){}
	}
	b.onSubscribe[sub] = append(b.onSubscribe[sub], f)
}

// OnBirth calls f for every birth message (the device announcing its
// firmware). f runs on the device's goroutine: it must not block.
func (b *Broker) OnBirth(f func(deviceID, firmware, model string)) {
	b.notifyMu.Lock()
	defer b.notifyMu.Unlock()
	b.onBirth = append(b.onBirth, f)
}

// Connected reports whether a device has a live session on this broker.
func (b *Broker) Connected(deviceID string) bool {
	cl, ok := b.srv.Clients.Get(deviceID)
	return ok && !cl.Closed() && !cl.Net.Inline
}

// TakeOverRemote ends the device's session here if a newer one (a later
// epoch) was established on another replica: one live session per id across
// replicas, as within one ([MQTT-3.1.4-2]). It is recorded as
// session_takeover, like a takeover within this broker. It does not wait
// for the old session to end.
func (b *Broker) TakeOverRemote(deviceID string, epoch int64) {
	cl, ok := b.srv.Clients.Get(deviceID)
	if !ok || cl.Closed() || cl.Net.Inline {
		return
	}
	v, ok := b.sessions.Load(cl)
	if !ok {
		return
	}
	s := v.(*session)
	if s.epoch >= epoch {
		return
	}
	s.takenOverRemotely.Store(true)
	// Ending it may wait on a slow device's socket; the lookup above is
	// what every other replica's connect costs, so it stays inline.
	go b.endSession(cl, packets.ErrSessionTakenOver)
}

// Listening reports whether a device has a live session subscribed to a
// filter that matches devices/{id}/{sub} (the topic itself, or a wildcard
// filter such as devices/{id}/cmd/#).
func (b *Broker) Listening(deviceID, sub string) bool {
	cl, ok := b.srv.Clients.Get(deviceID)
	if !ok || cl.Closed() || cl.Net.Inline {
		return false
	}
	topic := devicePrefix(deviceID) + sub
	if _, ok = cl.State.Subscriptions.Get(topic); ok {
		return true
	}
	for filter := range cl.State.Subscriptions.GetAll() {
		if matches(filter, topic) {
			return true
		}
	}
	return false
}

// nextEpoch returns a session epoch: microseconds since 1970, made strictly
// increasing within the process, so a later session always has a larger epoch.
func (b *Broker) nextEpoch() int64 {
	for {
		last := b.lastEpoch.Load()
		now := time.Now
		if b.cfg.Clock != nil {
			now = b.cfg.Clock
		}
		next := max(now().UnixMicro(), last+1)
		if b.lastEpoch.CompareAndSwap(last, next) {
			return next
		}
	}
}

// flushLastSeenLoop writes when each connected device was last heard from,
// coalesced: one statement per interval for the whole fleet, not one UPDATE
// per packet.
func (b *Broker) flushLastSeenLoop() {
	defer close(b.done)
	t := time.NewTicker(b.cfg.LastSeenInterval)
	defer t.Stop()
	for {
		select {
		case <-b.stop:
			b.flushLastSeen()
			return
		case <-t.C:
			b.flushLastSeen()
		}
	}
}

func (b *Broker) flushLastSeen() {
	seen := map[string]time.Time{}
	var flushed []*session
	b.sessions.Range(func(_, v any) bool {
		s := v.(*session)
		if last := s.wire.lastRead.Load(); last > s.lastFlushed.Load() {
			seen[s.deviceID] = time.Unix(0, last)
			flushed = append(flushed, s)
		}
		return true
	})
	if len(seen) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := b.reg.TouchLastSeen(ctx, seen); err != nil {
		b.log.Warn("cannot write last_seen; will retry", "devices", len(seen), "err", err)
		return
	}
	for _, s := range flushed {
		s.lastFlushed.Store(seen[s.deviceID].UnixNano())
	}
}

// handshakeFailed records a failed TLS handshake. When the certificate
// names a registered device, the event is that device's, so its diagnosis
// shows it; otherwise it is recorded under no device, with the subject.
func (b *Broker) handshakeFailed(remote string, f *handshakeFailure) {
	deviceID := ""
	if f.CN != "" {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		if info, err := b.reg.Admit(ctx, f.CN); err == nil && info.Result != fleet.AuthUnknownDevice {
			deviceID = f.CN
		}
		cancel()
	}
	// The certificate is unverified: its names are the sender's claim, so the
	// event is the claimed device's for its diagnosis to weigh (fleet:
	// id_used_elsewhere), and what it says is bounded.
	key := deviceID
	if key == "" {
		key = sourceOf(addrString(remote)).String()
	}
	b.refusals.Log(slog.LevelWarn, "tls:"+key, "TLS handshake failed", "device_id", deviceID, "class", f.Class, "remote", remote,
		"sni", excerpt(f.SNI), "offered", strings.Join(f.Offered, ","), "subject", excerpt(f.Subject), "sha256", f.Fingerprint, "err", excerpt(fmt.Sprint(f.Err)))
	now := time.Now()
	b.events.Record(fleet.Event{ID: fleet.NewEventID(now), DeviceID: deviceID, At: now, Kind: fleet.KindRefused,
		Reason: fleet.ReasonTLSHandshakeFailed, Detail: untrusted.Text(f.Detail(), 300), RemoteAddr: remote, Listener: "tls", BrokerNode: b.cfg.Node})
}

// levelHandler raises the minimum level of a handler: mochi logs a warning for
// every abnormal disconnect, which fleetd records as events instead.
type levelHandler struct {
	slog.Handler
	min slog.Level
}

func (h levelHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return l >= h.min && h.Handler.Enabled(ctx, l)
}
func (h levelHandler) WithAttrs(a []slog.Attr) slog.Handler {
	return levelHandler{h.Handler.WithAttrs(a), h.min}
}
func (h levelHandler) WithGroup(n string) slog.Handler {
	return levelHandler{h.Handler.WithGroup(n), h.min}
}
