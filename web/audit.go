package web

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/go-chi/chi/v5"

	"github.com/fleetd/fleetd/auth"
)

// What the audit log keeps of a request body: at most auditCapture bytes
// are looked at; the summary is at most auditSummaryMax bytes of JSON.
const (
	auditCapture    = 64 << 10
	auditSummaryMax = 4 << 10
	auditStringMax  = 200
	auditListMax    = 20
	auditDepthMax   = 4
)

type auditNoteKey struct{}

// auditNote is filled in while a request is served: the principal once
// known (for a failed sign-in, the name tried).
type auditNote struct {
	principal auth.Principal
}

func auditNoteOf(ctx context.Context) *auditNote {
	n, _ := ctx.Value(auditNoteKey{}).(*auditNote)
	return n
}

// captureBody keeps the first auditCapture bytes of a JSON body as the
// handler reads it, and counts the rest; a body of another type (a
// firmware image) is only counted, never kept.
type captureBody struct {
	io.ReadCloser
	keep bool
	buf  bytes.Buffer
	n    int64
}

func (c *captureBody) Read(p []byte) (int, error) {
	n, err := c.ReadCloser.Read(p)
	c.n += int64(n)
	if c.keep && c.buf.Len() < auditCapture {
		c.buf.Write(p[:min(n, auditCapture-c.buf.Len())])
	}
	return n, err
}

// recordAudit writes every state-changing request (POST, PUT, PATCH,
// DELETE) to the audit log after its handler, refused ones included, with
// the principal, the route pattern, the path parameters, a summary of the
// body, the source, the request id and the status. It is written in the
// request's path, before the response is flushed: a client that got an
// answer has its entry, and nothing queues in memory however many
// requests come (each waits for its own row). A failed write is logged
// with the whole entry and counted (fleetd_audit_write_failures_total).
// Requests that authenticate as nobody are not recorded (they changed
// nothing and anyone could fill the log with them), except sign-ins.
func (s *Server) recordAudit(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		accounts := s.accountStore()
		if safeMethod(r.Method) || accounts == nil {
			next.ServeHTTP(w, r)
			return
		}
		note := &auditNote{}
		if p, ok := PrincipalOf(r.Context()); ok {
			note.principal = p
		}
		body := &captureBody{ReadCloser: r.Body, keep: strings.Contains(r.Header.Get("Content-Type"), "json") || r.Header.Get("Content-Type") == ""}
		r.Body = body
		rec := &statusRecorder{ResponseWriter: w}
		r = r.WithContext(context.WithValue(r.Context(), auditNoteKey{}, note))
		write := func(status int) {
			if note.principal.Kind == "" {
				return
			}
			if status == 0 {
				status = http.StatusOK
			}
			e := auth.Entry{
				Principal: note.principal, Method: r.Method, Route: strings.TrimSuffix(chi.RouteContext(r.Context()).RoutePattern(), "/"),
				Path: r.URL.Path, Targets: map[string]string{}, Remote: r.RemoteAddr, RequestID: RequestID(r.Context()), Status: status,
			}
			rc := chi.RouteContext(r.Context())
			for i, k := range rc.URLParams.Keys {
				if k != "*" && i < len(rc.URLParams.Values) {
					e.Targets[k] = truncate(rc.URLParams.Values[i])
				}
			}
			e.Summary = summarize(r, body)
			ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), 5*time.Second)
			defer cancel()
			if err := accounts.Record(ctx, e); err != nil {
				s.auditFailures.Inc()
				s.opts.Logger.ErrorContext(ctx, "audit entry not written", "err", err, "request_id", e.RequestID,
					"principal_kind", e.Principal.Kind, "principal_id", e.Principal.ID, "principal_name", e.Principal.Name,
					"method", e.Method, "route", e.Route, "path", e.Path, "status", e.Status, "remote", e.Remote)
			}
		}
		// A handler that panics is recorded as the 500 recoverer answers.
		defer func() {
			if v := recover(); v != nil {
				write(http.StatusInternalServerError)
				panic(v)
			}
		}()
		next.ServeHTTP(rec, r)
		write(rec.status)
	})
}

// summarize describes a request body for the audit log: its JSON fields
// with secrets redacted and long values cut, or, for any other body, its
// size and type (and the query string, which says what a firmware upload
// was: its version and models).
func summarize(r *http.Request, body *captureBody) json.RawMessage {
	out := map[string]any{}
	if q := r.URL.Query(); len(q) > 0 {
		qs := map[string]any{}
		for k, v := range q {
			qs[k] = redact(k, strings.Join(v, ","), 1)
		}
		out["query"] = qs
	}
	switch {
	case body.n == 0:
	case !body.keep:
		out["body"] = map[string]any{"bytes": body.n, "content_type": truncate(r.Header.Get("Content-Type"))}
	case int64(body.buf.Len()) < body.n:
		out["body"] = map[string]any{"bytes": body.n, "truncated": true}
	default:
		var v any
		if err := json.Unmarshal(body.buf.Bytes(), &v); err != nil {
			out["body"] = map[string]any{"bytes": body.n, "malformed": true}
		} else {
			out["body"] = redact("", v, 0)
		}
	}
	if len(out) == 0 {
		return nil
	}
	b, _ := json.Marshal(out)
	if len(b) > auditSummaryMax {
		fields := []string{}
		if m, ok := out["body"].(map[string]any); ok {
			for k := range m {
				fields = append(fields, truncate(k))
			}
			sort.Strings(fields)
			fields = fields[:min(len(fields), 50)]
		}
		b, _ = json.Marshal(map[string]any{"truncated": true, "bytes": body.n, "fields": fields})
	}
	return b
}

