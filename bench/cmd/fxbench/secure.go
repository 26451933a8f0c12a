package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/internal/atomicfile"
	"github.com/fx-fl/fx/tensor"
)

// secureTrial is one pair of experiments, plain and secure, on the same
// federation.
type secureTrial struct {
	Order string
	// Plain and Secure are each experiment's round times (the first from
	// the submission, with start-up); the medians are over the others.
	Plain, Secure             []float64
	PlainMedian, SecureMedian float64
	Ratio                     float64
}

type secureResult struct {
	Start             time.Time
	Uptime, UptimeEnd string
	Envoys, Rounds    int
	Params            int64
	Range             float64
	Runner            string
	Trials            []secureTrial
	// Ratio is the median over the trials (the upper one for an even
	// count) of secure / plain round time
	// (goal ≤ 2 at 10 envoys × 25M parameters).
	Ratio       float64
	LogProblems []string
}

// secureMain is fxbench secure: see usage.
func secureMain(args []string) error {
	fs := flag.NewFlagSet("secure", flag.ExitOnError)
	params := fs.Int64("params", 25_000_000, "model parameters (float32), in 8 tensors")
	envoys := fs.Int("envoys", 10, "envoys, each a process with its own runner")
	rounds := fs.Int("rounds", 3, "rounds per experiment (the first, with start-up, is reported apart)")
	trials := fs.Int("trials", 3, "pairs of experiments (plain, secure), alternating which goes first; odd, so the ratio is a true median")
	rng := fs.Float64("range", 1, "aggregation.secure_range of the secure experiments")
	pkiDir := fs.String("pki", "bench/out/pki", "certificate cache (shared with capacity)")
	fxBin := fs.String("fx", "bench/out/fx", "the fx binary the director and envoys run")
	python := fs.String("python", "/usr/bin/python3", "the runners' interpreter (with numpy)")
	out := fs.String("out", "", "write the result as JSON here")
	keep := fs.Bool("keep", false, "keep the work directory (configurations, logs) and say where")
	_ = fs.Parse(args)
	if *envoys < 2 || *rounds < 2 || *trials < 1 || *params < 8 {
		return errors.New("want -envoys ≥ 2, -rounds ≥ 2, -trials ≥ 1, -params ≥ 8")
	}
	if err := exec.Command(*python, "-c", "import numpy").Run(); err != nil {
		return fmt.Errorf("%s cannot import numpy (%v): apt-get install python3-numpy", *python, err)
	}
	script, err := os.ReadFile(filepath.Join("bench", "large", "rewrite.py"))
	if err != nil {
		return fmt.Errorf("run from the repository root: %w", err)
	}
	setup, err := setUpFederation(*fxBin, "fxbench-secure-", *keep, *pkiDir, *envoys)
	if err != nil {
		return err
	}
	defer setup.done()
	work := setup.work
	// One model file, linked into every experiment's directory.
	modelFile := filepath.Join(work, "model.safetensors")
	var model tensor.Model
	for i := range 8 {
		n := *params / 8
		if i == 7 {
			n = *params - 7*(*params/8)
		}
		model = append(model, tensor.New(fmt.Sprintf("layer%d.weight", i), tensor.F32, []int64{n}))
	}
	if err := tensor.WriteFile(modelFile, model, nil); err != nil {
		return err
	}
	model = nil
	fed, err := startProcFederation(setup.bin, setup.pki, *envoys, filepath.Join(work, "fed"), fedOptions{
		python: *python, threads: "1", tag: "secure",
		shard: func(i, n int) string { return fmt.Sprintf("{kind: synthetic, shard: %d/%d, seed: 1}", i, n) },
	})
	if err != nil {
		return err
	}
	defer fed.stop()
	res := &secureResult{Start: time.Now().UTC(), Uptime: uptime(), Envoys: *envoys, Rounds: *rounds, Params: *params, Range: *rng,
		Runner: "bench/large/rewrite.py: Python (numpy) through fx.site, adds a constant to every weight each train task"}
	before := logSizes(fed.dir)
	experimentDir := func(name string, secure bool) (string, error) {
		dir := filepath.Join(work, name)
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return "", err
		}
		if err := os.Link(modelFile, filepath.Join(dir, "model.safetensors")); err != nil {
			return "", err
		}
		if err := os.WriteFile(filepath.Join(dir, "rewrite.py"), script, 0o600); err != nil {
			return "", err
		}
		agg := "{algorithm: fedavg}"
		if secure {
			agg = fmt.Sprintf("{algorithm: fedavg, secure: true, secure_range: %v}", *rng)
		}
		plan := fmt.Sprintf(`name: %s
rounds: %d
participants: {min: %d, tags: [secure]}
runner: {kind: exec, command: [python3, rewrite.py], timeout: 1h}
aggregation: %s
stragglers: {deadline: 1h, min_reporting: %d}
`, name, *rounds, *envoys, agg, *envoys)
		return dir, os.WriteFile(filepath.Join(dir, experiment.PlanFile), []byte(plan), 0o600)
	}
	var ratios []float64
	for trial := range *trials {
		var tr secureTrial
		kinds := []bool{false, true}
		tr.Order = "plain then secure"
		if trial%2 == 1 {
			kinds = []bool{true, false}
			tr.Order = "secure then plain"
		}
		for _, secure := range kinds {
			kind := "plain"
			if secure {
				kind = "secure"
			}
			name := fmt.Sprintf("%s-%d", kind, trial+1)
			dir, err := experimentDir(name, secure)
			if err != nil {
				return err
			}
			times, _, err := fed.run(dir, name, *rounds)
			if err != nil {
				return fmt.Errorf("%s: %w (logs in %s)", name, err, fed.dir)
			}
			fmt.Printf("%s: rounds %s s (the first from the submission), median %.2f s\n", name, fmtSeconds(times), median(times[1:]))
			if secure {
				tr.Secure, tr.SecureMedian = times, median(times[1:])
			} else {
				tr.Plain, tr.PlainMedian = times, median(times[1:])
			}
		}
		tr.Ratio = tr.SecureMedian / tr.PlainMedian
		ratios = append(ratios, tr.Ratio)
		fmt.Printf("trial %d (%s): secure round %.2f s / plain round %.2f s = %.2f× (goal ≤ 2)\n", trial+1, tr.Order, tr.SecureMedian, tr.PlainMedian, tr.Ratio)
		res.Trials = append(res.Trials, tr)
	}
	res.LogProblems = problemsSince(fed.dir, before)
	res.Ratio = median(ratios)
	res.UptimeEnd = uptime()
	fmt.Printf("%d envoys × %d parameters: secure / plain round time %.2f× (median of %d trials; goal ≤ 2); %d log lines of timeouts or retries\n",
		*envoys, *params, res.Ratio, *trials, len(res.LogProblems))
	for _, l := range res.LogProblems[:min(5, len(res.LogProblems))] {
		fmt.Printf("   %s\n", l)
	}
	if *out != "" {
		return atomicfile.ReplaceJSON(*out, res)
	}
	return nil
}
