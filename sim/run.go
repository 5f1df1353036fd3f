package sim

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"log/slog"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/fleetd/fleetd/fleet"
	"github.com/fleetd/fleetd/internal/devcert"
	"github.com/fleetd/fleetd/web/client"
)

// Options are the runner's own settings, outside the fleet file.
type Options struct {
	Logger *slog.Logger
	// Progress receives the live progress line (nil = none).
	Progress io.Writer
	// AdminToken registers devices when the fleet file names no token file.
	AdminToken string
}

// Simulator runs a fleet.
type Simulator struct {
	fleet     *Fleet
	opts      Options
	logger    *slog.Logger
	stats     *stats
	http      *http.Client
	ramp      *rate.Limiter
	serverCAs *x509.CertPool
	trusted   []ed25519.PublicKey // keys whose job and image signatures devices accept
	devices   []*device
	// api registers the devices of cohorts that start late (start_after)
	// when they start; nil when the run does not register.
	api     *client.Client
	images  *images           // the image bytes devices run, by digest (delta.go)
	imageOf map[string]string // version → digest of ota.images

	failMu   sync.Mutex
	failJobs map[*Cohort]int // OTA jobs seen per cohort, to spread failures evenly
}

// failsNext decides whether a cohort's next OTA job fails: exactly the
// cohort's rate of its jobs, spread evenly (with 0.4, the 3rd and 5th of
// every 5), so a canary of five sees two failures every time.
func (s *Simulator) failsNext(c *Cohort, rate float64) bool {
	s.failMu.Lock()
	defer s.failMu.Unlock()
	if s.failJobs == nil {
		s.failJobs = map[*Cohort]int{}
	}
	k := float64(s.failJobs[c])
	s.failJobs[c]++
	return int(math.Floor((k+1)*rate+1e-9)) > int(math.Floor(k*rate+1e-9))
}

// New prepares a run: tokens (registering the devices when asked to) and
// certificates. Nothing connects before Run.
func New(ctx context.Context, f *Fleet, opts Options) (*Simulator, error) {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	s := &Simulator{fleet: f, opts: opts, logger: opts.Logger, stats: newStats(),
		ramp: rate.NewLimiter(rate.Limit(f.Run.Ramp), max(1, int(f.Run.Ramp/10)))}
	s.http = &http.Client{Timeout: 5 * time.Minute, Transport: &http.Transport{
		MaxIdleConnsPerHost: 64, MaxConnsPerHost: 256, IdleConnTimeout: 30 * time.Second,
	}, CheckRedirect: func(req *http.Request, via []*http.Request) error {
		// A download may be redirected only to a host the fleet allows.
		if len(via) >= 5 {
			return errors.New("too many redirects")
		}
		return f.checkURL("redirect of a firmware download", req.URL.String())
	}}
	for i, raw := range append([]string{f.OTA.PublicKey}, f.OTA.TrustedKeys...) {
		if raw == "" {
			continue
		}
		k, err := base64.StdEncoding.DecodeString(raw)
		if err != nil || len(k) != ed25519.PublicKeySize {
			field := "ota.public_key"
			if i > 0 {
				field = fmt.Sprintf("ota.trusted_keys[%d]", i-1)
			}
			return nil, fmt.Errorf("%s must be a base64 ed25519 public key (32 bytes)", field)
		}
		s.trusted = append(s.trusted, k)
	}
	if f.Server.CAFile != "" {
		pem, err := os.ReadFile(f.Server.CAFile)
		if err != nil {
			return nil, fmt.Errorf("server.ca_file: %w", err)
		}
		s.serverCAs = x509.NewCertPool()
		if !s.serverCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("server.ca_file: %s holds no PEM certificate", f.Server.CAFile)
		}
	}
	var err error
	if s.imageOf, err = s.loadImages(); err != nil {
		return nil, err
	}
	if err := s.buildDevices(); err != nil {
		return nil, err
	}
	if err := s.provisionTokens(ctx); err != nil {
		return nil, err
	}
	if err := s.provisionCerts(); err != nil {
		return nil, err
	}
	return s, nil
}

