package app

import (
	"context"
	"encoding/csv"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/experiment/tfevents"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// metricsIdle is how long `fx experiment metrics` without --follow waits
// for the next event of a live experiment before it takes the events so far
// to be all there are: the director sends what it has at once, so a pause
// means the rest is still to be computed. The Python client's
// metrics(follow=False) waits as long.
const metricsIdle = 2 * time.Second

// TensorBoard runs: one directory per source of metrics, so that a tag's
// chart draws the round aggregate and every site as curves of their own.
const (
	tbAggregateRun = "aggregate"
	tbSitesDir     = "sites"
)

// The columns of a metrics row, in the order the CSV and JSON give them;
// the Python client's metrics_frame has the same.
var metricsColumns = []string{"round", "task", "collaborator", "metric", "value", "samples", "time"}

func newExperimentMetricsCommand(o *researcherOptions) *cobra.Command {
	var csvFile, jsonFile, tbDir string
	var follow bool
	cmd := &cobra.Command{
		Use:   "metrics NAME [--tensorboard DIR] [--csv FILE] [--json FILE] [--follow]",
		Short: "Export an experiment's per-round metrics for TensorBoard, CSV or JSON",
		Long: `Export every metric the experiment has reported: each round's aggregate over
the sites and each site's result of each task, one row per round, task,
collaborator (empty for the aggregate) and metric, with the samples behind
it and when it was reported. Rows come in the order the director recorded
them.

--tensorboard DIR writes TensorBoard event files: a run per source,
DIR/aggregate and DIR/sites/SITE, with one scalar per metric tagged
TASK/METRIC at step ROUND, so each chart draws the aggregate and every site
together. Open it with 'tensorboard --logdir DIR'. An export replaces the
event files an earlier one left in those runs.

--csv FILE and --json FILE write the rows as CSV (with a header) and as JSON
Lines (one object per row); FILE "-" is stdout. Without any of the three the
rows are printed in the --output format: a table, JSON Lines or YAML.

Without --follow the command exports the events so far and exits. With
--follow it keeps every file up to date as rounds complete, until the
experiment ends, riding out a dropped connection or a restarting director as
'fx experiment watch' does.`,
		Example: `  fx experiment metrics fashion-mlp --tensorboard runs/fashion-mlp && tensorboard --logdir runs
  fx experiment metrics fashion-mlp --csv metrics.csv --json metrics.jsonl
  fx experiment metrics fashion-mlp --follow --tensorboard runs/fashion-mlp
  fx experiment metrics fashion-mlp --output json | jq 'select(.collaborator == "")'`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := o.checkOutput(); err != nil {
				return err
			}
			if csvFile == "-" && jsonFile == "-" {
				return usageError{errors.New("--csv - and --json -: only one of them can go to stdout")}
			}
			c, err := o.dial(cmd)
			if err != nil {
				return err
			}
			defer c.Close()
			name := args[0]
			ctx := cmd.Context()
			e, err := c.Get(ctx, name)
			if err != nil {
				return err
			}
			x := &metricsExport{stdout: cmd.OutOrStdout()}
			defer x.close()
			if err := x.open(o, csvFile, jsonFile, tbDir); err != nil {
				return err
			}
			var last int64
			each := func(ev *fxv1.MetricEvent) error {
				last = ev.GetSequence()
				return x.write(ev)
			}
			if follow {
				e, err = followMetrics(ctx, c, name, each)
			} else {
				err = exportMetrics(ctx, c, name, experiment.Ended(e.GetState()), each)
			}
			if cerr := x.close(); err == nil {
				err = cerr
			}
			if err != nil {
				if errors.Is(err, context.Canceled) {
					return fmt.Errorf("stopped; what was written holds experiment %s's metrics up to sequence %d: %w", name, last, err)
				}
				return err
			}
			return x.summary(cmd, o, e)
		},
	}
	f := cmd.Flags()
	f.StringVar(&tbDir, "tensorboard", "", "write TensorBoard event files under DIR (a run per source: DIR/aggregate, DIR/sites/SITE)")
	f.StringVar(&csvFile, "csv", "", "write the rows as CSV to FILE (- for stdout)")
	f.StringVar(&jsonFile, "json", "", "write the rows as JSON Lines to FILE (- for stdout)")
	f.BoolVarP(&follow, "follow", "f", false, "keep exporting as rounds complete, until the experiment ends")
	_ = cmd.MarkFlagDirname("tensorboard")
	return cmd
}

