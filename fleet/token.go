package fleet

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"errors"
)

// tokenBytes is the token's entropy: 256 random bits.
const tokenBytes = 32

// Hasher turns device tokens into the values stored in the database:
// HMAC-SHA256 keyed with a server-side pepper. A fast keyed hash, not
// bcrypt or argon2: tokens are random 256-bit secrets, so slow hashing adds no
// protection and would burn seconds of CPU per reconnect storm, while the
// pepper keeps a stolen database useless without the server's key.
type Hasher struct{ pepper []byte }

// NewHasher returns a Hasher keyed with pepper (at least 32 bytes).
func NewHasher(pepper []byte) (*Hasher, error) {
	if len(pepper) < 32 {
		return nil, errors.New("token pepper must be at least 32 bytes")
	}
	return &Hasher{pepper: append([]byte(nil), pepper...)}, nil
}

// Hash returns HMAC-SHA256(pepper, token).
func (h *Hasher) Hash(token []byte) []byte {
	m := hmac.New(sha256.New, h.pepper)
	m.Write(token)
	return m.Sum(nil)
}

// Matches compares a presented token with a stored hash in constant time.
func (h *Hasher) Matches(token, stored []byte) bool {
	return len(stored) == sha256.Size && hmac.Equal(h.Hash(token), stored)
}

// newToken returns a fresh device token, URL-safe base64 without padding.
func newToken() (string, error) {
	b := make([]byte, tokenBytes)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	return base64.RawURLEncoding.EncodeToString(b), nil
}
