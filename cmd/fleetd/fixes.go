package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/fleetd/fleetd/devconfig"
	"github.com/fleetd/fleetd/fix"
)

// remedies applies a diagnosis' remedy as a merge patch of the device's own
// configuration layer (fix.Configurer over devconfig.Service).
type remedies struct{ config *devconfig.Service }

func (r remedies) PatchDevice(ctx context.Context, id string, patch json.RawMessage) (int64, error) {
	v, err := r.config.PatchDevice(ctx, id, patch)
	if errors.Is(err, devconfig.ErrGone) {
		return 0, fmt.Errorf("%w: %w", fix.ErrGone, err)
	}
	return v.Desired.Version, err
}
