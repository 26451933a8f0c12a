package main

import (
	"bufio"
	"cmp"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/fx-fl/fx/dataset"
	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/internal/atomicfile"
	"github.com/fx-fl/fx/pki"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner"
	fxexec "github.com/fx-fl/fx/runner/exec"
)

// The same model and hyper-parameters three ways: fx's built-in MLP's
// (and fx quickstart's), in PyTorch (bench/pytorch/mlp.py) and in Go.
const pytorchHyperJSON = `{"lr": 0.05, "momentum": 0.9, "batch_size": 64}`
const pytorchHyperYAML = "{hidden: [128], lr: 0.05, momentum: 0.9, batch_size: 64, epochs: 1}"

// roundTimes are the seconds of a run's rounds, and their median from the
// second round on (the first pays start-up: interpreters, imports).
type roundTimes struct {
	Rounds []float64
	Median float64
	// First is the first round, with start-up: for fx, from the
	// submission.
	First float64
}

func newRoundTimes(rounds []float64) roundTimes {
	rt := roundTimes{Rounds: rounds}
	if len(rounds) > 0 {
		rt.First = rounds[0]
	}
	rest := slices.Clone(rounds)
	if len(rest) > 1 {
		rest = rest[1:]
	}
	rt.Median = median(rest)
	return rt
}

type pytorchRun struct {
	Direct, FxPyTorch, Builtin roundTimes
	// RatioDirect is FxPyTorch.Median / (Direct.Median + TransferSeconds),
	// RatioBuiltin FxPyTorch.Median / Builtin.Median.
	RatioDirect, RatioBuiltin float64
	// Order says which fx experiment ran first in this run.
	Order string
	// Accuracy is the last round's mean validation accuracy of the global
	// model in each.
	DirectAccuracy, FxAccuracy, BuiltinAccuracy float64
}

type pytorchResult struct {
	Start            time.Time
	Uptime, UptimeAt string
	UptimeEnd        string
	Envoys, Rounds   int
	Model            string
	Threads          string
	ModelBytes       int64
	// TransferSeconds is the raw transfer of a round's model bytes over
	// the same mTLS: every site downloading the model and uploading its
	// own at once, on warm connections (median of 21).
	TransferSeconds float64
	Runs            []pytorchRun
	// The run with the median RatioDirect.
	Median pytorchRun
}

