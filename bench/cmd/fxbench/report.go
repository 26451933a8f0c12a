package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"
)

// goBench is one benchmark line of `go test -bench` output.
type goBench struct {
	Name    string
	N       int
	Metrics map[string]float64 // unit → value
}

// goRun is one `go test -bench` output file written by bench/run.sh.
type goRun struct {
	File    string
	Benches map[string]*goBench // name without the -GOMAXPROCS suffix
	Fails   []string            // failure lines, to explain a missing figure
}

func parseGoBench(path string) (*goRun, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	r := &goRun{File: filepath.Base(path), Benches: map[string]*goBench{}}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		f := strings.Fields(line)
		switch {
		case strings.HasPrefix(line, "Benchmark") && len(f) >= 3:
			n, err := strconv.Atoi(f[1])
			if err != nil {
				continue
			}
			name := f[0]
			if i := strings.LastIndexByte(name, '-'); i > 0 {
				if _, err := strconv.Atoi(name[i+1:]); err == nil {
					name = name[:i]
				}
			}
			gb := &goBench{Name: name, N: n, Metrics: map[string]float64{}}
			for i := 2; i+1 < len(f); i += 2 {
				if v, err := strconv.ParseFloat(f[i], 64); err == nil {
					gb.Metrics[f[i+1]] = v
				}
			}
			r.Benches[name] = gb
		case strings.HasPrefix(line, "--- FAIL"), strings.HasPrefix(line, "--- SKIP"),
			strings.Contains(line, "_test.go:"), strings.HasPrefix(line, "panic:"):
			if len(r.Fails) < 6 {
				r.Fails = append(r.Fails, line)
			}
		}
	}
	return r, sc.Err()
}

