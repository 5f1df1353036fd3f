package fleet

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	lru "github.com/hashicorp/golang-lru/v2"
)

// AuthResult is the outcome of checking a device's credential.
type AuthResult int

// Authentication outcomes. The broker turns each into the right CONNACK code.
const (
	AuthOK             AuthResult = iota
	AuthUnknownDevice             // no such device id
	AuthBadToken                  // the device exists but the token is wrong
	AuthDecommissioned            // the device was decommissioned
)

func (a AuthResult) String() string {
	return [...]string{"ok", "unknown device", "wrong token", "decommissioned"}[a]
}

// AuthInfo is what the broker learns about a device when it authenticates.
type AuthInfo struct {
	Result   AuthResult
	Firmware string
	Model    string
}

// Service is the registry's API for the broker and the web layer. It keeps
// every device's credential in memory, so that a connect needs no database
// round trip: the cache is loaded at start and kept current by the service's
// own writes (registration, rotation, decommission invalidate at once) and,
// with several replicas, by the others' (OnCredentialChange signals them,
// CredentialChanged applies theirs). Positive entries also expire after
// CacheTTL, a safety net for a signal that never arrived.
type Service struct {
	store  *Store
	hasher *Hasher
	logger *slog.Logger
	now    func() time.Time

	mu       sync.RWMutex
	cache    map[string]*cachedCredential  // registered devices
	unknown  *lru.Cache[string, time.Time] // ids found unregistered, and when
	onRevoke []func(deviceID string)
	onRotate []func(deviceID string)
	onChange []func(deviceID string, change CredentialChange)
	onPolicy []func()
	cacheTTL time.Duration // 0: entries live until invalidated

	pmu          sync.Mutex
	prefetch     map[string]struct{} // ids whose credential another replica changed, to load (prefetch.go)
	prefetchWake chan struct{}

	policy atomic.Pointer[compiledPolicy]
	an     analysis // guarded by mu
	links  linkCache
	health healthCache
}

type cachedCredential struct {
	credential
	missing bool      // the id is not registered
	at      time.Time // when it was read from the database (zero: written here)
}

// negativeTTL bounds how long an unknown id is remembered as unknown. Devices
// registered through this replica are visible at once; the TTL covers
// registrations made through another replica.
const negativeTTL = 5 * time.Second

// maxUnknownIDs bounds the negative cache. Unknown ids are what an attacker
// without any token can send at will: remembering every one of them would
// grow without end, so the least recently used are forgotten (and cost one
// query again).
const maxUnknownIDs = 16384

var missingCredential = &cachedCredential{missing: true}

// NewService builds the service. Call WarmCache before the broker accepts
// connections.
func NewService(store *Store, hasher *Hasher, logger *slog.Logger) *Service {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	unknown, err := lru.New[string, time.Time](maxUnknownIDs)
	if err != nil {
		panic(err) // only for a size below 1
	}
	return &Service{store: store, hasher: hasher, logger: logger, now: time.Now, cache: map[string]*cachedCredential{},
		unknown: unknown, an: analysis{wake: make(chan struct{}, 1)}, prefetchWake: make(chan struct{}, 1)}
}

// OnRevoke registers a function called (synchronously) when a device's
// credential is revoked, here or on another replica (CredentialChanged), so
// the broker can end its live session.
func (s *Service) OnRevoke(f func(deviceID string)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.onRevoke = append(s.onRevoke, f)
}

// OnRotate registers a function called (synchronously) when a device's
// token is rotated, here or on another replica, so the broker can end the
// session the old token opened.
func (s *Service) OnRotate(f func(deviceID string)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.onRotate = append(s.onRotate, f)
}

// CredentialChange says what changed about a device's credential.
type CredentialChange string

// What can change: the cached entry is stale (registered, model changed),
// the token was rotated (the old one's session ends), or the device was
// decommissioned (its session ends, it is refused).
const (
	CredentialUpdated CredentialChange = "updated"
	CredentialRotated CredentialChange = "rotated"
	CredentialRevoked CredentialChange = "revoked"
)

