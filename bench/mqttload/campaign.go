package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"math"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/fleetd/fleetd/firmware"
	"github.com/fleetd/fleetd/web/client"
)

// dispatchResult is what campaign-dispatch measures: how closely the jobs of
// one campaign followed its devices_per_minute.
type dispatchResult struct {
	Mode      string `json:"mode"`
	Devices   int    `json:"devices"` // selected by the campaign
	PerMinute int    `json:"devices_per_minute"`
	// SelectSeconds is how long the start action took (selecting and
	// recording the devices) before the pacing schedule began.
	SelectSeconds float64 `json:"select_seconds"`
	// Dispatched counts the jobs committed as dispatched; Seconds is from
	// the start of the schedule to the last of them.
	Dispatched int     `json:"dispatched"`
	Seconds    float64 `json:"seconds"`
	// AchievedPerMinute is (Dispatched − 1) over the time from the start to
	// the last job (the first job is due at the start, the n-th n intervals
	// later); Deviation is AchievedPerMinute / PerMinute − 1.
	AchievedPerMinute float64 `json:"achieved_per_minute"`
	Deviation         float64 `json:"deviation"`
	// MinuteMin and MinuteMax are the fewest and most jobs in any 60 s
	// window that starts at a batch and ends before the last one (none when
	// the run is shorter than a minute).
	MinuteMin int `json:"minute_min"`
	MinuteMax int `json:"minute_max"`
	// MaxAhead and MaxBehind are how far, in seconds, the jobs dispatched
	// so far ran ahead of or behind the schedule (one job every minute /
	// PerMinute from the start) at any batch.
	MaxAhead  float64 `json:"max_ahead_s"`
	MaxBehind float64 `json:"max_behind_s"`
	// Batches is how many dispatch transactions sent the jobs; MaxBatch the
	// largest (a late step makes up what it missed).
	Batches  int `json:"batches"`
	MaxBatch int `json:"max_batch"`
	// Online devices among the selection (played by fleetsim, registered
	// through the API): how many had their job delivered over MQTT when the
	// last job was dispatched.
	Online          int `json:"online"`
	OnlineDelivered int `json:"online_delivered"`
}

