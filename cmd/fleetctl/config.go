package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"

	"github.com/fleetd/fleetd/devconfig"
)

// config runs the configuration commands: get (a device's view, or a
// layer with -layer), set (a device's own layer, or a layer with -layer;
// whole, or a merge patch with -merge), diff (desired against reported;
// exit 1 unless in sync), layers (all of them) and delete (a layer).
func (c *cli) config(ctx context.Context, sub string, args []string) error {
	fs := flag.NewFlagSet("config "+sub, flag.ContinueOnError)
	fs.SetOutput(c.stderr)
	layer := fs.String("layer", "", "a layer's scope: fleet, model:M, tag:T or model:M,tag:T")
	merge := fs.Bool("merge", false, "set: apply the document as a JSON merge patch (RFC 7396: null removes a key)")
	file := fs.String("f", "", "set: read the document from FILE (- for stdin)")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	switch sub {
	case "get":
		if *layer != "" {
			l, err := c.api.ConfigLayer(ctx, *layer)
			if err != nil {
				return err
			}
			return c.printLayer(l)
		}
		id, err := needID(pos, "config get")
		if err != nil {
			return err
		}
		v, err := c.api.DeviceConfig(ctx, id)
		if err != nil {
			return err
		}
		return c.printConfig(v)
	case "diff":
		id, err := needID(pos, "config diff")
		if err != nil {
			return err
		}
		v, err := c.api.DeviceConfig(ctx, id)
		if err != nil {
			return err
		}
		if err := c.print(v, func(w *tabwriter.Writer) { configDiffTable(w, v) }); err != nil {
			return err
		}
		if !v.InSync {
			return fmt.Errorf("device %s is not in sync (%s)", id, v.Sync)
		}
		return nil
	case "set":
		var doc []byte
		switch {
		case *file == "-":
			doc, err = io.ReadAll(io.LimitReader(os.Stdin, 1<<20))
		case *file != "":
			doc, err = os.ReadFile(*file)
		case len(pos) > 0 && *layer != "":
			doc = []byte(pos[len(pos)-1])
		case len(pos) > 1:
			doc = []byte(pos[1])
		}
		if err != nil {
			return fmt.Errorf("config set: %w", err)
		}
		if len(strings.TrimSpace(string(doc))) == 0 {
			return errors.New("config set: want a JSON document (an argument, or -f FILE)")
		}
		if !json.Valid(doc) {
			return errors.New("config set: the document is not JSON")
		}
		if *layer != "" {
			set := c.api.SetConfigLayer
			if *merge {
				set = c.api.PatchConfigLayer
			}
			ch, err := set(ctx, *layer, doc)
			if err != nil {
				return err
			}
			return c.print(ch, func(w *tabwriter.Writer) {
				fmt.Fprintf(w, "layer\t%s\nrevision\t%d\nconfig\t%s\ndevices\t%d (re-resolved within about a second)\n",
					ch.Layer.Scope, ch.Layer.Revision, devconfig.Encode(ch.Layer.Config), ch.Devices)
			})
		}
		id, err := needID(pos, "config set")
		if err != nil {
			return err
		}
		set := c.api.SetDeviceConfig
		if *merge {
			set = c.api.PatchDeviceConfig
		}
		v, err := set(ctx, id, doc)
		if err != nil {
			return err
		}
		return c.printConfig(v)
	case "layers":
		ls, err := c.api.ConfigLayers(ctx)
		if err != nil {
			return err
		}
		return c.print(ls, func(w *tabwriter.Writer) {
			fmt.Fprintln(w, "SCOPE\tREVISION\tUPDATED\tCONFIG")
			for _, l := range ls {
				fmt.Fprintf(w, "%s\t%d\t%s\t%s\n", l.Scope, l.Revision, l.UpdatedAt.Format("2006-01-02 15:04:05"), clipResult(devconfig.Encode(l.Config), 80))
			}
		})
	case "delete":
		scope := *layer
		if scope == "" && len(pos) > 0 {
			scope = pos[0]
		}
		if scope == "" {
			return errors.New("config delete: want a layer's scope")
		}
		ch, err := c.api.DeleteConfigLayer(ctx, scope)
		if err != nil {
			return err
		}
		return c.print(ch, func(w *tabwriter.Writer) {
			fmt.Fprintf(w, "deleted\t%s\ndevices\t%d (re-resolved within about a second)\n", scope, ch.Devices)
		})
	}
	return fmt.Errorf("unknown command config %s (want get, set, diff, layers or delete)", sub)
}

// parseInterleaved parses flags wherever they are among the arguments
// (config set ID -merge '{…}') and returns the others in order.
func parseInterleaved(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		args = fs.Args()
		if len(args) == 0 {
			return pos, nil
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
}

func (c *cli) printLayer(l devconfig.Layer) error {
	return c.print(l, func(w *tabwriter.Writer) {
		fmt.Fprintf(w, "layer\t%s\nrevision\t%d\nupdated\t%s\nconfig\t%s\n", l.Scope, l.Revision, l.UpdatedAt.Format("2006-01-02 15:04:05"), devconfig.Encode(l.Config))
	})
}

func (c *cli) printConfig(v devconfig.View) error {
	return c.print(v, func(w *tabwriter.Writer) {
		fmt.Fprintf(w, "device\t%s\n", v.DeviceID)
		fmt.Fprintf(w, "desired\tversion %d\t%s\n", v.Desired.Version, devconfig.Encode(v.Desired.Config))
		fmt.Fprintf(w, "layers\t%s\n", strings.Join(v.Desired.Sources, " < "))
		fmt.Fprintf(w, "own layer\t%s\n", devconfig.Encode(v.Device))
		if v.Reported != nil {
			fmt.Fprintf(w, "reported\tversion %d\t%s\t%s\n", v.Reported.Version, devconfig.Encode(v.Reported.Config), v.Reported.At.Format("2006-01-02 15:04:05"))
		}
		fmt.Fprintf(w, "sync\t%s\n", v.Sync)
		if v.Problem != "" {
			fmt.Fprintf(w, "problem\t%s\n", v.Problem)
		}
	})
}

func configDiffTable(w *tabwriter.Writer, v devconfig.View) {
	reported := "-"
	if v.Reported != nil {
		reported = fmt.Sprint(v.Reported.Version)
	}
	fmt.Fprintf(w, "%s\t%s\tdesired version %d\treported version %s\n", v.DeviceID, v.Sync, v.Desired.Version, reported)
	if len(v.Diff) == 0 {
		return
	}
	fmt.Fprintln(w, "PATH\tKIND\tDESIRED\tREPORTED")
	for _, d := range v.Diff {
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\n", d.Path, d.Kind, jsonValue(d.Desired), jsonValue(d.Reported))
	}
}

func jsonValue(v any) string {
	if v == nil {
		return "-"
	}
	b, _ := json.Marshal(v)
	return clipResult(b, 60)
}
