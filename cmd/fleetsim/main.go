// Command fleetsim plays fleets of MQTT devices, healthy and broken, against
// fleetd: for demos, for the tests, and as a load generator.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/fleetd/fleetd/internal/devcert"
	"github.com/fleetd/fleetd/sim"
)

const usage = `fleetsim plays fleets of MQTT devices against fleetd.

Usage:
  fleetsim run -f FLEET_FILE [-duration D] [-progress D] [-summary FILE] [-log-level L]
      Play the fleet described in FLEET_FILE (YAML or JSON; see docs/fleet.example.yaml)
      until its run.duration (or -duration) is over or SIGINT, then print a JSON summary:
      connect latency percentiles, messages sent, errors by kind.
      Devices are registered through fleetd's API with the admin token from
      server.admin_token_file or FLEETD_ADMIN_TOKEN, or take tokens from run.tokens_file.

  fleetsim certs -dir DIR [-ip 127.0.0.1] [-dns localhost]
      Make a device CA and a server certificate for trying TLS with client certificates:
      DIR/device-ca.crt, DIR/device-ca.key, DIR/server.crt, DIR/server.key. Start fleetd with
      FLEETD_TLS_CERT_FILE=DIR/server.crt FLEETD_TLS_KEY_FILE=DIR/server.key
      FLEETD_TLS_CLIENT_CA_FILE=DIR/device-ca.crt, and point the fleet file's tls section at
      the device CA.

Only loopback hosts are contacted unless a fleet file lists others in server.allowed_hosts.
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout, os.Stderr, os.Getenv); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return
		}
		fmt.Fprintln(os.Stderr, "fleetsim:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) error {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(stdout, usage)
		if len(args) == 0 {
			return errors.New("missing command: run or certs")
		}
		return flag.ErrHelp
	}
	switch args[0] {
	case "run":
		return runFleet(ctx, args[1:], stdout, stderr, getenv)
	case "certs":
		return makeCerts(args[1:], stdout, stderr)
	}
	return fmt.Errorf("unknown command %q (want run or certs; see fleetsim -h)", args[0])
}

func runFleet(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) error {
	fs := flag.NewFlagSet("fleetsim run", flag.ContinueOnError)
	fs.SetOutput(stderr)
	file := fs.String("f", "", "fleet file (YAML or JSON)")
	duration := fs.Duration("duration", 0, "run time (overrides run.duration)")
	progress := fs.Duration("progress", 0, "progress line interval (overrides run.progress; 0 keeps the file's)")
	summaryFile := fs.String("summary", "", "also write the JSON summary to this file")
	level := fs.String("log-level", "warn", "log level: debug, info, warn, error")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *file == "" {
		return errors.New("run: -f FLEET_FILE is required")
	}
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(*level)); err != nil {
		return fmt.Errorf("-log-level: %w", err)
	}
	f, err := sim.Load(*file)
	if err != nil {
		return err
	}
	if *duration > 0 {
		f.Run.Duration = sim.Duration(*duration)
	}
	if *progress > 0 {
		f.Run.Progress = sim.Duration(*progress)
	}
	logger := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: lvl}))
	s, err := sim.New(ctx, f, sim.Options{Logger: logger, Progress: stderr, AdminToken: getenv("FLEETD_ADMIN_TOKEN")})
	if err != nil {
		return err
	}
	summary := s.Run(ctx)
	out, _ := json.MarshalIndent(summary, "", "  ")
	fmt.Fprintln(stdout, string(out))
	if *summaryFile != "" {
		if err := os.WriteFile(*summaryFile, append(out, '\n'), 0o644); err != nil {
			return err
		}
	}
	return nil
}

func makeCerts(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("fleetsim certs", flag.ContinueOnError)
	fs.SetOutput(stderr)
	dir := fs.String("dir", "", "directory to write the certificates to")
	ip := fs.String("ip", "127.0.0.1", "IP address the server certificate is for")
	dns := fs.String("dns", "localhost", "DNS name the server certificate is for")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *dir == "" {
		return errors.New("certs: -dir is required")
	}
	addr := net.ParseIP(*ip)
	if addr == nil {
		return fmt.Errorf("certs: -ip %q is not an IP address", *ip)
	}
	if err := os.MkdirAll(*dir, 0o755); err != nil {
		return err
	}
	ca, err := devcert.NewCA("fleetd device CA")
	if err != nil {
		return err
	}
	if err := ca.WriteCA(filepath.Join(*dir, "device-ca.crt")); err != nil {
		return err
	}
	if err := ca.WriteKey(filepath.Join(*dir, "device-ca.key")); err != nil {
		return err
	}
	srv, err := ca.Server(devcert.Options{IPs: []net.IP{addr}, DNSNames: []string{*dns}, NotAfter: time.Now().Add(365 * 24 * time.Hour)})
	if err != nil {
		return err
	}
	if _, _, err := devcert.WritePair(*dir, "server", srv); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "wrote %s/{device-ca.crt,device-ca.key,server.crt,server.key}\n", *dir)
	fmt.Fprintf(stdout, "fleetd: FLEETD_MQTT_TLS_ADDR=:8883 FLEETD_TLS_CERT_FILE=%[1]s/server.crt FLEETD_TLS_KEY_FILE=%[1]s/server.key FLEETD_TLS_CLIENT_CA_FILE=%[1]s/device-ca.crt\n", *dir)
	return nil
}