// buildDevices lays out every device: ids, firmware, source addresses.
func (s *Simulator) buildDevices() error {
	srcs := make([]net.IP, 0, len(s.fleet.Run.SourceAddrs))
	for _, a := range s.fleet.Run.SourceAddrs {
		srcs = append(srcs, net.ParseIP(a))
	}
	n := 0
	for ci := range s.fleet.Cohorts {
		c := &s.fleet.Cohorts[ci]
		var oversize []byte
		if c.OversizedEvery > 0 {
			oversize = oversizedPayload(c.OversizedBytes)
		}
		var pairSrc net.IP
		for i := range c.Count {
			id := fmt.Sprintf("%s%d", c.IDPrefix, i)
			var src net.IP
			if len(srcs) > 0 {
				src = srcs[n%len(srcs)]
			}
			twin := 0 // which device of a duplicate pair
			if c.DuplicateIDs {
				// Pairs share an id. By default they connect from two
				// different addresses, as two boxes flashed with the same
				// identity would; with same_address both use the first's
				// address (the system's choice when none is configured,
				// 127.0.0.1 on loopback) on different ports, as two gateways
				// behind one NAT router do.
				id, twin = fmt.Sprintf("%s%d", c.IDPrefix, i/2), i%2
				switch {
				case twin == 0:
					pairSrc = src
				case c.DuplicateFrom == "same_address":
					src = pairSrc
				default:
					src = twinAddress(srcs, n, src)
				}
			}
			d := &device{sim: s, cohort: c, id: id, firmware: c.Firmware, image: s.imageOf[c.Firmware], src: src, jobsSeen: map[string]bool{},
				rnd:     rand.New(rand.NewPCG(uint64(n), uint64(time.Now().UnixNano()))),
				flapRnd: flapSource(id, twin), oversize: oversize, booted: time.Now()}
			if c.Link != nil {
				// Seeded like the flap jitter: a run repeats its link.
				d.link = newLinkState(c.Link, flapSource(id+"/link", twin), i)
			}
			s.devices = append(s.devices, d)
			n++
		}
	}
	return nil
}

// flapSource is the random source of a device's flap jitter: seeded from the
// device id (and, for the two devices of a duplicate pair, which one it is),
// so that every run of a fleet file gives each device the same sequence of
// session lengths.
func flapSource(id string, twin int) *rand.Rand {
	h := fnv.New64a()
	h.Write([]byte(id))
	return rand.New(rand.NewPCG(h.Sum64(), uint64(twin)))
}

// oversizedPayload is a JSON telemetry message of exactly n bytes (n ≥ 10):
// a log buffer dumped in one message.
func oversizedPayload(n int) []byte {
	const head, tail = `{"log":"`, `"}`
	b := make([]byte, 0, n)
	b = append(b, head...)
	b = append(b, bytes.Repeat([]byte{'x'}, n-len(head)-len(tail))...)
	return append(b, tail...)
}

// twinAddress picks the second device of a duplicate pair (device n) a
// source address other than the first's (device n-1): its own turn in the
// round robin of configured addresses, src, when there are several, or
// 127.0.0.2 on loopback.
func twinAddress(srcs []net.IP, n int, src net.IP) net.IP {
	if len(srcs) > 1 && !src.Equal(srcs[(n-1)%len(srcs)]) {
		return src
	}
	return net.IPv4(127, 0, 0, 2)
}