func reportMain(args []string) error {
	fs := flag.NewFlagSet("report", flag.ExitOnError)
	dir := fs.String("dir", "bench/out", "where bench/run.sh left its outputs")
	out := fs.String("out", "bench/RESULTS.md", "the table to write")
	notes := fs.String("notes", "bench/notes", "the analysis written by hand for a section (NAME.md), kept after its table")
	_ = fs.Parse(args)

	var w bytes.Buffer
	p := func(format string, a ...any) { fmt.Fprintf(&w, format, a...) }
	p("# fx benchmark results\n\n")
	p("Written by `fxbench report` from the outputs of `make bench` (bench/run.sh) in %s.\n", *dir)
	p("Every figure sits next to a baseline measured in the same run on the same machine; the ratio is what to compare across runs.\n")
	p("The machine is shared (2 cores, other engineers' builds and tests running): absolute numbers are noisy, the load average at each measurement is given.\n\n")

	p("## Machine\n\n| | |\n|---|---|\n")
	p("| date (report written) | %s |\n", time.Now().UTC().Format("2006-01-02 15:04 MST"))
	p("| nproc | %d |\n", runtime.NumCPU())
	p("| CPU | %s |\n", cpuModel())
	p("| memory | %s |\n", memTotal())
	p("| Go | %s |\n", goVersion())
	p("| kernel | %s |\n", cmdOut("uname", "-sr"))
	if s := readTrim(filepath.Join(*dir, "uptime-start.txt")); s != "" {
		p("| load when `make bench` started | `%s` |\n", s)
	}
	if s := readTrim(filepath.Join(*dir, "uptime-end.txt")); s != "" {
		p("| load when it ended | `%s` |\n", s)
	}
	p("\n")

	runs := map[string]*goRun{}
	for _, f := range []string{"go-fold.txt", "go-aggregator-transfer.txt", "go-aggregator-memory.txt", "go-director.txt", "go-runner.txt"} {
		if r, err := parseGoBench(filepath.Join(*dir, f)); err == nil {
			runs[f] = r
		}
	}
	// metric looks a figure up; missing ones say why.
	metric := func(file, bench, unit string) (float64, bool) {
		r := runs[file]
		if r == nil {
			return 0, false
		}
		b := r.Benches[bench]
		if b == nil {
			return 0, false
		}
		v, ok := b.Metrics[unit]
		return v, ok
	}
	why := func(file, bench string) string {
		r := runs[file]
		if r == nil {
			return "not run (no " + file + ")"
		}
		var lines []string
		for _, l := range r.Fails {
			lines = append(lines, strings.ReplaceAll(l, "|", "\\|"))
		}
		if len(lines) == 0 {
			return bench + " printed no result"
		}
		return "**failed**: " + strings.Join(lines, " ")
	}
	f := func(v float64, ok bool, prec int) string {
		if !ok {
			return "—"
		}
		return strconv.FormatFloat(v, 'f', prec, 64)
	}
	type row struct {
		file, bench               string
		what                      string
		val, base, ratio          string // units
		vprec, bprec, rprec       int
		baseName, ratioName, goal string
		valSuffix, baseSuffix     string
		extra                     func() string
	}
	rows := []row{
		{file: "go-fold.txt", bench: "BenchmarkFold", what: "aggregation fold on the aggregator's path (Accumulator), 10 updates × 25M float32", val: "accumulator-GB/s", base: "reference-GB/s", ratio: "reference/accumulator",
			vprec: 2, bprec: 2, rprec: 2, baseName: "reference single-pass kernel out += w·x, one goroutine", goal: "≥ 0.8", valSuffix: " GB/s", baseSuffix: " GB/s",
			extra: func() string {
				s, ok := metric("go-fold.txt", "BenchmarkFoldScaling", "accumulator-slope")
				rs, ok2 := metric("go-fold.txt", "BenchmarkFoldScaling", "reference-slope")
				var at []string
				for _, m := range []string{"1M", "3M", "10M", "30M", "100M"} {
					v, ok := metric("go-fold.txt", "BenchmarkFoldScaling", "reference/accumulator@"+m)
					at = append(at, m+" "+f(v, ok, 2)+"×")
				}
				return fmt.Sprintf("1M→100M params: log-log slope %s (reference %s; goal ≤ 1.1); reference/accumulator %s", f(s, ok, 2), f(rs, ok2, 2), strings.Join(at, ", "))
			}},
		{file: "go-aggregator-memory.txt", bench: "BenchmarkUploadMemory", what: "aggregator peak live heap, 8 uploaders × 256 MiB (child process)", val: "peak_live_MiB", ratio: "peak_live/goal",
			vprec: 0, rprec: 2, baseName: "goal 2 × model + 64 MiB", goal: "peak/goal ≤ 1", valSuffix: " MiB",
			extra: func() string {
				r, ok := metric("go-aggregator-memory.txt", "BenchmarkUploadMemory", "received_MiB")
				h, ok1 := metric("go-aggregator-memory.txt", "BenchmarkUploadMemory", "peak_heap_MiB")
				hg, ok3 := metric("go-aggregator-memory.txt", "BenchmarkUploadMemory", "peak_heap/goal")
				pp, ok2 := metric("go-aggregator-memory.txt", "BenchmarkUploadMemory", "peak_process_MiB")
				return fmt.Sprintf("received %s MiB; peak heap in use %s MiB (%s× goal); peak process memory %s MiB", f(r, ok, 0), f(h, ok1, 0), f(hg, ok3, 2), f(pp, ok2, 0))
			}},
		{file: "go-aggregator-memory.txt", bench: "BenchmarkRoundOverhead", what: "round time p50, no-op runner, 10 collaborators, 1M params", val: "p50_ms/round", ratio: "p50/raw_transfer",
			vprec: 1, rprec: 2, baseName: "the same bytes over raw gRPC", goal: "p50 < 50 ms", valSuffix: " ms",
			extra: func() string {
				v, ok := metric("go-aggregator-memory.txt", "BenchmarkRoundOverhead", "p99_ms/round")
				beyond, bok := metric("go-aggregator-memory.txt", "BenchmarkRoundOverhead", "p50-raw_transfer_ms")
				return "p99 " + f(v, ok, 1) + " ms; p50 beyond the raw transfer " + f(beyond, bok, 1) + " ms"
			}},
		{file: "go-director.txt", bench: "BenchmarkSubmitLargeArchive", what: "director: 1 GiB archive submission", val: "director-MiB/s", base: "raw-grpc-MiB/s", ratio: "throughput-ratio",
			vprec: 0, bprec: 0, rprec: 2, baseName: "raw gRPC client stream, same mTLS", goal: "heap growth < 64 MiB", valSuffix: " MiB/s", baseSuffix: " MiB/s",
			extra: func() string {
				v, ok := metric("go-director.txt", "BenchmarkSubmitLargeArchive", "peak-heap-growth-MiB")
				return "peak heap growth " + f(v, ok, 1) + " MiB"
			}},
		{file: "go-runner.txt", bench: "BenchmarkEpoch/mlp[256]", what: "built-in MLP[256], one Fashion-MNIST epoch", val: "s/epoch", base: "naive_s/epoch", ratio: "speedup_vs_naive",
			vprec: 2, bprec: 1, rprec: 1, baseName: "naive GEMM (scaled from 1/10 epoch)", valSuffix: " s", baseSuffix: " s"},
		{file: "go-runner.txt", bench: "BenchmarkEpoch/softmax[]", what: "built-in softmax, one Fashion-MNIST epoch", val: "s/epoch", base: "naive_s/epoch", ratio: "speedup_vs_naive",
			vprec: 2, bprec: 2, rprec: 1, baseName: "naive GEMM (scaled from 1/10 epoch)", valSuffix: " s", baseSuffix: " s"},
	}
	// One download and one upload row per transfer sub-benchmark.
	var transfers []row
	if r := runs["go-aggregator-transfer.txt"]; r != nil {
		var names []string
		for name := range r.Benches {
			if strings.HasPrefix(name, "BenchmarkTransfer") {
				names = append(names, name)
			}
		}
		slices.Sort(names)
		for _, name := range names {
			size := strings.TrimPrefix(strings.TrimPrefix(name, "BenchmarkTransfer"), "/")
			for _, dir := range []struct{ what, v, b, r string }{{"download", "fx_down_GB/s", "raw_down_GB/s", "down/raw"}, {"upload", "fx_up_GB/s", "raw_up_GB/s", "up/raw"}} {
				transfers = append(transfers, row{file: "go-aggregator-transfer.txt", bench: name, what: "model " + dir.what + ", " + size + ", mTLS",
					val: dir.v, base: dir.b, ratio: dir.r, vprec: 3, bprec: 3, rprec: 2, baseName: "raw gRPC byte stream, same mTLS", goal: "≥ 0.85", valSuffix: " GB/s", baseSuffix: " GB/s"})
			}
		}
	}
	if len(transfers) == 0 {
		transfers = []row{{file: "go-aggregator-transfer.txt", bench: "BenchmarkTransfer", what: "model download and upload, mTLS", val: "fx_down_GB/s", baseName: "raw gRPC byte stream, same mTLS", goal: "≥ 0.85"}}
	}
	rows = append(rows[:1], append(transfers, rows[1:]...)...)

	p("## Go benchmarks\n\n")
	p("| figure | fx | baseline (same run) | ratio | goal | notes |\n|---|---|---|---|---|---|\n")
	for _, r := range rows {
		v, ok := metric(r.file, r.bench, r.val)
		if !ok {
			p("| %s | — | %s | — | %s | %s |\n", r.what, r.baseName, r.goal, why(r.file, r.bench))
			continue
		}
		base := r.baseName
		if r.base != "" {
			bv, bok := metric(r.file, r.bench, r.base)
			base = f(bv, bok, r.bprec) + r.baseSuffix + " (" + r.baseName + ")"
		}
		rv, rok := metric(r.file, r.bench, r.ratio)
		notes := ""
		if r.extra != nil {
			notes = r.extra()
		}
		p("| %s | %s%s | %s | %s× (%s) | %s | %s |\n", r.what, f(v, ok, r.vprec), r.valSuffix, base, f(rv, rok, r.rprec), r.ratio, r.goal, notes)
	}
	for _, name := range []string{"go-fold.txt", "go-aggregator-transfer.txt", "go-aggregator-memory.txt", "go-director.txt", "go-runner.txt"} {
		if s := readTrim(filepath.Join(*dir, strings.TrimSuffix(name, ".txt")+".uptime")); s != "" {
			p("\n- `%s`: load at start `%s`", name, s)
		}
	}
	p("\n\nEvery line the Go benchmarks printed, as printed:\n\n```\n")
	for _, name := range []string{"go-fold.txt", "go-aggregator-transfer.txt", "go-aggregator-memory.txt", "go-director.txt", "go-runner.txt"} {
		b, err := os.ReadFile(filepath.Join(*dir, name))
		if err != nil {
			continue
		}
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "Benchmark") || strings.HasPrefix(l, "--- FAIL") || strings.HasPrefix(l, "FAIL") || strings.HasPrefix(l, "ok ") {
				p("%s\n", strings.TrimRight(l, " \t"))
			}
		}
	}
	p("```\n\n")

	// Director capacity.
	p("## Director capacity\n\n")
	p("A real director (`director.New`, as `fx director start` builds it, bbolt store, CRL checks) runs as a child process; N simulated envoys in the parent, each with its own P-384 certificate (CN = envoy name) and its own gRPC connection over mutual TLS, register, hold a WatchAssignments stream open and heartbeat every period, starts staggered uniformly over one period. ")
	p("After every envoy is up and one more period has passed, heartbeats are timed for the window; the server's CPU is (utime+stime) over the window from /proc/PID/stat, its memory VmRSS/VmHWM from /proc/PID/status. ")
	p("Baseline, same run, same connections, certificates, TLS and authorisation interceptors: a child process serving only grpc.health.v1 (Check as the heartbeat, Watch as the stream).\n\n")
	p("| N | server | heartbeat p50 | p99 | median of per-period p99s | max | heartbeats/s | server CPU (%% of a core) | server RSS (peak) | RSS per envoy | first call incl. handshake p50 / p99 | all up after | failed first-call attempts (retried) | heartbeats while others connected: failed / sent, p99 | registrations committed | offline events | heartbeat errors |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	var capRuns []*capacityResult
	// capacity-1000.json and capacity-10000.json, then any other
	// capacity-*.json (earlier or differently configured runs kept there).
	files := []string{"capacity-1000.json", "capacity-10000.json"}
	more, _ := filepath.Glob(filepath.Join(*dir, "capacity-*.json"))
	slices.Sort(more)
	for _, m := range more {
		if b := filepath.Base(m); !slices.Contains(files, b) {
			files = append(files, b)
		}
	}
	for _, file := range files {
		var c capacityResult
		b, err := os.ReadFile(filepath.Join(*dir, file))
		if err != nil || json.Unmarshal(b, &c) != nil {
			p("| — | — | not measured (no %s) | | | | | | | | | | | | | | |\n", file)
			continue
		}
		capRuns = append(capRuns, &c)
		label := fmt.Sprint(c.N)
		if c.MaxConnecting > 0 {
			label += fmt.Sprintf(" (≤ %d connecting)", c.MaxConnecting)
		}
		if c.MaxConnecting == 0 && c.N > 1000 {
			label += " (no limit on connecting)"
		}
		if file != fmt.Sprintf("capacity-%d.json", c.N) && file != fmt.Sprintf("capacity-%d-limit%d.json", c.N, c.MaxConnecting) {
			label += " " + strings.TrimSuffix(strings.TrimPrefix(file, fmt.Sprintf("capacity-%d", c.N)), ".json")
		}
		n := label
		for _, s := range []*sideResult{c.Raw, c.Director} {
			if s == nil {
				continue
			}
			regs, off := "—", "—"
			if s.Server == "director" {
				regs, off = fmt.Sprint(s.Registrations), fmt.Sprint(s.Offline)
			}
			ramp := "—"
			if s.RampHeartbeats > 0 {
				ramp = fmt.Sprintf("%d / %d, %.0f ms", s.RampHeartbeatErrors, s.RampHeartbeats, s.RampHeartbeatP99MS)
			}
			slice := "—"
			if s.HeartbeatP99SliceMedianMS > 0 {
				slice = fmt.Sprintf("%.2f ms", s.HeartbeatP99SliceMedianMS)
			}
			p("| %s | %s | %.2f ms | %.2f ms | %s | %.1f ms | %.0f | %.1f%% | %.0f MiB (%.0f) | %.0f KiB | %.0f / %.0f ms | %.1f s | %d | %s | %s | %s | %d |\n",
				n, s.Server, s.HeartbeatP50MS, s.HeartbeatP99MS, slice, s.HeartbeatMaxMS, s.HeartbeatsPerSecond, s.ServerCPUPercent,
				s.ServerRSSMiB, s.ServerHWMMiB, s.ServerRSSPerConnKiB, s.FirstCallP50MS, s.FirstCallP99MS, s.AllConnectedSeconds, s.FirstCallErrors, ramp, regs, off, s.HeartbeatErrors)
		}
		if c.Raw != nil && c.Director != nil {
			sr := "—"
			if c.HeartbeatP99SliceMedianRatio > 0 {
				sr = fmt.Sprintf("**%.2f×**", c.HeartbeatP99SliceMedianRatio)
			}
			p("| %s | **director/raw** | **%.2f×** | **%.2f×** | %s | | | **%.2f×** | **%.2f×** | | | | | | | | |\n", n, c.HeartbeatP50Ratio, c.HeartbeatP99Ratio, sr, c.ServerCPURatio, c.ServerRSSRatio)
		}
	}
	p("\nReading the table: the first call of an envoy is its TLS handshake plus RegisterEnvoy (director) or Check (baseline); a failed attempt (the 15 s call timeout) is retried with the envoy's backoff. ")
	p("Registrations committed counts the director's \"envoy registered\" and \"envoy re-registered\" log lines: more than N means attempts whose callers had already given up were still committed. ")
	p("Offline events are envoys the director marked offline although they were heartbeating. The per-period p99 median is the median over the window's 10 s slices of each slice's p99, which a few seconds of another process hogging the shared cores does not decide.\n\n")
	for _, c := range capRuns {
		cs := c.Certificates
		limit := "no limit on connecting envoys"
		if c.MaxConnecting > 0 {
			limit = fmt.Sprintf("at most %d first calls in flight", c.MaxConnecting)
		}
		p("- N = %d: period %s, window %s, %s, started %s, load `%s`. ", c.N, c.Period, c.Window, limit, c.Start.Format("15:04 MST"), c.Uptime)
		if c.Note != "" {
			p("%s ", c.Note)
		}
		if cs.Issued > 0 {
			p("Certificates: %d issued in %.1f s (%.2f ms each with %d workers)", cs.Issued, cs.Seconds, cs.PerCertMS, cs.Workers)
			if cs.Reused > 0 {
				p(", %d reused from the cache", cs.Reused)
			}
			p(".")
		} else {
			p("Certificates: all %d reused from the cache", cs.Reused)
			if cs.Earlier != nil {
				p(" (issuing %d took %.1f s, %.2f ms each with %d workers)", cs.Earlier.Issued, cs.Earlier.Seconds, cs.Earlier.PerCertMS, cs.Earlier.Workers)
			}
			p(".")
		}
		for _, s := range []*sideResult{c.Raw, c.Director} {
			if s != nil {
				p(" Load generator during the %s window: %.0f%% CPU, %.0f MiB RSS, %d GCs (%.0f ms of pauses).", s.Server, s.ClientCPUPercent, s.ClientRSSMiB, s.ClientGCs, s.ClientGCPauseMS)
			}
		}
		p("\n")
	}
	p("\n")

	reportFashion(p, *dir)
	reportNotes(p, *notes, "fashion")
	reportPyTorch(p, *dir)
	reportLarge(p, *dir)
	reportNotes(p, *notes, "large")
	reportTelemetry(p, *dir)
	_ = reportFailover(p, *dir, "failover.json") // a missing result is said in the section
	reportNotes(p, *notes, "failover")
	reportPrivacy(p, *dir)
	reportNotes(p, *notes, "privacy")
	reportFedBuff(p, *dir)
	if err := os.WriteFile(*out, w.Bytes(), 0o644); err != nil {
		return err
	}
	fmt.Printf("wrote %s\n", *out)
	return nil
}