// exportMetrics hands each of the experiment's events so far to each. Of an
// ended experiment that is every event; of a live one, those that arrive
// before the stream has been quiet for metricsIdle.
func exportMetrics(ctx context.Context, c *experiment.Client, name string, ended bool, each func(*fxv1.MetricEvent) error) error {
	errIdle := errors.New("no new event")
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	if !ended {
		idle := time.AfterFunc(metricsIdle, func() { cancel(errIdle) })
		defer idle.Stop()
		prev := each
		each = func(ev *fxv1.MetricEvent) error {
			idle.Stop()
			defer idle.Reset(metricsIdle)
			return prev(ev)
		}
	}
	for ev, err := range c.Metrics(ctx, name, 0) {
		if err != nil {
			if errors.Is(context.Cause(ctx), errIdle) {
				return nil
			}
			return err
		}
		if err := each(ev); err != nil {
			return err
		}
	}
	return nil
}

// followMetrics hands each every event until the experiment ends, and
// returns it. That it ended other than FINISHED is no failure of the export.
func followMetrics(ctx context.Context, c *experiment.Client, name string, each func(*fxv1.MetricEvent) error) (*fxv1.Experiment, error) {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var werr error
	e, err := c.Follow(ctx, name, 0, func(ev *fxv1.MetricEvent) {
		if werr != nil {
			return
		}
		if werr = each(ev); werr != nil {
			cancel(werr)
		}
	})
	if werr != nil {
		return e, werr
	}
	var ended *experiment.EndedError
	if errors.As(err, &ended) {
		err = nil
	}
	return e, err
}

// metricRow is one metric of one event.
type metricRow struct {
	round        int32
	task         string
	collaborator string
	metric       string
	value        float64
	samples      int64
	time         time.Time // zero when the event has none
}

func metricRows(ev *fxv1.MetricEvent) []metricRow {
	var t time.Time
	if ev.GetTime() != nil {
		t = ev.GetTime().AsTime()
	}
	m := ev.GetMetrics()
	rows := make([]metricRow, 0, len(m))
	for _, k := range slices.Sorted(maps.Keys(m)) {
		rows = append(rows, metricRow{ev.GetRound(), ev.GetTask(), ev.GetCollaborator(), k, m[k], ev.GetSamples(), t})
	}
	return rows
}

func (r metricRow) timeString() string {
	if r.time.IsZero() {
		return ""
	}
	return r.time.UTC().Format(time.RFC3339Nano)
}

// cells is the row as CSV cells: numbers in Go's shortest exact form
// ("NaN", "+Inf" for the values JSON has no number for).
func (r metricRow) cells() []string {
	return []string{
		strconv.Itoa(int(r.round)), r.task, r.collaborator, r.metric,
		strconv.FormatFloat(r.value, 'g', -1, 64), strconv.FormatInt(r.samples, 10), r.timeString(),
	}
}

// object is the row for JSON and YAML, keys in column order.
func (r metricRow) object() object {
	var v any = r.value
	if math.IsNaN(r.value) || math.IsInf(r.value, 0) {
		v = fmt.Sprint(r.value) // as the other structured outputs write them
	}
	var t any
	if s := r.timeString(); s != "" {
		t = s
	}
	return object{
		{"round", r.round}, {"task", r.task}, {"collaborator", r.collaborator}, {"metric", r.metric},
		{"value", v}, {"samples", r.samples}, {"time", t},
	}
}

// metricsExport writes events to the chosen outputs as they come.
type metricsExport struct {
	stdout io.Writer
	sinks  []metricsSink
	tb     *tbSink
	events int
	rows   int
	files  object // what was written where, for the summary
	closed bool
}

// metricsSink is one output; write takes one event's rows, and leaves them
// where a reader of the file sees them.
type metricsSink interface {
	write(ev *fxv1.MetricEvent, rows []metricRow) error
	close() error
}

