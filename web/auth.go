package web

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/fleetd/fleetd/auth"
)

// SessionCookie names the console's session cookie; CSRFHeader carries the
// session's CSRF token on every state-changing request the cookie
// authenticates.
const (
	SessionCookie = "fleetd_session"
	CSRFHeader    = "X-CSRF-Token"
)

// Accounts is what authentication, the account endpoints and the audit
// log need (auth.Store). Calls on one user or key return errors wrapping
// auth.ErrNotFound; validation errors are *auth.ValidationError.
type Accounts interface {
	SignIn(ctx context.Context, name, password, remote string) (auth.Session, error)
	SessionByToken(ctx context.Context, token string) (auth.Session, error)
	SignOut(ctx context.Context, token string) error
	KeyByToken(ctx context.Context, token string) (auth.Principal, error)

	CreateUser(ctx context.Context, n auth.NewUser, by auth.Principal) (auth.User, error)
	Users(ctx context.Context) ([]auth.User, error)
	User(ctx context.Context, id string) (auth.User, error)
	UpdateUser(ctx context.Context, id string, p auth.UserPatch, bootstrap bool) (auth.User, error)
	DeleteUser(ctx context.Context, id string, bootstrap bool) error

	CreateKey(ctx context.Context, n auth.NewKey, by auth.Principal) (auth.Key, string, error)
	Keys(ctx context.Context) ([]auth.Key, error)
	RevokeKey(ctx context.Context, id string) (auth.Key, error)

	Record(ctx context.Context, e auth.Entry) error
	Audit(ctx context.Context, q auth.AuditQuery) ([]auth.Entry, int64, error)
	EachAudit(ctx context.Context, q auth.AuditQuery, f func(auth.Entry) error) error
}

func init() {
	RegisterError(auth.ErrNotFound, http.StatusNotFound, "not_found")
	RegisterError(auth.ErrConflict, http.StatusConflict, "conflict")
	RegisterError(auth.ErrLastAdmin, http.StatusConflict, "last_admin")
	RegisterError(auth.ErrForbidden, http.StatusForbidden, "forbidden")
}

type principalKey struct{}

// authn is what authenticated a request.
type authn struct {
	principal auth.Principal
	session   *auth.Session // set when the session cookie did
}

func withAuthn(ctx context.Context, a authn) context.Context {
	ctx = context.WithValue(ctx, principalKey{}, a)
	return withCredential(ctx, a.principal.Kind+":"+a.principal.ID)
}

// PrincipalOf returns who made the request, and false before
// authentication (or on a public route).
func PrincipalOf(ctx context.Context) (auth.Principal, bool) {
	a, ok := ctx.Value(principalKey{}).(authn)
	return a.principal, ok
}

func sessionOf(ctx context.Context) *auth.Session {
	a, _ := ctx.Value(principalKey{}).(authn)
	return a.session
}

// accountStore returns the mounted Accounts, or nil before the database is up
// (when only the bootstrap token authenticates).
func (s *Server) accountStore() Accounts {
	if a := s.accounts.Load(); a != nil {
		return *a
	}
	return nil
}

func unauthorized(w http.ResponseWriter, msg string) {
	w.Header().Set("WWW-Authenticate", `Bearer realm="fleetd"`)
	writeJSON(w, http.StatusUnauthorized, errorBody{apiError{Code: "unauthorized", Message: msg}})
}

// authenticate finds the request's principal: "Authorization: Bearer" with
// the bootstrap token or an API key, else the session cookie. It answers
// 401 (or 429 past the source's failure limit) itself and returns false
// when there is none. The bootstrap token is compared over SHA-256 digests,
// in constant time whatever the presented token; API keys and sessions are
// read from the database on every request, so a revocation or sign-out on
// any replica holds here at once.
func (s *Server) authenticate(w http.ResponseWriter, r *http.Request) (authn, bool) {
	const prefix = "Bearer "
	h := r.Header.Get("Authorization")
	accounts := s.accountStore()
	if h != "" {
		if len(h) > len(prefix) && (h[:len(prefix)] == prefix || h[:len(prefix)] == "bearer ") {
			tok := h[len(prefix):]
			got := sha256.Sum256([]byte(tok))
			if s.opts.AdminToken != "" && subtle.ConstantTimeCompare(got[:], s.bootstrapDigest[:]) == 1 {
				return authn{principal: auth.Bootstrap}, true
			}
			if accounts != nil && auth.LooksLikeKey(tok) {
				p, err := accounts.KeyByToken(r.Context(), tok)
				if err == nil {
					return authn{principal: p}, true
				}
				if !errors.Is(err, auth.ErrUnauthenticated) {
					writeError(w, r, s.opts.Logger, err)
					return authn{}, false
				}
			}
		}
		if within, retry := s.fails.fail(sourceOf(r.RemoteAddr)); !within {
			writeTooMany(w, retry, "too many failed authentications from this address; retry later")
			return authn{}, false
		}
		unauthorized(w, "invalid bearer token (wrong, expired or revoked)")
		return authn{}, false
	}
	if c, err := r.Cookie(SessionCookie); err == nil && c.Value != "" && accounts != nil {
		sess, err := accounts.SessionByToken(r.Context(), c.Value)
		if err == nil {
			return authn{principal: sess.Principal, session: &sess}, true
		}
		if !errors.Is(err, auth.ErrUnauthenticated) {
			writeError(w, r, s.opts.Logger, err)
			return authn{}, false
		}
		s.clearCookie(w, r)
		unauthorized(w, "console session expired or signed out: sign in again")
		return authn{}, false
	}
	unauthorized(w, "missing bearer token or session cookie")
	return authn{}, false
}

