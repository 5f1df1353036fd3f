package firmware

import (
	"context"
	"log/slog"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/fleetd/fleetd/fleet"
)

// Fleet is what campaigns need from the device registry.
type Fleet interface {
	Candidates(ctx context.Context, models, tags []string, incompatibleOnly bool) ([]fleet.Candidate, error)
	JudgeFirmware(model, version string) []fleet.Incompatibility
}

// Sender delivers jobs to devices (the broker).
type Sender interface {
	Send(deviceID, sub string, payload []byte) error
	// Listening reports whether the device has a live session subscribed to
	// devices/{id}/{sub}.
	Listening(deviceID, sub string) bool
}

// Campaigns runs staged OTA campaigns. State lives in PostgreSQL: a restart
// (or another replica) resumes every campaign where it was; each job row is
// dispatched once, and its job is sent again only to a device that has not
// reported on it yet.
//
// The work is split by job: the campaign store and its queries
// (store.go), operator actions (act.go), the scheduler that steps campaigns
// and delivers jobs (scheduler.go), and what devices send and receive
// (device.go). Decisions are pure functions: Campaign.Next and Transition.
type Campaigns struct {
	pool      *pgxpool.Pool
	artifacts *Artifacts
	fleet     Fleet
	send      Sender
	publicURL string
	logger    *slog.Logger
	// now is the dispatcher's one clock: pacing, timeouts, dispatch,
	// delivery and finish times all read it, so that tests drive time.
	now      func() time.Time
	notes    *noteQueue
	onChange func(campaignID string)
	// followEvery is how often a following campaign looks for devices
	// that start matching it (SetFollowInterval).
	followEvery time.Duration
	followBatch int
	// deltaWait is DeltaOptions.Wait.
	deltaWait time.Duration
}

// NewCampaigns builds the campaign service. publicURL is the base URL
// devices download firmware from.
func NewCampaigns(pool *pgxpool.Pool, artifacts *Artifacts, fl Fleet, send Sender, publicURL string, logger *slog.Logger) *Campaigns {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	return &Campaigns{pool: pool, artifacts: artifacts, fleet: fl, send: send, publicURL: strings.TrimRight(publicURL, "/"),
		logger: logger, now: time.Now, notes: newNoteQueue(), onChange: func(string) {}, followEvery: DefaultFollowInterval, followBatch: followBatch, deltaWait: DefaultDeltaWait}
}

// SetDeltaOptions sets how long dispatch waits for a pending delta
// (DeltaOptions.Wait). Call before Run.
func (c *Campaigns) SetDeltaOptions(o DeltaOptions) { c.deltaWait = o.withDefaults().Wait }

// OnChange registers f to be called, after the commit, with the id of every
// campaign whose state, counts or history changed, so that live views are
// told instead of polling. f must not block. Call before Run.
func (c *Campaigns) OnChange(f func(campaignID string)) { c.onChange = f }

// querier is what reads need: a transaction or the pool.
type querier interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
}

// Job kinds: every selected device has a forward job; a rollback gives the
// devices it sends back a rollback job.
const (
	kindForward  = "forward"
	kindRollback = "rollback"
)

// inFlight are the job states between dispatch and an outcome; they can
// time out.
var inFlight = []string{"dispatched", "downloading", "verifying", "installing", "rebooting"}

// finished reports whether a job state is an outcome.
func finished(state string) bool {
	return state == "succeeded" || state == "failed" || state == "timed_out"
}

// newJobID is the SQL expression of a fresh job id.
const newJobID = `'job_' || replace(gen_random_uuid()::text, '-', '')`

func contains(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}