func pytorchMain(args []string) error {
	fs := flag.NewFlagSet("pytorch", flag.ExitOnError)
	envoys := fs.Int("envoys", 4, "envoys (data sites), each holding one IID shard of Fashion-MNIST")
	rounds := fs.Int("rounds", 5, "rounds of each run")
	runs := fs.Int("runs", 3, "alternate the three ways this many times")
	pkiDir, fxBin, out, keep := federationFlags(fs)
	python := fs.String("python", "/usr/bin/python3", "the interpreter (with numpy and torch) of the floor and the sites")
	threads := fs.String("threads", "1", "OMP_NUM_THREADS of each site's runner and of the floor")
	_ = fs.Parse(args)
	if *runs < 1 || *rounds < 2 || *envoys < 1 {
		return errors.New("want -runs ≥ 1, -rounds ≥ 2, -envoys ≥ 1")
	}
	if _, err := os.Stat(fashionDir); err != nil {
		return fmt.Errorf("%s is missing: apt-get install dataset-fashion-mnist", fashionDir)
	}
	if err := exec.Command(*python, "-c", "import torch, numpy").Run(); err != nil {
		return fmt.Errorf("%s cannot import torch and numpy (%v): apt-get install python3-torch python3-numpy", *python, err)
	}
	bin, err := fxBinary(*fxBin)
	if err != nil {
		return err
	}
	repo, err := os.Getwd()
	if err != nil {
		return err
	}
	benchPy, sdk := filepath.Join(repo, "bench", "pytorch"), filepath.Join(repo, "sdk", "python")
	if _, err := os.Stat(filepath.Join(benchPy, "mlp.py")); err != nil {
		return fmt.Errorf("run from the repository root: %w", err)
	}
	work, done, err := workDir("fxbench-pytorch-", *keep)
	if err != nil {
		return err
	}
	defer done()

	res := &pytorchResult{Start: time.Now().UTC(), Envoys: *envoys, Rounds: *rounds, Threads: *threads,
		Model: "MLP 784-128-10, SGD " + pytorchHyperJSON + ", 1 epoch a round; IID Fashion-MNIST shards i/N, seed 1"}
	res.Uptime = uptime()

	// The sites' shards, as an envoy hands them to its runner, for the
	// floor; and the initial model all three start from.
	var dataFiles []string
	for i := 1; i <= *envoys; i++ {
		d, err := dataset.Load(dataset.Config{Kind: dataset.KindIDX, Path: fashionDir, Shard: fmt.Sprintf("%d/%d", i, *envoys), Seed: 1})
		if err != nil {
			return err
		}
		f := filepath.Join(work, fmt.Sprintf("data-%d.safetensors", i))
		if err := fxexec.WriteDataFile(f, d); err != nil {
			return err
		}
		dataFiles = append(dataFiles, f)
	}
	model := filepath.Join(work, "model.safetensors")
	pyEnv := append(os.Environ(), "PYTHONPATH="+sdk+":"+benchPy, "PYTHONDONTWRITEBYTECODE=1")
	init := exec.Command(*python, filepath.Join(benchPy, "mlp.py"), "init", model)
	init.Env = pyEnv
	if b, err := init.CombinedOutput(); err != nil {
		return fmt.Errorf("initial model: %v\n%s", err, b)
	}
	fi, err := os.Stat(model)
	if err != nil {
		return err
	}
	res.ModelBytes = fi.Size()

	p, err := openBenchPKI(*pkiDir)
	if err != nil {
		return err
	}
	if _, err := p.envoys(*envoys, 0); err != nil {
		return err
	}
	if res.TransferSeconds, err = measureTransfer(p, *envoys, res.ModelBytes); err != nil {
		return fmt.Errorf("raw transfer: %w", err)
	}
	fmt.Printf("raw mTLS transfer of a round's models (%d × %d B each way): %.1f ms\n", *envoys, res.ModelBytes, res.TransferSeconds*1000)

	for run := 1; run <= *runs; run++ {
		fmt.Printf("== run %d of %d\n", run, *runs)
		var r pytorchRun
		cmd := exec.Command(*python, append([]string{filepath.Join(benchPy, "direct.py"), fmt.Sprint(*rounds), pytorchHyperJSON, model}, dataFiles...)...)
		// The sites' thread setting: for this model one thread is faster
		// than PyTorch's default of one per core (measured 0.65 against
		// 1.2-2.5 s a round on 2 cores).
		cmd.Env = append(pyEnv, "OMP_NUM_THREADS="+*threads)
		direct, acc, err := runDirect(cmd)
		if err != nil {
			return fmt.Errorf("direct: %w", err)
		}
		r.Direct, r.DirectAccuracy = newRoundTimes(direct), acc
		fmt.Printf("direct PyTorch: rounds %s s, median %.2f s\n", fmtSeconds(direct), r.Direct.Median)

		fed, err := startProcFederation(bin, p, *envoys, filepath.Join(work, fmt.Sprintf("run-%d", run)), fedOptions{
			python: *python, threads: *threads, tag: "fashion-mnist",
			shard: func(i, n int) string {
				return fmt.Sprintf("{kind: idx, path: %s, shard: %d/%d, seed: 1}", fashionDir, i, n)
			},
		})
		if err != nil {
			return err
		}
		ways := []string{"pytorch", "builtin"}
		if run%2 == 0 {
			slices.Reverse(ways)
		}
		r.Order = strings.Join(ways, " then ")
		for _, way := range ways {
			times, acc, err := fed.runExperiment(way, *rounds, model, benchPy)
			if err != nil {
				fed.stop()
				return fmt.Errorf("fx %s: %w (logs in %s)", way, err, fed.dir)
			}
			if way == "pytorch" {
				r.FxPyTorch, r.FxAccuracy = newRoundTimes(times), acc
			} else {
				r.Builtin, r.BuiltinAccuracy = newRoundTimes(times), acc
			}
			fmt.Printf("fx %s: rounds %s s (the first with start-up), median %.2f s, accuracy %.4f\n", way, fmtSeconds(times), median(times[1:]), acc)
		}
		fed.stop()
		r.RatioDirect = r.FxPyTorch.Median / (r.Direct.Median + res.TransferSeconds)
		r.RatioBuiltin = r.FxPyTorch.Median / r.Builtin.Median
		fmt.Printf("run %d: fx PyTorch round / (direct + transfer) = %.2f×, / built-in = %.2f×\n", run, r.RatioDirect, r.RatioBuiltin)
		res.Runs = append(res.Runs, r)
	}
	sorted := slices.Clone(res.Runs)
	slices.SortFunc(sorted, func(a, b pytorchRun) int { return cmp.Compare(a.RatioDirect, b.RatioDirect) })
	res.Median = sorted[len(sorted)/2]
	res.UptimeEnd = uptime()
	fmt.Printf("pytorch: median run: fx %.2f s a round, direct %.2f s + transfer %.3f s, built-in %.2f s: %.2f× the floor (goal ≤ 1.3), %.2f× built-in (goal ≤ 3)\n",
		res.Median.FxPyTorch.Median, res.Median.Direct.Median, res.TransferSeconds, res.Median.Builtin.Median, res.Median.RatioDirect, res.Median.RatioBuiltin)
	if *out != "" {
		return atomicfile.ReplaceJSON(*out, res)
	}
	return nil
}