// requireAuthn is middleware around authenticate: it records the principal
// in the request context (PrincipalOf) and answers 401 or 429 itself.
func (s *Server) requireAuthn(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		a, ok := s.authenticate(w, r)
		if !ok {
			return
		}
		if n := auditNoteOf(r.Context()); n != nil {
			n.principal = a.principal
		}
		next.ServeHTTP(w, r.WithContext(withAuthn(r.Context(), a)))
	})
}

func safeMethod(m string) bool {
	return m == http.MethodGet || m == http.MethodHead || m == http.MethodOptions
}

func forbidden(w http.ResponseWriter, code, msg string) {
	writeJSON(w, http.StatusForbidden, errorBody{apiError{Code: code, Message: msg}})
}

// authorize refuses, with 403, a state change that the session cookie
// authenticated without the session's CSRF token in X-CSRF-Token (a
// bearer token is no ambient credential: a cross-site page cannot send
// one), a route that declares no role (fail closed), and a principal whose
// role is below the route's.
func (s *Server) authorize(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		a, _ := r.Context().Value(principalKey{}).(authn)
		if a.session != nil && !safeMethod(r.Method) {
			got := r.Header.Get(CSRFHeader)
			if got == "" || subtle.ConstantTimeCompare([]byte(got), []byte(a.session.CSRF)) != 1 {
				forbidden(w, "csrf", "missing or wrong "+CSRFHeader+" header: a change made with the console's session cookie must carry its CSRF token")
				return
			}
		}
		need, ok := roleFor(r)
		if !ok {
			s.opts.Logger.ErrorContext(r.Context(), "route declares no role: refused", "route", routeKey(r), "request_id", RequestID(r.Context()))
			forbidden(w, "forbidden", routeKey(r)+" declares no role, so nobody may use it")
			return
		}
		if !a.principal.Role.Allows(need) {
			forbidden(w, "forbidden", r.Method+" "+strings.TrimSuffix(chi.RouteContext(r.Context()).RoutePattern(), "/")+" needs the "+string(need)+" role")
			return
		}
		next.ServeHTTP(w, r)
	})
}

// actor names the principal in campaign history and webhooks:
// "user alice@10.0.0.7 (request 3f2a…)". The request id finds the audit
// entry (GET /api/v1/audit?request_id=).
func actor(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		host = r.RemoteAddr
	}
	p, ok := PrincipalOf(r.Context())
	if !ok {
		p = auth.Principal{Kind: auth.KindAnonymous, Name: "anonymous"}
	}
	return p.Kind + " " + p.Name + "@" + host + " (request " + RequestID(r.Context()) + ")"
}

func (s *Server) setCookie(w http.ResponseWriter, r *http.Request, value string, expires time.Time) {
	c := &http.Cookie{Name: SessionCookie, Value: value, Path: "/", HttpOnly: true, SameSite: http.SameSiteStrictMode,
		Secure: r.TLS != nil || s.opts.SecureCookies}
	if value == "" {
		c.MaxAge = -1
	} else {
		c.Expires = expires
	}
	http.SetCookie(w, c)
}

func (s *Server) clearCookie(w http.ResponseWriter, r *http.Request) {
	s.setCookie(w, r, "", time.Time{})
}

// Sign-in failures per user name tried: 5 in a row, then one every 20 s.
// They are counted per replica, like the per-source limit.
const (
	signInNameBurst = 5
	signInNameRate  = 1.0 / 20
)

