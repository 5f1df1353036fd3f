package fleet

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/fleetd/fleetd/internal/advisory"
)

// analysis is the Service's state for "why devices drop": the policy in
// force, the firmware flagged now, and the numbers exported as metrics.
type analysis struct {
	wake chan struct{} // asks the analysis loop to run now
	// flagged maps model+"\x00"+firmware to its active verdict.
	flagged      map[string]Verdict
	incompatible int
}

func flagKey(model, firmware string) string { return model + "\x00" + firmware }

// LoadPolicy reads the operator's policy (defaults when none was ever set).
// Call it at start, before the broker admits devices.
func (s *Service) LoadPolicy(ctx context.Context) error {
	p, _, err := s.store.loadPolicy(ctx)
	if err != nil {
		return err
	}
	cp, err := p.compile()
	if err != nil {
		return fmt.Errorf("stored policy is invalid: %w", err)
	}
	s.policy.Store(cp)
	return nil
}

// Policy returns the policy in force.
func (s *Service) Policy() Policy { return s.currentPolicy().Policy }

func (s *Service) currentPolicy() *compiledPolicy {
	if p := s.policy.Load(); p != nil {
		return p
	}
	cp, _ := Policy{}.compile()
	return cp
}

// SetPolicy validates, stores and applies a policy at once: new connects
// get the new keepalive cap, and devices are re-judged by the next analysis,
// which is started now.
func (s *Service) SetPolicy(ctx context.Context, p Policy) (Policy, error) {
	cp, err := p.compile()
	if err != nil {
		return Policy{}, err
	}
	if err := s.store.savePolicy(ctx, cp.Policy); err != nil {
		return Policy{}, err
	}
	s.policy.Store(cp)
	s.logger.Info("policy updated", "models", len(cp.Models), "keepalive_max", cp.Keepalive.MaxSeconds)
	s.mu.RLock()
	hooks := append([]func(){}, s.onPolicy...)
	s.mu.RUnlock()
	for _, f := range hooks {
		f()
	}
	s.AnalyzeSoon()
	return cp.Policy, nil
}

// KeepaliveFor returns the keepalive cap for a model, 0 for none.
func (s *Service) KeepaliveFor(model string) int { return s.currentPolicy().Keepalive.For(model) }

// AnalyzeSoon asks the analysis loop to run without waiting for its interval.
func (s *Service) AnalyzeSoon() {
	select {
	case s.an.wake <- struct{}{}:
	default:
	}
}

// RunAnalysis learns verdicts and re-judges every device's compatibility
// every interval (and when asked to), until ctx ends; with several replicas,
// one of them does it each round (analyzeRound).
func (s *Service) RunAnalysis(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		if err := s.analyzeRound(ctx); err != nil && ctx.Err() == nil {
			s.logger.Warn("analysis failed; retrying at the next interval", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-s.an.wake:
		}
	}
}

// Analyze learns verdicts from the events in the policy's window, starting
// from the firmware learned-flagged before (see LearnVerdicts), records them
// and their flips (verdicts no longer learned expire), and marks each device
// incompatible or not, with its reasons.
func (s *Service) Analyze(ctx context.Context) error {
	p := s.currentPolicy()
	since := s.now().Add(-p.VerdictWindow())
	stats, err := s.store.firmwareStats(ctx, since)
	if err != nil {
		return err
	}
	// The flagged set comes from the database, not from this replica's last
	// analysis, so every replica applies the same hysteresis.
	before, err := s.store.learnedFirmware(ctx)
	if err != nil {
		return err
	}
	learned := LearnVerdicts(stats, before, p.VerdictPolicy())
	for i, v := range learned.Flagged {
		if learned.Flagged[i].Samples, err = s.store.pingSamples(ctx, v.Model, v.Firmware, since, 5); err != nil {
			return err
		}
	}
	saved, err := s.store.saveLearned(ctx, before, learned)
	if err != nil {
		return err
	}
	if !saved {
		s.logger.Info("verdicts saved by another replica during this analysis; keeping theirs")
	}
	flagged, err := s.loadFlagged(ctx)
	if err != nil {
		return err
	}
	groups, err := s.store.compatGroups(ctx)
	if err != nil {
		return err
	}
	var changed []compatGroup
	var lists [][]Incompatibility
	incompatible := 0
	for _, g := range groups {
		list := judge(p, flagged, g.model, g.firmware, g.protocol)
		if len(list) > 0 {
			incompatible += g.devices
		}
		if !sameCompat(g.current, list) {
			changed, lists = append(changed, g), append(lists, list)
		}
	}
	if len(changed) > 0 {
		if err := s.store.setCompat(ctx, changed, lists); err != nil {
			return err
		}
	}
	s.mu.Lock()
	s.an.flagged, s.an.incompatible = flagged, incompatible
	s.mu.Unlock()
	return nil
}