func uptime() string {
	b, err := exec.Command("uptime").Output()
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

func fmtSeconds(v []float64) string {
	parts := make([]string, len(v))
	for i, s := range v {
		parts[i] = fmt.Sprintf("%.2f", s)
	}
	return strings.Join(parts, " ")
}

// runDirect runs the floor and reads its rounds.
func runDirect(cmd *exec.Cmd) (times []float64, acc float64, err error) {
	var stderr strings.Builder
	cmd.Stderr = &stderr
	outp, err := cmd.StdoutPipe()
	if err != nil {
		return nil, 0, err
	}
	if err := cmd.Start(); err != nil {
		return nil, 0, err
	}
	sc := bufio.NewScanner(outp)
	for sc.Scan() {
		var line struct {
			Round    int
			Seconds  float64
			Accuracy float64
		}
		if err := json.Unmarshal(sc.Bytes(), &line); err != nil {
			return nil, 0, fmt.Errorf("direct.py printed %q: %w", sc.Text(), err)
		}
		times, acc = append(times, line.Seconds), line.Accuracy
	}
	if err := cmd.Wait(); err != nil {
		return nil, 0, fmt.Errorf("%v\n%s", err, stderr.String())
	}
	return times, acc, nil
}

// measureTransfer times the raw mTLS transfer of a round's model bytes
// between n envoys and the director's certificate: each connection uploads
// modelBytes and downloads as many, all at once, on warm connections.
func measureTransfer(p *benchPKI, n int, modelBytes int64) (float64, error) {
	dk, err := pki.NewKeyring(pki.KeyringConfig{Files: p.Director})
	if err != nil {
		return 0, err
	}
	l, err := tls.Listen("tcp", "127.0.0.1:0", dk.ServerConfig())
	if err != nil {
		return 0, err
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, modelBytes)
				for {
					if _, err := io.ReadFull(c, buf); err != nil {
						return
					}
					if _, err := c.Write(buf); err != nil {
						return
					}
				}
			}()
		}
	}()
	conns := make([]*tls.Conn, n)
	for i := range conns {
		ek, err := pki.NewKeyring(pki.KeyringConfig{Files: p.envoyFiles(i + 1)})
		if err != nil {
			return 0, err
		}
		c, err := tls.Dial("tcp", l.Addr().String(), ek.ClientConfig("localhost"))
		if err != nil {
			return 0, err
		}
		defer c.Close()
		conns[i] = c
	}
	payload := make([]byte, modelBytes)
	var times []float64
	for trial := 0; trial < 21; trial++ {
		start := time.Now()
		var wg sync.WaitGroup
		errs := make(chan error, n)
		for _, c := range conns {
			wg.Go(func() {
				back := make([]byte, modelBytes)
				if _, err := c.Write(payload); err != nil {
					errs <- err
					return
				}
				if _, err := io.ReadFull(c, back); err != nil {
					errs <- err
				}
			})
		}
		wg.Wait()
		close(errs)
		if err := <-errs; err != nil {
			return 0, err
		}
		times = append(times, time.Since(start).Seconds())
	}
	return median(times), nil
}

// procFederation is a director and envoys, each a process of the fx
// binary, and a researcher's client.
type procFederation struct {
	dir    string
	procs  []*exec.Cmd
	client *experiment.Client
	cancel context.CancelFunc
	// metrics are the parties' metrics listeners (host:port), with
	// fedOptions.metrics.
	metrics []string
}