func (x *metricsExport) open(o *researcherOptions, csvFile, jsonFile, tbDir string) error {
	file := func(path string) (io.Writer, func() error, error) {
		if path == "-" {
			return x.stdout, func() error { return nil }, nil
		}
		f, err := os.Create(path)
		if err != nil {
			return nil, nil, err
		}
		return f, f.Close, nil
	}
	if csvFile != "" {
		w, closeFile, err := file(csvFile)
		if err != nil {
			return err
		}
		s := &csvSink{w: csv.NewWriter(w), closeFile: closeFile}
		x.sinks = append(x.sinks, s)
		if err := s.header(); err != nil {
			return err
		}
		x.files = append(x.files, objectField{"csv", csvFile})
	}
	if jsonFile != "" {
		w, closeFile, err := file(jsonFile)
		if err != nil {
			return err
		}
		x.sinks = append(x.sinks, &rowsSink{w: w, closeFile: closeFile, format: outputJSON})
		x.files = append(x.files, objectField{"json", jsonFile})
	}
	if tbDir != "" {
		s, err := newTBSink(tbDir)
		if err != nil {
			return err
		}
		x.tb = s
		x.sinks = append(x.sinks, s)
		x.files = append(x.files, objectField{"tensorboard", tbDir})
	}
	if len(x.sinks) == 0 {
		if o.output == outputTable {
			x.sinks = append(x.sinks, &tableSink{w: x.stdout})
		} else {
			x.sinks = append(x.sinks, &rowsSink{w: x.stdout, closeFile: func() error { return nil }, format: o.output})
		}
	}
	return nil
}

// toStdout reports whether rows go to stdout (and so no summary does).
func (x *metricsExport) toStdout() bool {
	if len(x.files) == 0 {
		return true
	}
	for _, f := range x.files {
		if f.value == "-" {
			return true
		}
	}
	return false
}

func (x *metricsExport) write(ev *fxv1.MetricEvent) error {
	rows := metricRows(ev)
	x.events++
	x.rows += len(rows)
	for _, s := range x.sinks {
		if err := s.write(ev, rows); err != nil {
			return err
		}
	}
	return nil
}

func (x *metricsExport) close() error {
	if x.closed {
		return nil
	}
	x.closed = true
	var errs []error
	for _, s := range x.sinks {
		errs = append(errs, s.close())
	}
	return errors.Join(errs...)
}

// summary says what was written where, unless the rows went to stdout.
func (x *metricsExport) summary(cmd *cobra.Command, o *researcherOptions, e *fxv1.Experiment) error {
	if x.toStdout() {
		return nil
	}
	var runs []string
	if x.tb != nil {
		runs = x.tb.runNames()
	}
	out := cmd.OutOrStdout()
	if o.structured() {
		v := object{{"experiment", e.GetName()}, {"state", e.GetState().String()}, {"events", x.events}, {"rows", x.rows}}
		v = append(v, x.files...)
		if x.tb != nil {
			v = append(v, objectField{"runs", runs})
		}
		return o.writeObject(out, v)
	}
	fmt.Fprintf(out, "%s (%s): %d metric events, %d rows\n", e.GetName(), e.GetState(), x.events, x.rows)
	for _, f := range x.files {
		switch f.key {
		case "csv":
			fmt.Fprintf(out, "wrote %s (CSV)\n", f.value)
		case "json":
			fmt.Fprintf(out, "wrote %s (JSON Lines)\n", f.value)
		case "tensorboard":
			if len(runs) == 0 {
				fmt.Fprintf(out, "no TensorBoard runs under %s yet: the experiment has no metrics\n", f.value)
				continue
			}
			fmt.Fprintf(out, "wrote TensorBoard runs %s under %s: tensorboard --logdir %s\n", strings.Join(runs, ", "), f.value, f.value)
		}
	}
	return nil
}

// csvSink writes CSV with a header row.
type csvSink struct {
	w         *csv.Writer
	closeFile func() error
}

func (s *csvSink) header() error {
	if err := s.w.Write(metricsColumns); err != nil {
		return err
	}
	s.w.Flush()
	return s.w.Error()
}

func (s *csvSink) write(_ *fxv1.MetricEvent, rows []metricRow) error {
	for _, r := range rows {
		if err := s.w.Write(r.cells()); err != nil {
			return err
		}
	}
	s.w.Flush()
	return s.w.Error()
}

func (s *csvSink) close() error {
	s.w.Flush()
	return errors.Join(s.w.Error(), s.closeFile())
}

// rowsSink writes JSON Lines, or a YAML document per row.
type rowsSink struct {
	w         io.Writer
	closeFile func() error
	format    string
}

