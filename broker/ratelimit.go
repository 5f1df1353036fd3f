package broker

import (
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// connectLimits are token buckets for connection attempts: one for the whole
// broker, so a reconnect storm is admitted at a pace the server (and the
// database behind it) can take, and one per client id, so a device in a tight
// reconnect loop is refused without using up everyone else's share.
type connectLimits struct {
	global *rate.Limiter

	perRate  rate.Limit
	perBurst int
	mu       sync.Mutex
	clients  map[string]*rate.Limiter
}

func newConnectLimits(cfg Config) *connectLimits {
	global := rate.Limit(cfg.ConnectRate)
	if cfg.ConnectRate <= 0 {
		global = rate.Inf
	}
	per := rate.Limit(cfg.ClientConnectRate)
	if cfg.ClientConnectRate <= 0 {
		per = rate.Inf
	}
	return &connectLimits{
		global:   rate.NewLimiter(global, cfg.ConnectBurst),
		perRate:  per,
		perBurst: cfg.ClientConnectBurst,
		clients:  map[string]*rate.Limiter{},
	}
}

func (c *connectLimits) allowGlobal() bool { return c.global.Allow() }

func (c *connectLimits) allowClient(id string) bool {
	if c.perRate == rate.Inf {
		return true
	}
	c.mu.Lock()
	lim, ok := c.clients[id]
	if !ok {
		lim = rate.NewLimiter(c.perRate, c.perBurst)
		c.clients[id] = lim
	}
	c.mu.Unlock()
	return lim.Allow()
}

func (c *connectLimits) forget(id string) {
	c.mu.Lock()
	delete(c.clients, id)
	c.mu.Unlock()
}

// pruneLoop drops per-client buckets that have refilled: they hold no
// information, and keeping them would grow with every id ever seen.
func (c *connectLimits) pruneLoop(stop <-chan struct{}) {
	t := time.NewTicker(time.Minute)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case now := <-t.C:
			c.mu.Lock()
			for id, lim := range c.clients {
				if lim.TokensAt(now) >= float64(c.perBurst) {
					delete(c.clients, id)
				}
			}
			c.mu.Unlock()
		}
	}
}