// provisionTokens registers the devices through the API (a device that
// exists gets a fresh token), or reads them from the tokens file.
func (s *Simulator) provisionTokens(ctx context.Context) error {
	var need []*device
	late := false
	for _, d := range s.devices {
		if d.cohort.Credentials != "token" && d.cohort.Credentials != "bad_token" {
			continue
		}
		if d.cohort.StartAfter > 0 && s.fleet.Run.TokensFile == "" {
			late = true // registered when it starts (Run)
			continue
		}
		need = append(need, d)
	}
	if len(need) == 0 && !late {
		return nil
	}
	if s.fleet.Run.TokensFile != "" {
		data, err := os.ReadFile(s.fleet.Run.TokensFile)
		if err != nil {
			return fmt.Errorf("run.tokens_file: %w", err)
		}
		tokens := map[string]string{}
		if err := json.Unmarshal(data, &tokens); err != nil {
			return fmt.Errorf("run.tokens_file: want a JSON object of device id to token: %w", err)
		}
		for _, d := range need {
			if d.token = tokens[d.id]; d.token == "" {
				return fmt.Errorf("run.tokens_file has no token for %s", d.id)
			}
		}
		return nil
	}
	token := s.opts.AdminToken
	if s.fleet.Server.AdminTokenFile != "" {
		b, err := os.ReadFile(s.fleet.Server.AdminTokenFile)
		if err != nil {
			return fmt.Errorf("server.admin_token_file: %w", err)
		}
		token = strings.TrimSpace(string(b))
	}
	if token == "" {
		return errors.New("registering devices needs the admin token: server.admin_token_file or FLEETD_ADMIN_TOKEN")
	}
	api := client.New(s.fleet.Server.API, token)
	s.api = api
	tokens := map[string]string{}
	var mu sync.Mutex
	ids := make(chan *device)
	errs := make(chan error, 16)
	var wg sync.WaitGroup
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for d := range ids {
				mu.Lock()
				_, done := tokens[d.id]
				mu.Unlock()
				if done {
					continue
				}
				tok, err := registerOrRotate(ctx, api, d)
				if err != nil {
					errs <- fmt.Errorf("register %s: %w", d.id, err)
					return
				}
				if d.cohort.Decommissioned {
					// The device keeps the token it was just given: valid a
					// moment ago, revoked now.
					if _, err := api.Decommission(ctx, d.id); err != nil {
						errs <- fmt.Errorf("decommission %s: %w", d.id, err)
						return
					}
				}
				mu.Lock()
				tokens[d.id] = tok
				mu.Unlock()
			}
		}()
	}
	go func() {
		defer close(ids)
		seen := map[string]bool{}
		for _, d := range need {
			if seen[d.id] {
				continue
			}
			seen[d.id] = true
			select {
			case ids <- d:
			case <-ctx.Done():
				return
			}
		}
	}()
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		return err
	}
	decommissioned := map[string]bool{}
	for _, d := range need {
		d.token = tokens[d.id]
		if d.cohort.Decommissioned {
			decommissioned[d.id] = true
		}
	}
	s.logger.Info("devices registered", "devices", len(tokens), "decommissioned", len(decommissioned))
	return nil
}

func registerOrRotate(ctx context.Context, api *client.Client, d *device) (string, error) {
	tags := d.cohort.registeredTags()
	reg, err := api.RegisterDevice(ctx, fleet.NewDevice{ID: d.id, Model: d.cohort.Model, Tags: tags})
	var apiErr *client.Error
	if errors.As(err, &apiErr) && apiErr.Status == http.StatusConflict {
		// Registered by an earlier run: the fleet file's tags (a time zone
		// may have changed) and a new token.
		if len(d.cohort.Tags) > 0 {
			if _, err := api.UpdateDevice(ctx, d.id, fleet.Patch{Tags: &tags}); err != nil {
				return "", err
			}
		}
		return api.RotateToken(ctx, d.id)
	}
	if err != nil {
		return "", err
	}
	return reg.Token, nil
}

func sanitizeTag(s string) string {
	return strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '_' || r == '-' {
			return r
		}
		return '-'
	}, s)
}