type signInRequest struct {
	Name     string `json:"name"`
	Password string `json:"password"`
}

type sessionResponse struct {
	Principal auth.Principal `json:"principal"`
	CSRFToken string         `json:"csrf_token,omitempty"`
	ExpiresAt *time.Time     `json:"expires_at,omitempty"`
}

// signIn is POST /session. Past the failure limit of the source address
// or of the name tried it answers 429 with Retry-After before checking the
// password (so guessing cannot go on past it); an unknown name, a wrong
// password and a disabled user are one 401 after the same argon2 work.
func (s *Server) signIn(w http.ResponseWriter, r *http.Request) {
	accounts := s.accountStore()
	note := auditNoteOf(r.Context())
	if note != nil {
		note.principal = auth.Principal{Kind: auth.KindAnonymous}
	}
	var req signInRequest
	if err := decodeJSON(r, &req); err != nil {
		writeError(w, r, s.opts.Logger, err)
		return
	}
	if note != nil {
		note.principal.Name = truncate(req.Name)
	}
	switch {
	case req.Name == "":
		writeError(w, r, s.opts.Logger, BadRequest("name", "name is required"))
		return
	case len(req.Name) > 64:
		writeError(w, r, s.opts.Logger, BadRequest("name", "name is longer than 64 characters"))
		return
	case req.Password == "":
		writeError(w, r, s.opts.Logger, BadRequest("password", "password is required"))
		return
	case len(req.Password) > auth.MaxPassword:
		writeError(w, r, s.opts.Logger, BadRequest("password", fmt.Sprintf("password is longer than %d bytes", auth.MaxPassword)))
		return
	}
	src, name := sourceOf(r.RemoteAddr).String(), strings.ToLower(req.Name)
	if blocked, retry := s.fails.blocked(src); blocked {
		writeTooMany(w, retry, "too many failed sign-ins from this address; retry later")
		return
	}
	if blocked, retry := s.nameFails.blocked(name); blocked {
		writeTooMany(w, retry, "too many failed sign-ins for this name; retry later")
		return
	}
	sess, err := accounts.SignIn(r.Context(), req.Name, req.Password, r.RemoteAddr)
	if errors.Is(err, auth.ErrUnauthenticated) {
		s.fails.failKey(src)
		s.nameFails.failKey(name)
		writeJSON(w, http.StatusUnauthorized, errorBody{apiError{Code: "unauthorized", Message: "wrong name or password"}})
		return
	}
	if err != nil {
		writeError(w, r, s.opts.Logger, err)
		return
	}
	if note != nil {
		note.principal = sess.Principal
	}
	s.setCookie(w, r, sess.Token, sess.ExpiresAt)
	writeJSON(w, http.StatusOK, sessionResponse{Principal: sess.Principal, CSRFToken: sess.CSRF, ExpiresAt: &sess.ExpiresAt})
}