// analysisLock is the advisory lock key of the analysis: with several
// replicas one analyses per round, so N replicas do not multiply its cost.
const analysisLock = advisory.Analysis

// analyzeRound is one round of the analysis loop. The replica holding the
// lock (the first to try) learns verdicts and re-judges devices; the others
// read what it stored, so their diagnosis and campaign checks agree. Either
// way the policy is re-read first: another replica may have changed it.
func (s *Service) analyzeRound(ctx context.Context) error {
	if err := s.LoadPolicy(ctx); err != nil {
		return err
	}
	release, ok, err := s.store.tryAdvisoryLock(ctx, analysisLock)
	if err != nil {
		return err
	}
	if ok {
		defer release()
		return s.Analyze(ctx)
	}
	flagged, err := s.loadFlagged(ctx)
	if err != nil {
		return err
	}
	incompatible, err := s.store.countIncompatible(ctx)
	if err != nil {
		return err
	}
	s.mu.Lock()
	s.an.flagged, s.an.incompatible = flagged, incompatible
	s.mu.Unlock()
	return nil
}

// loadFlagged reads the active verdicts, learned or decided.
func (s *Service) loadFlagged(ctx context.Context) (map[string]Verdict, error) {
	rows, err := s.store.verdicts(ctx)
	if err != nil {
		return nil, err
	}
	flagged := map[string]Verdict{}
	for _, v := range rows {
		if !v.Active {
			continue
		}
		ev := Verdict{Model: v.Model, Firmware: v.Firmware, Flag: v.Flag, Evidence: "confirmed by an operator"}
		if v.Evidence != nil {
			ev = *v.Evidence
			if v.Decision == "confirmed" && !v.Learned {
				ev.Evidence = "confirmed by an operator (learned evidence has aged out: " + ev.Evidence + ")"
			}
		}
		flagged[flagKey(v.Model, v.Firmware)] = ev
	}
	return flagged, nil
}

// judge combines the operator's rules and the active verdicts for one device.
func judge(p *compiledPolicy, flagged map[string]Verdict, model, firmware string, protocol Protocol) []Incompatibility {
	list := p.rules.Check(model, firmware, protocol)
	if v, ok := flagged[flagKey(model, firmware)]; ok {
		list = append(list, v.Incompatibility())
	}
	return list
}

func nonNil(l []Incompatibility) []Incompatibility {
	if l == nil {
		return []Incompatibility{}
	}
	return l
}

// Verdicts lists what was learned and decided about firmware.
func (s *Service) Verdicts(ctx context.Context) ([]FirmwareVerdict, error) {
	return s.store.verdicts(ctx)
}

// DecideVerdict records an operator's decision about a firmware: "confirmed"
// flags it whatever the evidence, "overridden" never flags it, "" returns
// the decision to the evidence.
func (s *Service) DecideVerdict(ctx context.Context, model, firmware, decision string) error {
	switch decision {
	case "", "confirmed", "overridden":
	default:
		return invalid("decision", "must be confirmed, overridden or empty, not %q", decision)
	}
	if err := validateModel(model); err != nil {
		return err
	}
	if firmware == "" || len(firmware) > 64 {
		return invalid("firmware", "must be 1 to 64 characters")
	}
	if err := s.store.decideVerdict(ctx, model, firmware, decision); err != nil {
		return err
	}
	s.logger.Info("firmware verdict decided", "model", model, "firmware", firmware, "decision", decision)
	s.AnalyzeSoon()
	return nil
}

// Diagnosis is a device's current problems.
type Diagnosis struct {
	Device            Device            `json:"device"`
	Incompatibilities []Incompatibility `json:"incompatibilities"`
	Problems          []Problem         `json:"problems"`
}

// Diagnose explains a device: its recent events through the diagnosis
// rules, its compatibility, and the keepalive policy an MQTT 3 device cannot
// be told.
func (s *Service) Diagnose(ctx context.Context, id string) (Diagnosis, error) {
	d, err := s.Get(ctx, id)
	if err != nil {
		return Diagnosis{}, err
	}
	now := s.now()
	policy := DefaultDiagnosisPolicy()
	events, err := s.store.eventsSince(ctx, id, now.Add(-policy.Window))
	if err != nil {
		return Diagnosis{}, err
	}
	p := s.currentPolicy()
	s.mu.RLock()
	flagged := s.an.flagged
	s.mu.RUnlock()
	incompat := nonNil(judge(p, flagged, d.Model, d.Firmware, d.ProtocolVersion))
	problems := Diagnose(d, events, incompat, now, policy)
	links, err := s.cachedFleetLinks(ctx)
	if err != nil {
		return Diagnosis{}, err
	}
	problems = append(problems, DiagnoseLink(events, links, p.LinkPolicy())...)
	if pr := keepalivePolicyProblem(d, p.Keepalive.For(d.Model)); pr != nil {
		problems = append(problems, *pr)
	}
	if problems == nil {
		problems = []Problem{}
	}
	return Diagnosis{Device: d, Incompatibilities: incompat, Problems: problems}, nil
}

