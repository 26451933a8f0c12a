package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/internal/atomicfile"
	"github.com/fx-fl/fx/tensor"
)

// fedbuffTrial is one pair of experiments, synchronous and asynchronous,
// on the same federation.
type fedbuffTrial struct {
	Order string
	// Sync and Async are each experiment's wall time, from the submission
	// until its last server step completed, in seconds; Ratio is
	// Async / Sync.
	Sync, Async, Ratio float64
	// SyncSteps and AsyncSteps are each step's seconds (the first from the
	// submission).
	SyncSteps, AsyncSteps []float64
}

type fedbuffResult struct {
	Start             time.Time
	Uptime, UptimeEnd string
	Envoys, Steps     int
	// Train is a fast site's train task in seconds; the slow site's takes
	// Slow times as long.
	Train, Slow float64
	Buffer      int
	Async       string
	Trials      []fedbuffTrial
	// Ratio is the median over the trials of async / sync wall time; Goal
	// is the (≤ 0.5).
	Ratio, Goal float64
	LogProblems []string
}

// fedbuffMain is fxbench fedbuff: see usage.
func fedbuffMain(args []string) error {
	fs := flag.NewFlagSet("fedbuff", flag.ExitOnError)
	envoys := fs.Int("envoys", 4, "envoys, each a process with its own runner")
	steps := fs.Int("steps", 10, "server steps (rounds) per experiment")
	train := fs.Float64("train", 1, "a fast site's train task, in seconds")
	slow := fs.Float64("slow", 5, "how many times longer the slow site's train task takes")
	buffer := fs.Int("buffer", 0, "aggregation.buffer of the asynchronous experiments (0: envoys − 1)")
	trials := fs.Int("trials", 3, "pairs of experiments (sync, async), alternating which goes first; odd, so the ratio is a true median")
	pkiDir, fxBin, out, keep := federationFlags(fs)
	python := fs.String("python", "/usr/bin/python3", "the runners' interpreter (with numpy)")
	_ = fs.Parse(args)
	if *envoys < 2 || *steps < 1 || *trials < 1 || *train <= 0 || *slow < 1 || *buffer < 0 || *buffer > *envoys {
		return errors.New("want -envoys ≥ 2, -steps ≥ 1, -trials ≥ 1, -train > 0, -slow ≥ 1, 0 ≤ -buffer ≤ -envoys")
	}
	k := *buffer
	if k == 0 {
		k = *envoys - 1
	}
	res := &fedbuffResult{Envoys: *envoys, Steps: *steps, Train: *train, Slow: *slow, Buffer: k, Goal: 0.5,
		Async: fmt.Sprintf("aggregation: {mode: async, buffer: %d}", k)}
	// bench/large/rewrite.py; each site's train task sleeps
	// FXBENCH_TRAIN_SECONDS first (5× longer at the slow site).
	script, err := rewriteScript(*python)
	if err != nil {
		return err
	}
	setup, err := setUpFederation(*fxBin, "fxbench-fedbuff-", *keep, *pkiDir, *envoys)
	if err != nil {
		return err
	}
	defer setup.done()
	work := setup.work
	fed, err := startProcFederation(setup.bin, setup.pki, *envoys, filepath.Join(work, "fed"), fedOptions{
		python: *python, threads: "1", tag: "fedbuff",
		shard: func(i, n int) string { return fmt.Sprintf("{kind: synthetic, shard: %d/%d, seed: 1}", i, n) },
		env: func(i int) []string {
			seconds := *train
			if i == 1 {
				seconds *= *slow
			}
			return []string{fmt.Sprintf("FXBENCH_TRAIN_SECONDS=%g", seconds)}
		},
	})
	if err != nil {
		return err
	}
	defer fed.stop()
	res.Start, res.Uptime = time.Now().UTC(), uptime()
	fmt.Printf("%d envoys, one of them %g× slower (train %g s, the slow one %g s); %d steps per experiment; load %s\n",
		*envoys, *slow, *train, *train**slow, *steps, loadAverage(res.Uptime))
	before := logSizes(fed.dir)
	experimentDir := func(name string, async bool) (string, error) {
		dir := filepath.Join(work, name)
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return "", err
		}
		if err := os.WriteFile(filepath.Join(dir, "rewrite.py"), script, 0o600); err != nil {
			return "", err
		}
		agg := "aggregation: {algorithm: fedavg}"
		if async {
			agg = res.Async
		}
		// No aggregated_model_validation: the last server step is the
		// experiment's end, without a validation round after it.
		plan := fmt.Sprintf(`name: %s
rounds: %d
participants: {min: %d, tags: [fedbuff]}
runner: {kind: exec, command: [python3, rewrite.py], timeout: 1h}
tasks: [train, locally_tuned_model_validation]
%s
stragglers: {deadline: 1h, min_reporting: 1}
best_model: {task: locally_tuned_model_validation, metric: accuracy, mode: max}
`, name, *steps, *envoys, agg)
		if err := os.WriteFile(filepath.Join(dir, experiment.PlanFile), []byte(plan), 0o600); err != nil {
			return "", err
		}
		// The runner makes no model: one small float32 model, a 16 × 4 layer.
		return dir, writeSmallModel(filepath.Join(dir, "model.safetensors"))
	}
	var ratios []float64
	for trial := range *trials {
		tr := fedbuffTrial{Order: "sync then async"}
		kinds := []bool{false, true}
		if trial%2 == 1 {
			kinds, tr.Order = []bool{true, false}, "async then sync"
		}
		for _, async := range kinds {
			kind := "sync"
			if async {
				kind = "async"
			}
			name := fmt.Sprintf("%s-%d", kind, trial+1)
			dir, err := experimentDir(name, async)
			if err != nil {
				return err
			}
			times, _, err := fed.run(dir, name, *steps)
			if err != nil {
				return fmt.Errorf("%s: %w (logs in %s)", name, err, fed.dir)
			}
			var total float64
			for _, s := range times {
				total += s
			}
			fmt.Printf("%s: %d steps in %.1f s (steps %s s, the first from the submission); load %s\n", name, *steps, total, fmtSeconds(times), loadAverage(uptime()))
			if async {
				tr.Async, tr.AsyncSteps = total, times
			} else {
				tr.Sync, tr.SyncSteps = total, times
			}
		}
		tr.Ratio = tr.Async / tr.Sync
		ratios = append(ratios, tr.Ratio)
		fmt.Printf("trial %d (%s): async %.1f s / sync %.1f s = %.2f× (goal ≤ %v)\n", trial+1, tr.Order, tr.Async, tr.Sync, tr.Ratio, res.Goal)
		res.Trials = append(res.Trials, tr)
	}
	res.LogProblems = problemsSince(fed.dir, before)
	res.Ratio = median(ratios)
	res.UptimeEnd = uptime()
	fmt.Printf("FedBuff (K = %d) / synchronous wall time for %d steps with one of %d sites %g× slower: %.2f× (median of %d trials; goal ≤ %v); %d log lines of timeouts or retries; load %s → %s\n",
		k, *steps, *envoys, *slow, res.Ratio, *trials, res.Goal, len(res.LogProblems), loadAverage(res.Uptime), loadAverage(res.UptimeEnd))
	if *out != "" {
		return atomicfile.ReplaceJSON(*out, res)
	}
	return nil
}

