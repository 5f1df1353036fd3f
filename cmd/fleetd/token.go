package main

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/fleetd/fleetd/firmware"
)

// Files in the data dir that hold secrets generated on first start.
const (
	adminTokenFile  = "admin-token"
	tokenPepperFile = "token-pepper"
	signingKeyFile  = "firmware-signing-key"
)

// adminToken returns the configured admin token or the one kept in the data
// dir, generating it on first start.
func adminToken(cfg Config, logger *slog.Logger) (string, error) {
	return secret(cfg.AdminToken, cfg.DataDir, adminTokenFile, "admin-token", 16, logger)
}

// tokenPepper returns the key of device token hashes. Losing it invalidates
// every device token, so it is generated once and kept; replicas sharing a
// database must be given the same one.
func tokenPepper(cfg Config, logger *slog.Logger) ([]byte, error) {
	s, err := secret(cfg.TokenPepper, cfg.DataDir, tokenPepperFile, "token-pepper", 64, logger)
	if err != nil {
		return nil, err
	}
	b, err := hex.DecodeString(s)
	if err != nil {
		return nil, fmt.Errorf("%s in %s is not hex: %w", tokenPepperFile, cfg.DataDir, err)
	}
	return b, nil
}

// secret returns configured when set. Otherwise it reads dataDir/file, or
// creates it with 32 random bytes in hex, readable by the owner only. The
// secret itself is never logged: only the file's path.
func secret(configured, dataDir, file, setting string, minLen int, logger *slog.Logger) (string, error) {
	if configured != "" {
		return configured, nil
	}
	path := filepath.Join(dataDir, file)
	data, err := os.ReadFile(path)
	switch {
	case err == nil:
		value := strings.TrimSpace(string(data))
		if len(value) < minLen {
			return "", fmt.Errorf("%s is damaged (fewer than %d characters): delete it to generate a new one, or set %s", path, minLen, envName(setting))
		}
		if err := os.Chmod(path, 0o600); err != nil {
			return "", fmt.Errorf("restrict %s to its owner: %w", path, err)
		}
		logger.Info("secret read from file", "setting", envName(setting), "path", path)
		return value, nil
	case !errors.Is(err, os.ErrNotExist):
		return "", fmt.Errorf("read %s: %w", path, err)
	}
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	value := hex.EncodeToString(b)
	// Write then rename, so a crash never leaves a truncated secret behind.
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(value+"\n"), 0o600); err != nil {
		return "", fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return "", fmt.Errorf("write %s: %w", path, err)
	}
	logger.Warn("generated a secret; keep the file", "setting", envName(setting), "path", path)
	return value, nil
}

// firmwareKeys returns the key that signs firmware (generated and kept in
// the data dir unless configured) and the trusted keys uploads may be
// signed with instead.
func firmwareKeys(cfg Config, logger *slog.Logger) (firmware.Keys, error) {
	seedHex, err := secret(cfg.SigningKey, cfg.DataDir, signingKeyFile, "firmware-signing-key", 64, logger)
	if err != nil {
		return firmware.Keys{}, err
	}
	seed, err := hex.DecodeString(seedHex)
	if err != nil || len(seed) != ed25519.SeedSize {
		return firmware.Keys{}, fmt.Errorf("%s: not an ed25519 seed (64 hex characters)", envName("firmware-signing-key"))
	}
	keys := firmware.Keys{Signing: ed25519.NewKeyFromSeed(seed)}
	if cfg.TrustedKeysFile != "" {
		data, err := os.ReadFile(cfg.TrustedKeysFile)
		if err != nil {
			return keys, fmt.Errorf("%s: %w", envName("firmware-trusted-keys-file"), err)
		}
		for i, line := range strings.Split(string(data), "\n") {
			line = strings.TrimSpace(line)
			if line == "" || strings.HasPrefix(line, "#") {
				continue
			}
			k, err := base64.StdEncoding.DecodeString(line)
			if err != nil || len(k) != ed25519.PublicKeySize {
				return keys, fmt.Errorf("%s line %d: not a base64 ed25519 public key", envName("firmware-trusted-keys-file"), i+1)
			}
			keys.Trusted = append(keys.Trusted, k)
		}
	}
	return keys, nil
}
