package main

import (
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/fx-fl/fx/dataset"
	"github.com/fx-fl/fx/director"
	"github.com/fx-fl/fx/envoy"
	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/internal/atomicfile"
	"github.com/fx-fl/fx/pki"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner"
	"github.com/fx-fl/fx/runner/builtin"
)

// fashionDir is where Debian's dataset-fashion-mnist package installs the
// data (as fx quickstart expects it).
const fashionDir = "/usr/share/datasets/fashion-mnist"

// The model and hyper-parameters of fx quickstart's plan: the built-in MLP
// with one hidden layer of 128, momentum SGD, one local epoch per round.
var fashionHyper = map[string]any{"hidden": []any{128}, "lr": 0.05, "momentum": 0.9, "batch_size": 64, "epochs": 1}

const fashionHyperYAML = "{hidden: [128], lr: 0.05, momentum: 0.9, batch_size: 64, epochs: 1}"

type fashionStep struct {
	N        int     // round or epoch
	Seconds  float64 // since the start, when this round's / epoch's model existed
	Accuracy float64 // of that model, on the 10000 test images
}

type fashionResult struct {
	Start     time.Time
	Uptime    string
	Target    float64
	Envoys    int
	Sharding  string
	Model     string
	Federated struct {
		// SetupSeconds: PKI, director and envoys started, data loaded, all
		// envoys online — before the clock below starts.
		SetupSeconds float64
		// Rounds until the aggregated model first reached Target.
		Rounds int
		// Seconds from the submission until that round's model existed
		// (its round completed); KnownSeconds until its accuracy was
		// reported (the next round's aggregated_model_validation).
		Seconds, KnownSeconds float64
		Steps                 []fashionStep
	}
	Central struct {
		Epochs                int
		Seconds, KnownSeconds float64
		Steps                 []fashionStep
	}
	// Federated / central wall time to the target (Seconds).
	TimeRatio float64
	// Runs is how many times both were run; the figures above are those of
	// the run with the median ratio, and every run's ratio is in Ratios.
	Runs   int
	Ratios []float64 `json:",omitempty"`
}

func fashionMain(args []string) error {
	fs := flag.NewFlagSet("fashion", flag.ExitOnError)
	target := fs.Float64("target", 0.85, "validation accuracy to reach")
	envoys := fs.Int("envoys", 4, "envoys (data sites), each holding one IID shard")
	maxRounds := fs.Int("max-rounds", 12, "give up after this many rounds / epochs")
	pkiDir := fs.String("pki", "bench/out/pki", "certificate cache (shared with capacity)")
	out := fs.String("out", "", "write the result as JSON here")
	runs := fs.Int("runs", 3, "run both this many times and keep the run with the median ratio")
	_ = fs.Parse(args)
	if *runs < 1 {
		return errors.New("-runs must be at least 1")
	}
	if _, err := os.Stat(fashionDir); err != nil {
		return fmt.Errorf("%s is missing: apt-get install dataset-fashion-mnist", fashionDir)
	}
	var all []*fashionResult
	var ratios []float64
	for run := 1; run <= *runs; run++ {
		fmt.Printf("== run %d of %d\n", run, *runs)
		res := &fashionResult{Start: time.Now().UTC(), Target: *target, Envoys: *envoys, Sharding: "IID, shard i/N with seed 1 (as fx quickstart)",
			Model: "mlp " + fashionHyperYAML}
		if b, err := exec.Command("uptime").Output(); err == nil {
			res.Uptime = strings.TrimSpace(string(b))
		}
		// The baseline first: the same model on all 60000 training images.
		if err := centralRun(res, *maxRounds); err != nil {
			return fmt.Errorf("centralised: %w", err)
		}
		if err := federatedRun(res, *pkiDir, *maxRounds); err != nil {
			return fmt.Errorf("federated: %w", err)
		}
		if res.Central.Epochs == 0 || res.Federated.Rounds == 0 {
			return fmt.Errorf("run %d: the target %.2f was not reached within %d rounds/epochs", run, *target, *maxRounds)
		}
		res.TimeRatio = res.Federated.Seconds / res.Central.Seconds
		fmt.Printf("run %d: centralised %d epochs %.1fs, federated %d rounds %.1fs: %.2f×\n", run,
			res.Central.Epochs, res.Central.Seconds, res.Federated.Rounds, res.Federated.Seconds, res.TimeRatio)
		all = append(all, res)
		ratios = append(ratios, res.TimeRatio)
	}
	slices.SortFunc(all, func(a, b *fashionResult) int { return cmp.Compare(a.TimeRatio, b.TimeRatio) })
	res := all[len(all)/2]
	res.Runs, res.Ratios = *runs, ratios
	fmt.Printf("\nfashion: target accuracy %.2f, %s, %d envoys (%s)\n", res.Target, res.Model, res.Envoys, res.Sharding)
	fmt.Printf("  centralised: %d epochs, %.1fs (accuracy known after %.1fs)\n", res.Central.Epochs, res.Central.Seconds, res.Central.KnownSeconds)
	fmt.Printf("  federated:   %d rounds, %.1fs from submission (accuracy reported after %.1fs; setup before submission %.1fs)\n",
		res.Federated.Rounds, res.Federated.Seconds, res.Federated.KnownSeconds, res.Federated.SetupSeconds)
	fmt.Printf("  federated/centralised wall time: %.2f× (median of %d runs: %v)\n", res.TimeRatio, res.Runs, ratios)
	if *out != "" {
		if err := atomicfile.ReplaceJSON(*out, res); err != nil {
			return err
		}
	}
	return nil
}

