package auth

import (
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"

	"golang.org/x/crypto/argon2"
)

// Password lengths, in bytes. The maximum bounds the work one sign-in can
// ask of argon2 (which hashes the whole password).
const (
	MinPassword = 12
	MaxPassword = 256
)

// Params are argon2id's cost parameters. They are stored with each hash, so
// changing them affects new hashes only.
type Params struct {
	Memory  uint32 // KiB
	Time    uint32
	Threads uint8
}

// DefaultParams follow OWASP's argon2id recommendation (19 MiB, 2 passes,
// one lane): about 20-50 ms a hash on a server core.
var DefaultParams = Params{Memory: 19 * 1024, Time: 2, Threads: 1}

const (
	saltLen = 16
	keyLen  = 32
)

// CheckPassword validates a new password.
func CheckPassword(pw string) error {
	switch {
	case len(pw) < MinPassword:
		return &ValidationError{"password", fmt.Sprintf("must be at least %d bytes", MinPassword)}
	case len(pw) > MaxPassword:
		return &ValidationError{"password", fmt.Sprintf("must be at most %d bytes", MaxPassword)}
	case !utf8.ValidString(pw):
		return &ValidationError{"password", "must be UTF-8"}
	}
	return nil
}

// HashPassword returns pw's argon2id hash as a PHC string.
func HashPassword(pw string, p Params) string {
	salt := make([]byte, saltLen)
	_, _ = rand.Read(salt)
	key := argon2.IDKey([]byte(pw), salt, p.Time, p.Memory, p.Threads, keyLen)
	b64 := base64.RawStdEncoding
	return fmt.Sprintf("$argon2id$v=%d$m=%d,t=%d,p=%d$%s$%s", argon2.Version, p.Memory, p.Time, p.Threads,
		b64.EncodeToString(salt), b64.EncodeToString(key))
}

var errBadHash = errors.New("not an argon2id PHC string")

// VerifyPassword reports whether pw matches the PHC string hash. A password
// longer than MaxPassword never matches and is not hashed.
func VerifyPassword(pw, hash string) (bool, error) {
	p, salt, key, err := parseHash(hash)
	if err != nil {
		return false, err
	}
	if len(pw) > MaxPassword {
		return false, nil
	}
	got := argon2.IDKey([]byte(pw), salt, p.Time, p.Memory, p.Threads, uint32(len(key)))
	return subtle.ConstantTimeCompare(got, key) == 1, nil
}

func parseHash(hash string) (Params, []byte, []byte, error) {
	parts := strings.Split(hash, "$")
	if len(parts) != 6 || parts[1] != "argon2id" {
		return Params{}, nil, nil, errBadHash
	}
	var v int
	var p Params
	if _, err := fmt.Sscanf(parts[2], "v=%d", &v); err != nil || v != argon2.Version {
		return Params{}, nil, nil, errBadHash
	}
	if _, err := fmt.Sscanf(parts[3], "m=%d,t=%d,p=%d", &p.Memory, &p.Time, &p.Threads); err != nil ||
		p.Memory == 0 || p.Time == 0 || p.Threads == 0 {
		return Params{}, nil, nil, errBadHash
	}
	salt, err1 := base64.RawStdEncoding.DecodeString(parts[4])
	key, err2 := base64.RawStdEncoding.DecodeString(parts[5])
	if err1 != nil || err2 != nil || len(salt) < 8 || len(key) < 16 {
		return Params{}, nil, nil, errBadHash
	}
	return p, salt, key, nil
}