// secretWords mark a field whose value is never recorded.
var secretWords = []string{"password", "token", "secret", "signature", "private", "credential", "authorization", "cookie", "csrf", "passphrase", "sig"}

func isSecret(key string) bool {
	k := strings.ToLower(key)
	if k == "key" {
		return true
	}
	for _, w := range secretWords {
		if strings.Contains(k, w) {
			return true
		}
	}
	return false
}

// redact copies v with secret fields replaced by "[redacted]", strings
// cut to auditStringMax, lists to auditListMax and nesting to
// auditDepthMax.
func redact(key string, v any, depth int) any {
	if key != "" && isSecret(key) {
		return "[redacted]"
	}
	switch t := v.(type) {
	case string:
		return truncate(t)
	case map[string]any:
		if depth >= auditDepthMax {
			return "[…]"
		}
		m := make(map[string]any, len(t))
		for k, x := range t {
			m[truncate(k)] = redact(k, x, depth+1)
		}
		return m
	case []any:
		if depth >= auditDepthMax {
			return "[…]"
		}
		n := min(len(t), auditListMax)
		l := make([]any, 0, n+1)
		for _, x := range t[:n] {
			l = append(l, redact("", x, depth+1))
		}
		if len(t) > n {
			l = append(l, strconv.Itoa(len(t)-n)+" more")
		}
		return l
	}
	return v
}

func truncate(s string) string {
	if len(s) <= auditStringMax {
		return s
	}
	cut := auditStringMax
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "…"
}

// audit is GET /audit: entries newest first, filtered by principal (id or
// name), method, route (pattern), target (a path parameter's value),
// request_id, outcome (success, failure or a status), from and to
// (RFC 3339), paged with cursor and limit (1-1000, default 100); with
// format=jsonl every matching entry is streamed as JSON lines.
func (s *Server) audit(w http.ResponseWriter, r *http.Request, a Accounts) {
	q := r.URL.Query()
	aq := auth.AuditQuery{Principal: q.Get("principal"), Method: strings.ToUpper(q.Get("method")), Route: q.Get("route"),
		Target: q.Get("target"), RequestID: q.Get("request_id"), Outcome: q.Get("outcome")}
	fail := func(err error) { writeError(w, r, s.opts.Logger, err) }
	for _, f := range []struct {
		name string
		to   *time.Time
	}{{"from", &aq.From}, {"to", &aq.To}} {
		if v := q.Get(f.name); v != "" {
			t, err := time.Parse(time.RFC3339, v)
			if err != nil {
				fail(BadRequest(f.name, f.name+" must be an RFC 3339 time"))
				return
			}
			*f.to = t
		}
	}
	if v := q.Get("cursor"); v != "" {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n <= 0 {
			fail(BadRequest("cursor", "cursor must be a next_cursor from a previous page"))
			return
		}
		aq.Before = n
	}
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 1000 {
			fail(BadRequest("limit", "limit must be 1 to 1000"))
			return
		}
		aq.Limit = n
	}
	if err := auth.CheckAuditQuery(aq); err != nil {
		fail(err)
		return
	}
	switch q.Get("format") {
	case "", "json":
	case "jsonl":
		w.Header().Set("Content-Type", "application/x-ndjson")
		w.WriteHeader(http.StatusOK)
		enc := json.NewEncoder(w)
		enc.SetEscapeHTML(false)
		flusher, _ := w.(http.Flusher)
		n := 0
		err := a.EachAudit(r.Context(), aq, func(e auth.Entry) error {
			if err := enc.Encode(e); err != nil {
				return err
			}
			if n++; n%200 == 0 && flusher != nil {
				flusher.Flush()
			}
			return nil
		})
		if err != nil && r.Context().Err() == nil {
			s.opts.Logger.WarnContext(r.Context(), "audit export ended early", "err", err, "request_id", RequestID(r.Context()))
		}
		return
	default:
		fail(BadRequest("format", "format must be json or jsonl"))
		return
	}
	entries, next, err := a.Audit(r.Context(), aq)
	if err != nil {
		fail(err)
		return
	}
	if entries == nil {
		entries = []auth.Entry{}
	}
	cursor := ""
	if next > 0 {
		cursor = strconv.FormatInt(next, 10)
	}
	writeJSON(w, http.StatusOK, map[string]any{"entries": entries, "next_cursor": cursor})
}
