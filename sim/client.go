package sim

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"sync"
	"time"

	"github.com/eclipse/paho.golang/paho"
	"github.com/eclipse/paho.golang/paho/log"
	pahov3 "github.com/eclipse/paho.mqtt.golang"
)

// session is one MQTT connection of a simulated device. The simulator runs its
// own reconnect loop (instead of the libraries' auto-reconnect) because the
// reconnect policy — backoff with jitter or a naive storm — is part of what
// it plays.
type session interface {
	Publish(ctx context.Context, topic string, payload []byte, qos byte, retain bool) error
	Subscribe(ctx context.Context, topic string, handle func([]byte)) error
	// SubscribeRequests subscribes to a filter and hands every message that
	// matches it to handle, with its MQTT 5 request properties (commands).
	SubscribeRequests(ctx context.Context, filter string, handle func(request)) error
	// Respond publishes an answer with QoS 1, with the request's Correlation
	// Data for MQTT 5 (MQTT 3 drops it: the payload names the request).
	Respond(ctx context.Context, topic string, payload, correlation []byte) error
	// Done is closed when the connection is lost.
	Done() <-chan struct{}
	// Disconnect sends DISCONNECT and closes.
	Disconnect()
}

// connectParams is what one CONNECT needs.
type connectParams struct {
	id, username, password string
	protocol               int // 3, 4 or 5
	keepalive              time.Duration
	pings                  string
	firmware, model        string
	conn                   net.Conn
	timeout                time.Duration
}

// ErrRefused wraps a CONNACK refusal.
type ErrRefused struct{ Reason string }

func (e *ErrRefused) Error() string { return "connection refused: " + e.Reason }

func connectSession(ctx context.Context, p connectParams) (session, error) {
	if p.protocol == 5 {
		return connectV5(ctx, p)
	}
	return connectV3(p)
}

// v3Session is MQTT 3.1 / 3.1.1 on github.com/eclipse/paho.mqtt.golang.
type v3Session struct {
	c    pahov3.Client
	done chan struct{}
	once sync.Once
}

func connectV3(p connectParams) (session, error) {
	s := &v3Session{done: make(chan struct{})}
	opts := pahov3.NewClientOptions().
		AddBroker("tcp://"+p.conn.RemoteAddr().String()).
		SetClientID(p.id).
		SetProtocolVersion(uint(p.protocol)).
		SetCleanSession(true).
		SetKeepAlive(p.keepalive).
		SetAutoReconnect(false).
		SetConnectRetry(false).
		SetConnectTimeout(p.timeout).
		SetWriteTimeout(p.timeout).
		SetOrderMatters(false).
		SetWill("devices/"+p.id+"/status", `{"online":false}`, 1, true).
		SetCustomOpenConnectionFn(func(*url.URL, pahov3.ClientOptions) (net.Conn, error) { return p.conn, nil }).
		SetConnectionLostHandler(func(pahov3.Client, error) { s.once.Do(func() { close(s.done) }) })
	if p.username != "" {
		opts.SetUsername(p.username).SetPassword(p.password)
	}
	if p.pings == "none" {
		// A firmware that never pings also never gives up waiting for a
		// PINGRESP: it stays connected until the broker drops it.
		opts.SetPingTimeout(100 * p.keepalive)
	}
	s.c = pahov3.NewClient(opts)
	tok := s.c.Connect()
	if !tok.WaitTimeout(p.timeout + time.Second) {
		p.conn.Close()
		return nil, errors.New("connect timed out")
	}
	if err := tok.Error(); err != nil {
		p.conn.Close()
		// Return codes 1-5 come from a CONNACK; paho uses 0xFE and up for
		// network and protocol failures of its own.
		if c, ok := tok.(*pahov3.ConnectToken); ok && c.ReturnCode() >= 1 && c.ReturnCode() <= 5 {
			return nil, &ErrRefused{Reason: err.Error()}
		}
		return nil, err
	}
	return s, nil
}

func (s *v3Session) Publish(ctx context.Context, topic string, payload []byte, qos byte, retain bool) error {
	tok := s.c.Publish(topic, qos, retain, payload)
	select {
	case <-tok.Done():
		return tok.Error()
	case <-ctx.Done():
		return ctx.Err()
	case <-s.done:
		return errors.New("connection lost")
	}
}

