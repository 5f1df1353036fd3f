// Package cluster lets fleetd replicas that share one PostgreSQL act as one
// fleet manager. Signals travel through PostgreSQL itself (LISTEN/NOTIFY on
// one dedicated connection per replica), so a deployment needs nothing
// besides the database it already has: credential changes reach every
// replica's cache, a decommission reaches the replica holding the session, a
// message for a device reaches the replica it is connected to, and presence
// and campaign changes reach every replica's live-stream clients.
//
// NOTIFY is at most once: a replica whose listening connection drops misses
// what was sent meanwhile. It reconnects and then runs its resync hooks (the
// credential cache reloads from the database); what else it missed is
// repaired by the protocols that use the bus (OTA jobs are redelivered when a
// device subscribes, positive cache entries expire).
package cluster

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
)

// channel is the one NOTIFY channel fleetd uses; messages say their kind.
const channel = "fleetd"

// maxPayload keeps a message under PostgreSQL's NOTIFY limit (8000 bytes).
const maxPayload = 7800

// maxQueued bounds the items waiting to be sent in a batch. Past it new
// items are dropped and counted: what is queued is presence for live views
// and takeover signals, which a lagging database must not turn into
// unbounded memory.
const maxQueued = 65536

// batchEvery is how long queued items wait to share a message.
const batchEvery = 20 * time.Millisecond

// ErrTooLarge is returned for an item that does not fit in one message.
var ErrTooLarge = errors.New("cluster: message too large for NOTIFY")

// message is what travels on the channel: items of one kind from one
// replica. Origin comes first on the wire (Bus.notify writes it so), so that
// a replica recognises its own messages by their first bytes without
// decoding them.
type message struct {
	Origin string            `json:"o"`
	Kind   string            `json:"k"`
	Items  []json.RawMessage `json:"i"`
}

// Handler takes the items of one message from another replica: a replica's
// own messages come back to it (NOTIFY reaches every listener) and are
// dropped unread, since it applied its own changes when it made them.
// Handlers run on the listener's goroutine, one message at a time: they must
// not block.
type Handler func(items []json.RawMessage)

// Bus is one replica's end of the signalling.
type Bus struct {
	pool   *pgxpool.Pool
	origin string // unique per process: replicas may share a node name
	// head is how this replica's messages begin: {"o":origin,"k":
	head string
	log  *slog.Logger

	mu       sync.RWMutex
	handlers map[string][]Handler
	resync   []func(context.Context)

	qmu    sync.Mutex
	queue  map[string][]json.RawMessage
	queued int
	wake   chan struct{}

	listening atomic.Bool
	conn      *pgx.Conn // the first connection, made by Start, until Run takes it
	stop      context.CancelFunc
	done      chan struct{}

	mSent, mReceived, mDropped prometheus.Counter
	mOwn                       prometheus.Counter
	mReconnects                prometheus.Counter
}

// NewBus builds a replica's bus; node names the replica in logs and in the
// origin of its messages.
func NewBus(pool *pgxpool.Pool, node string, logger *slog.Logger, reg prometheus.Registerer) *Bus {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	var r [6]byte
	_, _ = rand.Read(r[:])
	b := &Bus{pool: pool, origin: node + "/" + hex.EncodeToString(r[:]), log: logger,
		handlers: map[string][]Handler{}, queue: map[string][]json.RawMessage{}, wake: make(chan struct{}, 1),
		done:        make(chan struct{}),
		mOwn:        prometheus.NewCounter(prometheus.CounterOpts{Name: "fleetd_cluster_own_messages_total", Help: "This replica's own NOTIFY messages that came back to it (dropped unread)."}),
		mSent:       prometheus.NewCounter(prometheus.CounterOpts{Name: "fleetd_cluster_messages_sent_total", Help: "NOTIFY messages sent to the other replicas."}),
		mReceived:   prometheus.NewCounter(prometheus.CounterOpts{Name: "fleetd_cluster_messages_received_total", Help: "NOTIFY messages received from the other replicas."}),
		mDropped:    prometheus.NewCounter(prometheus.CounterOpts{Name: "fleetd_cluster_items_dropped_total", Help: "Signals dropped because the send queue was full (the database is too slow)."}),
		mReconnects: prometheus.NewCounter(prometheus.CounterOpts{Name: "fleetd_cluster_listener_reconnects_total", Help: "Times the listening connection was re-established (each followed by a resync)."}),
	}
	if reg != nil {
		reg.MustRegister(b.mSent, b.mReceived, b.mDropped, b.mOwn, b.mReconnects,
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "fleetd_cluster_listening", Help: "1 while this replica listens for the other replicas' signals."},
				func() float64 {
					if b.listening.Load() {
						return 1
					}
					return 0
				}))
	}
	origin, _ := json.Marshal(b.origin)
	b.head = `{"o":` + string(origin) + `,"k":`
	return b
}