// campaignDispatch registers devices straight into fleetd's database (the API
// would take minutes for 100 000), starts a one-stage campaign over them at
// perMinute and waits until every job is dispatched.
func campaignDispatch(api, token, dsn string, devices, perMinute int) (any, error) {
	ctx := context.Background()
	db, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return nil, fmt.Errorf("-dsn: %w", err)
	}
	defer db.Close(ctx)
	// The devices run 1.0.3 like the fleetsim devices of the same model
	// that bench/run.sh keeps online; those registered themselves already.
	if _, err := db.Exec(ctx, `INSERT INTO devices (id, model, firmware)
		SELECT 'cd-' || g, 'gw-100', '1.0.3' FROM generate_series(1, $1) AS g ON CONFLICT (id) DO NOTHING`, devices); err != nil {
		return nil, fmt.Errorf("register devices: %w", err)
	}

	cl := client.New(api, token)
	image := make([]byte, 64<<10)
	rand.Read(image)
	art, err := cl.UploadFirmware(ctx, "1.4.0", []string{"gw-100"}, bytes.NewReader(image))
	if err != nil {
		return nil, fmt.Errorf("upload firmware: %w", err)
	}
	camp, err := cl.CreateCampaign(ctx, firmware.Spec{Name: "dispatch benchmark", FirmwareID: art.ID,
		Stages: []firmware.Stage{{Name: "all", Percent: 100, MaxFailureRate: 1, MaxNotBackOnline: -1}},
		Pacing: firmware.Pacing{DevicesPerMinute: perMinute}, DeviceTimeout: firmware.Duration(24 * time.Hour)})
	if err != nil {
		return nil, fmt.Errorf("create campaign: %w", err)
	}
	view, err := cl.CampaignAction(ctx, camp.ID, "start")
	if err != nil {
		return nil, fmt.Errorf("start campaign: %w", err)
	}
	defer cl.CampaignAction(ctx, camp.ID, "abort")
	var startAction time.Time
	if err := db.QueryRow(ctx, `SELECT min(at) FROM campaign_history WHERE campaign_id = $1 AND action = 'start'`, camp.ID).Scan(&startAction); err != nil {
		return nil, err
	}

	res := dispatchResult{Mode: "campaign-dispatch", Devices: view.Total, PerMinute: perMinute}
	expected := time.Duration(float64(view.Total) / float64(perMinute) * float64(time.Minute))
	deadline := time.Now().Add(expected*3/2 + 30*time.Second)
	for {
		if err := db.QueryRow(ctx, `SELECT count(dispatched_at) FROM ota_jobs WHERE campaign_id = $1 AND kind = 'forward'`, camp.ID).Scan(&res.Dispatched); err != nil {
			return nil, err
		}
		if res.Dispatched == view.Total || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	// The devices not registered here are fleetsim's, online.
	if err := db.QueryRow(ctx, `SELECT count(*), count(delivered_at) FROM ota_jobs
		WHERE campaign_id = $1 AND kind = 'forward' AND device_id NOT LIKE 'cd-%'`, camp.ID).Scan(&res.Online, &res.OnlineDelivered); err != nil {
		return nil, err
	}

	// Every job's dispatch time; jobs of one batch share their transaction's.
	rows, err := db.Query(ctx, `SELECT dispatched_at, count(*) FROM ota_jobs
		WHERE campaign_id = $1 AND kind = 'forward' AND dispatched_at IS NOT NULL GROUP BY 1 ORDER BY 1`, camp.ID)
	if err != nil {
		return nil, err
	}
	type batch struct {
		at time.Time
		n  int
	}
	batches, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (batch, error) {
		var b batch
		return b, r.Scan(&b.at, &b.n)
	})
	if err != nil || len(batches) == 0 {
		return nil, fmt.Errorf("no job was dispatched (%v)", err)
	}
	last := batches[len(batches)-1].at
	interval := time.Minute / time.Duration(perMinute)
	// The schedule starts when the start action commits, after selecting
	// the devices; the first batch sends every job due by its step, so the
	// schedule began (n−1) intervals before it, within one interval.
	started := batches[0].at.Add(-time.Duration(batches[0].n-1) * interval)
	res.SelectSeconds = started.Sub(startAction).Seconds()
	res.Batches = len(batches)
	res.Seconds = last.Sub(started).Seconds()
	if span := last.Sub(started); span > 0 {
		res.AchievedPerMinute = float64(res.Dispatched-1) / span.Minutes()
		res.Deviation = res.AchievedPerMinute/float64(perMinute) - 1
	}
	sent := 0
	for i, b := range batches {
		res.MaxBatch = max(res.MaxBatch, b.n)
		// Jobs due by this batch: the first at the start, then one an interval.
		due := int(b.at.Sub(started)/interval) + 1
		res.MaxBehind = max(res.MaxBehind, float64(due-sent)*interval.Seconds())
		sent += b.n
		res.MaxAhead = max(res.MaxAhead, float64(sent-due)*interval.Seconds())
		if b.at.Add(time.Minute).After(last) {
			continue
		}
		inMinute := 0
		for _, c := range batches[i:] {
			if !c.at.Before(b.at.Add(time.Minute)) {
				break
			}
			inMinute += c.n
		}
		if res.MinuteMin == 0 || inMinute < res.MinuteMin {
			res.MinuteMin = inMinute
		}
		res.MinuteMax = max(res.MinuteMax, inMinute)
	}
	round := func(x float64) float64 { return math.Round(x*1e4) / 1e4 }
	res.Seconds, res.AchievedPerMinute, res.SelectSeconds = round(res.Seconds), round(res.AchievedPerMinute), round(res.SelectSeconds)
	res.Deviation, res.MaxAhead, res.MaxBehind = round(res.Deviation), round(res.MaxAhead), round(res.MaxBehind)
	return res, nil
}
