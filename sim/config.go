package sim

import (
	"context"
	"encoding/json"
	"time"
)

// desiredConfig is the payload of devices/{id}/config/desired and of the
// report on devices/{id}/config/reported (README: configuration).
type desiredConfig struct {
	Version int64          `json:"version"`
	Config  map[string]any `json:"config"`
}

// appliedConfig is what a device applied of its desired configuration. It
// outlives sessions, as firmware keeps its settings across reconnects.
type appliedConfig struct {
	version   int64
	config    map[string]any
	keepalive time.Duration // from keepalive_s; 0: the cohort's
}

// keepalive is what the device asks for in CONNECT: the configured
// keepalive_s once one was applied, else the cohort's.
func (d *device) keepalive() time.Duration {
	if d.applied.keepalive > 0 {
		return d.applied.keepalive
	}
	return d.cohort.Keepalive.D()
}

// applyConfig applies a desired configuration as firmware would and
// reports it: a keepalive_s from 1 to 65535 takes effect at the next
// connect (the session's keepalive is fixed by its CONNECT); other keys are
// kept as they are. The report carries the version applied, so the server
// can tell a stale report from a current one. A document older than the
// one applied (a copy delivered late) is reported as what is applied.
func (d *device) applyConfig(ctx context.Context, sess session, raw []byte) {
	var msg desiredConfig
	if err := json.Unmarshal(raw, &msg); err != nil || msg.Config == nil {
		d.sim.stats.count("config refused")
		return
	}
	if msg.Version >= d.applied.version || d.applied.config == nil {
		next := appliedConfig{version: msg.Version, config: msg.Config}
		if ka, ok := msg.Config["keepalive_s"].(float64); ok && ka >= 1 && ka <= 65535 && ka == float64(int(ka)) {
			next.keepalive = time.Duration(ka) * time.Second
		}
		if next.version != d.applied.version {
			d.sim.stats.count("config applied")
		}
		d.applied = next
	}
	report, _ := json.Marshal(desiredConfig{Version: d.applied.version, Config: d.applied.config})
	_ = d.publish(ctx, sess, "config/reported", report, 1, false)
}