// reportNotes writes the analysis people wrote for a section (where a
// round's time went, what changed since the last run) from NAME.md in dir:
// a regenerated RESULTS.md keeps it. A missing file writes nothing.
func reportNotes(p func(string, ...any), dir, name string) {
	b, err := os.ReadFile(filepath.Join(dir, name+".md"))
	if err != nil {
		return
	}
	p("%s\n\n", strings.TrimSpace(string(b)))
}

func readTrim(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	return strings.Join(strings.Fields(string(b)), " ")
}

func cmdOut(name string, args ...string) string {
	b, err := exec.Command(name, args...).Output()
	if err != nil {
		return "?"
	}
	return strings.TrimSpace(string(b))
}

func cpuModel() string {
	b, _ := os.ReadFile("/proc/cpuinfo")
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "?"
}

func memTotal() string {
	b, _ := os.ReadFile("/proc/meminfo")
	for _, l := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(l, "MemTotal:"); ok {
			fs := strings.Fields(rest)
			if kb, err := strconv.ParseFloat(fs[0], 64); err == nil {
				return fmt.Sprintf("%.1f GiB", kb/(1<<20))
			}
		}
	}
	return "?"
}

func goVersion() string {
	if s := cmdOut("go", "version"); s != "?" {
		return s
	}
	return runtime.Version()
}