// freePort returns a port nothing listens on just now.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// fedOptions shape the envoys of a procFederation.
type fedOptions struct {
	// python is the exec runners' interpreter, and threads their
	// OMP_NUM_THREADS.
	python, threads string
	// shard is envoy i of n's shard settings (a YAML flow mapping), tag
	// the tag every envoy has.
	shard func(i, n int) string
	tag   string
	// metrics gives the director and every envoy a metrics listener on
	// loopback (procFederation.metrics lists them).
	metrics bool
	// otlp, if set, is an OTLP/gRPC collector (without TLS) every party
	// sends its traces to.
	otlp string
	// envoyYAML, if set, is appended to every envoy's configuration (a
	// privacy budget, say).
	envoyYAML string
	// env, if set, gives envoy i (from 1) more environment variables for
	// its runners (exec.env): a per-site setting of the runner script.
	env func(i int) []string
}

// startProcFederation starts `fx director start` and n `fx envoy start`
// processes, as a site runs them: the envoys sandbox their runners, run
// o.python, and give each OMP_NUM_THREADS=o.threads.
func startProcFederation(bin string, p *benchPKI, n int, dir string, o fedOptions) (*procFederation, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	f := &procFederation{dir: dir}
	ctx, cancel := context.WithCancel(context.Background())
	f.cancel = cancel
	start := func(name, config string, args ...string) error {
		if err := os.WriteFile(filepath.Join(dir, name+".yaml"), []byte(config), 0o600); err != nil {
			return err
		}
		logf, err := os.Create(filepath.Join(dir, name+".log"))
		if err != nil {
			return err
		}
		cmd := exec.CommandContext(ctx, bin, append(args, "--config", filepath.Join(dir, name+".yaml"))...)
		cmd.Stdout, cmd.Stderr = logf, logf
		cmd.Cancel = func() error { return cmd.Process.Signal(os.Interrupt) }
		cmd.WaitDelay = 15 * time.Second
		if err := cmd.Start(); err != nil {
			return err
		}
		f.procs = append(f.procs, cmd)
		return nil
	}
	// metricsYAML is a party's metrics setting: a listener on a free
	// loopback port when o.metrics, else none.
	metricsYAML := func() (string, error) {
		if !o.metrics {
			return "", nil
		}
		port, err := freePort()
		if err != nil {
			return "", err
		}
		addr := fmt.Sprintf("127.0.0.1:%d", port)
		f.metrics = append(f.metrics, addr)
		yaml := fmt.Sprintf("metrics: {listen: %q}\n", addr)
		if o.otlp != "" {
			yaml += fmt.Sprintf("tracing: {endpoint: %q, insecure: true}\n", o.otlp)
		}
		return yaml, nil
	}
	d := p.Director
	dm, err := metricsYAML()
	if err != nil {
		return nil, err
	}
	if err := start("director", dm+fmt.Sprintf(`listen_address: %s
advertise: {host: 127.0.0.1}
tls: {cert: %s, key: %s, ca: %s, crl: %s}
data_dir: %s
heartbeat_period: 2s
offline_after: 10s
review_policy: auto
aggregator: {host: 127.0.0.1, port_min: 0, port_max: 0}
`, addr, d.Cert, d.Key, d.CA, d.CRL, filepath.Join(dir, "director")), "director", "start"); err != nil {
		f.stop()
		return nil, err
	}
	for i := 1; i <= n; i++ {
		e := p.envoyFiles(i)
		name := envoyName(i)
		em, err := metricsYAML()
		if err != nil {
			f.stop()
			return nil, err
		}
		var env string
		if o.env != nil {
			for _, v := range o.env(i) {
				env += ", " + v
			}
		}
		if err := start(name, em+fmt.Sprintf(`name: %s
director: {address: "%s", server_name: localhost}
tls: {cert: %s, key: %s, ca: %s}
work_dir: %s
tags: [%s]
shard: %s
review: {policy: auto}
exec:
  allow: true
  python: %s
  env: [PATH=/usr/bin:/bin, OMP_NUM_THREADS=%s%s]
max_experiments: 1
%s`, name, addr, e.Cert, e.Key, e.CA, filepath.Join(dir, name), o.tag, o.shard(i, n), o.python, o.threads, env, o.envoyYAML), "envoy", "start"); err != nil {
			f.stop()
			return nil, err
		}
	}
	rdir := filepath.Join(p.dir, "researcher")
	rfiles := pki.PartyFiles(rdir, "bench")
	if _, err := pki.NewKeyring(pki.KeyringConfig{Files: rfiles}); err != nil {
		if _, rfiles, err = p.ca.IssueTo(rdir, pki.IssueRequest{Role: pki.RoleResearcher, Name: "bench"}); err != nil {
			f.stop()
			return nil, err
		}
	}
	wctx, wcancel := context.WithTimeout(ctx, 2*time.Minute)
	defer wcancel()
	// The director process needs a moment to listen: a refused connection
	// is asked again until it does (Dial itself gives up on one at once).
	for {
		f.client, err = experiment.Dial(wctx, experiment.ClientConfig{Director: addr, ServerName: "localhost", Cert: rfiles.Cert, Key: rfiles.Key, CA: rfiles.CA})
		if err == nil || !errors.Is(err, experiment.ErrUnreachable) || wctx.Err() != nil {
			break
		}
		select {
		case <-wctx.Done():
		case <-time.After(200 * time.Millisecond):
		}
	}
	if err == nil {
		err = f.client.WaitForEnvoys(wctx, n)
	}
	if err != nil {
		f.stop()
		return nil, fmt.Errorf("federation of %d envoys: %w (logs in %s)", n, err, dir)
	}
	return f, nil
}

