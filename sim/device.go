package sim

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/url"
	"strings"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"

	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/wsconn"
)

// device is one simulated device.
type device struct {
	sim      *Simulator
	cohort   *Cohort
	id       string
	token    string // empty for certificate devices
	firmware string // changes when an OTA job succeeds
	image    string // SHA-256 of the image it runs, when its bytes are known (delta.go)
	src      net.IP // local address to connect from; nil = any
	cert     *tls.Certificate
	rnd      *rand.Rand
	flapRnd  *rand.Rand // flap jitter only, seeded from the id: a run repeats its flap timings
	oversize []byte     // the oversized telemetry payload, shared by the cohort (read only)
	link     *linkState // the radio link, when the cohort has one
	booted   time.Time

	pendingJob string          // job reported as succeeded once the device is back on the new firmware
	jobsSeen   map[string]bool // job ids received, so a repeated job is not run twice
	// commandsSeen are command ids received (bounded), so a command sent
	// again is not run twice (command.go: handleCommand).
	commandsSeen map[string]bool
	// applied is the desired configuration applied (config.go).
	applied appliedConfig
}

// sessionEnd is why live returned.
type sessionEnd int

const (
	endContinue    sessionEnd = iota // not an end: the session goes on
	endLost                          // the connection dropped (or was dropped on purpose)
	endReboot                        // watchdog or OTA reboot: reconnect at once
	endNeverReturn                   // an OTA install bricked the device
	endShutdown                      // the run is over
)

func (d *device) run(ctx context.Context) {
	attempt := 0
	for ctx.Err() == nil {
		// Wait for the ramp first: connect latency must not include the pacing.
		if err := d.sim.admit(ctx); err != nil {
			return
		}
		start := time.Now()
		sess, fc, err := d.connect(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			d.sim.stats.connectFailed(errorKind(err))
			d.sim.logger.Debug("connect failed", "device_id", d.id, "err", err)
			attempt++
			if !sleep(ctx, d.backoff(attempt)) {
				return
			}
			continue
		}
		d.sim.stats.connected(time.Since(start))
		attempt = 0
		end := d.live(ctx, sess, fc)
		d.sim.stats.disconnected()
		switch end {
		case endShutdown:
			sess.Disconnect()
			fc.closeSocket()
			return
		case endNeverReturn:
			fc.closeSocket()
			<-ctx.Done()
			return
		case endReboot:
			fc.closeSocket()
			sleep(ctx, 200*time.Millisecond)
		default:
			fc.closeSocket()
			attempt++
			if !sleep(ctx, d.backoff(attempt)) {
				return
			}
		}
	}
}

// backoff is the wait before reconnect attempt n: exponential with full
// jitter (a random wait up to 1 s × 2^n, at most a minute), or next to
// nothing for naive firmware, which is what turns a restart into a storm.
func (d *device) backoff(n int) time.Duration {
	if d.cohort.Reconnect == "naive" {
		return 10 * time.Millisecond
	}
	ceiling := min(time.Minute, time.Second<<min(n, 6))
	return time.Duration(d.rnd.Int64N(int64(ceiling)))
}