// OnCredentialChange registers a function called after this replica changed
// a device's credential, so that other replicas can be told.
func (s *Service) OnCredentialChange(f func(deviceID string, change CredentialChange)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.onChange = append(s.onChange, f)
}

// OnPolicyChange registers a function called after this replica stored a
// new policy, so that other replicas can be told (PolicyChanged).
func (s *Service) OnPolicyChange(f func()) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.onPolicy = append(s.onPolicy, f)
}

// PolicyChanged applies a policy another replica stored: it is read again
// and devices are re-judged soon.
func (s *Service) PolicyChanged(ctx context.Context) {
	if err := s.LoadPolicy(ctx); err != nil {
		s.logger.Warn("cannot read the policy another replica stored; the analysis retries", "err", err)
	}
	s.AnalyzeSoon()
}

// SetCacheTTL makes positive cache entries expire: a credential read from
// the database more than ttl ago is read again at the next connect. 0 keeps
// entries until they are invalidated.
func (s *Service) SetCacheTTL(ttl time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.cacheTTL = ttl
}

func (s *Service) changed(id string, change CredentialChange) {
	s.mu.RLock()
	hooks := append([]func(string, CredentialChange){}, s.onChange...)
	s.mu.RUnlock()
	for _, f := range hooks {
		f(id, change)
	}
}

// CredentialChanged applies another replica's change of a device's
// credential: the cached entry is dropped and loaded again soon, in a batch
// with the others changed at the same time (RunPrefetch), and the live
// session here of a device decommissioned, or whose token was rotated, is
// ended.
func (s *Service) CredentialChanged(id string, change CredentialChange) {
	s.mu.Lock()
	delete(s.cache, id)
	var hooks []func(string)
	switch change {
	case CredentialRevoked:
		hooks = append(hooks, s.onRevoke...)
	case CredentialRotated:
		hooks = append(hooks, s.onRotate...)
	}
	s.mu.Unlock()
	s.unknown.Remove(id)
	s.prefetchLater(id)
	if len(hooks) > 0 {
		// Off the caller's goroutine (the replicas' listener): ending a
		// session may wait on a slow device's socket.
		go func() {
			for _, f := range hooks {
				f(id)
			}
		}()
	}
}

// ReloadCache replaces every cached credential with the database's: what a
// replica does after it may have missed other replicas' changes (its
// listening connection was down).
func (s *Service) ReloadCache(ctx context.Context) (int, error) {
	loaded, err := s.loadCredentials(ctx)
	if err != nil {
		return 0, err
	}
	s.mu.Lock()
	s.cache = loaded
	s.mu.Unlock()
	s.unknown.Purge()
	return len(loaded), nil
}

func (s *Service) loadCredentials(ctx context.Context) (map[string]*cachedCredential, error) {
	return s.queryCredentials(ctx, `SELECT id, coalesce(token_hash, ''::bytea), state, firmware, model FROM devices WHERE state = 'active'`)
}

// queryCredentials reads credentials (id, token hash, state, firmware,
// model) as cache entries stamped now.
func (s *Service) queryCredentials(ctx context.Context, query string, args ...any) (map[string]*cachedCredential, error) {
	rows, err := s.store.pool.Query(ctx, query, args...)
	if err != nil {
		return nil, fmt.Errorf("load credentials: %w", err)
	}
	defer rows.Close()
	now := s.now()
	loaded := map[string]*cachedCredential{}
	for rows.Next() {
		var id string
		c := &cachedCredential{at: now}
		if err := rows.Scan(&id, &c.hash, &c.state, &c.firmware, &c.model); err != nil {
			return nil, fmt.Errorf("load credentials: %w", err)
		}
		loaded[id] = c
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("load credentials: %w", err)
	}
	return loaded, nil
}

