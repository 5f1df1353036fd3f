package main

import (
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/fleetd/fleetd/firmware"
	"github.com/fleetd/fleetd/fleet"
)

// Config is fleetd's whole configuration. Every field is a flag and an
// environment variable (FLEETD_ + the flag name in upper snake case); a flag
// wins over its variable. Secrets also come from files (*_FILE).
type Config struct {
	HTTPAddr        string
	MQTTAddr        string
	MQTTTLSAddr     string
	MQTTWSAddr      string
	TLSCertFile     string
	TLSKeyFile      string
	TLSClientCAFile string
	MQTTMaxPacket   int
	GCPercent       int
	ConnectTimeout  time.Duration
	ConnectRate     float64
	ConnectBurst    int
	ClientRate      float64
	ClientBurst     int
	// Limits on what a device or an unauthenticated client can make the broker do.
	AuthFailureRate  float64
	AuthFailureBurst int
	MaxPending       int
	MaxPendingPerSrc int
	PublishRate      float64
	PublishBurst     int
	SubscribeRate    float64
	SubscribeBurst   int
	SessionExpiry    time.Duration
	TokenPepper      string
	// AnalysisInterval is how often verdicts are learned and devices re-judged.
	AnalysisInterval time.Duration
	// CredentialCacheTTL is how long a cached credential is trusted without
	// reading the database again (a safety net under the replicas' signals).
	CredentialCacheTTL time.Duration
	// ReplicaDeadAfter is how long a replica may miss its heartbeats before
	// the others end the sessions it held.
	ReplicaDeadAfter time.Duration
	SigningKey       string
	TrustedKeysFile  string
	PublicURL        string
	OTAMaxDownloads  int
	CampaignInterval time.Duration
	// CampaignFollowInterval is how often a campaign that follows the fleet
	// looks for devices that start matching it.
	CampaignFollowInterval time.Duration
	// DeltaMaxImageMB and DeltaWait are firmware.DeltaOptions.
	DeltaMaxImageMB int
	DeltaWait       time.Duration
	DatabaseURL     string
	DataDir         string
	AdminToken      string
	LogLevel        slog.Level
	LogFormat       string
	PGBin           string
	ShutdownTimeout time.Duration
	Node            string

	// RecorderBehindAfter is how old the oldest connection event not yet in
	// the database may get before /readyz reports fleetd not ready.
	RecorderBehindAfter time.Duration
	// EventSpoolMaxBytes caps the file connection events are spooled to
	// while the database cannot take them.
	EventSpoolMaxBytes int64
	// EventRetention is how long connection events are kept (a day's
	// partition is dropped once all of it is older); EventPartitionsAhead
	// how many days of partitions are created ahead. RollupRetention and
	// HourlyRollupRetention keep the per-minute and hourly rollups longer.
	EventRetention        time.Duration
	EventPartitionsAhead  int
	RollupRetention       time.Duration
	HourlyRollupRetention time.Duration

	// Telemetry (devices/{id}/telemetry): the messages per second each
	// device may have stored (the excess is sampled away), the messages that
	// may wait for the database, and how long each tier is kept.
	TelemetryRate            float64
	TelemetryBurst           int
	TelemetryQueue           int
	TelemetryRawRetention    time.Duration
	TelemetryMinuteRetention time.Duration
	TelemetryHourRetention   time.Duration

	// Commands (POST /devices/{id}/commands): how many a device may have
	// pending, and how long and how many finished ones are kept.
	CommandMaxPending    int
	CommandRetention     time.Duration
	CommandKeepPerDevice int
	// Bulk commands (POST /commands): devices one may select, and how many
	// may run at once.
	CommandBulkMaxDevices int
	CommandBulkMaxRunning int
	// Webhooks (notify.Options): one attempt's time, the backoff between
	// attempts, attempts per delivery, failed attempts in a row that disable
	// a subscription, and how long notifications are kept.
	WebhookTimeout        time.Duration
	WebhookRetryMin       time.Duration
	WebhookRetryMax       time.Duration
	WebhookMaxAttempts    int
	WebhookDisableAfter   int
	NotificationRetention time.Duration
	// The offline watch (notify.OfflineWatch): how long a device must be
	// offline to be told of, and the share of a model's devices (with at
	// least a minimum of devices) that makes a model.offline notification.
	NotifyOfflineAfter           time.Duration
	NotifyModelOfflineShare      float64
	NotifyModelOfflineMinDevices int
	// Operators (auth.Options): console sessions end when idle for
	// SessionIdle or SessionMax after sign-in; the audit log is kept
	// AuditRetention (0: as long as connection events, EventRetention).
	SessionIdle    time.Duration
	SessionMax     time.Duration
	AuditRetention time.Duration

	// Limits on what one HTTP client can hold (web.Limits).
	OTAMaxDownloadsPerSource int
	HTTPIdleTimeout          time.Duration
	HTTPReadTimeout          time.Duration
	HTTPStallTimeout         time.Duration
	HTTPMaxStreams           int
	HTTPMaxStreamsPerToken   int
	HTTPAuthFailureRate      float64
	HTTPAuthFailureBurst     int
}