// connect dials (from the device's source address), wraps the socket in the
// firmware's behaviour, and runs the MQTT CONNECT.
func (d *device) connect(ctx context.Context) (session, *firmwareConn, error) {
	u, err := url.Parse(d.cohort.mqttURL(d.sim.fleet))
	if err != nil {
		return nil, nil, err
	}
	dialer := &net.Dialer{Timeout: 10 * time.Second}
	if d.src != nil {
		dialer.LocalAddr = &net.TCPAddr{IP: d.src}
	}
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	var conn net.Conn
	switch u.Scheme {
	case "tls", "ssl", "mqtts":
		raw, err := dialer.DialContext(dctx, "tcp", u.Host)
		if err != nil {
			return nil, nil, err
		}
		cfg := &tls.Config{RootCAs: d.sim.serverCAs, ServerName: u.Hostname()}
		if d.cert != nil {
			// Present the certificate whatever CAs the server asks for, as
			// firmware does (Go would withhold one from a foreign CA).
			cert := d.cert
			cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return cert, nil }
		}
		tc := tls.Client(raw, cfg)
		if err := tc.HandshakeContext(dctx); err != nil {
			raw.Close()
			return nil, nil, fmt.Errorf("tls handshake: %w", err)
		}
		conn = tc
	case "ws":
		wsd := websocket.Dialer{NetDialContext: dialer.DialContext, Subprotocols: []string{"mqtt"}, HandshakeTimeout: 10 * time.Second}
		ws, _, err := wsd.DialContext(dctx, u.String(), nil)
		if err != nil {
			return nil, nil, err
		}
		conn = wsconn.New(ws)
	default:
		if conn, err = dialer.DialContext(dctx, "tcp", u.Host); err != nil {
			return nil, nil, err
		}
	}
	pings := d.sim.fleet.pingsFor(d.cohort, d.firmware)
	fc := newFirmwareConn(conn, pings)
	proto, _ := fleet.ParseProtocol(d.cohort.Protocol)
	p := connectParams{id: d.id, protocol: int(proto), keepalive: d.keepalive(), pings: pings,
		firmware: d.firmware, model: d.cohort.Model, conn: fc, timeout: 10 * time.Second}
	if d.token != "" {
		p.username, p.password = d.id, d.token
		if d.cohort.Credentials == "bad_token" {
			p.password = d.token + "-wrong"
		}
	}
	sess, err := connectSession(ctx, p)
	if err != nil {
		fc.closeSocket()
		return nil, nil, err
	}
	return sess, fc, nil
}

// live runs one connected session: birth, OTA subscription, telemetry, and
// the cohort's misbehaviour, until the session ends.
func (d *device) live(ctx context.Context, sess session, fc *firmwareConn) sessionEnd {
	birth, _ := json.Marshal(map[string]any{"online": true, "firmware": d.firmware, "model": d.cohort.Model})
	if err := d.publish(ctx, sess, "status", birth, 1, true); err != nil {
		return endLost
	}
	if d.pendingJob != "" {
		d.report(ctx, sess, otaStatus{JobID: d.pendingJob, State: "succeeded", Progress: 100})
		d.pendingJob = ""
	}
	jobs := make(chan []byte, 4)
	if err := sess.Subscribe(ctx, "devices/"+d.id+"/ota/job", func(b []byte) {
		select {
		case jobs <- b:
		default: // a job is already waiting; the server re-sends on reconnect
		}
	}); err != nil {
		return endLost
	}
	// Commands: the server sends them on devices/{id}/cmd/{name} and again
	// on every subscription until they are answered.
	commands := make(chan request, 8)
	if err := sess.SubscribeRequests(ctx, "devices/"+d.id+"/cmd/#", func(r request) {
		select {
		case commands <- r:
		default: // busy: the server sends it again on reconnect, or it times out
		}
	}); err != nil {
		return endLost
	}
	if d.commandsSeen == nil {
		d.commandsSeen = map[string]bool{}
	}
	// Desired configuration: sent on subscribe (from the database) and on
	// every change; the device applies and reports it.
	// Only the latest document matters: one that arrives while the last
	// is being applied replaces it.
	var latestConfig atomic.Pointer[[]byte]
	configs := make(chan struct{}, 1)
	if err := sess.Subscribe(ctx, "devices/"+d.id+"/config/desired", func(b []byte) {
		b = bytes.Clone(b)
		latestConfig.Store(&b)
		select {
		case configs <- struct{}{}:
		default:
		}
	}); err != nil {
		return endLost
	}

	var telemetry <-chan time.Time
	if d.cohort.Telemetry > 0 {
		t := time.NewTicker(d.cohort.Telemetry.D())
		defer t.Stop()
		telemetry = t.C
	}
	flap := timerChan(d.flapAfter())
	freeze := timerChan(d.cohort.FreezeAfter.D())
	oversized := timerChan(d.cohort.OversizedEvery.D())
	var roam <-chan time.Time
	if d.link != nil {
		roam = timerChan(d.cohort.Link.RoamEvery.D())
	}
	for {
		select {
		case <-ctx.Done():
			return endShutdown
		case <-sess.Done():
			return endLost
		case <-telemetry:
			msg := map[string]any{"rssi_dbm": -40 - d.rnd.IntN(50), "channel": 1 + d.rnd.IntN(11),
				"uptime_s": int(time.Since(d.booted).Seconds())}
			drop := false
			if d.link != nil {
				drop = d.link.tick(d.cohort.Telemetry.D())
				d.link.report(msg)
			}
			payload, _ := json.Marshal(msg)
			_ = d.publish(ctx, sess, "telemetry", payload, 0, false)
			if drop {
				d.sim.stats.count("link drops")
				return endLost // the radio lost the link: no DISCONNECT
			}
		case <-roam:
			roam = timerChan(d.cohort.Link.RoamEvery.D())
			if d.link.roam() {
				// The client reports the access point it associated with,
				// then loses its connection in the hand-over.
				msg := map[string]any{"uptime_s": int(time.Since(d.booted).Seconds())}
				d.link.report(msg)
				payload, _ := json.Marshal(msg)
				_ = d.publish(ctx, sess, "telemetry", payload, 0, false)
				d.sim.stats.count("roaming drops")
				return endLost
			}
		case <-flap:
			d.sim.stats.count("flaps")
			return endLost // the socket is closed without DISCONNECT
		case <-oversized:
			// One message over the broker's maximum packet size, as firmware
			// that dumps a whole log buffer does. The broker hangs up part way
			// (packet_too_large); the session then ends through sess.Done.
			d.sim.stats.count("oversized")
			_ = d.publish(ctx, sess, "telemetry", d.oversize, 0, false)
		case <-freeze:
			d.sim.stats.count("freezes")
			fc.freeze()
			if !sleep(ctx, d.cohort.FreezeFor.D()) {
				return endShutdown
			}
			d.booted = time.Now() // the watchdog reboots the device
			return endReboot
		case r := <-commands:
			proto, _ := fleet.ParseProtocol(d.cohort.Protocol)
			if end := d.handleCommand(ctx, sess, int(proto), r); end != endContinue {
				return end
			}
		case <-configs:
			if raw := latestConfig.Swap(nil); raw != nil {
				d.applyConfig(ctx, sess, *raw)
			}
		case raw := <-jobs:
			switch end := d.handleJob(ctx, sess, raw); end {
			case endReboot, endNeverReturn, endShutdown:
				return end
			}
		}
	}
}

