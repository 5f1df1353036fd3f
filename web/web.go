// Package web serves fleetd's HTTP surface: health and readiness probes,
// Prometheus metrics and the REST API under /api/v1 (the bootstrap token,
// API keys or a console session, each route with the role it needs).
package web

import (
	"context"
	"crypto/sha256"
	"log/slog"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-chi/chi/v5"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Check is one readiness condition: the database answers, a listener is up.
type Check struct {
	Name  string
	Check func(ctx context.Context) error
}

// Options are the dependencies of the HTTP handler.
type Options struct {
	// AdminToken is the bootstrap (break-glass) credential: role admin.
	// Empty: none.
	AdminToken string
	// SecureCookies marks the session cookie Secure even on plain HTTP
	// requests: set it when the public URL is https (TLS ends at a proxy).
	// A request that came over TLS always gets a Secure cookie.
	SecureCookies bool
	Logger        *slog.Logger
	// Registry gathers /metrics and receives the HTTP metrics.
	Registry *prometheus.Registry
	// Version is reported by GET /api/v1/server.
	Version string
	// Node names this fleetd replica.
	Node string
	// Limits bound what one HTTP client can hold (see Limits).
	Limits Limits
}

// Server is the HTTP handler. Readiness checks and API routes are added by
// the components as they start, so /healthz answers while the database is
// still starting and /readyz tells what is missing. Each Mount builds a new
// router and swaps it in whole: chi's route tree must not change while it
// serves.
type Server struct {
	opts    Options
	metrics *httpMetrics
	router  atomic.Pointer[chi.Mux]
	mounts  []func(public, api chi.Router)
	console http.Handler
	started time.Time
	// fails counts wrong bearer tokens and failed sign-ins per source (nil:
	// no limit); nameFails failed sign-ins per user name tried.
	fails, nameFails *authFailures
	bootstrapDigest  [32]byte
	accounts         atomic.Pointer[Accounts]
	auditFailures    prometheus.Counter

	mu     sync.Mutex
	checks []Check
}

// New builds the handler.
func New(opts Options) *Server {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Registry == nil {
		opts.Registry = prometheus.NewRegistry()
	}
	opts.Limits = opts.Limits.withDefaults()
	s := &Server{opts: opts, started: time.Now(), metrics: newHTTPMetrics(opts.Registry), console: ConsoleHandler(),
		fails:           newAuthFailures(opts.Limits, opts.Logger),
		nameFails:       newAuthFailures(Limits{AuthFailureRate: signInNameRate, AuthFailureBurst: signInNameBurst}, opts.Logger),
		bootstrapDigest: sha256.Sum256([]byte(opts.AdminToken)),
		auditFailures: prometheus.NewCounter(prometheus.CounterOpts{Name: "fleetd_audit_write_failures_total",
			Help: "State-changing API requests whose audit entry could not be written (each is logged in full)."}),
	}
	opts.Registry.MustRegister(s.auditFailures)
	s.mount(func(_, api chi.Router) { api.Get("/server", s.serverInfo) })
	return s
}

// mount adds routes and swaps in a router that has them. public routes do
// their own authorisation (signed firmware URLs, signing in); api routes
// need a principal (authenticate) whose role is the route's (authorize,
// routeRoles). Both are audited (recordAudit) when they change state; on
// api routes the audit wraps authorize, so refusals are recorded too.
func (s *Server) mount(f func(public, api chi.Router)) {
	s.mounts = append(s.mounts, f)
	r := chi.NewRouter()
	r.Use(requestID, accessLog(s.opts.Logger, s.metrics), recoverer(s.opts.Logger), stallWrites(s.opts.Limits.StallTimeout))
	notFound := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusNotFound, errorBody{apiError{Code: "not_found", Message: "no such endpoint: " + r.URL.Path}})
	})
	r.NotFound(notFound)
	r.MethodNotAllowed(func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusMethodNotAllowed, errorBody{apiError{Code: "method_not_allowed", Message: r.Method + " is not allowed on " + r.URL.Path}})
	})
	r.Get("/healthz", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	r.Get("/readyz", s.readyz)
	r.Method(http.MethodGet, "/metrics", promhttp.HandlerFor(s.opts.Registry, promhttp.HandlerOpts{Registry: s.opts.Registry}))
	// The web console: static assets, and index.html for its own routes.
	r.Handle("/*", s.console)
	r.Route("/api/v1", func(v1 chi.Router) {
		// Unknown API paths ask for a credential first: they do not reveal
		// which endpoints exist.
		v1.NotFound(s.requireAuthn(notFound).ServeHTTP)
		v1.Group(func(public chi.Router) {
			public.Use(s.recordAudit)
			v1.Group(func(api chi.Router) {
				api.Use(s.requireAuthn, s.recordAudit, s.authorize)
				for _, m := range s.mounts {
					m(public, api)
				}
			})
		})
	})
	s.router.Store(r)
}

// ServeHTTP implements http.Handler.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) { s.router.Load().ServeHTTP(w, r) }

// AddCheck adds a readiness condition.
func (s *Server) AddCheck(c Check) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.checks = append(s.checks, c)
}

type readiness struct {
	Status string            `json:"status"`
	Checks map[string]string `json:"checks"`
}

// readyz runs every check with a short deadline: a load balancer polls this,
// and a hung database must turn into a 503, not a hung probe.
func (s *Server) readyz(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	checks := append([]Check(nil), s.checks...)
	s.mu.Unlock()
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
	defer cancel()
	res := readiness{Status: "ready", Checks: map[string]string{}}
	if len(checks) == 0 {
		res.Status = "not ready"
		res.Checks["startup"] = "starting"
	}
	type result struct {
		name string
		err  error
	}
	results := make(chan result, len(checks))
	for _, c := range checks {
		go func() { results <- result{c.Name, c.Check(ctx)} }()
	}
	for range checks {
		res2 := <-results
		if res2.err != nil {
			res.Status = "not ready"
			res.Checks[res2.name] = res2.err.Error()
		} else {
			res.Checks[res2.name] = "ok"
		}
	}
	status := http.StatusOK
	if res.Status != "ready" {
		status = http.StatusServiceUnavailable
	}
	writeJSON(w, status, res)
}

func (s *Server) serverInfo(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, map[string]any{
		"version":    s.opts.Version,
		"node":       s.opts.Node,
		"started_at": s.started.UTC().Format(time.RFC3339),
	})
}
