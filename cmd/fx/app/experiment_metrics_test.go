package app

import (
	"bytes"
	"encoding/csv"
	"encoding/json"
	"fmt"
	"maps"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fx-fl/fx/experiment/tfevents"
)

// watchedEvent is a metric event as `fx experiment watch --output json`
// prints it.
type watchedEvent struct {
	Sequence     int64              `json:"sequence"`
	Round        int32              `json:"round"`
	Task         string             `json:"task"`
	Collaborator string             `json:"collaborator"`
	Samples      int64              `json:"samples"`
	Metrics      map[string]float64 `json:"metrics"`
	Time         string             `json:"time"`
}

// exportedRow is a row of the CSV and JSON exports.
type exportedRow struct {
	Round        int32   `json:"round"`
	Task         string  `json:"task"`
	Collaborator string  `json:"collaborator"`
	Metric       string  `json:"metric"`
	Value        float64 `json:"value"`
	Samples      int64   `json:"samples"`
	Time         string  `json:"time"`
}

// TestExperimentMetricsExport runs a two-round experiment on a real
// federation, exports its metrics with --follow while it runs and again once
// it has ended, to TensorBoard event files, CSV and JSON, and checks every
// file against the events `fx experiment watch` prints.
func TestExperimentMetricsExport(t *testing.T) {
	f := newResearchFederation(t)
	p := []string{"--profile", f.profile}
	waitForSites(t, f.profile)
	out, _, err := fx(t, append([]string{"experiment", "submit", writePlan(t, "synth", 2, 2), "--name", "tracked"}, p...)...)
	if err != nil {
		t.Fatalf("submit: %v\n%s", err, out)
	}

	// Follow it from the start, while it runs.
	live := t.TempDir()
	followed := make(chan error, 1)
	var followOut string
	go func() {
		var err error
		followOut, _, err = fx(t, append([]string{"experiment", "metrics", "tracked", "--follow",
			"--tensorboard", filepath.Join(live, "tb"), "--csv", filepath.Join(live, "m.csv"), "--json", filepath.Join(live, "m.jsonl")}, p...)...)
		followed <- err
	}()
	select {
	case err := <-followed:
		if err != nil {
			t.Fatalf("metrics --follow: %v\n%s", err, followOut)
		}
	case <-time.After(3 * time.Minute):
		t.Fatal("metrics --follow did not end with the experiment")
	}
	if !strings.Contains(followOut, "tracked (FINISHED): 21 metric events") || !strings.Contains(followOut, "tensorboard --logdir "+filepath.Join(live, "tb")) {
		t.Errorf("metrics --follow printed:\n%s", followOut)
	}

	out, _, err = fx(t, append([]string{"experiment", "watch", "tracked", "--output", "json"}, p...)...)
	if err != nil {
		t.Fatalf("watch: %v", err)
	}
	var events []watchedEvent
	for line := range strings.SplitSeq(strings.TrimSpace(out), "\n") {
		var ev watchedEvent
		if err := json.Unmarshal([]byte(line), &ev); err != nil {
			t.Fatalf("watch line %q: %v", line, err)
		}
		events = append(events, ev)
	}
	var want []exportedRow
	for _, ev := range events {
		for _, k := range slices.Sorted(maps.Keys(ev.Metrics)) {
			want = append(want, exportedRow{ev.Round, ev.Task, ev.Collaborator, k, ev.Metrics[k], ev.Samples, ev.Time})
		}
	}
	// What the experiment reports: both sites' and the aggregate's train
	// results in rounds 1 and 2, and the final model's validation (round 3).
	has := func(round int32, task, collaborator string) bool {
		return slices.ContainsFunc(want, func(r exportedRow) bool {
			return r.Round == round && r.Task == task && r.Collaborator == collaborator && r.Metric == "accuracy"
		})
	}
	for _, c := range []string{"", "site-1", "site-2"} {
		if !has(1, "train", c) || !has(2, "train", c) || !has(3, "aggregated_model_validation", c) {
			t.Fatalf("the experiment's events lack %q's results: %+v", c, events)
		}
	}

	// Export the ended experiment, and once more into the same
	// TensorBoard directory, which replaces the first export's files.
	ended := t.TempDir()
	tb := filepath.Join(ended, "tb")
	for range 2 {
		out, _, err = fx(t, append([]string{"experiment", "metrics", "tracked", "--tensorboard", tb,
			"--csv", filepath.Join(ended, "m.csv"), "--json", filepath.Join(ended, "m.jsonl"), "--output", "json"}, p...)...)
		if err != nil {
			t.Fatalf("metrics: %v\n%s", err, out)
		}
	}
	var summary struct {
		State  string   `json:"state"`
		Events int      `json:"events"`
		Rows   int      `json:"rows"`
		Runs   []string `json:"runs"`
	}
	if err := json.Unmarshal([]byte(out), &summary); err != nil || summary.State != "FINISHED" || summary.Events != len(events) ||
		summary.Rows != len(want) || fmt.Sprint(summary.Runs) != "[aggregate sites/site-1 sites/site-2]" {
		t.Errorf("metrics --output json printed %s (%v)", out, err)
	}

	for _, dir := range []string{live, ended} {
		checkCSV(t, filepath.Join(dir, "m.csv"), want)
		checkJSONLines(t, filepath.Join(dir, "m.jsonl"), want)
		checkTensorBoard(t, filepath.Join(dir, "tb"), want)
	}
	a, _ := os.ReadFile(filepath.Join(live, "m.csv"))
	b, _ := os.ReadFile(filepath.Join(ended, "m.csv"))
	if !bytes.Equal(a, b) {
		t.Errorf("the followed and the later CSV differ:\n%s\n%s", a, b)
	}

	// To stdout: a table by default, JSON Lines with --output json, CSV
	// with --csv -.
	out, _, err = fx(t, append([]string{"experiment", "metrics", "tracked"}, p...)...)
	if lines := strings.Split(strings.TrimSpace(out), "\n"); err != nil || len(lines) != len(want)+1 ||
		strings.Fields(lines[0])[0] != "ROUND" || !strings.Contains(out, "aggregated_model_validation") || !strings.Contains(out, "site-2") {
		t.Errorf("metrics = %v\n%s", err, out)
	}
	out, _, err = fx(t, append([]string{"experiment", "metrics", "tracked", "--output", "json"}, p...)...)
	if err != nil || strings.Count(out, "\n") != len(want) || !strings.HasPrefix(out, `{"round":`) {
		t.Errorf("metrics --output json = %v\n%s", err, out)
	}
	out, _, err = fx(t, append([]string{"experiment", "metrics", "tracked", "--csv", "-"}, p...)...)
	if err != nil || string(a) != out {
		t.Errorf("metrics --csv - = %v\n%s", err, out)
	}
	if _, _, err := fx(t, append([]string{"experiment", "metrics", "tracked", "--csv", "-", "--json", "-"}, p...)...); exitCode(err) != 2 {
		t.Errorf("--csv - --json -: %v (exit %d), want a usage error", err, exitCode(err))
	}
	if _, _, err := fx(t, append([]string{"experiment", "metrics", "no-such"}, p...)...); exitCode(err) != 3 {
		t.Errorf("an unknown experiment: %v (exit %d), want 3", err, exitCode(err))
	}

	// A live experiment without --follow: what exists so far (here
	// nothing: it selects no site and waits), then the command returns.
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "plan.yaml"), []byte("name: waiting\nrounds: 1\nparticipants: {min: 1, tags: [nowhere]}\nrunner: {kind: builtin, model: softmax}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, _, err := fx(t, append([]string{"experiment", "submit", dir}, p...)...); err != nil {
		t.Fatalf("submit: %v\n%s", err, out)
	}
	start := time.Now()
	out, _, err = fx(t, append([]string{"experiment", "metrics", "waiting", "--tensorboard", filepath.Join(dir, "tb")}, p...)...)
	if err != nil || !strings.Contains(out, "waiting (OFFERED): 0 metric events, 0 rows") || !strings.Contains(out, "no TensorBoard runs") {
		t.Errorf("metrics of a waiting experiment = %v\n%s", err, out)
	}
	if d := time.Since(start); d > 15*time.Second {
		t.Errorf("metrics of a live experiment took %s to return", d)
	}
	if _, _, err := fx(t, append([]string{"experiment", "cancel", "waiting"}, p...)...); err != nil {
		t.Error(err)
	}
}