// stop ends every process (SIGINT, as an operator would) and waits.
func (f *procFederation) stop() {
	if f.client != nil {
		f.client.Close()
	}
	f.cancel()
	for _, p := range f.procs {
		_ = p.Wait()
	}
}

// runExperiment runs rounds of the MLP, the PyTorch way (an exec runner
// on mlp.py) or the built-in way, from the same initial model, and returns
// each round's seconds — from one round's aggregate to the next; the first
// from the submission, so it holds the start-up — and the last round's
// validation accuracy of the global model.
func (f *procFederation) runExperiment(way string, rounds int, model, benchPy string) ([]float64, float64, error) {
	dir := filepath.Join(f.dir, "exp-"+way)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, 0, err
	}
	runnerSpec := fmt.Sprintf("{kind: builtin, model: mlp, hyperparameters: %s}", pytorchHyperYAML)
	if way == "pytorch" {
		b, err := os.ReadFile(filepath.Join(benchPy, "mlp.py"))
		if err != nil {
			return nil, 0, err
		}
		if err := os.WriteFile(filepath.Join(dir, "mlp.py"), b, 0o600); err != nil {
			return nil, 0, err
		}
		runnerSpec = fmt.Sprintf("{kind: exec, command: [python3, mlp.py], timeout: 10m, hyperparameters: %s}", pytorchHyperJSON)
	}
	b, err := os.ReadFile(model)
	if err != nil {
		return nil, 0, err
	}
	if err := os.WriteFile(filepath.Join(dir, "model.safetensors"), b, 0o600); err != nil {
		return nil, 0, err
	}
	name := "bench-mlp-" + way
	plan := fmt.Sprintf(`name: %s
rounds: %d
participants: {min: %d, tags: [fashion-mnist]}
runner: %s
aggregation: {algorithm: fedavg}
stragglers: {deadline: 10m, min_reporting: %d}
best_model: {metric: accuracy, mode: max}
`, name, rounds, len(f.procs)-1, runnerSpec, len(f.procs)-1)
	if err := os.WriteFile(filepath.Join(dir, experiment.PlanFile), []byte(plan), 0o600); err != nil {
		return nil, 0, err
	}
	return f.run(dir, name, rounds)
}

// run submits the experiment in dir and waits for it to finish; it returns
// each round's seconds — from one round's aggregate to the next; the first
// from the submission, so it holds the start-up — and the last round's
// validation accuracy of the global model.
func (f *procFederation) run(dir, name string, rounds int) ([]float64, float64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Hour)
	defer cancel()
	submitted := time.Now()
	if _, err := f.client.Submit(ctx, dir, experiment.SubmitOptions{}); err != nil {
		return nil, 0, err
	}
	done := map[int]time.Time{}
	var acc float64
	_, err := f.client.WaitFunc(ctx, name, func(ev *fxv1.MetricEvent) {
		if ev.GetCollaborator() != "" {
			return
		}
		// Every event of a round carries the round's completion time; a
		// round under DP has no train aggregate (its metrics stay at the
		// sites), so any aggregate marks it.
		done[int(ev.GetRound())] = ev.GetTime().AsTime()
		if ev.GetTask() == runner.TaskAggregatedValidation {
			acc = ev.GetMetrics()["accuracy"]
		}
	})
	if err != nil {
		return nil, 0, err
	}
	times := make([]float64, rounds)
	prev := submitted
	for r := 1; r <= rounds; r++ {
		t, ok := done[r]
		if !ok {
			return nil, 0, fmt.Errorf("no aggregate of round %d", r)
		}
		times[r-1] = t.Sub(prev).Seconds()
		prev = t
	}
	return times, acc, nil
}
