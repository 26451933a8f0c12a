package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/internal/atomicfile"
	"github.com/fx-fl/fx/tensor"
)

// largeSize is one model size's figures.
type largeSize struct {
	ModelMiB   int
	ModelBytes int64
	// Order says whether fx or the raw baseline ran first for this size.
	Order string
	// Raw are the raw baseline's trials (seconds to move a round's bytes
	// between the processes), RawMedian their median.
	Raw       []float64
	RawMedian float64
	// Rounds are fx's round times (the first from the submission, with
	// start-up), RoundMedian the median from the second on.
	Rounds      []float64
	RoundMedian float64
	// Ratio is RoundMedian / RawMedian (goal ≤ 1.5).
	Ratio float64
	// Peak resident memory (VmHWM) of the director, each envoy, and each
	// envoy's runner process, in bytes; Goal is 2 × model + 128 MiB.
	DirectorHWM uint64
	EnvoyHWM    []uint64
	RunnerHWM   []uint64
	Goal        uint64
	// LogProblems are log lines of the director and envoys that say a
	// call timed out, failed or was retried (goal: none).
	LogProblems []string
}

type largeResult struct {
	Start             time.Time
	Uptime, UptimeEnd string
	Envoys, Rounds    int
	Runner            string
	Sizes             []largeSize
}

// largeMain is fxbench large: see usage.
func largeMain(args []string) error {
	fs := flag.NewFlagSet("large", flag.ExitOnError)
	sizes := fs.String("sizes", "64,512,1024", "model sizes in MiB, comma-separated")
	envoys := fs.Int("envoys", 4, "envoys, each a process with its own runner")
	rounds := fs.Int("rounds", 5, "rounds per size (the first, with start-up, is reported apart; the last, whose files no next round overlaps, is one of the rest the median is taken over)")
	trials := fs.Int("trials", 3, "raw baseline trials per size")
	pkiDir, fxBin, out, keep := federationFlags(fs)
	python := fs.String("python", "/usr/bin/python3", "the runners' interpreter (with numpy)")
	_ = fs.Parse(args)
	var sizeMiBs []int
	for _, s := range strings.Split(*sizes, ",") {
		v, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || v <= 0 {
			return fmt.Errorf("-sizes %q: want positive MiB counts, comma-separated", *sizes)
		}
		sizeMiBs = append(sizeMiBs, v)
	}
	if *envoys < 1 || *rounds < 2 || *trials < 1 {
		return errors.New("want -envoys ≥ 1, -rounds ≥ 2, -trials ≥ 1")
	}
	script, err := rewriteScript(*python)
	if err != nil {
		return err
	}
	setup, err := setUpFederation(*fxBin, "fxbench-large-", *keep, *pkiDir, *envoys)
	if err != nil {
		return err
	}
	defer setup.done()
	bin, work, p := setup.bin, setup.work, setup.pki
	res := &largeResult{Start: time.Now().UTC(), Uptime: uptime(), Envoys: *envoys, Rounds: *rounds,
		Runner: "bench/large/rewrite.py: Python (numpy) through fx.site, adds a constant to every weight each train task"}
	for i, size := range sizeMiBs {
		s := largeSize{ModelMiB: size, ModelBytes: int64(size) << 20, Goal: 2*uint64(size)<<20 + 128<<20}
		dir := filepath.Join(work, fmt.Sprintf("%dMiB", size))
		raw := func() error {
			t, err := measureRawProcesses(p, *envoys, s.ModelBytes, *trials)
			if err != nil {
				return fmt.Errorf("raw baseline, %d MiB: %w", size, err)
			}
			s.Raw, s.RawMedian = t, median(t)
			fmt.Printf("raw: %d MiB down and up between 1 and %d processes: %s s, median %.2f s\n", size, *envoys, fmtSeconds(t), s.RawMedian)
			return nil
		}
		fx := func() error { return runLarge(bin, p, *envoys, *rounds, *python, script, dir, &s) }
		steps := []func() error{raw, fx}
		s.Order = "raw then fx"
		if i%2 == 1 {
			steps[0], steps[1] = fx, raw
			s.Order = "fx then raw"
		}
		fmt.Printf("== %d MiB model (%s)\n", size, s.Order)
		for _, step := range steps {
			if err := step(); err != nil {
				return err
			}
		}
		s.Ratio = s.RoundMedian / s.RawMedian
		fmt.Printf("%d MiB: round %.2f s / raw %.2f s = %.2f× (goal ≤ 1.5); peak RSS director %.0f MiB, envoys %s MiB (goal ≤ %.0f), runners %s MiB; %d log lines of timeouts or retries\n",
			size, s.RoundMedian, s.RawMedian, s.Ratio, mib(s.DirectorHWM), mibList(s.EnvoyHWM), mib(s.Goal), mibList(s.RunnerHWM), len(s.LogProblems))
		for _, l := range s.LogProblems[:min(5, len(s.LogProblems))] {
			fmt.Printf("   %s\n", l)
		}
		res.Sizes = append(res.Sizes, s)
	}
	res.UptimeEnd = uptime()
	if *out != "" {
		return atomicfile.ReplaceJSON(*out, res)
	}
	return nil
}

func mibList(v []uint64) string {
	parts := make([]string, len(v))
	for i, b := range v {
		parts[i] = fmt.Sprintf("%.0f", mib(b))
	}
	return strings.Join(parts, ", ")
}

// problemLine matches what the director and envoys log when a call timed
// out, failed, or is being retried.
var problemLine = regexp.MustCompile(`(?i)retrying|reconnecting|handshake|deadline exceeded|timed out|stalled|\[ERROR\]`)