// Handle registers f for messages of a kind. Register before Start.
func (b *Bus) Handle(kind string, f Handler) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.handlers[kind] = append(b.handlers[kind], f)
}

// OnResync registers f to run after the listening connection was lost and is
// back: f must reload whatever a missed message could have left stale.
func (b *Bus) OnResync(f func(context.Context)) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.resync = append(b.resync, f)
}

// Start listens, so that nothing sent after it returns is missed, and runs
// the bus in the background until Close: the listener (reconnecting with
// backoff, then resyncing) and the sender of queued items.
func (b *Bus) Start(ctx context.Context) error {
	conn, err := b.listen(ctx)
	if err != nil {
		return fmt.Errorf("listen for the other replicas: %w", err)
	}
	b.conn = conn
	runCtx, cancel := context.WithCancel(context.Background())
	b.stop = cancel
	go func() {
		defer close(b.done)
		var wg sync.WaitGroup
		wg.Add(1)
		go func() { defer wg.Done(); b.sendLoop(runCtx) }()
		b.listenLoop(runCtx)
		wg.Wait()
	}()
	return nil
}

// Close stops the bus after sending what is queued.
func (b *Bus) Close(ctx context.Context) error {
	if b.stop == nil {
		return nil
	}
	b.stop()
	select {
	case <-b.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Listening reports whether the replica hears the others right now.
func (b *Bus) Listening() bool { return b.listening.Load() }

func (b *Bus) listen(ctx context.Context) (*pgx.Conn, error) {
	cfg := b.pool.Config().ConnConfig.Copy()
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, err
	}
	if _, err := conn.Exec(ctx, "LISTEN "+channel); err != nil {
		conn.Close(context.Background())
		return nil, err
	}
	b.listening.Store(true)
	return conn, nil
}

func (b *Bus) listenLoop(ctx context.Context) {
	conn := b.conn
	backoff := 100 * time.Millisecond
	for {
		if conn == nil {
			var err error
			if conn, err = b.listen(ctx); err != nil {
				if ctx.Err() != nil {
					return
				}
				b.log.Warn("cannot listen for the other replicas; retrying", "err", err, "in", backoff.String())
				select {
				case <-ctx.Done():
					return
				case <-time.After(backoff):
				}
				backoff = min(backoff*2, 5*time.Second)
				continue
			}
			b.mReconnects.Inc()
			b.log.Info("listening for the other replicas again; resyncing")
			b.runResync(ctx)
		}
		backoff = 100 * time.Millisecond
		for {
			n, err := conn.WaitForNotification(ctx)
			if err != nil {
				break
			}
			b.dispatch(n.Payload)
		}
		b.listening.Store(false)
		conn.Close(context.Background())
		conn = nil
		if ctx.Err() != nil {
			return
		}
		b.log.Warn("lost the connection that listens for the other replicas")
	}
}

func (b *Bus) runResync(ctx context.Context) {
	b.mu.RLock()
	hooks := append([]func(context.Context){}, b.resync...)
	b.mu.RUnlock()
	for _, f := range hooks {
		f(ctx)
	}
}

func (b *Bus) dispatch(payload string) {
	if strings.HasPrefix(payload, b.head) {
		b.mOwn.Inc()
		return
	}
	b.mReceived.Inc()
	var m message
	if err := json.Unmarshal([]byte(payload), &m); err != nil {
		b.log.Warn("ignored a malformed signal", "err", err)
		return
	}
	b.mu.RLock()
	hs := b.handlers[m.Kind]
	b.mu.RUnlock()
	for _, h := range hs {
		h(m.Items)
	}
}

// Publish sends items of a kind to every replica now (this one included),
// packed into as few messages as fit.
func (b *Bus) Publish(ctx context.Context, kind string, items ...any) error {
	raw := make([]json.RawMessage, 0, len(items))
	for _, it := range items {
		j, err := json.Marshal(it)
		if err != nil {
			return err
		}
		raw = append(raw, j)
	}
	return b.send(ctx, kind, raw)
}

// Enqueue sends an item with the next batch (within batchEvery), without
// waiting; when the queue is full the item is dropped and counted.
func (b *Bus) Enqueue(kind string, item any) {
	j, err := json.Marshal(item)
	if err != nil {
		return
	}
	b.qmu.Lock()
	if b.queued >= maxQueued {
		b.qmu.Unlock()
		b.mDropped.Inc()
		return
	}
	b.queue[kind] = append(b.queue[kind], j)
	b.queued++
	b.qmu.Unlock()
	select {
	case b.wake <- struct{}{}:
	default:
	}
}

func (b *Bus) sendLoop(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			b.flush(context.Background())
			return
		case <-b.wake:
		}
		select { // let a burst gather into one message
		case <-ctx.Done():
		case <-time.After(batchEvery):
		}
		b.flush(ctx)
	}
}

