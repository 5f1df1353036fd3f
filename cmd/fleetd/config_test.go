package main

import (
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func envFrom(m map[string]string) func(string) string {
	return func(k string) string { return m[k] }
}

func TestParseConfig(t *testing.T) {
	host, _ := os.Hostname()
	tokenFile := filepath.Join(t.TempDir(), "token")
	os.WriteFile(tokenFile, []byte("  from-a-file-0123456789\n"), 0o600)
	dbFile := filepath.Join(t.TempDir(), "db")
	os.WriteFile(dbFile, []byte("postgres://u:p@db:5432/fleetd\n"), 0o600)

	defaults := Config{HTTPAddr: ":8080", MQTTAddr: ":1883", DataDir: "./fleetd-data", LogLevel: slog.LevelInfo,
		LogFormat: "json", ShutdownTimeout: 20 * time.Second, Node: host,
		MQTTMaxPacket: 256 << 10, GCPercent: 25, ConnectTimeout: 10 * time.Second, ConnectRate: 5000, ConnectBurst: 1000,
		ClientRate: 1, ClientBurst: 10, AuthFailureRate: 1, AuthFailureBurst: 20, MaxPending: 10000, MaxPendingPerSrc: 1000,
		PublishRate: 100, PublishBurst: 500, SubscribeRate: 5, SubscribeBurst: 50, SessionExpiry: time.Hour, AnalysisInterval: time.Minute, CredentialCacheTTL: 5 * time.Minute, ReplicaDeadAfter: 15 * time.Second,
		OTAMaxDownloads: 100, CampaignInterval: time.Second, DeltaMaxImageMB: 64, DeltaWait: 10 * time.Minute, RecorderBehindAfter: 30 * time.Second}
	defaults.OTAMaxDownloadsPerSource, defaults.HTTPIdleTimeout, defaults.HTTPReadTimeout, defaults.HTTPStallTimeout = 4, time.Minute, 30*time.Second, 30*time.Second
	defaults.HTTPMaxStreams, defaults.HTTPMaxStreamsPerToken, defaults.HTTPAuthFailureRate, defaults.HTTPAuthFailureBurst = 256, 8, 1, 20
	defaults.EventSpoolMaxBytes = 1 << 30
	defaults.EventRetention, defaults.EventPartitionsAhead, defaults.RollupRetention, defaults.HourlyRollupRetention = 720*time.Hour, 7, 2160*time.Hour, 8760*time.Hour
	defaults.TelemetryRate, defaults.TelemetryBurst, defaults.TelemetryQueue = 1, 10, 100_000
	defaults.TelemetryRawRetention, defaults.TelemetryMinuteRetention, defaults.TelemetryHourRetention = 48*time.Hour, 30*24*time.Hour, 400*24*time.Hour
	defaults.CommandMaxPending, defaults.CommandRetention, defaults.CommandKeepPerDevice = 16, 7*24*time.Hour, 100
	defaults.CommandBulkMaxDevices, defaults.CommandBulkMaxRunning = 100000, 10
	defaults.WebhookTimeout, defaults.WebhookRetryMin, defaults.WebhookRetryMax = 10*time.Second, 10*time.Second, time.Hour
	defaults.WebhookMaxAttempts, defaults.WebhookDisableAfter, defaults.NotificationRetention = 10, 20, 720*time.Hour
	defaults.NotifyOfflineAfter, defaults.NotifyModelOfflineShare, defaults.NotifyModelOfflineMinDevices = 15*time.Minute, 0.2, 10
	defaults.CampaignFollowInterval = 10 * time.Second
	defaults.SessionIdle, defaults.SessionMax, defaults.AuditRetention = 30*time.Minute, 12*time.Hour, 0
	with := func(f func(*Config)) Config { c := defaults; f(&c); return c }

	tests := []struct {
		name string
		args []string
		env  map[string]string
		want Config
	}{
		{name: "defaults", want: defaults},
		{name: "env", env: map[string]string{"FLEETD_HTTP_ADDR": "127.0.0.1:9000", "FLEETD_LOG_LEVEL": "debug", "FLEETD_SHUTDOWN_TIMEOUT": "5s", "FLEETD_MQTT_ADDR": ""},
			want: with(func(c *Config) {
				c.HTTPAddr = "127.0.0.1:9000"
				c.LogLevel = slog.LevelDebug
				c.ShutdownTimeout = 5 * time.Second
			})},
		{name: "flag wins over env", args: []string{"-http-addr", ":7000"}, env: map[string]string{"FLEETD_HTTP_ADDR": ":9000"},
			want: with(func(c *Config) { c.HTTPAddr = ":7000" })},
		{name: "mqtt off", args: []string{"-mqtt-addr="}, want: with(func(c *Config) { c.MQTTAddr = "" })},
		{name: "token from file, trimmed", env: map[string]string{"FLEETD_ADMIN_TOKEN_FILE": tokenFile},
			want: with(func(c *Config) { c.AdminToken = "from-a-file-0123456789" })},
		{name: "database url from file", args: []string{"-database-url-file", dbFile},
			want: with(func(c *Config) { c.DatabaseURL = "postgres://u:p@db:5432/fleetd" })},
		{name: "recorder behind after", env: map[string]string{"FLEETD_RECORDER_BEHIND_AFTER": "2m"},
			want: with(func(c *Config) { c.RecorderBehindAfter = 2 * time.Minute })},
		{name: "telemetry", env: map[string]string{"FLEETD_TELEMETRY_RATE": "0.2", "FLEETD_TELEMETRY_RAW_RETENTION": "6h"},
			args: []string{"-telemetry-burst", "3", "-telemetry-queue", "5000", "-telemetry-minute-retention", "168h", "-telemetry-hour-retention", "8760h"},
			want: with(func(c *Config) {
				c.TelemetryRate, c.TelemetryBurst, c.TelemetryQueue = 0.2, 3, 5000
				c.TelemetryRawRetention, c.TelemetryMinuteRetention, c.TelemetryHourRetention = 6*time.Hour, 7*24*time.Hour, 365*24*time.Hour
			})},
		{name: "telemetry unlimited", args: []string{"-telemetry-rate", "-1"}, want: with(func(c *Config) { c.TelemetryRate = -1 })},
		{name: "event spool cap", env: map[string]string{"FLEETD_EVENT_SPOOL_MAX_BYTES": "1048576"},
			want: with(func(c *Config) { c.EventSpoolMaxBytes = 1 << 20 })},
		{name: "event retention", env: map[string]string{"FLEETD_EVENT_RETENTION": "168h", "FLEETD_ROLLUP_RETENTION": "336h"},
			args: []string{"-event-partitions-ahead", "3", "-hourly-rollup-retention", "720h"},
			want: with(func(c *Config) {
				c.EventRetention, c.RollupRetention, c.HourlyRollupRetention, c.EventPartitionsAhead = 168*time.Hour, 336*time.Hour, 720*time.Hour, 3
			})},
		{name: "http limits", env: map[string]string{"FLEETD_HTTP_IDLE_TIMEOUT": "15s", "FLEETD_HTTP_STALL_TIMEOUT": "1m", "FLEETD_HTTP_MAX_STREAMS": "0",
			"FLEETD_HTTP_AUTH_FAILURE_RATE": "0.5", "FLEETD_OTA_MAX_DOWNLOADS_PER_SOURCE": "0"},
			args: []string{"-http-read-timeout", "5s", "-http-max-streams-per-token", "2", "-http-auth-failure-burst", "3"},
			want: with(func(c *Config) {
				c.HTTPIdleTimeout, c.HTTPReadTimeout, c.HTTPStallTimeout = 15*time.Second, 5*time.Second, time.Minute
				c.HTTPMaxStreams, c.HTTPMaxStreamsPerToken, c.HTTPAuthFailureRate, c.HTTPAuthFailureBurst = 0, 2, 0.5, 3
				c.OTAMaxDownloadsPerSource = 0
			})},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseConfig(tt.args, envFrom(tt.env), io.Discard)
			if err != nil {
				t.Fatalf("parseConfig: %v", err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("config mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

func TestParseConfigErrorsNameTheSetting(t *testing.T) {
	tokenFile := filepath.Join(t.TempDir(), "token")
	os.WriteFile(tokenFile, []byte("from-a-file-0123456789"), 0o600)
	empty := filepath.Join(t.TempDir(), "empty")
	os.WriteFile(empty, nil, 0o600)

	tests := []struct {
		name string
		args []string
		env  map[string]string
		want []string // all must appear in the error
	}{
		{name: "bad log format", env: map[string]string{"FLEETD_LOG_FORMAT": "xml"}, want: []string{"FLEETD_LOG_FORMAT", "xml"}},
		{name: "bad log level", env: map[string]string{"FLEETD_LOG_LEVEL": "loud"}, want: []string{"FLEETD_LOG_LEVEL", "loud"}},
		{name: "bad duration", env: map[string]string{"FLEETD_SHUTDOWN_TIMEOUT": "soon"}, want: []string{"FLEETD_SHUTDOWN_TIMEOUT"}},
		{name: "negative duration", args: []string{"-shutdown-timeout", "-1s"}, want: []string{"FLEETD_SHUTDOWN_TIMEOUT", "positive"}},
		{name: "address without port", env: map[string]string{"FLEETD_HTTP_ADDR": "localhost"}, want: []string{"FLEETD_HTTP_ADDR", "host:port"}},
		{name: "bad mqtt port", args: []string{"-mqtt-addr", ":99999"}, want: []string{"FLEETD_MQTT_ADDR"}},
		{name: "empty http addr", args: []string{"-http-addr="}, want: []string{"FLEETD_HTTP_ADDR", "empty"}},
		{name: "short admin token", env: map[string]string{"FLEETD_ADMIN_TOKEN": "short"}, want: []string{"FLEETD_ADMIN_TOKEN", "16"}},
		{name: "token and token file", env: map[string]string{"FLEETD_ADMIN_TOKEN": "0123456789abcdefgh", "FLEETD_ADMIN_TOKEN_FILE": tokenFile},
			want: []string{"FLEETD_ADMIN_TOKEN", "FLEETD_ADMIN_TOKEN_FILE", "both"}},
		{name: "missing token file", env: map[string]string{"FLEETD_ADMIN_TOKEN_FILE": "/nonexistent/token"}, want: []string{"FLEETD_ADMIN_TOKEN_FILE", "/nonexistent/token"}},
		{name: "empty token file", env: map[string]string{"FLEETD_ADMIN_TOKEN_FILE": empty}, want: []string{"FLEETD_ADMIN_TOKEN_FILE", "empty"}},
		{name: "bad database url", env: map[string]string{"FLEETD_DATABASE_URL": "postgres://h:notaport/x"}, want: []string{"FLEETD_DATABASE_URL"}},
		{name: "unknown flag", args: []string{"-no-such-flag"}, want: []string{"no-such-flag"}},
		{name: "stray argument", args: []string{"serve"}, want: []string{"serve"}},
		{name: "tls without cert", args: []string{"-mqtt-tls-addr", ":8883"}, want: []string{"FLEETD_TLS_CERT_FILE", "FLEETD_TLS_KEY_FILE"}},
		{name: "tiny max packet", args: []string{"-mqtt-max-packet", "10"}, want: []string{"FLEETD_MQTT_MAX_PACKET"}},
		{name: "negative connect rate", args: []string{"-mqtt-connect-rate", "-1"}, want: []string{"FLEETD_MQTT_CONNECT_RATE"}},
		{name: "zero publish rate", args: []string{"-mqtt-publish-rate", "0"}, want: []string{"FLEETD_MQTT_PUBLISH_RATE", "-1 for unlimited"}},
		{name: "zero auth failure burst", args: []string{"-mqtt-auth-failure-burst", "0"}, want: []string{"FLEETD_MQTT_AUTH_FAILURE_BURST", "at least 1"}},
		{name: "negative pending cap", env: map[string]string{"FLEETD_MQTT_MAX_PENDING_CONNECTS_PER_SOURCE": "-5"}, want: []string{"FLEETD_MQTT_MAX_PENDING_CONNECTS_PER_SOURCE", "negative"}},
		{name: "zero recorder behind after", args: []string{"-recorder-behind-after", "0s"}, want: []string{"FLEETD_RECORDER_BEHIND_AFTER", "positive"}},
		{name: "zero idle timeout", args: []string{"-http-idle-timeout", "0s"}, want: []string{"FLEETD_HTTP_IDLE_TIMEOUT", "positive"}},
		{name: "zero read timeout", env: map[string]string{"FLEETD_HTTP_READ_TIMEOUT": "0s"}, want: []string{"FLEETD_HTTP_READ_TIMEOUT", "positive"}},
		{name: "negative stall timeout", args: []string{"-http-stall-timeout", "-1s"}, want: []string{"FLEETD_HTTP_STALL_TIMEOUT", "positive"}},
		{name: "negative stream caps", args: []string{"-http-max-streams", "-1", "-http-max-streams-per-token", "-1"},
			want: []string{"FLEETD_HTTP_MAX_STREAMS ", "FLEETD_HTTP_MAX_STREAMS_PER_TOKEN", "negative"}},
		{name: "negative http auth failure rate", args: []string{"-http-auth-failure-rate", "-1"}, want: []string{"FLEETD_HTTP_AUTH_FAILURE_RATE", "negative"}},
		{name: "zero http auth failure burst", args: []string{"-http-auth-failure-burst", "0"}, want: []string{"FLEETD_HTTP_AUTH_FAILURE_BURST", "at least 1"}},
		{name: "zero command max pending", args: []string{"-command-max-pending", "0"}, want: []string{"FLEETD_COMMAND_MAX_PENDING", "between 1 and 1000"}},
		{name: "short command retention", env: map[string]string{"FLEETD_COMMAND_RETENTION": "1s"}, want: []string{"FLEETD_COMMAND_RETENTION", "at least 1m"}},
		{name: "zero commands kept per device", args: []string{"-command-keep-per-device", "0"}, want: []string{"FLEETD_COMMAND_KEEP_PER_DEVICE", "at least 1"}},
		{name: "zero bulk devices", args: []string{"-command-bulk-max-devices", "0"}, want: []string{"FLEETD_COMMAND_BULK_MAX_DEVICES", "between 1 and 1000000"}},
		{name: "too many running bulks", env: map[string]string{"FLEETD_COMMAND_BULK_MAX_RUNNING": "5000"}, want: []string{"FLEETD_COMMAND_BULK_MAX_RUNNING", "between 1 and 1000"}},
		{name: "negative downloads per source", env: map[string]string{"FLEETD_OTA_MAX_DOWNLOADS_PER_SOURCE": "-2"}, want: []string{"FLEETD_OTA_MAX_DOWNLOADS_PER_SOURCE", "negative"}},
		{name: "bad recorder behind after", env: map[string]string{"FLEETD_RECORDER_BEHIND_AFTER": "later"}, want: []string{"FLEETD_RECORDER_BEHIND_AFTER", "later"}},
		{name: "tiny event spool cap", args: []string{"-event-spool-max-bytes", "4096"}, want: []string{"FLEETD_EVENT_SPOOL_MAX_BYTES", "at least 1048576"}},
		{name: "event spool cap with a unit", env: map[string]string{"FLEETD_EVENT_SPOOL_MAX_BYTES": "1GiB"}, want: []string{"FLEETD_EVENT_SPOOL_MAX_BYTES", "1GiB"}},
		{name: "delta image limit above a zstd window", args: []string{"-delta-max-image-mb", "1024"}, want: []string{"FLEETD_DELTA_MAX_IMAGE_MB", "between 1 and 512"}},
		{name: "zero delta wait", env: map[string]string{"FLEETD_DELTA_WAIT": "0s"}, want: []string{"FLEETD_DELTA_WAIT", "positive"}},
		{name: "campaign interval too long for pacing", args: []string{"-campaign-interval", "5s"}, want: []string{"FLEETD_CAMPAIGN_INTERVAL", "2s"}},
		{name: "campaign follow interval above an hour", args: []string{"-campaign-follow-interval", "2h"}, want: []string{"FLEETD_CAMPAIGN_FOLLOW_INTERVAL", "1h"}},
		{name: "campaign follow interval below the step", args: []string{"-campaign-follow-interval", "100ms"}, want: []string{"FLEETD_CAMPAIGN_FOLLOW_INTERVAL", "-campaign-interval"}},
		{name: "replica dead-after below two heartbeats", args: []string{"-replica-dead-after", "2s"}, want: []string{"FLEETD_REPLICA_DEAD_AFTER", "3s"}},
		{name: "negative credential cache TTL", args: []string{"-credential-cache-ttl", "-1s"}, want: []string{"FLEETD_CREDENTIAL_CACHE_TTL", "negative"}},
		{name: "zero telemetry rate", args: []string{"-telemetry-rate", "0"}, want: []string{"FLEETD_TELEMETRY_RATE", "-1 for unlimited"}},
		{name: "zero gc percent", args: []string{"-gc-percent", "0"}, want: []string{"FLEETD_GC_PERCENT", "-1 for Go's default"}},
		{name: "zero telemetry burst", env: map[string]string{"FLEETD_TELEMETRY_BURST": "0"}, want: []string{"FLEETD_TELEMETRY_BURST", "at least 1"}},
		{name: "tiny telemetry queue", args: []string{"-telemetry-queue", "10"}, want: []string{"FLEETD_TELEMETRY_QUEUE", "1000"}},
		{name: "short telemetry retention", args: []string{"-telemetry-raw-retention", "10m", "-telemetry-hour-retention", "0s"},
			want: []string{"FLEETD_TELEMETRY_RAW_RETENTION", "FLEETD_TELEMETRY_HOUR_RETENTION", "at least 1h"}},
		{name: "bad telemetry retention", env: map[string]string{"FLEETD_TELEMETRY_MINUTE_RETENTION": "a month"}, want: []string{"FLEETD_TELEMETRY_MINUTE_RETENTION", "a month"}},
		{name: "short session idle", args: []string{"-session-idle", "30s"}, want: []string{"FLEETD_SESSION_IDLE", "at least 2m"}},
		{name: "session max below idle", env: map[string]string{"FLEETD_SESSION_IDLE": "2h", "FLEETD_SESSION_MAX": "1h"}, want: []string{"FLEETD_SESSION_MAX", "2h0m0s"}},
		{name: "short audit retention", args: []string{"-audit-retention", "1h"}, want: []string{"FLEETD_AUDIT_RETENTION", "at least 24h"}},
		{name: "event retention under a day", args: []string{"-event-retention", "12h"}, want: []string{"FLEETD_EVENT_RETENTION", "24h"}},
		{name: "no partitions ahead", args: []string{"-event-partitions-ahead", "0"}, want: []string{"FLEETD_EVENT_PARTITIONS_AHEAD", "between 1 and 90"}},
		{name: "rollups kept shorter than events", args: []string{"-event-retention", "2160h", "-rollup-retention", "720h"},
			want: []string{"FLEETD_ROLLUP_RETENTION", "2160h0m0s", "FLEETD_EVENT_RETENTION"}},
		{name: "hourly rollups kept shorter than minute ones", env: map[string]string{"FLEETD_HOURLY_ROLLUP_RETENTION": "100h"},
			want: []string{"FLEETD_HOURLY_ROLLUP_RETENTION", "FLEETD_ROLLUP_RETENTION"}},
		{name: "short pepper", env: map[string]string{"FLEETD_TOKEN_PEPPER": "abcd"}, want: []string{"FLEETD_TOKEN_PEPPER"}},
		{name: "several problems at once", env: map[string]string{"FLEETD_LOG_FORMAT": "xml", "FLEETD_HTTP_ADDR": "nope"},
			want: []string{"FLEETD_LOG_FORMAT", "FLEETD_HTTP_ADDR"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := parseConfig(tt.args, envFrom(tt.env), io.Discard)
			if err == nil {
				t.Fatal("parseConfig succeeded, want an error")
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
		})
	}
}

func TestAdminTokenGeneratedOnceAndPrivate(t *testing.T) {
	dir := t.TempDir()
	cfg := Config{DataDir: dir}
	first, err := adminToken(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	if len(first) != 64 {
		t.Fatalf("generated token has %d characters, want 64", len(first))
	}
	st, err := os.Stat(filepath.Join(dir, adminTokenFile))
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("token file mode %o, want 600", st.Mode().Perm())
	}
	second, err := adminToken(cfg, slog.New(slog.DiscardHandler))
	if err != nil || second != first {
		t.Fatalf("second start: got %q, %v; want the same token", second, err)
	}
	configured, _ := adminToken(Config{DataDir: dir, AdminToken: "configured-token-123"}, slog.New(slog.DiscardHandler))
	if configured != "configured-token-123" {
		t.Fatalf("configured token ignored: got %q", configured)
	}
}