// runLarge runs rounds of a model of s.ModelBytes through a fresh director
// and n envoys (separate fx processes) with the rewriting runner, filling
// in s's round times, peak memory and log problems.
func runLarge(bin string, p *benchPKI, n, rounds int, python string, script []byte, dir string, s *largeSize) error {
	exp := filepath.Join(dir, "experiment")
	if err := os.MkdirAll(exp, 0o700); err != nil {
		return err
	}
	// Eight float32 tensors of P/8 bytes: the model's size, in a few layers.
	var model tensor.Model
	for i := range 8 {
		model = append(model, tensor.New(fmt.Sprintf("layer%d.weight", i), tensor.F32, []int64{s.ModelBytes / 32}))
	}
	if err := tensor.WriteFile(filepath.Join(exp, "model.safetensors"), model, nil); err != nil {
		return err
	}
	model = nil
	if err := os.WriteFile(filepath.Join(exp, "rewrite.py"), script, 0o600); err != nil {
		return err
	}
	name := fmt.Sprintf("large-%dmib", s.ModelMiB)
	plan := fmt.Sprintf(`name: %s
rounds: %d
participants: {min: %d, tags: [large]}
runner: {kind: exec, command: [python3, rewrite.py], timeout: 1h}
aggregation: {algorithm: fedavg}
stragglers: {deadline: 1h, min_reporting: %d}
`, name, rounds, n, n)
	if err := os.WriteFile(filepath.Join(exp, experiment.PlanFile), []byte(plan), 0o600); err != nil {
		return err
	}
	fed, err := startProcFederation(bin, p, n, filepath.Join(dir, "fed"), fedOptions{
		python: python, threads: "1", tag: "large",
		shard: func(i, n int) string { return fmt.Sprintf("{kind: synthetic, shard: %d/%d, seed: 1}", i, n) },
	})
	if err != nil {
		return err
	}
	stopped := false
	defer func() {
		if !stopped {
			fed.stop()
		}
	}()
	// The runners come and go with the experiment: sample their peak
	// memory while it runs.
	envoyPIDs := make([]int, n)
	for i := range n {
		envoyPIDs[i] = fed.procs[i+1].Process.Pid
	}
	s.RunnerHWM = make([]uint64, n)
	var mu sync.Mutex
	done := make(chan struct{})
	var sampler sync.WaitGroup
	sampler.Go(func() {
		t := time.NewTicker(250 * time.Millisecond)
		defer t.Stop()
		for {
			for i, pid := range envoyPIDs {
				for _, c := range childPIDs(pid) {
					if _, hwm, err := procMem(c); err == nil {
						mu.Lock()
						s.RunnerHWM[i] = max(s.RunnerHWM[i], hwm)
						mu.Unlock()
					}
				}
			}
			select {
			case <-done:
				return
			case <-t.C:
			}
		}
	})
	before := logSizes(fed.dir)
	times, _, err := fed.run(exp, name, rounds)
	s.LogProblems = problemsSince(fed.dir, before)
	close(done)
	sampler.Wait()
	if err != nil {
		return fmt.Errorf("fx, %d MiB: %w (logs in %s)", s.ModelMiB, err, fed.dir)
	}
	s.Rounds = times
	s.RoundMedian = median(times[1:])
	fmt.Printf("fx: rounds %s s (the first from the submission), median %.2f s\n", fmtSeconds(times), s.RoundMedian)
	if _, hwm, err := procMem(fed.procs[0].Process.Pid); err == nil {
		s.DirectorHWM = hwm
	}
	for _, pid := range envoyPIDs {
		_, hwm, _ := procMem(pid)
		s.EnvoyHWM = append(s.EnvoyHWM, hwm)
	}
	fed.stop()
	stopped = true
	return nil
}

// childPIDs lists pid's child processes (each thread's: a Go process
// starts its children from any of its threads).
func childPIDs(pid int) []int {
	files, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", pid))
	var out []int
	for _, file := range files {
		b, err := os.ReadFile(file)
		if err != nil {
			continue
		}
		for _, f := range strings.Fields(string(b)) {
			if c, err := strconv.Atoi(f); err == nil {
				out = append(out, c)
			}
		}
	}
	return out
}

// logSizes records how long each log in dir is now.
func logSizes(dir string) map[string]int64 {
	logs, _ := filepath.Glob(filepath.Join(dir, "*.log"))
	out := map[string]int64{}
	for _, l := range logs {
		if fi, err := os.Stat(l); err == nil {
			out[l] = fi.Size()
		}
	}
	return out
}

// problemsSince returns the lines matching problemLine that the logs in dir
// gained since from: what the parties logged while the experiment ran, not
// the federation's start-up (envoys that came before the director
// listened) or shutdown.
func problemsSince(dir string, from map[string]int64) []string {
	var out []string
	for l, end := range logSizes(dir) {
		b, err := os.ReadFile(l)
		if err != nil || int64(len(b)) < from[l] {
			continue
		}
		for _, line := range strings.Split(string(b[from[l]:min(end, int64(len(b)))]), "\n") {
			if problemLine.MatchString(line) {
				out = append(out, filepath.Base(l)+": "+line)
			}
		}
	}
	return out
}

// rewriteScript is bench/large/rewrite.py, the runner the large-model and
// secure benchmarks hand their envoys, once python can run it (numpy).
func rewriteScript(python string) ([]byte, error) {
	if err := exec.Command(python, "-c", "import numpy").Run(); err != nil {
		return nil, fmt.Errorf("%s cannot import numpy (%v): apt-get install python3-numpy", python, err)
	}
	script, err := os.ReadFile(filepath.Join("bench", "large", "rewrite.py"))
	if err != nil {
		return nil, fmt.Errorf("run from the repository root: %w", err)
	}
	return script, nil
}