// WarmCache loads every active device's credential, so that the reconnect
// storm after a restart is authenticated from memory.
func (s *Service) WarmCache(ctx context.Context) (int, error) {
	loaded, err := s.loadCredentials(ctx)
	if err != nil {
		return 0, err
	}
	s.mu.Lock()
	for id, c := range loaded {
		if _, ok := s.cache[id]; !ok {
			s.cache[id] = c
		}
	}
	s.mu.Unlock()
	return len(loaded), nil
}

// Authenticate checks a device's token. It answers from memory when it can;
// only an id it has never seen costs a query. A database error is returned
// as such, so that the broker can answer "server unavailable" rather than
// "bad credentials".
func (s *Service) Authenticate(ctx context.Context, id string, token []byte) (AuthInfo, error) {
	c, err := s.lookup(ctx, id)
	if err != nil {
		return AuthInfo{}, err
	}
	return s.verdict(c, token, true), nil
}

// Admit is Authenticate for devices that proved their identity another way
// (a verified client certificate): the token is not checked.
func (s *Service) Admit(ctx context.Context, id string) (AuthInfo, error) {
	c, err := s.lookup(ctx, id)
	if err != nil {
		return AuthInfo{}, err
	}
	return s.verdict(c, nil, false), nil
}

func (s *Service) verdict(c *cachedCredential, token []byte, checkToken bool) AuthInfo {
	switch {
	case c.missing:
		return AuthInfo{Result: AuthUnknownDevice}
	case c.state != StateActive:
		return AuthInfo{Result: AuthDecommissioned}
	case checkToken && !s.hasher.Matches(token, c.hash):
		return AuthInfo{Result: AuthBadToken, Firmware: c.firmware, Model: c.model}
	}
	return AuthInfo{Result: AuthOK, Firmware: c.firmware, Model: c.model}
}

func (s *Service) lookup(ctx context.Context, id string) (*cachedCredential, error) {
	s.mu.RLock()
	c, ok := s.cache[id]
	ttl := s.cacheTTL
	s.mu.RUnlock()
	if ok && (ttl <= 0 || c.at.IsZero() || s.now().Sub(c.at) < ttl) {
		return c, nil
	}
	if at, ok := s.unknown.Get(id); ok && s.now().Sub(at) < negativeTTL {
		return missingCredential, nil
	}
	cred, err := s.store.credential(ctx, id)
	// The id may alias a whole packet buffer of the broker's: what is kept
	// is a copy.
	id = strings.Clone(id)
	switch {
	case errors.Is(err, ErrNotFound):
		s.unknown.Add(id, s.now())
		return missingCredential, nil
	case err != nil:
		return nil, fmt.Errorf("look up device %s: %w", id, err)
	}
	c = &cachedCredential{credential: cred, at: s.now()}
	s.mu.Lock()
	s.cache[id] = c
	s.mu.Unlock()
	return c, nil
}

// NoteBirth updates the cached firmware and model of a device after its
// birth message, so that its later events carry them.
func (s *Service) NoteBirth(id, firmware, model string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if c, ok := s.cache[id]; ok {
		updated := *c
		updated.firmware = firmware
		if updated.model == "" {
			updated.model = model
		}
		s.cache[id] = &updated
	}
}

// Register creates a device and returns it with its token. The token is
// shown once: only its keyed hash is stored.
func (s *Service) Register(ctx context.Context, n NewDevice) (Device, string, error) {
	if err := n.Validate(); err != nil {
		return Device{}, "", err
	}
	token, err := newToken()
	if err != nil {
		return Device{}, "", err
	}
	hash := s.hasher.Hash([]byte(token))
	d, err := s.store.insertDevice(ctx, n, hash)
	if err != nil {
		return Device{}, "", err
	}
	s.mu.Lock()
	s.cache[d.ID] = &cachedCredential{credential: credential{hash: hash, state: StateActive, model: d.Model}}
	s.mu.Unlock()
	s.unknown.Remove(d.ID)
	s.changed(d.ID, CredentialUpdated)
	s.logger.Info("device registered", "device_id", d.ID, "model", d.Model)
	return d, token, nil
}