// setting binds one flag to its environment variable.
type setting struct {
	name  string // flag name; the variable is envName(name)
	usage string
	bind  func(fs *flag.FlagSet, name, usage string)
	// fromFile marks a secret that may instead be read from the file named by
	// -NAME-file / FLEETD_NAME_FILE.
	fromFile bool
}

func envName(flagName string) string {
	return "FLEETD_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

func (c *Config) settings() []setting {
	str := func(p *string, def string) func(*flag.FlagSet, string, string) {
		return func(fs *flag.FlagSet, n, u string) { fs.StringVar(p, n, def, u) }
	}
	dur := func(p *time.Duration, def time.Duration) func(*flag.FlagSet, string, string) {
		return func(fs *flag.FlagSet, n, u string) { fs.DurationVar(p, n, def, u) }
	}
	num := func(p *int, def int) func(*flag.FlagSet, string, string) {
		return func(fs *flag.FlagSet, n, u string) { fs.IntVar(p, n, def, u) }
	}
	float := func(p *float64, def float64) func(*flag.FlagSet, string, string) {
		return func(fs *flag.FlagSet, n, u string) { fs.Float64Var(p, n, def, u) }
	}
	host, _ := os.Hostname()
	return []setting{
		{name: "http-addr", usage: "HTTP listen address (API, console, probes, metrics)", bind: str(&c.HTTPAddr, ":8080")},
		{name: "http-idle-timeout", usage: "how long an idle keep-alive HTTP connection is kept open", bind: dur(&c.HTTPIdleTimeout, 60*time.Second)},
		{name: "http-read-timeout", usage: "time an HTTP client has to send a whole request, body included; a firmware upload may take longer but must bring data at least this often", bind: dur(&c.HTTPReadTimeout, 30*time.Second)},
		{name: "http-stall-timeout", usage: "an HTTP response whose client takes no data for this long is ended and its connection closed (a firmware download loses its slot); a slow reader is served to the end", bind: dur(&c.HTTPStallTimeout, 30*time.Second)},
		{name: "http-max-streams", usage: "live streams (GET /api/v1/stream) open at once; more get 429 with Retry-After; 0 = no cap", bind: num(&c.HTTPMaxStreams, 256)},
		{name: "http-max-streams-per-token", usage: "live streams open at once per bearer token; more get 429 with Retry-After; 0 = no cap", bind: num(&c.HTTPMaxStreamsPerToken, 8)},
		{name: "http-auth-failure-rate", usage: "wrong bearer tokens per second allowed per source address (IPv4 address or IPv6 /64); past it wrong tokens get 429 instead of 401 (the right token still works); 0 = unlimited", bind: float(&c.HTTPAuthFailureRate, 1)},
		{name: "http-auth-failure-burst", usage: "burst of wrong bearer tokens per source address", bind: num(&c.HTTPAuthFailureBurst, 20)},
		{name: "mqtt-addr", usage: "MQTT TCP listen address; empty turns it off", bind: str(&c.MQTTAddr, ":1883")},
		{name: "mqtt-tls-addr", usage: "MQTT over TLS listen address; empty turns it off", bind: str(&c.MQTTTLSAddr, "")},
		{name: "mqtt-ws-addr", usage: "MQTT over WebSocket listen address (path /mqtt); empty turns it off", bind: str(&c.MQTTWSAddr, "")},
		{name: "tls-cert-file", usage: "PEM certificate of the MQTT TLS listener", bind: str(&c.TLSCertFile, "")},
		{name: "tls-key-file", usage: "PEM private key of the MQTT TLS listener", bind: str(&c.TLSKeyFile, "")},
		{name: "tls-client-ca-file", usage: "PEM CA that signs device certificates; when set, the TLS listener requires a client certificate whose CN is the device id", bind: str(&c.TLSClientCAFile, "")},
		{name: "mqtt-max-packet", usage: "largest MQTT packet accepted, in bytes", bind: num(&c.MQTTMaxPacket, 256<<10)},
		{name: "gc-percent", usage: "Go's garbage collection target, as GOGC: the heap may grow this many percent over the live heap before a collection. Lower keeps less memory per idle device (25 instead of 100: about a third less RSS per idle device at 10 000 devices, bench/RESULTS.md) for more collections under load; ignored when the GOGC environment variable is set; -1 = Go's own default (100)", bind: num(&c.GCPercent, 25)},
		{name: "mqtt-connect-timeout", usage: "time a new connection has to send CONNECT (TLS handshake included)", bind: dur(&c.ConnectTimeout, 10*time.Second)},
		{name: "mqtt-connect-rate", usage: "connection attempts per second admitted by the broker; 0 = unlimited", bind: float(&c.ConnectRate, 5000)},
		{name: "mqtt-connect-burst", usage: "burst of connection attempts admitted above the rate", bind: num(&c.ConnectBurst, 1000)},
		{name: "mqtt-client-connect-rate", usage: "connection attempts per second admitted per device id; 0 = unlimited", bind: float(&c.ClientRate, 1)},
		{name: "mqtt-client-connect-burst", usage: "burst of connection attempts per device id", bind: num(&c.ClientBurst, 10)},
		{name: "mqtt-auth-failure-rate", usage: "failed authentications per second allowed per source address (IPv4 address or IPv6 /64); past it failures get CONNACK 'connection rate exceeded'; 0 = unlimited", bind: float(&c.AuthFailureRate, 1)},
		{name: "mqtt-auth-failure-burst", usage: "burst of failed authentications per source address", bind: num(&c.AuthFailureBurst, 20)},
		{name: "mqtt-max-pending-connects", usage: "connections that have not sent CONNECT yet, at most, in total; more are closed at accept; 0 = no cap", bind: num(&c.MaxPending, 10000)},
		{name: "mqtt-max-pending-connects-per-source", usage: "connections that have not sent CONNECT yet, at most, per source address; 0 = no cap", bind: num(&c.MaxPendingPerSrc, 1000)},
		{name: "mqtt-publish-rate", usage: "packets per second a device session may send (PINGREQ aside); a session over it is ended with DISCONNECT 0x96; -1 = unlimited", bind: float(&c.PublishRate, 100)},
		{name: "mqtt-publish-burst", usage: "burst of packets a device session may send above the rate", bind: num(&c.PublishBurst, 500)},
		{name: "mqtt-subscribe-rate", usage: "subscription filters per second a device session may send (SUBSCRIBE and UNSUBSCRIBE); -1 = unlimited", bind: float(&c.SubscribeRate, 5)},
		{name: "mqtt-subscribe-burst", usage: "burst of subscription filters a device session may send above the rate", bind: num(&c.SubscribeBurst, 50)},
		{name: "mqtt-session-expiry", usage: "longest time a disconnected persistent session is kept", bind: dur(&c.SessionExpiry, time.Hour)},
		{name: "token-pepper", usage: "secret key for device token hashes (64 hex characters); empty generates one in the data dir; replicas must share it", bind: str(&c.TokenPepper, ""), fromFile: true},
		{name: "database-url", usage: "PostgreSQL URL; empty starts an embedded PostgreSQL under the data dir", bind: str(&c.DatabaseURL, ""), fromFile: true},
		{name: "data-dir", usage: "directory for the embedded database, generated secrets and spooled events", bind: str(&c.DataDir, "./fleetd-data")},
		{name: "recorder-behind-after", usage: "how old the oldest connection event not yet in the database (in memory or spooled) may get before /readyz fails", bind: dur(&c.RecorderBehindAfter, 30*time.Second)},
		{name: "event-spool-max-bytes", usage: "cap on the file connection events are spooled to while the database cannot take them, in bytes; at the cap /readyz fails and events past what memory holds are dropped and counted", bind: func(fs *flag.FlagSet, n, u string) { fs.Int64Var(&c.EventSpoolMaxBytes, n, 1<<30, u) }},
		{name: "telemetry-rate", usage: "telemetry messages per second stored per device; the excess is dropped (sampled) and a rejected event a minute says how many; -1 = unlimited", bind: float(&c.TelemetryRate, 1)},
		{name: "telemetry-burst", usage: "burst of telemetry messages per device above the rate", bind: num(&c.TelemetryBurst, 10)},
		{name: "telemetry-queue", usage: "telemetry messages that may wait for the database (in memory, not spooled); past it new ones are dropped and counted", bind: num(&c.TelemetryQueue, 100_000)},
		{name: "telemetry-raw-retention", usage: "how long raw telemetry points are kept (daily partitions: a day is dropped once it ended this long ago)", bind: dur(&c.TelemetryRawRetention, 48*time.Hour)},
		{name: "telemetry-minute-retention", usage: "how long per-minute telemetry rollups are kept", bind: dur(&c.TelemetryMinuteRetention, 30*24*time.Hour)},
		{name: "telemetry-hour-retention", usage: "how long hourly telemetry rollups (and the latest values of silent devices) are kept", bind: dur(&c.TelemetryHourRetention, 400*24*time.Hour)},
		{name: "command-max-pending", usage: "commands a device may have queued or delivered but unanswered at once; one more is refused with 429", bind: num(&c.CommandMaxPending, 16)},
		{name: "command-retention", usage: "how long finished commands (answered, timed out, expired) are kept", bind: dur(&c.CommandRetention, 7*24*time.Hour)},
		{name: "command-keep-per-device", usage: "finished commands kept per device at most (the newest); older ones are pruned", bind: num(&c.CommandKeepPerDevice, 100)},
		{name: "command-bulk-max-devices", usage: "devices one bulk command may select; a selector matching more is refused", bind: num(&c.CommandBulkMaxDevices, 100000)},
		{name: "command-bulk-max-running", usage: "bulk commands running at once; one more is refused with 429", bind: num(&c.CommandBulkMaxRunning, 10)},
		{name: "webhook-timeout", usage: "time one webhook delivery attempt may take, connection and answer included", bind: dur(&c.WebhookTimeout, 10*time.Second)},
		{name: "webhook-retry-min", usage: "wait after a webhook delivery's first failed attempt; it doubles with each attempt (with a random part) up to -webhook-retry-max", bind: dur(&c.WebhookRetryMin, 10*time.Second)},
		{name: "webhook-retry-max", usage: "longest wait between two attempts of a webhook delivery", bind: dur(&c.WebhookRetryMax, time.Hour)},
		{name: "webhook-max-attempts", usage: "attempts of one webhook delivery before it is failed", bind: num(&c.WebhookMaxAttempts, 10)},
		{name: "webhook-disable-after", usage: "failed webhook delivery attempts in a row that disable the subscription (a webhook.disabled notification tells the others)", bind: num(&c.WebhookDisableAfter, 20)},
		{name: "notification-retention", usage: "how long notifications and their webhook delivery log are kept", bind: dur(&c.NotificationRetention, 720*time.Hour)},
		{name: "notify-offline-after", usage: "a device offline this long is told of (devices.offline), and counts in its model's offline share; 0 turns the offline watch off", bind: dur(&c.NotifyOfflineAfter, 15*time.Minute)},
		{name: "notify-model-offline-share", usage: "share (0-1) of a model's active devices offline longer than -notify-offline-after that makes a model.offline notification (model.back_online when below again); 0 = off", bind: float(&c.NotifyModelOfflineShare, 0.2)},
		{name: "notify-model-offline-min-devices", usage: "models with fewer active devices are not judged by their offline share", bind: num(&c.NotifyModelOfflineMinDevices, 10)},
		{name: "session-idle", usage: "a console session unused this long ends (at least 2m)", bind: dur(&c.SessionIdle, 30*time.Minute)},
		{name: "session-max", usage: "a console session ends this long after sign-in however much it is used (at least -session-idle, at most 720h)", bind: dur(&c.SessionMax, 12*time.Hour)},
		{name: "audit-retention", usage: "how long audit log entries are kept, at least 24h; 0 = as long as connection events (-event-retention)", bind: dur(&c.AuditRetention, 0)},
		{name: "event-retention", usage: "how long connection events are kept, at least 24h; a day's partition of events is dropped (never a mass DELETE) once all of it is older", bind: dur(&c.EventRetention, 720*time.Hour)},
		{name: "event-partitions-ahead", usage: "days after today whose event partitions are created ahead of time (1-90); a write for a day without one creates it", bind: num(&c.EventPartitionsAhead, 7)},
		{name: "rollup-retention", usage: "how long the per-minute event rollups are kept (fleet health, fleet history by 1m and 5m, learned verdicts), at least 48h and at least -event-retention", bind: dur(&c.RollupRetention, 2160*time.Hour)},
		{name: "hourly-rollup-retention", usage: "how long the hourly event rollups are kept (fleet history by 1h and 1d), at least -rollup-retention", bind: dur(&c.HourlyRollupRetention, 8760*time.Hour)},
		{name: "admin-token", usage: "bootstrap (break-glass) admin bearer token for /api/v1, for the first admin user and recovery; empty generates one on first start, kept in the data dir", bind: str(&c.AdminToken, ""), fromFile: true},
		{name: "analysis-interval", usage: "how often firmware verdicts are learned and device compatibility re-judged", bind: dur(&c.AnalysisInterval, time.Minute)},
		{name: "replica-dead-after", usage: "how long a replica sharing the database may be silent (it writes a heartbeat every 2 s) before the others record the sessions it held as ended (replica_lost)", bind: dur(&c.ReplicaDeadAfter, 15*time.Second)},
		{name: "credential-cache-ttl", usage: "how long a cached device credential is used before it is read from the database again; replicas also tell each other of every change at once, this is the safety net; 0 = until changed", bind: dur(&c.CredentialCacheTTL, 5*time.Minute)},
		{name: "firmware-signing-key", usage: "ed25519 seed (64 hex characters) that signs firmware images; empty generates one in the data dir", bind: str(&c.SigningKey, ""), fromFile: true},
		{name: "firmware-trusted-keys-file", usage: "file of base64 ed25519 public keys (one per line) whose signatures uploads may carry instead of the server's", bind: str(&c.TrustedKeysFile, "")},
		{name: "public-url", usage: "base URL devices download firmware from (default: http:// and the HTTP listener's address)", bind: str(&c.PublicURL, "")},
		{name: "ota-max-downloads", usage: "concurrent firmware downloads; more get 503 with Retry-After", bind: num(&c.OTAMaxDownloads, 100)},
		{name: "ota-max-downloads-per-source", usage: "concurrent firmware downloads per source address (IPv4 address or IPv6 /64); more get 429 with Retry-After; 0 = no cap (devices behind one NAT share an address)", bind: num(&c.OTAMaxDownloadsPerSource, 4)},
		{name: "campaign-interval", usage: "how often running campaigns are stepped", bind: dur(&c.CampaignInterval, time.Second)},
		{name: "campaign-follow-interval", usage: "how often a campaign that follows the fleet looks for devices that start matching its selector", bind: dur(&c.CampaignFollowInterval, firmware.DefaultFollowInterval)},
		{name: "delta-max-image-mb", usage: "largest firmware image (base or target, MiB) a delta campaign builds a delta for; larger ones are sent whole; building holds about 8 times it in memory", bind: num(&c.DeltaMaxImageMB, firmware.DefaultDeltaMaxImage>>20)},
		{name: "delta-wait", usage: "how long a delta campaign holds the jobs of devices whose delta is still being built before it sends them the full image", bind: dur(&c.DeltaWait, firmware.DefaultDeltaWait)},
		{name: "log-level", usage: "log level: debug, info, warn, error", bind: func(fs *flag.FlagSet, n, u string) { fs.TextVar(&c.LogLevel, n, slog.LevelInfo, u) }},
		{name: "log-format", usage: "log format: json or text", bind: str(&c.LogFormat, "json")},
		{name: "pg-bin", usage: "directory holding the PostgreSQL server binaries for the embedded database (default: search PATH and the usual locations)", bind: str(&c.PGBin, "")},
		{name: "shutdown-timeout", usage: "how long a graceful shutdown may take before components are stopped hard", bind: func(fs *flag.FlagSet, n, u string) { fs.DurationVar(&c.ShutdownTimeout, n, 20*time.Second, u) }},
		{name: "node", usage: "name of this fleetd replica, recorded with every connection", bind: str(&c.Node, host)},
	}
}

// errHelp is returned when -h was asked for; usage has been printed.
var errHelp = errors.New("help requested")

// parseConfig reads the environment, then the flags, then the secret files,
// and validates the result. Every error names the setting (flag and variable)
// it is about.
func parseConfig(args []string, getenv func(string) string, usageOut io.Writer) (Config, error) {
	var c Config
	fs := flag.NewFlagSet("fleetd", flag.ContinueOnError)
	fs.SetOutput(usageOut)
	files := map[string]*string{}
	settings := c.settings()
	for _, s := range settings {
		s.bind(fs, s.name, s.usage+" (env "+envName(s.name)+")")
		if s.fromFile {
			p := new(string)
			files[s.name] = p
			fs.StringVar(p, s.name+"-file", "", "read "+s.name+" from this file (env "+envName(s.name+"-file")+")")
		}
	}
	// Environment first, through the flags' own parsers, so that a variable and
	// its flag accept exactly the same values.
	var errs []error
	fs.VisitAll(func(f *flag.Flag) {
		if v := getenv(envName(f.Name)); v != "" {
			if err := fs.Set(f.Name, v); err != nil {
				errs = append(errs, fmt.Errorf("%s: invalid value %q: %v", envName(f.Name), v, err))
			}
		}
	})
	if err := errors.Join(errs...); err != nil {
		return c, err
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return c, errHelp
		}
		return c, err
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected argument %q (fleetd takes only flags; see -h)", fs.Arg(0))
	}
	for _, s := range settings {
		if !s.fromFile {
			continue
		}
		path := *files[s.name]
		if path == "" {
			continue
		}
		value := fs.Lookup(s.name).Value
		if value.String() != "" {
			return c, fmt.Errorf("%s and %s are both set: use one", envName(s.name), envName(s.name+"-file"))
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return c, fmt.Errorf("%s: %w", envName(s.name+"-file"), err)
		}
		secret := strings.TrimSpace(string(data))
		if secret == "" {
			return c, fmt.Errorf("%s: file %s is empty", envName(s.name+"-file"), path)
		}
		_ = value.Set(secret)
	}
	return c, c.validate()
}

