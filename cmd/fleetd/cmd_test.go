package main

import (
	"context"
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/fleetd/fleetd/internal/fleetdtest"
)

func fleetdtestCmd(t *testing.T, env ...string) *exec.Cmd {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	cmd := exec.CommandContext(ctx, fleetdtest.Binary(t))
	cmd.Env = append([]string{"PATH=" + os.Getenv("PATH"), "FLEETD_DATA_DIR=" + fleetdtest.DataDir(t)}, env...)
	return cmd
}
