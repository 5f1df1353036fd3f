package auth

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Options tune a Store. Zero values take the defaults named on each field.
type Options struct {
	// Params are the argon2id costs of new password hashes (DefaultParams).
	Params Params
	// SessionIdle ends a console session unused this long (30m);
	// SessionMax ends it this long after sign-in whatever its use (12h).
	SessionIdle, SessionMax time.Duration
	// MaxHashing bounds concurrent argon2 computations (4): each holds
	// Params.Memory, and sign-in must not be a way to exhaust memory.
	MaxHashing int
}

// touchEvery is how stale last_seen_at (sessions) and last_used_at (keys)
// may be before a request writes it again: a busy script does not write a
// row per request.
const touchEvery = time.Minute

// Store keeps users, sessions, API keys and the audit log in PostgreSQL.
type Store struct {
	pool  *pgxpool.Pool
	opts  Options
	dummy string // verified when a sign-in names no user, to cost the same time
	sem   chan struct{}
}

// NewStore returns a Store over pool.
func NewStore(pool *pgxpool.Pool, opts Options) *Store {
	if opts.Params == (Params{}) {
		opts.Params = DefaultParams
	}
	if opts.SessionIdle <= 0 {
		opts.SessionIdle = 30 * time.Minute
	}
	if opts.SessionMax <= 0 {
		opts.SessionMax = 12 * time.Hour
	}
	if opts.MaxHashing <= 0 {
		opts.MaxHashing = 4
	}
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	return &Store{pool: pool, opts: opts, dummy: HashPassword(hex.EncodeToString(b), opts.Params), sem: make(chan struct{}, opts.MaxHashing)}
}

// hashing runs f while holding one of the MaxHashing slots.
func (s *Store) hashing(ctx context.Context, f func()) error {
	select {
	case s.sem <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	defer func() { <-s.sem }()
	f()
	return nil
}

func randomID(prefix string, n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return prefix + hex.EncodeToString(b)
}

func digest(s string) []byte {
	d := sha256.Sum256([]byte(s))
	return d[:]
}

// User is an operator who signs in to the console.
type User struct {
	ID        string    `json:"id"`
	Name      string    `json:"name"`
	Role      Role      `json:"role"`
	Disabled  bool      `json:"disabled"`
	CreatedBy string    `json:"created_by"`
	CreatedAt time.Time `json:"created_at"`
	UpdatedAt time.Time `json:"updated_at"`
}

// NewUser is what POST /users takes.
type NewUser struct {
	Name     string `json:"name"`
	Role     Role   `json:"role"`
	Password string `json:"password"`
}

// UserPatch is what PATCH /users/{id} takes; absent fields stay.
type UserPatch struct {
	Role     *Role   `json:"role,omitempty"`
	Password *string `json:"password,omitempty"`
	Disabled *bool   `json:"disabled,omitempty"`
}

// CheckName validates a user or key name: 1 to 64 printable characters
// from a small set, so a name is safe in logs, tables and the audit log.
func CheckName(field, name string) error {
	if name == "" || len(name) > 64 {
		return &ValidationError{field, "must be 1 to 64 characters"}
	}
	for _, c := range name {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.ContainsRune("._@-+ ", c)) {
			return &ValidationError{field, "may hold only letters, digits, spaces and . _ @ - +"}
		}
	}
	if strings.TrimSpace(name) != name {
		return &ValidationError{field, "must not start or end with a space"}
	}
	return nil
}

func checkRole(r Role) error {
	if !r.Valid() {
		return &ValidationError{"role", "must be viewer, operator or admin"}
	}
	return nil
}

const userColumns = `id, name, role, disabled, created_by, created_at, updated_at`

func scanUser(row pgx.Row) (User, error) {
	var u User
	err := row.Scan(&u.ID, &u.Name, &u.Role, &u.Disabled, &u.CreatedBy, &u.CreatedAt, &u.UpdatedAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return u, ErrNotFound
	}
	return u, err
}