// FleetHealth summarises the fleet: presence, why devices dropped in the last
// hour and day by firmware and protocol, incompatible devices, flapping
// devices and flagged firmware.
//
// With SetHealthTTL, a summary is computed at most once per TTL and shared
// by the requests within it (they wait for one computation rather than each
// making their own): its reads are O(fleet) counts, and every console open
// on every replica polls it. A change made through this service (a device
// registered or decommissioned, compatibility, verdicts, policy) is served
// at once; presence and events up to the TTL late, and another replica's
// changes too.
func (s *Service) FleetHealth(ctx context.Context) (FleetHealth, error) {
	c := &s.health
	c.mu.Lock()
	defer c.mu.Unlock()
	now, gen := s.now(), s.store.gen.Load()
	if c.ttl > 0 && c.ok && gen == c.gen && now.Sub(c.at) < c.ttl && !now.Before(c.at) {
		return c.h, nil
	}
	h, err := s.fleetHealth(ctx)
	if err == nil && c.ttl > 0 {
		c.h, c.at, c.gen, c.ok = h, now, gen, true
	}
	return h, err
}

// SetHealthTTL makes FleetHealth share one computation per ttl (0: every
// request computes its own).
func (s *Service) SetHealthTTL(ttl time.Duration) {
	s.health.mu.Lock()
	defer s.health.mu.Unlock()
	s.health.ttl, s.health.ok = ttl, false
}

// healthCache is FleetHealth's shared summary.
type healthCache struct {
	mu  sync.Mutex
	ttl time.Duration
	ok  bool
	at  time.Time
	gen uint64
	h   FleetHealth
}

func (s *Service) fleetHealth(ctx context.Context) (FleetHealth, error) {
	h, err := s.store.fleetHealth(ctx, s.now(), DefaultDiagnosisPolicy())
	if err != nil {
		return h, err
	}
	verdicts, err := s.store.verdicts(ctx)
	if err != nil {
		return h, err
	}
	h.FlaggedFirmware = []FirmwareVerdict{}
	for _, v := range verdicts {
		if v.Active {
			h.FlaggedFirmware = append(h.FlaggedFirmware, v)
		}
	}
	return h, nil
}

// RegisterMetrics exports the analysis' numbers.
func (s *Service) RegisterMetrics(r prometheus.Registerer) {
	r.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "fleetd_incompatible_devices", Help: "Active devices whose firmware is incompatible (rules or flagged firmware)."},
			func() float64 { s.mu.RLock(); defer s.mu.RUnlock(); return float64(s.an.incompatible) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "fleetd_flagged_firmware", Help: "Firmware versions flagged as rejecting pings."},
			func() float64 { s.mu.RLock(); defer s.mu.RUnlock(); return float64(len(s.an.flagged)) }),
	)
}

// JudgeFirmware says why a firmware version must not be rolled out to a
// model: it is below the model's minimum, or it is flagged (learned or
// confirmed). Protocol support is not judged: it depends on each device.
func (s *Service) JudgeFirmware(model, version string) []Incompatibility {
	s.mu.RLock()
	flagged := s.an.flagged
	s.mu.RUnlock()
	return judge(s.currentPolicy(), flagged, model, version, 0)
}

// Candidate is a device a campaign may select.
type Candidate struct {
	ID, Model, Firmware string
}

// Candidates returns the active devices of the given models (all when
// empty) carrying every tag, only incompatible ones when asked.
func (s *Service) Candidates(ctx context.Context, models, tags []string, incompatibleOnly bool) ([]Candidate, error) {
	return s.store.candidates(ctx, models, tags, incompatibleOnly)
}

// sameCompat reports whether the stored incompatibilities (jsonb, as
// PostgreSQL renders it: its own key order and spacing) say what list says.
// Both are compared as Go renders them, so that a device whose verdict did
// not change is not rewritten on every analysis.
func sameCompat(stored []byte, list []Incompatibility) bool {
	if len(list) == 0 {
		return bytes.Equal(stored, []byte("[]"))
	}
	var cur []Incompatibility
	if err := json.Unmarshal(stored, &cur); err != nil {
		return false
	}
	a, _ := json.Marshal(cur)
	b, _ := json.Marshal(list)
	return bytes.Equal(a, b)
}