// centralRun trains on the whole training set, one epoch per Train call (as
// one federated round is one local epoch), validating on the test images
// after each epoch, until the target.
func centralRun(res *fashionResult, maxEpochs int) error {
	d, err := dataset.Load(dataset.Config{Kind: dataset.KindIDX, Path: fashionDir})
	if err != nil {
		return err
	}
	ctx := context.Background()
	r, err := builtin.New(builtin.Config{Model: builtin.ModelMLP, Hyperparameters: fashionHyper, Data: d})
	if err != nil {
		return err
	}
	m, err := builtin.InitialModel(builtin.ModelMLP, fashionHyper, d.SampleShape, d.Classes)
	if err != nil {
		return err
	}
	fmt.Printf("centralised: %d training and %d validation images (held out of the training files)\n", d.Train.N, d.Valid.N)
	start := time.Now()
	for epoch := 1; epoch <= maxEpochs; epoch++ {
		tr, err := r.Train(ctx, runner.Task{Name: runner.TaskTrain, Round: epoch}, m)
		if err != nil {
			return err
		}
		m = tr.Model
		trained := time.Since(start).Seconds()
		v, err := r.Validate(ctx, runner.Task{Name: runner.TaskAggregatedValidation, Round: epoch}, m)
		if err != nil {
			return err
		}
		acc := v.Metrics["accuracy"]
		res.Central.Steps = append(res.Central.Steps, fashionStep{epoch, trained, acc})
		fmt.Printf("centralised: epoch %d: accuracy %.4f, %.1fs\n", epoch, acc, trained)
		if acc >= res.Target {
			res.Central.Epochs, res.Central.Seconds, res.Central.KnownSeconds = epoch, trained, time.Since(start).Seconds()
			return nil
		}
	}
	return nil
}