// validate checks every setting before anything starts, and reports all the
// problems at once.
func (c *Config) validate() error {
	var errs []error
	bad := func(name, format string, a ...any) {
		errs = append(errs, fmt.Errorf("%s (-%s): %s", envName(name), name, fmt.Sprintf(format, a...)))
	}
	if c.HTTPAddr == "" {
		bad("http-addr", "must not be empty")
	} else if err := checkAddr(c.HTTPAddr); err != nil {
		bad("http-addr", "%v", err)
	}
	if c.MQTTAddr != "" {
		if err := checkAddr(c.MQTTAddr); err != nil {
			bad("mqtt-addr", "%v", err)
		}
	}
	for _, l := range []struct{ name, addr string }{{"mqtt-tls-addr", c.MQTTTLSAddr}, {"mqtt-ws-addr", c.MQTTWSAddr}} {
		if l.addr != "" {
			if err := checkAddr(l.addr); err != nil {
				bad(l.name, "%v", err)
			}
		}
	}
	if c.MQTTTLSAddr != "" {
		for _, f := range []struct{ name, path string }{{"tls-cert-file", c.TLSCertFile}, {"tls-key-file", c.TLSKeyFile}} {
			if f.path == "" {
				bad(f.name, "is required when FLEETD_MQTT_TLS_ADDR is set")
			} else if _, err := os.Stat(f.path); err != nil {
				bad(f.name, "%v", err)
			}
		}
	}
	if c.TLSClientCAFile != "" {
		if _, err := os.Stat(c.TLSClientCAFile); err != nil {
			bad("tls-client-ca-file", "%v", err)
		}
	}
	if c.GCPercent < 1 && c.GCPercent != -1 {
		bad("gc-percent", "must be 1 or more, or -1 for Go's default")
	}
	if c.MQTTMaxPacket < 1024 || c.MQTTMaxPacket > 256<<20 {
		bad("mqtt-max-packet", "must be between 1024 and %d bytes", 256<<20)
	}
	if c.ConnectTimeout <= 0 {
		bad("mqtt-connect-timeout", "must be positive")
	}
	// Rates and caps: 0 turns a limit off; bursts need room for one.
	for _, f := range []struct {
		name string
		v    float64
	}{
		{"mqtt-connect-rate", c.ConnectRate}, {"mqtt-client-connect-rate", c.ClientRate}, {"mqtt-auth-failure-rate", c.AuthFailureRate},
		{"mqtt-max-pending-connects", float64(c.MaxPending)}, {"mqtt-max-pending-connects-per-source", float64(c.MaxPendingPerSrc)},
		{"http-auth-failure-rate", c.HTTPAuthFailureRate}, {"http-max-streams", float64(c.HTTPMaxStreams)},
		{"http-max-streams-per-token", float64(c.HTTPMaxStreamsPerToken)}, {"ota-max-downloads-per-source", float64(c.OTAMaxDownloadsPerSource)},
	} {
		if f.v < 0 {
			bad(f.name, "must not be negative")
		}
	}
	for _, f := range []struct {
		name string
		v    int
	}{
		{"mqtt-connect-burst", c.ConnectBurst}, {"mqtt-client-connect-burst", c.ClientBurst}, {"mqtt-auth-failure-burst", c.AuthFailureBurst},
		{"mqtt-publish-burst", c.PublishBurst}, {"mqtt-subscribe-burst", c.SubscribeBurst}, {"http-auth-failure-burst", c.HTTPAuthFailureBurst},
	} {
		if f.v < 1 {
			bad(f.name, "must be at least 1")
		}
	}
	// A session rate of 0 would end every session at its first packets.
	for _, f := range []struct {
		name string
		v    float64
	}{{"mqtt-publish-rate", c.PublishRate}, {"mqtt-subscribe-rate", c.SubscribeRate}} {
		if f.v <= 0 && f.v != -1 {
			bad(f.name, "must be above 0, or -1 for unlimited")
		}
	}
	if c.SigningKey != "" {
		if b, err := hex.DecodeString(c.SigningKey); err != nil || len(b) != 32 {
			bad("firmware-signing-key", "must be 64 hex characters (an ed25519 seed)")
		}
	}
	if c.TrustedKeysFile != "" {
		if _, err := os.Stat(c.TrustedKeysFile); err != nil {
			bad("firmware-trusted-keys-file", "%v", err)
		}
	}
	if c.PublicURL != "" && !strings.HasPrefix(c.PublicURL, "http://") && !strings.HasPrefix(c.PublicURL, "https://") {
		bad("public-url", "must start with http:// or https://")
	}
	for _, f := range []struct {
		name string
		v    time.Duration
	}{{"http-idle-timeout", c.HTTPIdleTimeout}, {"http-read-timeout", c.HTTPReadTimeout}, {"http-stall-timeout", c.HTTPStallTimeout}} {
		if f.v <= 0 {
			bad(f.name, "must be positive")
		}
	}
	if c.OTAMaxDownloads < 1 {
		bad("ota-max-downloads", "must be at least 1")
	}
	if c.CredentialCacheTTL < 0 {
		bad("credential-cache-ttl", "must not be negative")
	}
	if c.ReplicaDeadAfter < 3*time.Second {
		// Heartbeats come every 2 s: less would end a live replica's sessions.
		bad("replica-dead-after", "must be at least 3s")
	}
	if c.CampaignInterval < 100*time.Millisecond || c.CampaignInterval > 2*time.Second {
		// Above 2 s the pacing schedule (firmware.PacingCatchUp) could not
		// make up a late step, and campaigns would run under their rate.
		bad("campaign-interval", "must be between 100ms and 2s")
	}
	if c.CampaignFollowInterval < c.CampaignInterval || c.CampaignFollowInterval > time.Hour {
		// A look happens in a campaign's step, so it cannot come more often
		// than the steps; an hour is already a long wait for a new device.
		bad("campaign-follow-interval", "must be between -campaign-interval and 1h")
	}
	if c.DeltaMaxImageMB < 1 || int64(c.DeltaMaxImageMB)<<20 > firmware.MaxDeltaImage {
		bad("delta-max-image-mb", "must be between 1 and %d", firmware.MaxDeltaImage>>20)
	}
	if c.DeltaWait <= 0 {
		bad("delta-wait", "must be positive")
	}
	if c.AnalysisInterval < time.Second {
		bad("analysis-interval", "must be at least 1s")
	}
	if c.SessionExpiry <= 0 {
		bad("mqtt-session-expiry", "must be positive")
	}
	if c.TokenPepper != "" {
		if b, err := hex.DecodeString(c.TokenPepper); err != nil || len(b) < 32 {
			bad("token-pepper", "must be at least 64 hex characters (32 bytes)")
		}
	}
	if c.DataDir == "" {
		bad("data-dir", "must not be empty")
	}
	if c.RecorderBehindAfter <= 0 {
		bad("recorder-behind-after", "must be positive")
	}
	if c.EventSpoolMaxBytes < 1<<20 {
		// Less would not hold a few thousand events: the cap would be hit in
		// the first seconds of any outage.
		bad("event-spool-max-bytes", "must be at least %d bytes (1 MiB)", 1<<20)
	}
	if c.TelemetryRate <= 0 && c.TelemetryRate != -1 {
		bad("telemetry-rate", "must be above 0, or -1 for unlimited")
	}
	if c.TelemetryBurst < 1 {
		bad("telemetry-burst", "must be at least 1")
	}
	if c.TelemetryQueue < 1000 {
		// Less would drop telemetry at the first slow batch.
		bad("telemetry-queue", "must be at least 1000 messages")
	}
	for _, f := range []struct {
		name string
		v    time.Duration
	}{{"telemetry-raw-retention", c.TelemetryRawRetention}, {"telemetry-minute-retention", c.TelemetryMinuteRetention}, {"telemetry-hour-retention", c.TelemetryHourRetention}} {
		if f.v < time.Hour {
			bad(f.name, "must be at least 1h")
		}
	}
	if c.CommandMaxPending < 1 || c.CommandMaxPending > 1000 {
		bad("command-max-pending", "must be between 1 and 1000")
	}
	if c.CommandRetention < time.Minute {
		bad("command-retention", "must be at least 1m")
	}
	if c.CommandKeepPerDevice < 1 {
		bad("command-keep-per-device", "must be at least 1")
	}
	if c.CommandBulkMaxDevices < 1 || c.CommandBulkMaxDevices > 1_000_000 {
		bad("command-bulk-max-devices", "must be between 1 and 1000000")
	}
	if c.CommandBulkMaxRunning < 1 || c.CommandBulkMaxRunning > 1000 {
		bad("command-bulk-max-running", "must be between 1 and 1000")
	}
	if c.WebhookTimeout < 100*time.Millisecond || c.WebhookTimeout > 5*time.Minute {
		bad("webhook-timeout", "must be between 100ms and 5m")
	}
	if c.WebhookRetryMin < 10*time.Millisecond {
		bad("webhook-retry-min", "must be at least 10ms")
	}
	if c.WebhookRetryMax < c.WebhookRetryMin {
		bad("webhook-retry-max", "must be at least -webhook-retry-min (%s)", c.WebhookRetryMin)
	}
	if c.WebhookMaxAttempts < 1 || c.WebhookMaxAttempts > 100 {
		bad("webhook-max-attempts", "must be between 1 and 100")
	}
	if c.WebhookDisableAfter < 1 {
		bad("webhook-disable-after", "must be at least 1")
	}
	if c.NotifyOfflineAfter != 0 && c.NotifyOfflineAfter < time.Second {
		bad("notify-offline-after", "must be 0 (off) or at least 1s")
	}
	if c.NotifyModelOfflineShare < 0 || c.NotifyModelOfflineShare > 1 {
		bad("notify-model-offline-share", "must be between 0 (off) and 1")
	}
	if c.NotifyModelOfflineMinDevices < 1 {
		bad("notify-model-offline-min-devices", "must be at least 1")
	}
	if c.NotificationRetention < time.Hour {
		bad("notification-retention", "must be at least 1h")
	}
	if c.SessionIdle < 2*time.Minute {
		// The idle clock is refreshed at most once a minute.
		bad("session-idle", "must be at least 2m")
	}
	if c.SessionMax < c.SessionIdle || c.SessionMax > 720*time.Hour {
		bad("session-max", "must be at least %s (FLEETD_SESSION_IDLE) and at most 720h", c.SessionIdle)
	}
	if c.AuditRetention != 0 && c.AuditRetention < 24*time.Hour {
		bad("audit-retention", "must be 0 (as -event-retention) or at least 24h")
	}
	if c.EventRetention < 24*time.Hour {
		// Events are dropped by the day; the diagnosis and the verdicts'
		// samples read the last day of them.
		bad("event-retention", "must be at least 24h")
	}
	if c.EventPartitionsAhead < 1 || c.EventPartitionsAhead > 90 {
		bad("event-partitions-ahead", "must be between 1 and 90 days")
	}
	if c.RollupRetention < 48*time.Hour || c.RollupRetention < c.EventRetention {
		// Fleet health reads the last day of them, the verdicts their window.
		bad("rollup-retention", "must be at least 48h and at least %s (FLEETD_EVENT_RETENTION)", c.EventRetention)
	}
	if c.HourlyRollupRetention < c.RollupRetention {
		bad("hourly-rollup-retention", "must be at least %s (FLEETD_ROLLUP_RETENTION)", c.RollupRetention)
	}
	if c.DatabaseURL != "" {
		if _, err := pgxpool.ParseConfig(c.DatabaseURL); err != nil {
			bad("database-url", "not a valid PostgreSQL connection string: %v", err)
		}
	}
	if c.AdminToken != "" && len(c.AdminToken) < 16 {
		bad("admin-token", "must be at least 16 characters (or leave it empty to have one generated)")
	}
	if c.LogFormat != "json" && c.LogFormat != "text" {
		bad("log-format", "must be json or text, not %q", c.LogFormat)
	}
	if c.ShutdownTimeout <= 0 {
		bad("shutdown-timeout", "must be positive")
	}
	if c.Node == "" {
		bad("node", "must not be empty")
	}
	return errors.Join(errs...)
}

// auditRetention is how long the audit log is kept.
func (c *Config) auditRetention() time.Duration {
	if c.AuditRetention == 0 {
		return c.EventRetention
	}
	return c.AuditRetention
}

// eventRetention is what the event maintenance loop keeps.
func (c *Config) eventRetention() fleet.EventRetention {
	return fleet.EventRetention{Events: c.EventRetention, MinuteRollups: c.RollupRetention,
		HourlyRollups: c.HourlyRollupRetention, DaysAhead: c.EventPartitionsAhead}
}

func checkAddr(addr string) error {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%q is not host:port", addr)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
		return fmt.Errorf("%q has no valid port", addr)
	}
	return nil
}