// reportPyTorch writes the section of `fxbench pytorch`.
func reportPyTorch(p func(string, ...any), dir string) {
	p("## A PyTorch model through the exec runner\n\n")
	var r pytorchResult
	if b, err := os.ReadFile(filepath.Join(dir, "pytorch.json")); err != nil || json.Unmarshal(b, &r) != nil {
		p("Not measured (no pytorch.json).\n\n")
		return
	}
	p("%s; %d envoys. Three ways, alternated %d times, the same initial model and shards: ", r.Model, r.Envoys, len(r.Runs))
	p("**direct**, the rounds done in one Python process without fx (bench/pytorch/direct.py: per site, validate the global model, train, validate the trained one; then FedAvg; OMP_NUM_THREADS=%s), the floor; ", r.Threads)
	p("**fx PyTorch**, a director and %d envoys as separate `fx` processes, the same PyTorch code (bench/pytorch/mlp.py, on fx.site) as a persistent, sandboxed exec runner with OMP_NUM_THREADS=%s; ", r.Envoys, r.Threads)
	p("**fx built-in**, the same federation running fx's Go MLP. A round is the time from one round's aggregate to the next; the first round, which holds the start-up (interpreter, `import torch`, the review's start), is left out of the median and shown apart. ")
	p("Transfer: the raw mTLS transfer of a round's model bytes (%d envoys × %d B each way, at once, warm connections) between the same certificates: %.1f ms. Started %s, load `%s`; ended `%s`.\n\n", r.Envoys, r.ModelBytes, r.TransferSeconds*1000, r.Start.Format("15:04 MST"), r.Uptime, r.UptimeEnd)
	p("| run | order | direct (s/round) | fx PyTorch (s/round) | fx built-in (s/round) | first round: PyTorch, built-in (s) | fx PyTorch / (direct + transfer) | fx PyTorch / built-in | accuracy: direct, PyTorch, built-in |\n|---|---|---|---|---|---|---|---|---|\n")
	for i, x := range r.Runs {
		p("| %d | %s | %.2f | %.2f | %.2f | %.1f, %.1f | %.2f× | %.2f× | %.4f, %.4f, %.4f |\n", i+1, x.Order, x.Direct.Median, x.FxPyTorch.Median, x.Builtin.Median,
			x.FxPyTorch.First, x.Builtin.First, x.RatioDirect, x.RatioBuiltin, x.DirectAccuracy, x.FxAccuracy, x.BuiltinAccuracy)
	}
	m := r.Median
	p("\nMedian run: **fx PyTorch %.2f× the direct loop plus the transfer** (goal ≤ 1.3×), **%.2f× the built-in round** (goal ≤ 3×).\n\n", m.RatioDirect, m.RatioBuiltin)
}

