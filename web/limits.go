package web

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/fleetd/fleetd/internal/netsource"
)

// Limits bound what one HTTP client can hold: a connection it does not use,
// a request it sends slowly, a response it stops reading, live streams, and
// guesses at the admin token. Zero durations take the defaults documented on
// each field; zero caps and rates turn their limit off.
//
// There is deliberately no server-wide WriteTimeout: it would cut every
// firmware download and live stream at the same age, however well it was
// going. Responses get StallTimeout instead, which follows progress.
type Limits struct {
	// ReadHeaderTimeout bounds the request line and headers (default 10s).
	ReadHeaderTimeout time.Duration
	// IdleTimeout closes a keep-alive connection that has carried no
	// request for this long (default 60s), so idle clients do not hold file
	// descriptors the MQTT listeners need.
	IdleTimeout time.Duration
	// ReadTimeout bounds reading a whole request, body included (default
	// 30s). Firmware uploads are exempt: one may take as long as it needs,
	// as long as data keeps coming (no read waits longer than ReadTimeout).
	ReadTimeout time.Duration
	// StallTimeout ends a response whose client has taken nothing for this
	// long (default 30s): the connection is closed, and a firmware download
	// gives back its slot. A client that reads slowly keeps its response
	// however long it takes.
	StallTimeout time.Duration
	// MaxStreams and MaxStreamsPerToken cap open live streams, in all and
	// per bearer token; more get 429.
	MaxStreams, MaxStreamsPerToken int
	// AuthFailureRate (per second) and AuthFailureBurst bound wrong bearer
	// tokens per source address; past them a wrong token gets 429 instead
	// of 401. A right token is never refused.
	AuthFailureRate  float64
	AuthFailureBurst int
}

func (l Limits) withDefaults() Limits {
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&l.ReadHeaderTimeout, 10*time.Second)
	def(&l.IdleTimeout, 60*time.Second)
	def(&l.ReadTimeout, 30*time.Second)
	def(&l.StallTimeout, 30*time.Second)
	if l.AuthFailureBurst < 1 {
		l.AuthFailureBurst = 1
	}
	return l
}

// HTTPServer returns the http.Server that should serve s, with the
// connection limits of Options.Limits. ReadTimeout covers headers and body
// of every request: the firmware upload handler replaces it with a deadline
// that follows progress (uploadBody), so the default protects every route,
// including ones added later. The server clears the read deadline itself
// once a body has been read, so a long response (a download, a live stream)
// is not cut by it.
func (s *Server) HTTPServer() *http.Server {
	l := s.opts.Limits
	return &http.Server{
		Handler:           s,
		ReadHeaderTimeout: l.ReadHeaderTimeout,
		ReadTimeout:       l.ReadTimeout,
		IdleTimeout:       l.IdleTimeout,
		ErrorLog:          slog.NewLogLogger(s.opts.Logger.Handler(), slog.LevelWarn),
	}
}

// errBodyTimeout is a request body that did not arrive in time.
var errBodyTimeout = errors.New("request body not received in time")

func init() {
	RegisterError(errBodyTimeout, http.StatusRequestTimeout, "timeout")
}

// bodyTimeout makes a read deadline error name the request timeout, so that
// the client gets a 408 rather than a 400 about a "malformed" body.
func bodyTimeout(err error) error {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return fmt.Errorf("%w: %v", errBodyTimeout, err)
	}
	return err
}

// uploadBody is a request body with a read deadline that follows progress:
// each read has timeout to deliver data. It replaces the server's
// ReadTimeout for firmware uploads, which may be large and slow. Once the
// body has ended it sets no more deadlines: net/http then reads the
// connection in the background, and a deadline would cancel the request.
type uploadBody struct {
	io.ReadCloser
	rc      *http.ResponseController
	timeout time.Duration
	done    bool
}

