package telemetry

import (
	"math"
	"time"

	"github.com/fleetd/fleetd/fleet"
)

// sessionLink is the radio link one session of a device reported, kept with
// the device's state so that its disconnect can carry it (Stamper).
type sessionLink struct {
	epoch      int64 // the session the fields below belong to
	rssi       float64
	hasRSSI    bool
	channel    int
	bssid      string
	firstBSSID string
	roamedAt   time.Time // the session's last change of access point
}

// rssiMetric is the metric whose last value a disconnect records.
const rssiMetric = "rssi_dbm"

// note takes an accepted message's link into the session's link: a message
// from a new session starts over. d.mu is held.
func (l *sessionLink) note(epoch int64, msg *Message, now time.Time) {
	if l.epoch != epoch {
		*l = sessionLink{epoch: epoch}
	}
	for _, m := range msg.Metrics {
		if m.Name == rssiMetric {
			l.rssi, l.hasRSSI = m.Value, true
		}
	}
	if c := msg.Link.Channel; c != 0 {
		l.channel = c
	}
	if b := msg.Link.BSSID; b != "" {
		switch {
		case l.firstBSSID == "":
			l.firstBSSID = b
		case b != l.bssid:
			l.roamedAt = now
		}
		l.bssid = b
	}
}

// at returns what the session reported of its link, for a disconnect at end.
func (l *sessionLink) at(end time.Time) fleet.SessionLink {
	var out fleet.SessionLink
	// RSSI is reported in dBm, negative; a value outside what a radio
	// reports is not recorded.
	if r := int(math.Round(l.rssi)); l.hasRSSI && r >= -150 && r < 0 {
		out.RSSI = r
	}
	out.Channel, out.BSSID, out.FirstBSSID = l.channel, l.bssid, l.firstBSSID
	if !l.roamedAt.IsZero() {
		out.RoamMillis = max(end.Sub(l.roamedAt).Milliseconds(), 1)
	}
	return out
}

// SessionLink returns the link the device's session epoch reported, if it
// reported any: what its disconnect records.
func (in *Ingest) SessionLink(deviceID string, epoch int64, end time.Time) (fleet.SessionLink, bool) {
	v, ok := in.devices.Load(deviceID)
	if !ok {
		return fleet.SessionLink{}, false
	}
	d := v.(*device)
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.link.epoch != epoch {
		return fleet.SessionLink{}, false
	}
	l := d.link.at(end)
	return l, l.Reported()
}

// Stamper records the broker's connection events through Next, with the
// radio link its telemetry reported on each disconnect (Ingest.SessionLink),
// so that the diagnosis reads a session's link from its disconnect. Links is
// set once, before the broker starts; until then events pass unchanged.
type Stamper struct {
	Next  EventSink
	Links *Ingest
}

// Record stamps a disconnect with its session's link and records it.
func (s *Stamper) Record(e fleet.Event) {
	if e.Kind == fleet.KindDisconnect && s.Links != nil && e.DeviceID != "" {
		if l, ok := s.Links.SessionLink(e.DeviceID, e.SessionEpoch, e.At); ok {
			e.SessionLink = l
		}
	}
	s.Next.Record(e)
}