// CreateUser adds a user. It returns a *ValidationError naming the bad
// field, or ErrConflict when the name is taken (in any case).
func (s *Store) CreateUser(ctx context.Context, n NewUser, by Principal) (User, error) {
	if err := CheckName("name", n.Name); err != nil {
		return User{}, err
	}
	if err := checkRole(n.Role); err != nil {
		return User{}, err
	}
	if err := CheckPassword(n.Password); err != nil {
		return User{}, err
	}
	var hash string
	if err := s.hashing(ctx, func() { hash = HashPassword(n.Password, s.opts.Params) }); err != nil {
		return User{}, err
	}
	u, err := scanUser(s.pool.QueryRow(ctx, `INSERT INTO users (id, name, role, password_hash, created_by)
		VALUES ($1, $2, $3, $4, $5) RETURNING `+userColumns, randomID("u_", 8), n.Name, n.Role, hash, by.Name))
	var pe *pgconn.PgError
	if errors.As(err, &pe) && pe.Code == "23505" {
		return User{}, fmt.Errorf("%w: a user named %q exists", ErrConflict, n.Name)
	}
	return u, err
}

// maxListed bounds the users and keys one list returns.
const maxListed = 1000

// Users lists users by name (at most 1000).
func (s *Store) Users(ctx context.Context) ([]User, error) {
	rows, err := s.pool.Query(ctx, `SELECT `+userColumns+` FROM users ORDER BY lower(name) LIMIT $1`, maxListed)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (User, error) { return scanUser(r) })
}

// User returns one user, or ErrNotFound.
func (s *Store) User(ctx context.Context, id string) (User, error) {
	return scanUser(s.pool.QueryRow(ctx, `SELECT `+userColumns+` FROM users WHERE id = $1`, id))
}

// keepAdmin fails with ErrLastAdmin when removing user id from the enabled
// admins leaves none and no bootstrap token can recover. It locks every
// enabled admin, in id order, so two admins demoting each other at once
// are serialised.
func keepAdmin(ctx context.Context, tx pgx.Tx, id string, bootstrap bool) error {
	if bootstrap {
		return nil
	}
	rows, err := tx.Query(ctx, `SELECT id FROM users WHERE role = 'admin' AND NOT disabled ORDER BY id FOR UPDATE`)
	if err != nil {
		return err
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return err
	}
	for _, a := range ids {
		if a != id {
			return nil
		}
	}
	return ErrLastAdmin
}

// UpdateUser changes a user's role, password or disabled flag. Disabling a
// user or setting a password ends the user's sessions. bootstrap says
// whether a bootstrap token exists (ErrLastAdmin otherwise guards the last
// enabled admin).
func (s *Store) UpdateUser(ctx context.Context, id string, p UserPatch, bootstrap bool) (User, error) {
	if p.Role != nil {
		if err := checkRole(*p.Role); err != nil {
			return User{}, err
		}
	}
	var hash *string
	if p.Password != nil {
		if err := CheckPassword(*p.Password); err != nil {
			return User{}, err
		}
		var h string
		if err := s.hashing(ctx, func() { h = HashPassword(*p.Password, s.opts.Params) }); err != nil {
			return User{}, err
		}
		hash = &h
	}
	var u User
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		cur, err := scanUser(tx.QueryRow(ctx, `SELECT `+userColumns+` FROM users WHERE id = $1 FOR UPDATE`, id))
		if err != nil {
			return err
		}
		leaves := cur.Role == Admin && !cur.Disabled &&
			(p.Role != nil && *p.Role != Admin || p.Disabled != nil && *p.Disabled)
		if leaves {
			if err := keepAdmin(ctx, tx, id, bootstrap); err != nil {
				return err
			}
		}
		u, err = scanUser(tx.QueryRow(ctx, `UPDATE users SET role = coalesce($2, role), password_hash = coalesce($3, password_hash),
			disabled = coalesce($4, disabled), updated_at = now() WHERE id = $1 RETURNING `+userColumns, id, p.Role, hash, p.Disabled))
		if err != nil {
			return err
		}
		if hash != nil || u.Disabled {
			_, err = tx.Exec(ctx, `DELETE FROM sessions WHERE user_id = $1`, id)
		}
		return err
	})
	return u, err
}