func newUploadBody(w http.ResponseWriter, body io.ReadCloser, timeout time.Duration) *uploadBody {
	return &uploadBody{ReadCloser: body, rc: http.NewResponseController(w), timeout: timeout}
}

func (b *uploadBody) Read(p []byte) (int, error) {
	if !b.done {
		_ = b.rc.SetReadDeadline(time.Now().Add(b.timeout))
	}
	n, err := b.ReadCloser.Read(p)
	if err != nil {
		b.done = true
	}
	return n, bodyTimeout(err)
}

// stallPiece is the most a response write sends under one deadline: a
// client must take this much per StallTimeout to keep its response.
const stallPiece = 8 << 10

// stallWrites gives every response a write deadline that follows progress:
// it is pushed StallTimeout ahead before each piece of the response goes
// out, so a client that reads nothing loses its connection (and the handler
// its write, which ends it) while a slow one is served to the end.
func stallWrites(stall time.Duration) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			sw := &stallWriter{ResponseWriter: w, rc: http.NewResponseController(w), stall: stall}
			sw.refresh() // a response without a body is written after the handler
			next.ServeHTTP(sw, r)
			sw.refresh() // what is still buffered goes out after the handler returns
		})
	}
}

type stallWriter struct {
	http.ResponseWriter
	rc    *http.ResponseController
	stall time.Duration
}

func (w *stallWriter) refresh() { _ = w.rc.SetWriteDeadline(time.Now().Add(w.stall)) }

// Write sends b in pieces of stallPiece, each under a fresh deadline. It
// does not implement io.ReaderFrom on purpose: sendfile would send a whole
// image under one deadline.
func (w *stallWriter) Write(b []byte) (int, error) {
	if len(b) == 0 {
		w.refresh()
		return w.ResponseWriter.Write(b)
	}
	n := 0
	for len(b) > 0 {
		w.refresh()
		m, err := w.ResponseWriter.Write(b[:min(len(b), stallPiece)])
		n += m
		if err != nil {
			return n, err
		}
		b = b[m:]
	}
	return n, nil
}