func (s *rowsSink) write(_ *fxv1.MetricEvent, rows []metricRow) error {
	for _, r := range rows {
		if s.format == outputYAML {
			if err := writeYAMLValue(s.w, r.object()); err != nil {
				return err
			}
			continue
		}
		b, err := json.Marshal(r.object())
		if err != nil {
			return err
		}
		if _, err := s.w.Write(append(b, '\n')); err != nil {
			return err
		}
	}
	return nil
}

func (s *rowsSink) close() error { return s.closeFile() }

// tableSink prints rows for people, in fixed columns: with --follow they are
// read live and cannot wait for the widest row.
type tableSink struct {
	w      io.Writer
	headed bool
}

const metricsTableRow = "%5v  %-30s  %-16s  %-20s  %12s  %8v\n"

func (s *tableSink) write(_ *fxv1.MetricEvent, rows []metricRow) error {
	if !s.headed {
		s.headed = true
		if _, err := fmt.Fprintf(s.w, metricsTableRow, "ROUND", "TASK", "COLLABORATOR", "METRIC", "VALUE", "SAMPLES"); err != nil {
			return err
		}
	}
	for _, r := range rows {
		if _, err := fmt.Fprintf(s.w, metricsTableRow, r.round, r.task, orDash(r.collaborator), r.metric, strconv.FormatFloat(r.value, 'g', 6, 64), r.samples); err != nil {
			return err
		}
	}
	return nil
}

func (s *tableSink) close() error {
	if !s.headed {
		_, err := fmt.Fprintln(s.w, "no metrics yet")
		return err
	}
	return nil
}

// tbSink writes a TensorBoard run per source of metrics.
type tbSink struct {
	dir  string
	runs map[string]*tfevents.Writer
}

// newTBSink prepares dir, removing the event files an earlier export left
// in its runs: TensorBoard reads every file of a run, and would draw each
// point twice.
func newTBSink(dir string) (*tbSink, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	runDirs := []string{filepath.Join(dir, tbAggregateRun)}
	sites, err := os.ReadDir(filepath.Join(dir, tbSitesDir))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	for _, s := range sites {
		if s.IsDir() {
			runDirs = append(runDirs, filepath.Join(dir, tbSitesDir, s.Name()))
		}
	}
	for _, d := range runDirs {
		old, _ := filepath.Glob(filepath.Join(d, tfevents.FilePrefix+"*"))
		for _, f := range old {
			if err := os.Remove(f); err != nil {
				return nil, fmt.Errorf("replacing an earlier export: %w", err)
			}
		}
	}
	return &tbSink{dir: dir, runs: map[string]*tfevents.Writer{}}, nil
}

// tbRun is the run an event belongs to, relative to the log directory.
func tbRun(ev *fxv1.MetricEvent) (string, error) {
	site := ev.GetCollaborator()
	if site == "" {
		return tbAggregateRun, nil
	}
	// Envoy names are checked by the director; a name that is not one
	// path element must not reach the file system all the same.
	if err := experiment.ValidateName("envoy", site); err != nil {
		return "", fmt.Errorf("metric event %d: %w", ev.GetSequence(), err)
	}
	return filepath.Join(tbSitesDir, site), nil
}

func (s *tbSink) write(ev *fxv1.MetricEvent, rows []metricRow) error {
	if len(rows) == 0 {
		return nil
	}
	run, err := tbRun(ev)
	if err != nil {
		return err
	}
	w := s.runs[run]
	if w == nil {
		if w, err = tfevents.Create(filepath.Join(s.dir, run), time.Now()); err != nil {
			return err
		}
		s.runs[run] = w
	}
	values := make([]tfevents.Value, len(rows))
	for i, r := range rows {
		values[i] = tfevents.Value{Tag: r.task + "/" + r.metric, Value: float32(r.value)}
	}
	t := rows[0].time
	if t.IsZero() {
		t = time.Now()
	}
	if err := w.Scalars(int64(ev.GetRound()), t, values...); err != nil {
		return err
	}
	return w.Flush()
}

func (s *tbSink) runNames() []string {
	names := make([]string, 0, len(s.runs))
	for r := range s.runs {
		names = append(names, filepath.ToSlash(r))
	}
	slices.Sort(names)
	return names
}

func (s *tbSink) close() error {
	var errs []error
	for _, w := range s.runs {
		errs = append(errs, w.Close())
	}
	return errors.Join(errs...)
}
