package broker

import (
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"

	"github.com/fleetd/fleetd/internal/netsource"
)

// connectLimits are the broker's defences against connection floods, each
// chosen so that an attacker without a device's token cannot turn it against
// the device:
//   - one token bucket for the whole broker, so a reconnect storm is admitted
//     at a pace the server (and the database behind it) can take;
//   - one bucket per device id, charged only by connects that authenticated,
//     so a device in a tight reconnect loop is refused without using up
//     everyone else's share, and nobody else can use up the device's;
//   - one bucket of failed authentications per source address (an IPv4
//     address or an IPv6 /64), so guessing tokens is slow and a flood of bad
//     logins is refused cheaply;
//   - a cap on sockets that have not finished their CONNECT, overall and per
//     source address, so unauthenticated connections cannot hold memory and
//     file descriptors.
type connectLimits struct {
	global *rate.Limiter

	perRate   rate.Limit
	perBurst  int
	failRate  rate.Limit
	failBurst int
	mu        sync.Mutex
	clients   map[string]*rate.Limiter
	failures  map[netip.Prefix]*rate.Limiter

	maxPending, maxPendingPerSource int
	pending                         atomic.Int64
	pendingMu                       sync.Mutex
	pendingBySource                 map[netip.Prefix]int
}

func newConnectLimits(cfg Config) *connectLimits {
	limit := func(r float64) rate.Limit {
		if r <= 0 {
			return rate.Inf
		}
		return rate.Limit(r)
	}
	return &connectLimits{
		global:              rate.NewLimiter(limit(cfg.ConnectRate), cfg.ConnectBurst),
		perRate:             limit(cfg.ClientConnectRate),
		perBurst:            cfg.ClientConnectBurst,
		failRate:            limit(cfg.AuthFailureRate),
		failBurst:           cfg.AuthFailureBurst,
		clients:             map[string]*rate.Limiter{},
		failures:            map[netip.Prefix]*rate.Limiter{},
		maxPending:          cfg.MaxPendingConnects,
		maxPendingPerSource: cfg.MaxPendingConnectsPerSource,
		pendingBySource:     map[netip.Prefix]int{},
	}
}

// sourceOf is the unit the per-source limits count (netsource): the IPv4
// address or the IPv6 /64.
func sourceOf(addr net.Addr) netip.Prefix { return netsource.OfAddr(addr) }

func (c *connectLimits) allowGlobal() bool { return c.global.Allow() }

// allowClient charges one connect of an authenticated device.
func (c *connectLimits) allowClient(id string) bool {
	return allowIn(c, c.clients, id, c.perRate, c.perBurst)
}

// failedAuth charges one failed authentication to its source and reports
// whether the source was still within its limit.
func (c *connectLimits) failedAuth(src netip.Prefix) bool {
	return allowIn(c, c.failures, src, c.failRate, c.failBurst)
}

// newLimiter is a token bucket of r per second, or nil for unlimited
// (r < 0): a session's limiter is asked for every packet, and nil spares an
// unlimited one the clock and the limiter's mutex (allow).
func newLimiter(r float64, burst int) *rate.Limiter {
	if r < 0 {
		return nil
	}
	return rate.NewLimiter(rate.Limit(r), burst)
}

// allow takes n tokens from lim, which is nil when unlimited (newLimiter).
func allow(lim *rate.Limiter, n int) bool { return lim == nil || lim.AllowN(time.Now(), n) }

// allowIn takes a token from the bucket of key in m, making the bucket on
// first use.
func allowIn[K comparable](c *connectLimits, m map[K]*rate.Limiter, key K, r rate.Limit, burst int) bool {
	if r == rate.Inf {
		return true
	}
	c.mu.Lock()
	lim, ok := m[key]
	if !ok {
		lim = rate.NewLimiter(r, burst)
		m[key] = lim
	}
	c.mu.Unlock()
	return lim.Allow()
}

func (c *connectLimits) forget(id string) {
	c.mu.Lock()
	delete(c.clients, id)
	c.mu.Unlock()
}

// admitPending takes a place for a socket that has not sent its CONNECT yet.
// It reports false, taking nothing, when the broker or the source already
// holds its maximum of such sockets.
func (c *connectLimits) admitPending(src netip.Prefix) bool {
	if c.maxPending > 0 && c.pending.Add(1) > int64(c.maxPending) {
		c.pending.Add(-1)
		return false
	}
	if c.maxPendingPerSource > 0 {
		c.pendingMu.Lock()
		n := c.pendingBySource[src]
		if n >= c.maxPendingPerSource {
			c.pendingMu.Unlock()
			if c.maxPending > 0 {
				c.pending.Add(-1)
			}
			return false
		}
		c.pendingBySource[src] = n + 1
		c.pendingMu.Unlock()
	}
	return true
}

// pendingFrom returns how many sockets of src have not sent CONNECT yet.
func (c *connectLimits) pendingFrom(src netip.Prefix) int {
	c.pendingMu.Lock()
	defer c.pendingMu.Unlock()
	return c.pendingBySource[src]
}

// releasePending gives back a place taken by admitPending.
func (c *connectLimits) releasePending(src netip.Prefix) {
	if c.maxPending > 0 {
		c.pending.Add(-1)
	}
	if c.maxPendingPerSource > 0 {
		c.pendingMu.Lock()
		if n := c.pendingBySource[src]; n <= 1 {
			delete(c.pendingBySource, src)
		} else {
			c.pendingBySource[src] = n - 1
		}
		c.pendingMu.Unlock()
	}
}

// pruneLoop drops buckets that have refilled: they hold no information, and
// keeping them would grow with every id and address ever seen.
func (c *connectLimits) pruneLoop(stop <-chan struct{}) {
	t := time.NewTicker(time.Minute)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case now := <-t.C:
			c.prune(now)
		}
	}
}

func (c *connectLimits) prune(now time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for id, lim := range c.clients {
		if lim.TokensAt(now) >= float64(c.perBurst) {
			delete(c.clients, id)
		}
	}
	for src, lim := range c.failures {
		if lim.TokensAt(now) >= float64(c.failBurst) {
			delete(c.failures, src)
		}
	}
}
