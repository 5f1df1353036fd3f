package auth

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// Entry is one audit log record: a state-changing API request.
type Entry struct {
	ID        int64             `json:"id"`
	At        time.Time         `json:"at"`
	Principal Principal         `json:"principal"`
	Method    string            `json:"method"`
	Route     string            `json:"route"`
	Path      string            `json:"path"`
	Targets   map[string]string `json:"targets"`
	// Summary is the request body's fields with secrets redacted, bounded
	// in size (see web), or a note of what the body was (a firmware
	// image's size).
	Summary   json.RawMessage `json:"summary,omitempty"`
	Remote    string          `json:"remote"`
	RequestID string          `json:"request_id"`
	Status    int             `json:"status"`
}

// Record writes an entry.
func (s *Store) Record(ctx context.Context, e Entry) error {
	ids := make([]string, 0, len(e.Targets))
	for _, v := range e.Targets {
		ids = append(ids, v)
	}
	targets, err := json.Marshal(e.Targets)
	if err != nil {
		return err
	}
	var summary any
	if len(e.Summary) > 0 {
		summary = string(e.Summary)
	}
	_, err = s.pool.Exec(ctx, `INSERT INTO audit_log (principal_kind, principal_id, principal_name, principal_role, method, route, path,
		targets, target_ids, summary, remote, request_id, status) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::jsonb, $11, $12, $13)`,
		e.Principal.Kind, e.Principal.ID, e.Principal.Name, e.Principal.Role, e.Method, e.Route, e.Path, targets, ids, summary, e.Remote, e.RequestID, e.Status)
	if err != nil {
		return fmt.Errorf("record audit entry: %w", err)
	}
	return nil
}

// AuditQuery filters the audit log. Empty fields do not filter.
type AuditQuery struct {
	Principal string // a principal's id or name
	Method    string
	Route     string // a route pattern, e.g. /api/v1/devices/{id}
	Target    string // a path parameter's value (a device id, a campaign id)
	RequestID string
	// Outcome is "success" (status below 400), "failure" (400 and up) or
	// a status code.
	Outcome  string
	From, To time.Time
	// Before is the cursor: entries with a lower id.
	Before int64
	Limit  int
}

// CheckAuditQuery validates the parts of q that come from a client.
func CheckAuditQuery(q AuditQuery) error {
	if q.Outcome != "" && q.Outcome != "success" && q.Outcome != "failure" {
		if n, err := strconv.Atoi(q.Outcome); err != nil || n < 100 || n > 599 {
			return &ValidationError{"outcome", "must be success, failure or a status code"}
		}
	}
	if q.Method != "" && !strings.Contains(" POST PUT PATCH DELETE ", " "+q.Method+" ") {
		return &ValidationError{"method", "must be POST, PUT, PATCH or DELETE"}
	}
	for f, v := range map[string]string{"principal": q.Principal, "route": q.Route, "target": q.Target, "request_id": q.RequestID} {
		if len(v) > 256 {
			return &ValidationError{f, "longer than 256 characters"}
		}
	}
	return nil
}

func (q AuditQuery) where() (string, []any) {
	var conds []string
	var args []any
	add := func(cond string, v any) {
		args = append(args, v)
		conds = append(conds, strings.ReplaceAll(cond, "$?", "$"+strconv.Itoa(len(args))))
	}
	if q.Principal != "" {
		add(`(principal_id = $? OR principal_name = $?)`, q.Principal)
	}
	if q.Method != "" {
		add(`method = $?`, q.Method)
	}
	if q.Route != "" {
		add(`route = $?`, q.Route)
	}
	if q.Target != "" {
		add(`target_ids @> ARRAY[$?::text]`, q.Target)
	}
	if q.RequestID != "" {
		add(`request_id = $?`, q.RequestID)
	}
	switch q.Outcome {
	case "":
	case "success":
		conds = append(conds, `status < 400`)
	case "failure":
		conds = append(conds, `status >= 400`)
	default:
		n, _ := strconv.Atoi(q.Outcome)
		add(`status = $?`, n)
	}
	if !q.From.IsZero() {
		add(`at >= $?`, q.From)
	}
	if !q.To.IsZero() {
		add(`at < $?`, q.To)
	}
	if q.Before > 0 {
		add(`id < $?`, q.Before)
	}
	if len(conds) == 0 {
		return "", args
	}
	return " WHERE " + strings.Join(conds, " AND "), args
}

// Audit returns a page of entries, newest first, and the cursor of the
// next page (0 when this one is the last).
func (s *Store) Audit(ctx context.Context, q AuditQuery) ([]Entry, int64, error) {
	if q.Limit <= 0 || q.Limit > 1000 {
		q.Limit = 100
	}
	where, args := q.where()
	args = append(args, q.Limit+1)
	rows, err := s.pool.Query(ctx, `SELECT id, at, principal_kind, principal_id, principal_name, principal_role, method, route, path,
		targets, summary, remote, request_id, status FROM audit_log`+where+` ORDER BY id DESC LIMIT $`+strconv.Itoa(len(args)), args...)
	if err != nil {
		return nil, 0, err
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (Entry, error) {
		var e Entry
		var summary []byte
		err := r.Scan(&e.ID, &e.At, &e.Principal.Kind, &e.Principal.ID, &e.Principal.Name, &e.Principal.Role, &e.Method, &e.Route, &e.Path,
			&e.Targets, &summary, &e.Remote, &e.RequestID, &e.Status)
		e.Summary = summary
		return e, err
	})
	if err != nil {
		return nil, 0, err
	}
	var next int64
	if len(out) > q.Limit {
		out = out[:q.Limit]
		next = out[len(out)-1].ID
	}
	return out, next, nil
}

// EachAudit calls f for every entry q matches, newest first, reading a
// page at a time: an export of a year holds one page in memory and no
// long-running transaction.
func (s *Store) EachAudit(ctx context.Context, q AuditQuery, f func(Entry) error) error {
	q.Limit = 500
	for {
		page, next, err := s.Audit(ctx, q)
		if err != nil {
			return err
		}
		for _, e := range page {
			if err := f(e); err != nil {
				return err
			}
		}
		if next == 0 {
			return nil
		}
		q.Before = next
	}
}

// PruneAudit deletes entries older than keep, 5000 at a time.
func (s *Store) PruneAudit(ctx context.Context, keep time.Duration) (int64, error) {
	var n int64
	for {
		tag, err := s.pool.Exec(ctx, `DELETE FROM audit_log WHERE id IN (
			SELECT id FROM audit_log WHERE at < now() - $1 * interval '1 millisecond' ORDER BY id LIMIT 5000)`, keep.Milliseconds())
		if err != nil {
			return n, err
		}
		n += tag.RowsAffected()
		if tag.RowsAffected() < 5000 {
			return n, nil
		}
	}
}
