// Package auth holds fleetd's operators: users with a role and a password,
// their console sessions, API keys, and the audit log of every change made
// through the API. Its rules (roles, password hashing, token formats) are
// plain functions; Store keeps the state in PostgreSQL so that every
// replica sees a revoked key or an ended session at once.
package auth

import (
	"errors"
	"fmt"
)

// Role is what a principal may do. Roles are ordered: each one may do
// everything the ones below it may.
type Role string

const (
	// Viewer reads everything but the users, keys, webhooks and audit log.
	Viewer Role = "viewer"
	// Operator runs the fleet: devices, commands, configuration,
	// firmware uploads and campaigns.
	Operator Role = "operator"
	// Admin sets policy (compatibility rules and verdict decisions) and
	// manages users, API keys, webhooks, and reads the audit log.
	Admin Role = "admin"
)

// Roles lists the roles, lowest first.
var Roles = []Role{Viewer, Operator, Admin}

func (r Role) rank() int {
	switch r {
	case Viewer:
		return 1
	case Operator:
		return 2
	case Admin:
		return 3
	}
	return 0
}

// Valid reports whether r is one of Roles.
func (r Role) Valid() bool { return r.rank() > 0 }

// Allows reports whether a principal with role r may do what needs role
// need. An unknown role allows nothing, and nothing allows an unknown need.
func (r Role) Allows(need Role) bool {
	return r.rank() > 0 && need.rank() > 0 && r.rank() >= need.rank()
}

// Lower returns the lower of two roles.
func Lower(a, b Role) Role {
	if a.rank() <= b.rank() {
		return a
	}
	return b
}

// Kinds of principal.
const (
	KindUser      = "user"
	KindKey       = "key"
	KindBootstrap = "bootstrap"
	// KindAnonymous is an unauthenticated caller, in the audit log only (a
	// failed sign-in: its name is the name tried).
	KindAnonymous = "anonymous"
)

// Principal is who makes a request.
type Principal struct {
	Kind string `json:"kind"`
	ID   string `json:"id"`
	Name string `json:"name"`
	Role Role   `json:"role"`
	// Owner is the user behind the principal: the user itself, or the user
	// who made a key ("" for the bootstrap token and its keys).
	Owner string `json:"-"`
}

// Bootstrap is the principal of the break-glass admin token.
// Its name says what it is wherever a principal is shown (GET /me, the
// audit log, campaign history).
var Bootstrap = Principal{Kind: KindBootstrap, ID: "bootstrap", Name: "break-glass", Role: Admin}

// Errors returned by Store; web maps them to statuses.
var (
	ErrNotFound = errors.New("not found")
	ErrConflict = errors.New("conflict")
	// ErrUnauthenticated is a credential that is wrong, expired, revoked or
	// whose owner is disabled. Which of these is not told to the caller.
	ErrUnauthenticated = errors.New("unauthenticated")
	// ErrLastAdmin refuses a change that would leave no enabled admin user
	// while there is no bootstrap token to recover with.
	ErrLastAdmin = errors.New("the last admin user cannot be removed, disabled or demoted")
	// ErrForbidden is a change beyond the caller's own role (a key above
	// its creator's role).
	ErrForbidden = errors.New("forbidden")
)

// ValidationError names the request field that is wrong.
type ValidationError struct {
	Field string
	Msg   string
}

func (e *ValidationError) Error() string { return fmt.Sprintf("%s: %s", e.Field, e.Msg) }

// FieldName is the field the error is about (web.FieldError).
func (e *ValidationError) FieldName() string { return e.Field }