// Flush lets streaming handlers flush, under a fresh deadline.
func (w *stallWriter) Flush() {
	w.refresh()
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func (w *stallWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// sourceOf is the unit per-source limits count, as on the MQTT side
// (netsource): the IPv4 address, or the IPv6 /64.
func sourceOf(remoteAddr string) netip.Prefix { return netsource.OfString(remoteAddr) }

// writeTooMany answers 429 with Retry-After (whole seconds, at least one)
// and the API's JSON error.
func writeTooMany(w http.ResponseWriter, retry time.Duration, msg string) {
	w.Header().Set("Retry-After", strconv.Itoa(max(1, int(math.Ceil(retry.Seconds())))))
	writeJSON(w, http.StatusTooManyRequests, errorBody{apiError{Code: "rate_limited", Message: msg}})
}

func withCredential(ctx context.Context, id string) context.Context {
	return context.WithValue(ctx, credentialKey, id)
}

// credential returns the id of the token that authenticated the request, or
// "".
func credential(ctx context.Context) string {
	id, _ := ctx.Value(credentialKey).(string)
	return id
}

// Failed authentications are counted per source in at most maxAuthSources
// buckets; past that, new sources share one. A bucket that has refilled, and
// whose source was not logged within authLogEvery, is forgotten.
const (
	maxAuthSources = 16384
	authLogEvery   = time.Minute
)

// authFailures limits wrong bearer tokens per source address with a token
// bucket each, mirroring the MQTT side: only failures are charged, so the
// right token always works, and past the limit a failure is answered 429
// instead of 401. A refused source is logged once per authLogEvery with the
// count of refusals since its previous line.
type authFailures struct {
	rate   rate.Limit
	burst  int
	max    int
	logger *slog.Logger
	now    func() time.Time

	mu      sync.Mutex
	sources map[string]*failureBucket
	shared  *failureBucket // for new sources once max are tracked
	pruned  time.Time
}

type failureBucket struct {
	lim     *rate.Limiter
	logged  time.Time
	refused int
}

// newAuthFailures returns nil (no limit) for a rate of zero or less.
func newAuthFailures(l Limits, logger *slog.Logger) *authFailures {
	if l.AuthFailureRate <= 0 {
		return nil
	}
	a := &authFailures{rate: rate.Limit(l.AuthFailureRate), burst: l.AuthFailureBurst, max: maxAuthSources,
		logger: logger, now: time.Now, sources: map[string]*failureBucket{}}
	a.shared = a.bucket()
	return a
}

func (a *authFailures) bucket() *failureBucket {
	return &failureBucket{lim: rate.NewLimiter(a.rate, a.burst)}
}

// fail charges one failed authentication to src. It reports whether src was
// still within its limit and, when not, how long until it is again.
func (a *authFailures) fail(src netip.Prefix) (bool, time.Duration) { return a.failKey(src.String()) }

// failKey charges one failure to any key (a source, a user name tried at
// sign-in).
func (a *authFailures) failKey(src string) (bool, time.Duration) {
	if a == nil {
		return true, 0
	}
	now := a.now()
	a.mu.Lock()
	defer a.mu.Unlock()
	if now.Sub(a.pruned) >= authLogEvery {
		a.prune(now)
	}
	b, who := a.sources[src], src
	if b == nil {
		if len(a.sources) >= a.max {
			a.prune(now)
		}
		if len(a.sources) < a.max {
			b = a.bucket()
			a.sources[src] = b
		} else {
			b, who = a.shared, "other addresses (too many sources tracked)"
		}
	}
	if b.lim.AllowN(now, 1) {
		return true, 0
	}
	b.refused++
	if now.Sub(b.logged) >= authLogEvery {
		a.logger.Warn("too many failed API authentications: answering 429", "source", who, "refused", b.refused,
			"rate", float64(a.rate), "burst", a.burst)
		b.logged, b.refused = now, 0
	}
	missing := 1 - b.lim.TokensAt(now)
	return false, time.Duration(missing / float64(a.rate) * float64(time.Second))
}

// blocked reports, without charging anything, whether key has no failure
// left (and how long until it has): a sign-in from there is refused before
// its password is even checked, since admitting a right password past the
// limit would let guessing go on.
func (a *authFailures) blocked(key string) (bool, time.Duration) {
	if a == nil {
		return false, 0
	}
	now := a.now()
	a.mu.Lock()
	defer a.mu.Unlock()
	b := a.sources[key]
	if b == nil && len(a.sources) >= a.max {
		b = a.shared
	}
	if b == nil {
		return false, 0
	}
	if t := b.lim.TokensAt(now); t < 1 {
		return true, time.Duration((1 - t) / float64(a.rate) * float64(time.Second))
	}
	return false, 0
}

// prune forgets buckets that have refilled: they hold no information, and
// keeping them would grow with every address ever seen.
func (a *authFailures) prune(now time.Time) {
	a.pruned = now
	for src, b := range a.sources {
		if b.lim.TokensAt(now) >= float64(a.burst) && now.Sub(b.logged) >= authLogEvery {
			delete(a.sources, src)
		}
	}
}

// tracked returns how many sources have a bucket of their own.
func (a *authFailures) tracked() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.sources)
}

// downloadSources counts concurrent firmware downloads per source address.
type downloadSources struct {
	max int // 0: no cap
	mu  sync.Mutex
	n   map[netip.Prefix]int
}

// take reports whether src may start one more download, and counts it.
func (d *downloadSources) take(src netip.Prefix) bool {
	if d.max <= 0 {
		return true
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.n[src] >= d.max {
		return false
	}
	d.n[src]++
	return true
}

func (d *downloadSources) release(src netip.Prefix) {
	if d.max <= 0 {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.n[src] <= 1 {
		delete(d.n, src)
	} else {
		d.n[src]--
	}
}