// Get returns one device.
func (s *Service) Get(ctx context.Context, id string) (Device, error) {
	if err := ValidateID(id); err != nil {
		return Device{}, err
	}
	return s.store.getDevice(ctx, id)
}

// List returns a page of devices and the cursor of the next page ("" at the end).
func (s *Service) List(ctx context.Context, f Filter) ([]Device, string, error) {
	if err := f.Validate(); err != nil {
		return nil, "", err
	}
	devices, err := s.store.listDevices(ctx, f)
	if err != nil {
		return nil, "", err
	}
	next := ""
	if len(devices) == f.Limit {
		next = devices[len(devices)-1].ID
	}
	return devices, next, nil
}

// Update changes a device's model or tags.
func (s *Service) Update(ctx context.Context, id string, p Patch) (Device, error) {
	if err := ValidateID(id); err != nil {
		return Device{}, err
	}
	if err := p.Validate(); err != nil {
		return Device{}, err
	}
	d, err := s.store.updateDevice(ctx, id, p)
	if err != nil {
		return d, err
	}
	if p.Model != nil {
		s.mu.Lock()
		if c, ok := s.cache[id]; ok {
			updated := *c
			updated.model = d.Model
			s.cache[id] = &updated
		}
		s.mu.Unlock()
		s.changed(id, CredentialUpdated)
	}
	return d, nil
}

// RotateToken issues a new token; the old one stops working at once, on
// every replica: later connects with it are refused and the live session it
// opened is ended (a token is rotated because it may have leaked, and a
// session opened with it must not outlive it). The device reconnects with
// the new token, delivered to it out of band.
func (s *Service) RotateToken(ctx context.Context, id string) (string, error) {
	if err := ValidateID(id); err != nil {
		return "", err
	}
	token, err := newToken()
	if err != nil {
		return "", err
	}
	hash := s.hasher.Hash([]byte(token))
	if err := s.store.setTokenHash(ctx, id, hash); err != nil {
		return "", err
	}
	s.mu.Lock()
	if c, ok := s.cache[id]; ok {
		updated := *c
		updated.hash = hash
		s.cache[id] = &updated
	} else {
		delete(s.cache, id)
	}
	hooks := append([]func(string){}, s.onRotate...)
	s.mu.Unlock()
	for _, f := range hooks {
		f(id)
	}
	s.changed(id, CredentialRotated)
	s.logger.Info("device token rotated", "device_id", id)
	return token, nil
}

// Decommission revokes the device's credential and ends its live session;
// later connects are refused. The device's history stays.
func (s *Service) Decommission(ctx context.Context, id string) (Device, error) {
	if err := ValidateID(id); err != nil {
		return Device{}, err
	}
	d, err := s.store.decommission(ctx, id)
	if err != nil {
		return d, err
	}
	s.mu.Lock()
	s.cache[id] = &cachedCredential{credential: credential{state: StateDecommissioned}}
	hooks := append([]func(string){}, s.onRevoke...)
	s.mu.Unlock()
	for _, f := range hooks {
		f(id)
	}
	s.changed(id, CredentialRevoked)
	s.logger.Info("device decommissioned", "device_id", id)
	return d, nil
}

// Events returns a device's events, newest first, strictly before the cursor.
func (s *Service) Events(ctx context.Context, id string, before *EventCursor, limit int) ([]Event, error) {
	if err := ValidateID(id); err != nil {
		return nil, err
	}
	if limit <= 0 || limit > 1000 {
		return nil, invalid("limit", "must be between 1 and 1000")
	}
	return s.store.listEvents(ctx, id, before, limit)
}

// TouchLastSeen records when devices were last heard from.
func (s *Service) TouchLastSeen(ctx context.Context, seen map[string]time.Time) error {
	if len(seen) == 0 {
		return nil
	}
	return s.store.touchLastSeen(ctx, seen)
}
