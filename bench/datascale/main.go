// Command datascale is the data-scale benchmark's tool (bench/run.sh
// data-scale): it loads a month of a large fleet's history into fleetd's
// database and measures the queries that must not grow with that history.
//
//	datascale load    -dsn DSN -devices N -events M [-telemetry-devices D] [-verify]
//	datascale measure -dsn DSN -api URL -token T [-telemetry-devices D] [-n REQUESTS] [-analyses A]
//
// load applies the migrations, then writes in SQL (generate_series, INSERT …
// SELECT) the devices, M connection events over the last 30 days into the
// day partitions of device_events, and the rollups those events imply (the
// backfill statements of migrations/00012_events_partitioned.sql, so that the
// rollups match the events; -verify checks that they do), judges the fleet
// once with fleet.Service.Analyze, and writes a day of telemetry for D
// devices through telemetry.Writer. It prints Markdown lines for
// bench/RESULTS.md, the whole result as JSON among them.
//
// measure, with fleetd serving that database, times the HTTP endpoints
// (fleet health, fleet history, device telemetry), runs the analysis
// in-process, times the pre-rollup fleet-health query on device_events for
// contrast and prints the results as Markdown lines for bench/RESULTS.md.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: datascale load|measure [flags]")
		os.Exit(2)
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	dsn := fs.String("dsn", "", "fleetd's database")
	devices := fs.Int("devices", 200_000, "load: devices")
	events := fs.Int("events", 20_000_000, "load: connection events over the last 30 days")
	telemetryDevices := fs.Int("telemetry-devices", 100, "devices with a day of telemetry (5 metrics every 20 s)")
	workers := fs.Int("workers", 2, "load: database connections loading at once")
	verify := fs.Bool("verify", false, "load: check the rollups against the migration's backfill of the events")
	api := fs.String("api", "", "measure: fleetd's base URL")
	token := fs.String("token", "", "measure: fleetd's admin token")
	requests := fs.Int("n", 100, "measure: timed requests per endpoint")
	analyses := fs.Int("analyses", 5, "measure: analysis runs")
	_ = fs.Parse(os.Args[2:])
	if *dsn == "" {
		fail(fmt.Errorf("-dsn is required"))
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	switch os.Args[1] {
	case "load":
		res, err := load(ctx, loadOptions{dsn: *dsn, devices: *devices, events: *events, telemetryDevices: *telemetryDevices,
			workers: *workers, verify: *verify, now: time.Now().UTC()})
		if err != nil {
			fail(err)
		}
		res.write(os.Stdout)
	case "measure":
		if *api == "" || *token == "" {
			fail(fmt.Errorf("measure needs -api and -token"))
		}
		if err := measure(ctx, os.Stdout, measureOptions{dsn: *dsn, api: *api, token: *token, requests: *requests, analyses: *analyses,
			telemetryDevices: *telemetryDevices}); err != nil {
			fail(err)
		}
	default:
		fail(fmt.Errorf("unknown mode %s", os.Args[1]))
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "datascale:", err)
	os.Exit(1)
}