func checkCSV(t *testing.T, path string, want []exportedRow) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	records, err := csv.NewReader(f).ReadAll()
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	if len(records) != len(want)+1 || strings.Join(records[0], ",") != "round,task,collaborator,metric,value,samples,time" {
		t.Fatalf("%s: %d records, header %v; want %d rows", path, len(records), records[0], len(want))
	}
	for i, rec := range records[1:] {
		round, _ := strconv.Atoi(rec[0])
		value, _ := strconv.ParseFloat(rec[4], 64)
		samples, _ := strconv.ParseInt(rec[5], 10, 64)
		got := exportedRow{int32(round), rec[1], rec[2], rec[3], value, samples, rec[6]}
		if !sameRow(got, want[i]) {
			t.Errorf("%s row %d = %+v, want %+v", path, i+1, got, want[i])
		}
	}
}

func checkJSONLines(t *testing.T, path string, want []exportedRow) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
	if len(lines) != len(want) {
		t.Fatalf("%s: %d lines, want %d", path, len(lines), len(want))
	}
	for i, line := range lines {
		var got exportedRow
		if err := json.Unmarshal([]byte(line), &got); err != nil {
			t.Fatalf("%s line %d: %v", path, i+1, err)
		}
		if !strings.HasPrefix(line, `{"round":`) || !sameRow(got, want[i]) {
			t.Errorf("%s line %d = %s, want %+v", path, i+1, line, want[i])
		}
	}
}