func (b *Bus) flush(ctx context.Context) {
	b.qmu.Lock()
	q := b.queue
	b.queue, b.queued = map[string][]json.RawMessage{}, 0
	b.qmu.Unlock()
	sendCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	for kind, items := range q {
		if err := b.send(sendCtx, kind, items); err != nil {
			b.mDropped.Add(float64(len(items)))
			b.log.Warn("signals to the other replicas lost", "kind", kind, "items", len(items), "err", err)
		}
	}
}

// send packs items into messages under maxPayload and notifies each.
func (b *Bus) send(ctx context.Context, kind string, items []json.RawMessage) error {
	base := len(kind) + len(b.origin) + 24
	var batch []json.RawMessage
	size := base
	var errs []error
	for _, it := range items {
		if base+len(it)+1 > maxPayload {
			errs = append(errs, fmt.Errorf("%w: a %s item of %d bytes", ErrTooLarge, kind, len(it)))
			continue
		}
		if size+len(it)+1 > maxPayload {
			errs = append(errs, b.notify(ctx, kind, batch))
			batch, size = nil, base
		}
		batch = append(batch, it)
		size += len(it) + 1
	}
	if len(batch) > 0 {
		errs = append(errs, b.notify(ctx, kind, batch))
	}
	return errors.Join(errs...)
}

// notify sends one message. It is written out rather than marshalled: the
// items are JSON already (json.Marshal would check and compact each again),
// and the origin must come first (dispatch).
func (b *Bus) notify(ctx context.Context, kind string, items []json.RawMessage) error {
	k, _ := json.Marshal(kind)
	var payload strings.Builder
	payload.Grow(len(b.head) + len(k) + 8 + len(items)*64)
	payload.WriteString(b.head)
	payload.Write(k)
	payload.WriteString(`,"i":[`)
	for i, it := range items {
		if i > 0 {
			payload.WriteByte(',')
		}
		payload.Write(it)
	}
	payload.WriteString("]}")
	if _, err := b.pool.Exec(ctx, "SELECT pg_notify($1, $2)", channel, payload.String()); err != nil {
		return fmt.Errorf("notify %s: %w", kind, err)
	}
	b.mSent.Inc()
	return nil
}
