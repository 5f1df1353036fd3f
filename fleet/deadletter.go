package fleet

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5/pgconn"
)

// writeFailure says what a failed event write means for the events in it.
type writeFailure int

const (
	// failUnavailable: the database could not take the write (unreachable,
	// restarting, overloaded, read-only, misconfigured). Every event in the
	// batch is fine; they wait in the spool until the database answers.
	failUnavailable writeFailure = iota
	// failData: PostgreSQL refused the content of some event in the batch
	// (a string it cannot store, a key too large to index, a constraint).
	// Retrying the same batch would fail forever, so the batch is split until
	// the refused events are alone, and those go to the dead letters.
	failData
)

func (f writeFailure) String() string {
	if f == failData {
		return "data"
	}
	return "unavailable"
}

// classifyWriteError decides whether a failed event write is the database's
// fault or the data's. It is pure so that every driver error has a table row.
//
// Only an error reported by the server about the statement (a *pgconn.PgError)
// can blame the data, and only when its SQLSTATE class is not one that every
// row would hit alike: connection (08), transaction state such as a read-only
// standby after a failover (25), authorization (28), missing database or
// schema (3D, 3F), serialization failure or deadlock (40), schema or privilege
// problems of the deployment (42), insufficient resources (53), lock not
// available or object in use (55), operator intervention such as an admin
// shutdown, "cannot connect now" or a statement timeout (57), system errors
// (58), configuration file errors (F0) and internal errors (XX). Dead-lettering
// on those would empty the event stream into the dead letters during an
// incident. Anything else the client reports (a refused dial, a closed pool, a
// dropped connection, a deadline) is unavailability too; so is any error this
// function does not recognise, because spooling loses nothing and shows in
// Ready, whereas a wrong dead letter would leave device_events incomplete.
func classifyWriteError(err error) writeFailure {
	var connectErr *pgconn.ConnectError
	var netErr net.Error
	switch {
	case errors.As(err, &connectErr), // wraps server errors of the handshake too (28P01, 3D000)
		errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled),
		errors.As(err, &netErr), pgconn.SafeToRetry(err), pgconn.Timeout(err),
		errors.Is(err, pgconn.ErrConnClosed), errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return failUnavailable
	}
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		return failUnavailable // e.g. puddle's "closed pool"
	}
	code := pgErr.Code
	if len(code) != 5 {
		return failUnavailable
	}
	switch code[:2] {
	case "08", "25", "28", "3D", "3F", "40", "42", "53", "55", "57", "58", "F0", "XX":
		return failUnavailable
	}
	return failData
}

// Bounds on what a refused event may cost: in the dead-letter table, and in
// one log line (an attacker choosing the device id chooses the payload).
const (
	deadLetterMaxEvent = 8 << 10
	deadLetterMaxError = 1 << 10
	logExcerpt         = 200
	// deadLetterLogEvery is how often a dead-lettered or dropped event may be
	// logged; the ones in between are counted in the next line.
	deadLetterLogEvery = time.Minute
)

// deadLetter is an event PostgreSQL refused, as event_dead_letters stores it.
type deadLetter struct {
	EventID EventID
	// Event is the event as JSON, cut at deadLetterMaxEvent bytes. It goes to a
	// bytea column: no encoding, NUL byte or size can make the insert fail.
	Event []byte
	// EventBytes is the length of the whole JSON.
	EventBytes int
	// Error is the refusal, made valid UTF-8 without NUL and cut.
	Error string
}

// newDeadLetter builds the stored form of a refused event.
func newDeadLetter(e *Event, cause error) deadLetter {
	b, err := json.Marshal(e)
	if err != nil { // not with today's fields, but the event must still be kept
		b = []byte(strconv.Quote(err.Error()))
	}
	d := deadLetter{EventID: e.ID, Event: b, EventBytes: len(b), Error: cleanText(cause.Error(), deadLetterMaxError)}
	if len(d.Event) > deadLetterMaxEvent {
		d.Event = d.Event[:deadLetterMaxEvent]
	}
	return d
}

// cleanText makes s storable in a text column and bounded: at most max bytes
// (cut on a rune boundary), valid UTF-8, NUL bytes written as \x00.
func cleanText(s string, max int) string {
	s = strings.ToValidUTF8(s, "\uFFFD")
	s = strings.ReplaceAll(s, "\x00", `\x00`)
	if len(s) <= max {
		return s
	}
	cut := max
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "…"
}

// excerpt renders the start of untrusted bytes for a log line: at most
// logExcerpt bytes, escaped as in a Go string literal (without its quotes) so
// that control characters and invalid UTF-8 cannot forge lines whatever the
// log handler; "…" marks a cut.
func excerpt(s string) string {
	cut := len(s) > logExcerpt
	if cut {
		s = s[:logExcerpt]
	}
	q := strconv.Quote(s)
	q = q[1 : len(q)-1]
	if cut {
		q += "…"
	}
	return q
}

// logEvery lets a log line through at most once per interval and counts the
// ones it held back, so that a flood of bad events costs one line a minute.
// It is used from the recorder's writer goroutine only.
type logEvery struct {
	every time.Duration
	last  time.Time
	held  int
}

// allow reports whether a line may be logged now and, if so, how many lines
// were held back since the last one.
func (l *logEvery) allow(now time.Time) (held int, ok bool) {
	if !l.last.IsZero() && now.Sub(l.last) < l.every {
		l.held++
		return 0, false
	}
	held, l.held, l.last = l.held, 0, now
	return held, true
}