// DeleteUser removes a user, their sessions and the API keys they made.
func (s *Store) DeleteUser(ctx context.Context, id string, bootstrap bool) error {
	return pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		cur, err := scanUser(tx.QueryRow(ctx, `SELECT `+userColumns+` FROM users WHERE id = $1 FOR UPDATE`, id))
		if err != nil {
			return err
		}
		if cur.Role == Admin && !cur.Disabled {
			if err := keepAdmin(ctx, tx, id, bootstrap); err != nil {
				return err
			}
		}
		_, err = tx.Exec(ctx, `DELETE FROM users WHERE id = $1`, id)
		return err
	})
}

// Session is a console sign-in. Token goes in the cookie and is never
// stored; CSRF must come back in X-CSRF-Token on every change.
type Session struct {
	Principal Principal
	Token     string
	CSRF      string
	ExpiresAt time.Time
}

// SignIn checks a name and password and opens a session. A wrong password,
// an unknown name and a disabled user all return ErrUnauthenticated after
// the same argon2 work.
func (s *Store) SignIn(ctx context.Context, name, password, remote string) (Session, error) {
	var (
		id, hash string
		role     Role
		disabled bool
	)
	err := s.pool.QueryRow(ctx, `SELECT id, name, role, password_hash, disabled FROM users WHERE lower(name) = lower($1)`, name).
		Scan(&id, &name, &role, &hash, &disabled)
	found := err == nil
	if err != nil && !errors.Is(err, pgx.ErrNoRows) {
		return Session{}, err
	}
	if !found {
		hash = s.dummy
	}
	var ok bool
	var verr error
	if err := s.hashing(ctx, func() { ok, verr = VerifyPassword(password, hash) }); err != nil {
		return Session{}, err
	}
	if verr != nil {
		return Session{}, fmt.Errorf("password hash of user %s: %w", id, verr)
	}
	if !found || !ok || disabled {
		return Session{}, ErrUnauthenticated
	}
	b := make([]byte, 32)
	_, _ = rand.Read(b)
	token := base64.RawURLEncoding.EncodeToString(b)
	_, _ = rand.Read(b)
	csrf := base64.RawURLEncoding.EncodeToString(b)
	sess := Session{Principal: Principal{Kind: KindUser, ID: id, Name: name, Role: role, Owner: id}, Token: token, CSRF: csrf}
	err = s.pool.QueryRow(ctx, `INSERT INTO sessions (token_hash, user_id, csrf_token, remote, expires_at)
		VALUES ($1, $2, $3, $4, now() + $5 * interval '1 millisecond') RETURNING expires_at`,
		digest(token), id, csrf, remote, s.opts.SessionMax.Milliseconds()).Scan(&sess.ExpiresAt)
	return sess, err
}

