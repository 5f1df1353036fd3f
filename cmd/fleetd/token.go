package main

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
)

// adminTokenFile is where a generated admin token is kept, readable by the
// owner only.
const adminTokenFile = "admin-token"

// adminToken returns the configured token or, when none is configured, the one
// kept in the data dir, generating it on first start. The token itself is
// never logged: only the file's path.
func adminToken(cfg Config, logger *slog.Logger) (string, error) {
	if cfg.AdminToken != "" {
		return cfg.AdminToken, nil
	}
	path := filepath.Join(cfg.DataDir, adminTokenFile)
	data, err := os.ReadFile(path)
	switch {
	case err == nil:
		token := strings.TrimSpace(string(data))
		if len(token) < 16 {
			return "", fmt.Errorf("admin token file %s is damaged (fewer than 16 characters): delete it to generate a new token, or set %s", path, envName("admin-token"))
		}
		if err := os.Chmod(path, 0o600); err != nil {
			return "", fmt.Errorf("restrict %s to its owner: %w", path, err)
		}
		logger.Info("admin token read from file", "path", path)
		return token, nil
	case !errors.Is(err, os.ErrNotExist):
		return "", fmt.Errorf("read admin token: %w", err)
	}
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	token := hex.EncodeToString(b)
	// Write then rename, so a crash never leaves a truncated token behind.
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(token+"\n"), 0o600); err != nil {
		return "", fmt.Errorf("write admin token: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return "", fmt.Errorf("write admin token: %w", err)
	}
	logger.Warn("generated an admin token for /api/v1; read it from the file", "path", path)
	return token, nil
}