// reportFedBuff writes the section of `fxbench fedbuff` (fedbuff.json).
func reportFedBuff(p func(string, ...any), dir string) {
	p("## Asynchronous rounds (FedBuff) with a slow site\n\n")
	var r fedbuffResult
	if b, err := os.ReadFile(filepath.Join(dir, "fedbuff.json")); err != nil || json.Unmarshal(b, &r) != nil {
		p("Not measured (no fedbuff.json).\n\n")
		return
	}
	p("`fxbench fedbuff`: a director and %d envoys as separate `fx` processes; an exec runner whose train task sleeps %g s (%g s at the slow site, %g× slower) and then rewrites the weights, so the sites' speeds are what the benchmark sets. ", r.Envoys, r.Train, r.Train*r.Slow, r.Slow)
	p("Each trial runs %d server steps synchronously (FedAvg, a round waits for every site) and with `%s`, alternating which goes first; wall time is from the submission to the last step's completion. Load average (1, 5, 15 min) at the run's start → end.\n\n", r.Steps, r.Async)
	p("| trial | order | sync (s) | async (s) | async/sync |\n|---|---|---|---|---|\n")
	for i, t := range r.Trials {
		p("| %d | %s | %.1f | %.1f | %.2f× |\n", i+1, t.Order, t.Sync, t.Async, t.Ratio)
	}
	ok := "met"
	if r.Ratio > r.Goal {
		ok = "**not met**"
	}
	p("\nMedian ratio **%.2f×** (goal ≤ %v×: %s); started %s; %d log lines of timeouts or retries; load %s → %s.\n\n", r.Ratio, r.Goal, ok, r.Start.Format("2006-01-02 15:04 MST"), len(r.LogProblems), loadAverage(r.Uptime), loadAverage(r.UptimeEnd))
}

// writeSmallModel writes the experiments' initial model: a 16 × 4 float32
// layer and its bias, which the runner rewrites.
func writeSmallModel(path string) error {
	return tensor.WriteFile(path, tensor.Model{
		tensor.New("fc.weight", tensor.F32, []int64{4, 16}),
		tensor.New("fc.bias", tensor.F32, []int64{4}),
	}, nil)
}