// reportLarge writes the section of `fxbench large`.
func reportLarge(p func(string, ...any), dir string) {
	p("## Large models through real processes\n\n")
	var r largeResult
	if b, err := os.ReadFile(filepath.Join(dir, "large.json")); err != nil || json.Unmarshal(b, &r) != nil {
		p("Not measured (no large.json).\n\n")
		return
	}
	p("A director and %d envoys as separate `fx` processes; %s; %d rounds per size, a fresh federation per size. ", r.Envoys, r.Runner, r.Rounds)
	p("Baseline: a raw gRPC/mTLS server process and %d client processes moving the same bytes (each client downloads the model and uploads as much, all at once; median of the trials), alternated with fx. ", r.Envoys)
	p("A round is the time from one round's aggregate to the next, median from the second round (the first, from the submission, holds the start-up). Peak memory is each process's VmHWM; the runners' (Python) are reported apart. Started %s, load `%s`; ended `%s`.\n\n", r.Start.Format("15:04 MST"), r.Uptime, r.UptimeEnd)
	p("| model | order | raw (s) | fx round (s) | fx / raw (goal ≤ 1.5) | first round (s) | director peak (MiB) | envoys' peak (MiB) | goal 2P + 128 MiB | runners' peak (MiB) | log lines of timeouts or retries (goal 0) |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, s := range r.Sizes {
		first := 0.0
		if len(s.Rounds) > 0 {
			first = s.Rounds[0]
		}
		p("| %d MiB | %s | %.2f | %.2f | %.2f× | %.1f | %.0f | %s | %.0f | %s | %d |\n", s.ModelMiB, s.Order, s.RawMedian, s.RoundMedian, s.Ratio, first,
			mib(s.DirectorHWM), mibList(s.EnvoyHWM), mib(s.Goal), mibList(s.RunnerHWM), len(s.LogProblems))
	}
	p("\n")
}