// federatedRun starts a director and the envoys in this process, as fx
// quickstart does (each envoy with its own certificate and shard, gRPC over
// mutual TLS on 127.0.0.1), submits the quickstart plan with up to
// maxRounds rounds, and follows the metric stream until the aggregated model
// reaches the target; then it cancels the experiment.
func federatedRun(res *fashionResult, pkiDir string, maxRounds int) error {
	setup := time.Now()
	p, err := openBenchPKI(pkiDir)
	if err != nil {
		return err
	}
	if _, err := p.envoys(res.Envoys, 0); err != nil {
		return err
	}
	rdir := filepath.Join(pkiDir, "researcher")
	rfiles := pki.PartyFiles(rdir, "bench")
	if _, err := pki.NewKeyring(pki.KeyringConfig{Files: rfiles}); err != nil {
		if _, rfiles, err = p.ca.IssueTo(rdir, pki.IssueRequest{Role: pki.RoleResearcher, Name: "bench"}); err != nil {
			return err
		}
	}
	work, err := os.MkdirTemp("", "fxbench-fashion-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	logf, err := os.Create(filepath.Join(work, "parties.log"))
	if err != nil {
		return err
	}
	defer logf.Close()
	logger := hclog.New(&hclog.LoggerOptions{Output: logf, Level: hclog.Info})

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	failures := make(chan error, res.Envoys+1)

	s := director.DefaultSettings()
	s.ListenAddress, s.Advertise.Host, s.Aggregator.Host = "127.0.0.1:0", "127.0.0.1", "127.0.0.1"
	s.TLS.Cert, s.TLS.Key, s.TLS.CA, s.TLS.CRL = p.Director.Cert, p.Director.Key, p.Director.CA, p.Director.CRL
	s.DataDir = filepath.Join(work, "director")
	s.HeartbeatPeriod, s.OfflineAfter = 2*time.Second, 10*time.Second
	s.ReviewPolicy = director.ReviewAuto
	dcfg, err := s.Config(logger.Named("director"))
	if err != nil {
		return err
	}
	d, err := director.New(dcfg)
	if err != nil {
		return err
	}
	wg.Go(func() {
		if err := d.Run(ctx); err != nil && ctx.Err() == nil {
			failures <- fmt.Errorf("director: %w", err)
		}
	})
	addr := d.Addr().String()
	for i := 1; i <= res.Envoys; i++ {
		f := p.envoyFiles(i)
		cfg := envoy.DefaultConfig()
		cfg.Name = envoyName(i)
		cfg.Director = envoy.DirectorConfig{Address: addr, ServerName: "localhost"}
		cfg.TLS = envoy.TLSConfig{Cert: f.Cert, Key: f.Key, CA: f.CA}
		cfg.WorkDir = filepath.Join(work, fmt.Sprintf("e%d", i))
		cfg.Tags = []string{"fashion-mnist"}
		cfg.Shard = dataset.Config{Kind: dataset.KindIDX, Path: fashionDir, Shard: fmt.Sprintf("%d/%d", i, res.Envoys), Seed: 1}
		cfg.Review = envoy.ReviewConfig{Policy: envoy.PolicyAuto}
		cfg.Logger, cfg.Version = logger.Named(cfg.Name), "bench"
		e, err := envoy.New(cfg)
		if err != nil {
			return fmt.Errorf("%s: %w", cfg.Name, err)
		}
		wg.Go(func() {
			if err := e.Run(ctx); err != nil && ctx.Err() == nil {
				failures <- fmt.Errorf("%s: %w", cfg.Name, err)
			}
		})
	}
	client, err := experiment.Dial(ctx, experiment.ClientConfig{Director: addr, ServerName: "localhost", Cert: rfiles.Cert, Key: rfiles.Key, CA: rfiles.CA})
	if err != nil {
		return err
	}
	defer client.Close()
	if err := waitOnline(ctx, client, res.Envoys, failures); err != nil {
		return err
	}
	res.Federated.SetupSeconds = time.Since(setup).Seconds()

	expDir := filepath.Join(work, "experiment")
	if err := os.MkdirAll(expDir, 0o700); err != nil {
		return err
	}
	plan := fmt.Sprintf(`name: bench-fashion-mlp
rounds: %d
participants: {min: %d, tags: [fashion-mnist]}
runner: {kind: builtin, model: mlp, hyperparameters: %s}
aggregation: {algorithm: fedavg}
stragglers: {deadline: 5m, min_reporting: %d}
best_model: {metric: accuracy, mode: max}
`, maxRounds, res.Envoys, fashionHyperYAML, res.Envoys)
	if err := os.WriteFile(filepath.Join(expDir, experiment.PlanFile), []byte(plan), 0o600); err != nil {
		return err
	}
	start := time.Now()
	exp, err := client.Submit(ctx, expDir, experiment.SubmitOptions{})
	if err != nil {
		return fmt.Errorf("submit: %w", err)
	}
	fmt.Printf("federated: %d envoys online after %.1fs of setup; submitted %s\n", res.Envoys, res.Federated.SetupSeconds, exp.GetId())

	// Round r's aggregate train event marks when round r's model existed;
	// round r+1's aggregated_model_validation is that model's accuracy.
	var mu sync.Mutex
	completed := map[int]time.Time{}
	reached := make(chan struct{})
	var once sync.Once
	since := func(t time.Time) float64 { return t.Sub(start).Seconds() }
	each := func(ev *fxv1.MetricEvent) {
		if ev.GetCollaborator() != "" {
			return
		}
		mu.Lock()
		defer mu.Unlock()
		r := int(ev.GetRound())
		switch ev.GetTask() {
		case runner.TaskTrain:
			completed[r] = ev.GetTime().AsTime()
		case runner.TaskAggregatedValidation:
			model := r - 1
			acc := ev.GetMetrics()["accuracy"]
			if model == 0 {
				fmt.Printf("federated: initial model: accuracy %.4f\n", acc)
				return
			}
			done, ok := completed[model]
			if !ok {
				return
			}
			res.Federated.Steps = append(res.Federated.Steps, fashionStep{model, since(done), acc})
			fmt.Printf("federated: round %d: accuracy %.4f, model at %.1fs, reported at %.1fs\n", model, acc, since(done), since(ev.GetTime().AsTime()))
			if acc >= res.Target && res.Federated.Rounds == 0 {
				res.Federated.Rounds, res.Federated.Seconds, res.Federated.KnownSeconds = model, since(done), since(ev.GetTime().AsTime())
				once.Do(func() { close(reached) })
			}
		}
	}
	wctx, wcancel := context.WithCancel(ctx)
	defer wcancel()
	waited := make(chan error, 1)
	go func() {
		_, err := client.WaitFunc(wctx, exp.GetName(), each)
		waited <- err
	}()
	select {
	case <-reached:
		cctx, ccancel := context.WithTimeout(ctx, 30*time.Second)
		_, err := client.Cancel(cctx, exp.GetName(), "benchmark reached its target")
		ccancel()
		if err != nil {
			fmt.Printf("federated: cancel: %v\n", err)
		}
	case err := <-waited:
		if err != nil {
			return err
		}
	case err := <-failures:
		return err
	case <-time.After(30 * time.Minute):
		return errors.New("no result within 30 minutes")
	}
	wcancel()
	mu.Lock()
	slices.SortFunc(res.Federated.Steps, func(a, b fashionStep) int { return a.N - b.N })
	mu.Unlock()
	return nil
}

// waitOnline waits until n envoys are online, or a party fails, for at
// most 2 minutes.
func waitOnline(ctx context.Context, c *experiment.Client, n int, failures <-chan error) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- c.WaitForEnvoys(ctx, n) }()
	select {
	case err := <-failures:
		return err
	case err := <-done:
		return err
	}
}