// sameRow compares rows, times as instants.
func sameRow(a, b exportedRow) bool {
	ta, errA := time.Parse(time.RFC3339Nano, a.Time)
	tb, errB := time.Parse(time.RFC3339Nano, b.Time)
	if errA != nil || errB != nil || !ta.Equal(tb) {
		return false
	}
	a.Time, b.Time = "", ""
	return a == b
}

// checkTensorBoard reads the event files of each run back and compares
// them with the rows: a run per source, a tag TASK/METRIC, a point per round.
func checkTensorBoard(t *testing.T, dir string, want []exportedRow) {
	t.Helper()
	type key struct {
		run, tag string
		step     int64
	}
	wantPoints := map[key]float32{}
	for _, r := range want {
		run := "aggregate"
		if r.Collaborator != "" {
			run = "sites/" + r.Collaborator
		}
		wantPoints[key{run, r.Task + "/" + r.Metric, int64(r.Round)}] = float32(r.Value)
	}
	got := map[key]float32{}
	for _, run := range []string{"aggregate", "sites/site-1", "sites/site-2"} {
		files, _ := filepath.Glob(filepath.Join(dir, run, "events.out.tfevents.*"))
		if len(files) != 1 {
			t.Fatalf("%s/%s: event files %v, want one", dir, run, files)
		}
		events, err := tfevents.ReadFile(files[0])
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range events[1:] {
			for _, v := range e.Values {
				k := key{run, v.Tag, e.Step}
				if _, dup := got[k]; dup {
					t.Errorf("%s: %s at step %d twice", run, v.Tag, e.Step)
				}
				got[k] = v.Value
			}
		}
	}
	if !maps.EqualFunc(got, wantPoints, func(a, b float32) bool { return a == b || math.IsNaN(float64(a)) && math.IsNaN(float64(b)) }) {
		t.Errorf("%s: scalars %v\nwant %v", dir, got, wantPoints)
	}

	// And as a reader that shares no code with fx's sees them (see
	// experiment/tfevents): run names and tags included.
	const python = "/usr/bin/python3"
	if exec.Command(python, "-c", "import google.protobuf").Run() != nil {
		t.Logf("no %s with google.protobuf: the event files were read by fx's reader only", python)
		return
	}
	cmd := exec.Command(python, filepath.Join("..", "..", "..", "experiment", "tfevents", "testdata", "read_events.py"), dir)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("read_events.py: %v\n%s", err, stderr.String())
	}
	var read struct {
		Reader  string                             `json:"reader"`
		Scalars map[string]map[string][][3]float64 `json:"scalars"`
	}
	if err := json.Unmarshal(out, &read); err != nil {
		t.Fatalf("read_events.py printed %s: %v", out, err)
	}
	n := 0
	for run, tags := range read.Scalars {
		for tag, points := range tags {
			for _, pt := range points {
				n++
				if v, ok := wantPoints[key{run, tag, int64(pt[0])}]; !ok || float32(pt[1]) != v {
					t.Errorf("%s read %s %s step %v = %v, want %v", read.Reader, run, tag, pt[0], pt[1], v)
				}
			}
		}
	}
	if n != len(wantPoints) {
		t.Errorf("%s read %d scalars, want %d", read.Reader, n, len(wantPoints))
	}
	t.Logf("%s read the %d scalars of %s", read.Reader, n, dir)
}