// SessionByToken returns the live session a cookie names, refreshing its
// idle clock at most once a minute. An unknown, expired or idle session,
// or one whose user is disabled, is ErrUnauthenticated.
func (s *Store) SessionByToken(ctx context.Context, token string) (Session, error) {
	if token == "" || len(token) > 64 {
		return Session{}, ErrUnauthenticated
	}
	h := digest(token)
	var sess Session
	var stale bool
	err := s.pool.QueryRow(ctx, `SELECT u.id, u.name, u.role, s.csrf_token, s.expires_at, s.last_seen_at < now() - $3 * interval '1 millisecond'
		FROM sessions s JOIN users u ON u.id = s.user_id
		WHERE s.token_hash = $1 AND s.expires_at > now() AND s.last_seen_at > now() - $2 * interval '1 millisecond' AND NOT u.disabled`,
		h, s.opts.SessionIdle.Milliseconds(), touchEvery.Milliseconds()).
		Scan(&sess.Principal.ID, &sess.Principal.Name, &sess.Principal.Role, &sess.CSRF, &sess.ExpiresAt, &stale)
	if errors.Is(err, pgx.ErrNoRows) {
		return Session{}, ErrUnauthenticated
	}
	if err != nil {
		return Session{}, err
	}
	sess.Principal.Kind, sess.Principal.Owner, sess.Token = KindUser, sess.Principal.ID, token
	if stale {
		if _, err := s.pool.Exec(ctx, `UPDATE sessions SET last_seen_at = now() WHERE token_hash = $1`, h); err != nil {
			return Session{}, err
		}
	}
	return sess, nil
}

// SignOut ends the session a cookie names, on every replica at once.
func (s *Store) SignOut(ctx context.Context, token string) error {
	_, err := s.pool.Exec(ctx, `DELETE FROM sessions WHERE token_hash = $1`, digest(token))
	return err
}

// Key is an API key; its secret is shown once, by CreateKey.
type Key struct {
	ID         string     `json:"id"`
	Name       string     `json:"name"`
	Role       Role       `json:"role"`
	CreatedBy  string     `json:"created_by"`
	CreatedAt  time.Time  `json:"created_at"`
	ExpiresAt  *time.Time `json:"expires_at"`
	RevokedAt  *time.Time `json:"revoked_at"`
	LastUsedAt *time.Time `json:"last_used_at"`
}

// NewKey is a key to create.
type NewKey struct {
	Name      string
	Role      Role
	ExpiresAt *time.Time
}

// Token format: "fk_" + 16 hex digits of id + 43 characters of secret.
const (
	keyPrefix    = "fk_"
	keyIDLen     = 16
	keySecretLen = 43
)

const keyColumns = `id, name, role, created_by, created_at, expires_at, revoked_at, last_used_at`

func scanKey(row pgx.Row) (Key, error) {
	var k Key
	err := row.Scan(&k.ID, &k.Name, &k.Role, &k.CreatedBy, &k.CreatedAt, &k.ExpiresAt, &k.RevokedAt, &k.LastUsedAt)
	if errors.Is(err, pgx.ErrNoRows) {
		return k, ErrNotFound
	}
	return k, err
}

// CreateKey makes an API key and returns it with its token. A role above
// the creator's is ErrForbidden; an expiry in the past a *ValidationError.
func (s *Store) CreateKey(ctx context.Context, n NewKey, by Principal) (Key, string, error) {
	if err := CheckName("name", n.Name); err != nil {
		return Key{}, "", err
	}
	if err := checkRole(n.Role); err != nil {
		return Key{}, "", err
	}
	if !by.Role.Allows(n.Role) {
		return Key{}, "", fmt.Errorf("%w: a key's role (%s) cannot exceed its creator's (%s)", ErrForbidden, n.Role, by.Role)
	}
	if n.ExpiresAt != nil && !n.ExpiresAt.After(time.Now()) {
		return Key{}, "", &ValidationError{"expires_at", "must be in the future"}
	}
	id := randomID("", keyIDLen/2)
	b := make([]byte, 32)
	_, _ = rand.Read(b)
	secret := base64.RawURLEncoding.EncodeToString(b)
	var owner *string
	if by.Owner != "" {
		owner = &by.Owner
	}
	k, err := scanKey(s.pool.QueryRow(ctx, `INSERT INTO api_keys (id, name, role, secret_hash, created_by, created_by_user, expires_at)
		VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING `+keyColumns, id, n.Name, n.Role, digest(secret), by.Name, owner, n.ExpiresAt))
	if err != nil {
		return Key{}, "", err
	}
	return k, keyPrefix + id + secret, nil
}