func (s *v3Session) Subscribe(ctx context.Context, topic string, handle func([]byte)) error {
	tok := s.c.Subscribe(topic, 1, func(_ pahov3.Client, m pahov3.Message) { handle(m.Payload()) })
	select {
	case <-tok.Done():
		return tok.Error()
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (s *v3Session) Done() <-chan struct{} { return s.done }
func (s *v3Session) Disconnect()           { s.c.Disconnect(250) }

// v5Session is MQTT 5 on github.com/eclipse/paho.golang.
type v5Session struct {
	c       *paho.Client
	done    chan struct{}
	once    sync.Once
	mu      sync.Mutex
	routes  map[string]func([]byte)
	filters map[string]func(request) // SubscribeRequests, by filter
}

func connectV5(ctx context.Context, p connectParams) (session, error) {
	s := &v5Session{done: make(chan struct{}), routes: map[string]func([]byte){}, filters: map[string]func(request){}}
	lost := func() { s.once.Do(func() { close(s.done) }) }
	cfg := paho.ClientConfig{
		ClientID:           p.id,
		Conn:               p.conn, // a sync.Locker: paho writes each packet whole under it
		OnClientError:      func(error) { lost() },
		OnServerDisconnect: func(*paho.Disconnect) { lost() },
		OnPublishReceived: []func(paho.PublishReceived) (bool, error){func(r paho.PublishReceived) (bool, error) {
			s.mu.Lock()
			h := s.routes[r.Packet.Topic]
			req := s.requestRoute(r.Packet.Topic)
			s.mu.Unlock()
			if h != nil {
				h(r.Packet.Payload)
			} else if req != nil {
				req(requestOf(r.Packet))
			}
			return true, nil
		}},
	}
	if p.pings == "none" {
		cfg.PingHandler = silentPinger{}
	}
	s.c = paho.NewClient(cfg)
	cp := &paho.Connect{
		ClientID:   p.id,
		KeepAlive:  uint16(p.keepalive / time.Second),
		CleanStart: true,
		WillMessage: &paho.WillMessage{Topic: "devices/" + p.id + "/status", Payload: []byte(`{"online":false}`),
			QoS: 1, Retain: true},
		Properties: &paho.ConnectProperties{User: paho.UserProperties{{Key: "firmware", Value: p.firmware}, {Key: "model", Value: p.model}}},
	}
	if p.username != "" {
		cp.Username, cp.UsernameFlag = p.username, true
		cp.Password, cp.PasswordFlag = []byte(p.password), true
	}
	cctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	ca, err := s.c.Connect(cctx, cp)
	if err != nil {
		p.conn.Close()
		if ca != nil && ca.ReasonCode >= 0x80 {
			reason := fmt.Sprintf("reason code 0x%02x", ca.ReasonCode)
			if ca.Properties != nil && ca.Properties.ReasonString != "" {
				reason += " " + ca.Properties.ReasonString
			}
			return nil, &ErrRefused{Reason: reason}
		}
		return nil, err
	}
	go func() {
		<-s.c.Done()
		lost()
	}()
	return s, nil
}

func (s *v5Session) Publish(ctx context.Context, topic string, payload []byte, qos byte, retain bool) error {
	_, err := s.c.Publish(ctx, &paho.Publish{Topic: topic, QoS: qos, Retain: retain, Payload: payload})
	return err
}

func (s *v5Session) Subscribe(ctx context.Context, topic string, handle func([]byte)) error {
	s.mu.Lock()
	s.routes[topic] = handle
	s.mu.Unlock()
	return s.subscribe(ctx, topic)
}

// subscribe subscribes at QoS 1 and turns a refusing SUBACK into an error.
func (s *v5Session) subscribe(ctx context.Context, filter string) error {
	sa, err := s.c.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: filter, QoS: 1}}})
	if err != nil {
		return err
	}
	if len(sa.Reasons) > 0 && sa.Reasons[0] >= 0x80 {
		return fmt.Errorf("subscribe %s refused: 0x%02x", filter, sa.Reasons[0])
	}
	return nil
}

func (s *v5Session) Done() <-chan struct{} { return s.done }
func (s *v5Session) Disconnect()           { _ = s.c.Disconnect(&paho.Disconnect{ReasonCode: 0}) }

// silentPinger is the PINGREQ scheduler of a firmware that never pings.
type silentPinger struct{}

func (silentPinger) Run(ctx context.Context, _ net.Conn, _ uint16) error {
	<-ctx.Done()
	return nil
}
func (silentPinger) PacketSent()         {}
func (silentPinger) PacketReceived()     {}
func (silentPinger) PingResp()           {}
func (silentPinger) SetDebug(log.Logger) {}