// provisionCerts issues the certificate devices: valid and expired ones
// from the configured device CA, and "unknown CA" ones from a throwaway CA.
func (s *Simulator) provisionCerts() error {
	var deviceCA, foreignCA *devcert.CA
	for _, d := range s.devices {
		var ca *devcert.CA
		opts := devcert.Options{}
		switch d.cohort.Credentials {
		case "cert", "expired_cert":
			if deviceCA == nil {
				var err error
				if deviceCA, err = devcert.LoadCA(s.fleet.TLS.DeviceCACert, s.fleet.TLS.DeviceCAKey); err != nil {
					return fmt.Errorf("tls.device_ca: %w", err)
				}
			}
			ca = deviceCA
			if d.cohort.Credentials == "expired_cert" {
				opts.NotBefore, opts.NotAfter = time.Now().Add(-60*24*time.Hour), time.Now().Add(-24*time.Hour)
			}
		case "unknown_ca_cert":
			if foreignCA == nil {
				var err error
				if foreignCA, err = devcert.NewCA("not the fleet's CA"); err != nil {
					return err
				}
			}
			ca = foreignCA
		default:
			continue
		}
		cert, err := ca.Device(d.id, opts)
		if err != nil {
			return err
		}
		d.cert = &cert
	}
	return nil
}

// admit paces connection attempts to the ramp rate.
func (s *Simulator) admit(ctx context.Context) error { return s.ramp.Wait(ctx) }

// Run plays the fleet until the run's duration is over or ctx ends, then
// disconnects every device and returns the summary.
func (s *Simulator) Run(ctx context.Context) Summary {
	ctx, cancel := context.WithTimeout(ctx, s.fleet.Run.Duration.D())
	defer cancel()
	var wg sync.WaitGroup
	for _, d := range s.devices {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if !s.startLate(ctx, d) {
				return
			}
			d.run(ctx)
		}()
	}
	if s.opts.Progress != nil && s.fleet.Run.Progress > 0 {
		go func() {
			t := time.NewTicker(s.fleet.Run.Progress.D())
			defer t.Stop()
			var prev int64
			for {
				select {
				case <-ctx.Done():
					return
				case <-t.C:
					s.stats.progressLine(s.opts.Progress, len(s.devices), &prev, s.fleet.Run.Progress.D())
				}
			}
		}()
	}
	<-ctx.Done()
	wg.Wait()
	if s.opts.Progress != nil && s.fleet.Run.Progress > 0 {
		fmt.Fprintln(s.opts.Progress)
	}
	return s.stats.summary(len(s.devices))
}

// startLate holds a device of a cohort with start_after until its time,
// and registers it then when the run registers devices. It reports whether
// the device should run: not when the run ended first or the registration
// failed (counted as "late registration errors").
func (s *Simulator) startLate(ctx context.Context, d *device) bool {
	wait := d.cohort.StartAfter.D()
	if wait <= 0 {
		return true
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
	}
	if s.api == nil || (d.cohort.Credentials != "token" && d.cohort.Credentials != "bad_token") {
		return true
	}
	tok, err := registerOrRotate(ctx, s.api, d)
	if err != nil {
		if ctx.Err() == nil {
			s.logger.Warn("cannot register a device that starts late", "device_id", d.id, "err", err)
			s.stats.count("late registration errors")
		}
		return false
	}
	d.token = tok
	s.stats.count("late registrations")
	return true
}

// Online returns how many devices are connected now.
func (s *Simulator) Online() int64 { return s.stats.online.Load() }

// DeviceIDs lists the simulated device ids (a duplicate pair appears once).
func (s *Simulator) DeviceIDs() []string {
	seen := map[string]bool{}
	var out []string
	for _, d := range s.devices {
		if !seen[d.id] {
			seen[d.id] = true
			out = append(out, d.id)
		}
	}
	return out
}

// randN returns a random int in [0, n).
func randN(n int64) int64 { return rand.Int64N(n) }