// LooksLikeKey reports whether a bearer token has an API key's shape.
func LooksLikeKey(token string) bool {
	return len(token) == len(keyPrefix)+keyIDLen+keySecretLen && strings.HasPrefix(token, keyPrefix)
}

// Keys lists API keys, newest first (at most 1000).
func (s *Store) Keys(ctx context.Context) ([]Key, error) {
	rows, err := s.pool.Query(ctx, `SELECT `+keyColumns+` FROM api_keys ORDER BY created_at DESC, id LIMIT $1`, maxListed)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (Key, error) { return scanKey(r) })
}

// RevokeKey revokes a key at once; revoking it again changes nothing.
func (s *Store) RevokeKey(ctx context.Context, id string) (Key, error) {
	return scanKey(s.pool.QueryRow(ctx, `UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1 RETURNING `+keyColumns, id))
}

// KeyByToken returns the principal of an API key token, read from the
// database on every call (a primary-key read), so a key revoked on any
// replica is refused on all of them at once. A wrong, expired or revoked
// key, or one whose creating user is disabled or gone, is
// ErrUnauthenticated. Its role is the lower of its own and its creator's.
func (s *Store) KeyByToken(ctx context.Context, token string) (Principal, error) {
	if !LooksLikeKey(token) {
		return Principal{}, ErrUnauthenticated
	}
	id, secret := token[len(keyPrefix):len(keyPrefix)+keyIDLen], token[len(keyPrefix)+keyIDLen:]
	var (
		p             = Principal{Kind: KindKey, ID: id}
		hash          []byte
		owner         *string
		ownerRole     *Role
		ownerDisabled *bool
		live, stale   bool
	)
	err := s.pool.QueryRow(ctx, `SELECT k.name, k.role, k.secret_hash, k.created_by_user, u.role, u.disabled,
			k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > now()),
			k.last_used_at IS NULL OR k.last_used_at < now() - $2 * interval '1 millisecond'
		FROM api_keys k LEFT JOIN users u ON u.id = k.created_by_user WHERE k.id = $1`, id, touchEvery.Milliseconds()).
		Scan(&p.Name, &p.Role, &hash, &owner, &ownerRole, &ownerDisabled, &live, &stale)
	if errors.Is(err, pgx.ErrNoRows) {
		return Principal{}, ErrUnauthenticated
	}
	if err != nil {
		return Principal{}, err
	}
	if subtle.ConstantTimeCompare(digest(secret), hash) != 1 || !live {
		return Principal{}, ErrUnauthenticated
	}
	if owner != nil {
		if ownerRole == nil || *ownerDisabled {
			return Principal{}, ErrUnauthenticated
		}
		p.Role, p.Owner = Lower(p.Role, *ownerRole), *owner
	}
	if stale {
		if _, err := s.pool.Exec(ctx, `UPDATE api_keys SET last_used_at = now() WHERE id = $1`, id); err != nil {
			return Principal{}, err
		}
	}
	return p, nil
}

// PruneSessions deletes ended sessions and keys revoked or expired longer
// than keep ago, in bounded batches.
func (s *Store) PruneSessions(ctx context.Context, keep time.Duration) error {
	for _, d := range []struct {
		q   string
		age time.Duration
	}{
		{`DELETE FROM sessions WHERE token_hash IN (SELECT token_hash FROM sessions
			WHERE expires_at < now() OR last_seen_at < now() - $1 * interval '1 millisecond' LIMIT 5000)`, s.opts.SessionIdle},
		{`DELETE FROM api_keys WHERE id IN (SELECT id FROM api_keys
			WHERE coalesce(revoked_at, expires_at) < now() - $1 * interval '1 millisecond' LIMIT 5000)`, keep},
	} {
		for {
			tag, err := s.pool.Exec(ctx, d.q, d.age.Milliseconds())
			if err != nil {
				return err
			}
			if tag.RowsAffected() < 5000 {
				break
			}
		}
	}
	return nil
}