// flapAfter is how long the next session lasts before the device drops it:
// FlapEvery plus a uniform random extra in [0, FlapJitter); 0 when the device
// does not flap.
func (d *device) flapAfter() time.Duration {
	every := d.cohort.FlapEvery.D()
	if every <= 0 {
		return 0
	}
	if j := d.cohort.FlapJitter.D(); j > 0 {
		every += time.Duration(d.flapRnd.Int64N(int64(j)))
	}
	return every
}

func (d *device) publish(ctx context.Context, sess session, sub string, payload []byte, qos byte, retain bool) error {
	pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	err := sess.Publish(pctx, "devices/"+d.id+"/"+sub, payload, qos, retain)
	if err == nil {
		d.sim.stats.sent()
	}
	return err
}

func timerChan(d time.Duration) <-chan time.Time {
	if d <= 0 {
		return nil
	}
	return time.After(d)
}

func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// errorKind names a connect failure for the summary.
func errorKind(err error) string {
	var refused *ErrRefused
	var opErr *net.OpError
	switch {
	case errors.As(err, &refused):
		return "refused: " + refused.Reason
	case strings.Contains(err.Error(), "tls:"):
		// With TLS 1.3 the server judges the client certificate after the
		// client's handshake is done: the refusal arrives on the first read.
		msg := err.Error()
		return "tls:" + msg[strings.LastIndex(msg, "tls:")+4:]
	case errors.Is(err, context.DeadlineExceeded), strings.Contains(err.Error(), "timed out"):
		return "timeout"
	case errors.As(err, &opErr):
		return opErr.Op + ": " + opErr.Err.Error()
	}
	return err.Error()
}