// reportTelemetry writes the section of `fxbench telemetry`.
func reportTelemetry(p func(string, ...any), dir string) {
	p("## The cost of metrics and tracing\n\n")
	var r telemetryResult
	if b, err := os.ReadFile(filepath.Join(dir, "telemetry.json")); err != nil || json.Unmarshal(b, &r) != nil {
		p("Not measured (no telemetry.json).\n\n")
		return
	}
	p("A director and %d envoys as separate `fx` processes run %d rounds of the built-in MLP on Fashion-MNIST, a fresh federation per trial, in trials that alternate metrics and tracing off and on; with them on, every party's `/metrics` is read every %s (Prometheus's default is 1m) and every party exports its spans by OTLP to a collector in the benchmark's process. A round is the time from one round's aggregate to the next, median from the second round. Started %s, load `%s`; ended `%s`.\n\n", r.Envoys, r.Rounds, r.Scrape, r.Start.Format("15:04 MST"), r.Uptime, r.UptimeEnd)
	p("| trial | metrics and tracing | rounds (s) | median (s) | CPU of all parties (s) | scrapes | spans |\n|---|---|---|---|---|---|---|\n")
	for i, t := range r.Trials {
		kind := "off"
		if t.Metrics {
			kind = "on"
		}
		p("| %d | %s | %s | %.3f | %.1f | %d | %d |\n", i+1, kind, fmtSeconds(t.Rounds), t.Median, t.CPU, t.Scrapes, t.Spans)
	}
	p("\nRound with metrics and tracing %.3f s, without %.3f s (medians of the trials). Each on trial against the off trial before it: %s %%; **median cost %+.1f %%** (goal < 2 %%). The spread of the pairs is this shared 2-core machine's noise between two federations of 11 processes, not a cost. The CPU seconds all the parties spent from the submission to the end, paired the same way: %s %%, **median %+.1f %%**.\n\n", r.On, r.Off, percents(r.Pairs), 100*r.Cost, percents(r.CPUPairs), 100*r.CPUCost)
}
