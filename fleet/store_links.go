package fleet

import (
	"context"
	"fmt"
	"time"
)

// linkInputs reads what judgeLinks needs for the window from since: the
// link rollup cells summed over the window, the live sessions' connected
// time by the link their devices report now (sessions_open joined with
// telemetry_link, a row per live session), the devices on each link now,
// and the window's ping-related disconnects (the firmware's cause, from the
// session rollups). Every read is bounded by the window's hours and the
// fleet's links or live sessions, never by the events kept.
func (s *Store) linkInputs(ctx context.Context, since, now time.Time) (cells []linkCell, live []liveLink, current []currentLink, pingLost int64, err error) {
	rows, err := s.pool.Query(ctx, `
		SELECT model, channel, bssid, rssi_bucket, sum(lost)::bigint, sum(roam_lost)::bigint, (sum(connected_us) / 3600e6)::float8
		FROM link_rollups_hour WHERE hour >= $1 GROUP BY 1, 2, 3, 4`, since.UTC().Truncate(time.Hour))
	if err != nil {
		return nil, nil, nil, 0, fmt.Errorf("link rollups: %w", err)
	}
	for rows.Next() {
		var c linkCell
		if err := rows.Scan(&c.model, &c.channel, &c.bssid, &c.rssi, &c.lost, &c.roamLost, &c.hours); err != nil {
			rows.Close()
			return nil, nil, nil, 0, fmt.Errorf("link rollups: %w", err)
		}
		cells = append(cells, c)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, nil, nil, 0, fmt.Errorf("link rollups: %w", err)
	}
	rows, err = s.pool.Query(ctx, `
		SELECT o.model, coalesce(k.channel, 0), coalesce(k.bssid, ''),
			sum(extract(epoch FROM $2::timestamptz - greatest(o.started_at, $1::timestamptz)) / 3600)::float8
		FROM sessions_open o JOIN telemetry_link k ON k.device_id = o.device_id
		WHERE o.started_at < $2
		GROUP BY 1, 2, 3`, since, now)
	if err != nil {
		return nil, nil, nil, 0, fmt.Errorf("live links: %w", err)
	}
	for rows.Next() {
		var l liveLink
		if err := rows.Scan(&l.model, &l.channel, &l.bssid, &l.hours); err != nil {
			rows.Close()
			return nil, nil, nil, 0, fmt.Errorf("live links: %w", err)
		}
		live = append(live, l)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, nil, nil, 0, fmt.Errorf("live links: %w", err)
	}
	rows, err = s.pool.Query(ctx, `
		SELECT d.model, coalesce(k.channel, 0), coalesce(k.bssid, ''), coalesce(max(k.band), ''), coalesce(max(k.ssid), ''), count(*)
		FROM telemetry_link k JOIN devices d ON d.id = k.device_id
		WHERE d.online GROUP BY 1, 2, 3`)
	if err != nil {
		return nil, nil, nil, 0, fmt.Errorf("current links: %w", err)
	}
	for rows.Next() {
		var c currentLink
		if err := rows.Scan(&c.model, &c.channel, &c.bssid, &c.band, &c.ssid, &c.devices); err != nil {
			rows.Close()
			return nil, nil, nil, 0, fmt.Errorf("current links: %w", err)
		}
		current = append(current, c)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, nil, nil, 0, fmt.Errorf("current links: %w", err)
	}
	if err := s.pool.QueryRow(ctx, `SELECT coalesce(sum(ping_disconnects), 0)::bigint FROM session_rollups_minute WHERE minute >= $1`,
		since.UTC().Truncate(time.Minute)).Scan(&pingLost); err != nil {
		return nil, nil, nil, 0, fmt.Errorf("ping disconnects: %w", err)
	}
	return cells, live, current, pingLost, nil
}