// MountAccounts adds sign-in and sign-out (POST and DELETE /session),
// GET /me, the users (admin: GET and POST /users, GET, PATCH and DELETE
// /users/{id}), API keys (admin: GET and POST /keys, DELETE /keys/{id})
// and the audit log (admin: GET /audit). From then on API keys and
// session cookies authenticate, and every state-changing request is
// written to the audit log.
func (s *Server) MountAccounts(a Accounts) {
	s.accounts.Store(&a)
	fail := func(w http.ResponseWriter, r *http.Request, err error) { writeError(w, r, s.opts.Logger, err) }
	bootstrap := s.opts.AdminToken != ""
	s.mount(func(public, api chi.Router) {
		public.Post("/session", s.signIn)
		api.Delete("/session", func(w http.ResponseWriter, r *http.Request) {
			if sess := sessionOf(r.Context()); sess != nil {
				if err := a.SignOut(r.Context(), sess.Token); err != nil {
					fail(w, r, err)
					return
				}
			}
			s.clearCookie(w, r)
			w.WriteHeader(http.StatusNoContent)
		})
		api.Get("/me", func(w http.ResponseWriter, r *http.Request) {
			p, _ := PrincipalOf(r.Context())
			res := sessionResponse{Principal: p}
			if sess := sessionOf(r.Context()); sess != nil {
				res.CSRFToken, res.ExpiresAt = sess.CSRF, &sess.ExpiresAt
			}
			writeJSON(w, http.StatusOK, res)
		})
		api.Get("/users", func(w http.ResponseWriter, r *http.Request) {
			us, err := a.Users(r.Context())
			if err != nil {
				fail(w, r, err)
				return
			}
			if us == nil {
				us = []auth.User{}
			}
			writeJSON(w, http.StatusOK, map[string]any{"users": us})
		})
		api.Post("/users", func(w http.ResponseWriter, r *http.Request) {
			var n auth.NewUser
			if err := decodeJSON(r, &n); err != nil {
				fail(w, r, err)
				return
			}
			p, _ := PrincipalOf(r.Context())
			u, err := a.CreateUser(r.Context(), n, p)
			if err != nil {
				fail(w, r, err)
				return
			}
			w.Header().Set("Location", "/api/v1/users/"+u.ID)
			writeJSON(w, http.StatusCreated, u)
		})
		api.Get("/users/{id}", func(w http.ResponseWriter, r *http.Request) {
			u, err := a.User(r.Context(), chi.URLParam(r, "id"))
			if err != nil {
				fail(w, r, err)
				return
			}
			writeJSON(w, http.StatusOK, u)
		})
		api.Patch("/users/{id}", func(w http.ResponseWriter, r *http.Request) {
			var p auth.UserPatch
			if err := decodeJSON(r, &p); err != nil {
				fail(w, r, err)
				return
			}
			u, err := a.UpdateUser(r.Context(), chi.URLParam(r, "id"), p, bootstrap)
			if err != nil {
				fail(w, r, err)
				return
			}
			writeJSON(w, http.StatusOK, u)
		})
		api.Delete("/users/{id}", func(w http.ResponseWriter, r *http.Request) {
			if err := a.DeleteUser(r.Context(), chi.URLParam(r, "id"), bootstrap); err != nil {
				fail(w, r, err)
				return
			}
			w.WriteHeader(http.StatusNoContent)
		})
		api.Get("/keys", func(w http.ResponseWriter, r *http.Request) {
			ks, err := a.Keys(r.Context())
			if err != nil {
				fail(w, r, err)
				return
			}
			if ks == nil {
				ks = []auth.Key{}
			}
			writeJSON(w, http.StatusOK, map[string]any{"keys": ks})
		})
		api.Post("/keys", func(w http.ResponseWriter, r *http.Request) {
			var req struct {
				Name      string     `json:"name"`
				Role      auth.Role  `json:"role"`
				ExpiresAt *time.Time `json:"expires_at"`
				ExpiresIn string     `json:"expires_in"`
			}
			if err := decodeJSON(r, &req); err != nil {
				fail(w, r, err)
				return
			}
			n := auth.NewKey{Name: req.Name, Role: req.Role, ExpiresAt: req.ExpiresAt}
			if req.ExpiresIn != "" {
				if req.ExpiresAt != nil {
					fail(w, r, BadRequest("expires_in", "give expires_at or expires_in, not both"))
					return
				}
				d, err := parseLifetime(req.ExpiresIn)
				if err != nil {
					fail(w, r, BadRequest("expires_in", err.Error()))
					return
				}
				at := time.Now().Add(d).UTC()
				n.ExpiresAt = &at
			}
			p, _ := PrincipalOf(r.Context())
			k, token, err := a.CreateKey(r.Context(), n, p)
			if err != nil {
				fail(w, r, err)
				return
			}
			w.Header().Set("Location", "/api/v1/keys/"+k.ID)
			writeJSON(w, http.StatusCreated, struct {
				auth.Key
				Token string `json:"token"`
			}{k, token})
		})
		api.Delete("/keys/{id}", func(w http.ResponseWriter, r *http.Request) {
			k, err := a.RevokeKey(r.Context(), chi.URLParam(r, "id"))
			if err != nil {
				fail(w, r, err)
				return
			}
			writeJSON(w, http.StatusOK, k)
		})
		api.Get("/audit", func(w http.ResponseWriter, r *http.Request) { s.audit(w, r, a) })
	})
}

// parseLifetime reads a key's lifetime: a Go duration ("720h") or whole
// days ("30d"), from one minute to ten years.
func parseLifetime(v string) (time.Duration, error) {
	var d time.Duration
	if days, ok := strings.CutSuffix(v, "d"); ok {
		n, err := strconv.Atoi(days)
		if err != nil {
			return 0, errors.New("must be a duration such as 720h or 30d")
		}
		d = time.Duration(n) * 24 * time.Hour
	} else {
		var err error
		if d, err = time.ParseDuration(v); err != nil {
			return 0, errors.New("must be a duration such as 720h or 30d")
		}
	}
	if d < time.Minute || d > 10*365*24*time.Hour {
		return 0, errors.New("must be between 1m and 3650d")
	}
	return d, nil
}
