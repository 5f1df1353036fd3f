package firmware

import (
	"fmt"
	"regexp"
	"strings"
	"sync"
	"time"
	_ "time/tzdata" // every zone a campaign or a device tag names, on any machine (the image has no zoneinfo)

	"github.com/robfig/cron/v3"
)

// Window is a maintenance window: it opens at every activation of Cron (a
// standard five-field expression, or a descriptor such as @daily) and stays
// open for Duration. Its time zone is the device's (from the campaign's
// timezone tag) or the campaign's.
type Window struct {
	Cron     string   `json:"cron"`
	Duration Duration `json:"duration"`
}

// Bounds on what a campaign's windows may hold.
const (
	maxWindows     = 16
	maxCronLen     = 100
	maxZoneNameLen = 64
	// windowHorizon and windowProbes bound the search for the shortest gap
	// between two openings of a window at validation: a year of openings
	// (every cron expression repeats within one, leap days aside), or the
	// first windowProbes of them for expressions that open more often than
	// every 53 minutes, whose pattern repeats within a day or a week.
	windowHorizon = 366 * 24 * time.Hour
	windowProbes  = 10000
)

// tagKeyPattern is a tag key (the part before '=' in key=value).
var tagKeyPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._:-]*$`)

// parseWindow parses a window's cron expression. The time zone is not the
// expression's to say (the campaign and the devices' tags say it), and
// @every is a delay from whenever it is asked, not a time of day: both are
// refused. A schedule that never fires within five years is refused too.
func parseWindow(expr string) (*cron.SpecSchedule, error) {
	expr = strings.TrimSpace(expr)
	switch {
	case expr == "":
		return nil, fmt.Errorf("is required (e.g. \"0 2 * * *\" for 02:00 every day)")
	case len(expr) > maxCronLen:
		return nil, fmt.Errorf("is longer than %d characters", maxCronLen)
	case strings.HasPrefix(expr, "TZ=") || strings.HasPrefix(expr, "CRON_TZ="):
		return nil, fmt.Errorf("must not carry a time zone: set the campaign's timezone (or timezone_tag) instead")
	case strings.HasPrefix(expr, "@every"):
		return nil, fmt.Errorf("@every is not a time of day; use a cron expression or @daily, @weekly, @monthly")
	}
	s, err := cron.ParseStandard(expr)
	if err != nil {
		return nil, fmt.Errorf("is not a cron expression: %v", err)
	}
	spec, ok := s.(*cron.SpecSchedule)
	if !ok {
		return nil, fmt.Errorf("is not a time-of-day schedule")
	}
	return spec, nil
}

// in returns the schedule evaluated in loc.
func in(s *cron.SpecSchedule, loc *time.Location) *cron.SpecSchedule {
	c := *s
	c.Location = loc
	return &c
}

// validateWindows checks a campaign's windows, its time zone and its time
// zone tag, naming the field of the first problem. A window's duration
// must be positive and no longer than the shortest gap between two of its
// openings (a longer one overlaps itself).
func validateWindows(ws []Window, zone, tag string) error {
	if len(ws) == 0 {
		switch {
		case zone != "":
			return campaignInvalid("timezone", "is the zone of the campaign's windows, and it has none")
		case tag != "":
			return campaignInvalid("timezone_tag", "names the zone of the campaign's windows per device, and it has none")
		}
		return nil
	}
	if len(ws) > maxWindows {
		return campaignInvalid("windows", "holds more than %d windows", maxWindows)
	}
	if _, err := campaignZone(zone); err != nil {
		return campaignInvalid("timezone", "%v", err)
	}
	if tag != "" && (len(tag) > maxZoneNameLen || !tagKeyPattern.MatchString(tag)) {
		return campaignInvalid("timezone_tag", "must be a tag key (letters, digits, '.', '_', ':', '-'; at most %d characters), got %q", maxZoneNameLen, tag)
	}
	for i, w := range ws {
		f := func(name string) string { return fmt.Sprintf("windows[%d].%s", i, name) }
		s, err := parseWindow(w.Cron)
		if err != nil {
			return campaignInvalid(f("cron"), "%v", err)
		}
		if w.Duration <= 0 {
			return campaignInvalid(f("duration"), "must be > 0, got %s", w.Duration)
		}
		// The gaps are measured on a clock without daylight saving time:
		// where a zone's clocks go back, an opening in the repeated hour
		// comes twice (the window is that much longer that night), which
		// is the zone's doing, not an overlap in the operator's schedule.
		s = in(s, time.UTC)
		from := time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC) // a leap year, for @yearly-like and 29 February expressions
		prev := s.Next(from.Add(-time.Second))
		if prev.IsZero() {
			return campaignInvalid(f("cron"), "%q never opens", w.Cron)
		}
		for n := 0; n < windowProbes && prev.Sub(from) < windowHorizon; n++ {
			next := s.Next(prev)
			if next.IsZero() {
				break
			}
			if gap := next.Sub(prev); w.Duration.D() > gap {
				return campaignInvalid(f("duration"), "%s is longer than the %s between two openings of %q (e.g. %s and %s): the window would overlap itself",
					w.Duration, gap, w.Cron, prev.Format("Mon 15:04"), next.Format("Mon 15:04"))
			}
			prev = next
		}
	}
	return nil
}

// zones caches the time zones fleetd has loaded: a zone's rules are
// compiled into the binary (time/tzdata) and never change while it runs,
// so the cache holds no state that another replica could make wrong.
var zones sync.Map // name → *time.Location

// LoadZone returns the IANA time zone name names ("Europe/Paris", "UTC").
// "Local" is refused: it is whatever zone the machine runs in, so two
// replicas could disagree on when a window is open.
func LoadZone(name string) (*time.Location, error) {
	if v, ok := zones.Load(name); ok {
		return v.(*time.Location), nil
	}
	var loc *time.Location
	var err error
	switch {
	case name == "" || len(name) > maxZoneNameLen:
		err = fmt.Errorf("%q is not an IANA time zone (e.g. Europe/Paris, UTC)", name)
	case name == "Local":
		err = fmt.Errorf("%q is the zone of whichever machine runs fleetd; name the zone (e.g. Europe/Paris, UTC)", name)
	default:
		if loc, err = time.LoadLocation(name); err != nil {
			err = fmt.Errorf("%q is not an IANA time zone (e.g. Europe/Paris, UTC)", name)
		}
	}
	if err != nil {
		return nil, err
	}
	zones.Store(name, loc) // only real zones: a few hundred, whatever tags devices carry
	return loc, nil
}

// campaignZone is the campaign's own zone: UTC when it names none.
func campaignZone(name string) (*time.Location, error) {
	if name == "" {
		return time.UTC, nil
	}
	return LoadZone(name)
}

// WindowState is whether a campaign's windows are open at a moment in one
// time zone.
type WindowState struct {
	Open bool `json:"open"`
	// OpenedAt is when the earliest of the open windows opened, ClosesAt
	// when the last of them closes (Open only).
	OpenedAt time.Time `json:"opened_at,omitzero"`
	ClosesAt time.Time `json:"closes_at,omitzero"`
	// NextOpen is when a window next opens (closed only; zero if none
	// opens within five years).
	NextOpen time.Time `json:"next_open,omitzero"`
}

// WindowsAt says whether any of the windows is open at t in loc: a window
// is open from each activation a of its cron expression until a+Duration.
// It is pure (given the compiled-in zone rules), for the dispatcher and the
// campaign view alike. Windows that do not parse (Validate refuses them) are
// never open. No windows at all means always open.
func WindowsAt(ws []Window, loc *time.Location, t time.Time) WindowState {
	if len(ws) == 0 {
		return WindowState{Open: true}
	}
	var st WindowState
	for _, w := range ws {
		s, err := parseWindow(w.Cron)
		if err != nil || w.Duration <= 0 {
			continue
		}
		s = in(s, loc)
		// The latest activation in (t−duration, t] opened a window that is
		// still open at t. Next works in whole seconds, a second after its
		// argument's second.
		if a := s.Next(t.Add(-w.Duration.D())); !a.IsZero() && !a.After(t) {
			closes := a.Add(w.Duration.D()) // after t, since a > t−duration
			if !st.Open || a.Before(st.OpenedAt) {
				st.OpenedAt = a
			}
			if closes.After(st.ClosesAt) {
				st.ClosesAt = closes
			}
			st.Open = true
			continue
		}
		if n := s.Next(t); !n.IsZero() && (st.NextOpen.IsZero() || n.Before(st.NextOpen)) {
			st.NextOpen = n
		}
	}
	if st.Open {
		st.NextOpen = time.Time{}
	}
	st.OpenedAt, st.ClosesAt, st.NextOpen = st.OpenedAt.UTC(), st.ClosesAt.UTC(), st.NextOpen.UTC()
	return st
}

// WindowStatus is where a campaign's windows stand at a moment for the
// devices it has yet to dispatch, zone by zone: what the dispatcher acts
// on and what the campaign view shows, so that an operator sees why
// nothing goes out and when it will.
type WindowStatus struct {
	// Open: a window is open for at least one pending device (with none
	// pending, in the campaign's zone).
	Open bool `json:"open"`
	// Dispatchable is how many pending devices are inside an open window.
	Dispatchable int `json:"dispatchable"`
	// OpenedAt is when the earliest open window of a pending device
	// opened, ClosesAt when the last of them closes.
	OpenedAt time.Time `json:"opened_at,omitzero"`
	ClosesAt time.Time `json:"closes_at,omitzero"`
	// NextWindow is when the next window opens for a pending device whose
	// windows are closed (with none pending, in the campaign's zone).
	NextWindow time.Time    `json:"next_window,omitzero"`
	Zones      []ZoneWindow `json:"zones"`
	openTags   []string     // the open groups' tag values, for Decision.Zones
}

// ZoneWindow is one zone's windows and how many pending devices are in it.
type ZoneWindow struct {
	Zone    string `json:"zone"`
	Pending int    `json:"pending"`
	WindowState
}

// Zone returns the zone of a device whose timezone tag has value tag ("":
// none): the zone it names, or the campaign's when it names none (a device
// is never held by a typo in its tag, nor sent outside the campaign's
// windows because of one).
func (c Campaign) Zone(tag string) *time.Location {
	if c.TimezoneTag != "" && tag != "" {
		if loc, err := LoadZone(tag); err == nil {
			return loc
		}
	}
	loc, err := campaignZone(c.Timezone)
	if err != nil {
		return time.UTC // Validate refuses it; never reached for a stored campaign
	}
	return loc
}

// WindowStatus says, for the pending devices grouped by zone tag, which
// are inside an open window at now. It is pure. Groups whose tags resolve
// to one zone are shown as one zone.
func (c Campaign) WindowStatus(groups []ZonePending, now time.Time) WindowStatus {
	ws := WindowStatus{Zones: []ZoneWindow{}}
	if len(groups) == 0 {
		loc := c.Zone("")
		st := WindowsAt(c.Windows, loc, now)
		ws.Open, ws.OpenedAt, ws.ClosesAt, ws.NextWindow = st.Open, st.OpenedAt, st.ClosesAt, st.NextOpen
		ws.Zones = append(ws.Zones, ZoneWindow{Zone: loc.String(), WindowState: st})
		return ws
	}
	byZone := map[string]int{} // zone name → index in ws.Zones
	for _, g := range groups {
		loc := c.Zone(g.Tag)
		i, ok := byZone[loc.String()]
		if !ok {
			i = len(ws.Zones)
			byZone[loc.String()] = i
			ws.Zones = append(ws.Zones, ZoneWindow{Zone: loc.String(), WindowState: WindowsAt(c.Windows, loc, now)})
		}
		z := &ws.Zones[i]
		z.Pending += g.Pending
		if !z.Open {
			if !z.NextOpen.IsZero() && (ws.NextWindow.IsZero() || z.NextOpen.Before(ws.NextWindow)) {
				ws.NextWindow = z.NextOpen
			}
			continue
		}
		ws.Open = true
		ws.Dispatchable += g.Pending
		ws.openTags = append(ws.openTags, g.Tag)
		if ws.OpenedAt.IsZero() || z.OpenedAt.Before(ws.OpenedAt) {
			ws.OpenedAt = z.OpenedAt
		}
		if z.ClosesAt.After(ws.ClosesAt) {
			ws.ClosesAt = z.ClosesAt
		}
	}
	return ws
}
