package app

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/spf13/cobra"

	"github.com/fx-fl/fx/dataset"
	"github.com/fx-fl/fx/director"
	"github.com/fx-fl/fx/envoy"
	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/pki"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner"
	"github.com/fx-fl/fx/runner/builtin"
	"github.com/fx-fl/fx/tensor"
)

// fashionMNIST is where Debian's dataset-fashion-mnist package puts the data.
const fashionMNIST = "/usr/share/datasets/fashion-mnist"

type quickstartOptions struct {
	workdir     string
	envoys      int
	rounds      int
	data        string
	verbose     bool
	keepRunning bool
	// fellBack is set when --data auto found no Fashion-MNIST.
	fellBack bool
}

// profileFile is the researcher's profile quickstart writes in its work
// directory: the connection settings `fx experiment --profile` and the
// Python client's Federation.from_profile read.
const profileFile = "profile.yaml"

func newQuickstartCommand(opts *globalOptions) *cobra.Command {
	q := &quickstartOptions{}
	cmd := &cobra.Command{
		Use:   "quickstart",
		Short: "Run a whole federation on this machine: PKI, director, envoys, one experiment",
		Long: `Run a whole federation on 127.0.0.1 and one experiment on it, then stop.

quickstart makes a certificate authority and certificates for a director, N
envoys and a researcher; starts the director and the envoys, each with its own
certificate, talking gRPC over mutual TLS; submits an experiment that trains
the built-in MLP; shows each round's model with its accuracy on the envoys'
validation data; saves the best model and scores it on test data no envoy
trained or validated on; and shuts everything down.

With --keep-running the federation stays up after the experiment, until
Ctrl-C, for more experiments: from the CLI (fx experiment --profile
WORKDIR/profile.yaml ...), or from Python and the notebook
(examples/notebooks/fashion_mnist.ipynb), which read the same profile.

Its data is Fashion-MNIST when ` + fashionMNIST + ` exists
(apt-get install dataset-fashion-mnist), each envoy holding one shard of it;
otherwise a generated data set, and it says which.

Everything it makes stays in --workdir: the PKI (kept across runs), the
configuration files of every party (rerun one by hand with
"fx director start --config WORKDIR/director.yaml"), logs, the best model,
and with --keep-running the researcher's profile (profile.yaml).`,
		Example: `  fx quickstart
  fx quickstart --envoys 4 --rounds 8 --workdir /tmp/fx-demo
  fx quickstart --keep-running     # then: FX_PROFILE=fx-quickstart/profile.yaml fx experiment list`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runQuickstart(cmd.Context(), opts, q, cmd.OutOrStdout(), cmd.ErrOrStderr())
		},
	}
	f := cmd.Flags()
	f.StringVar(&q.workdir, "workdir", "fx-quickstart", "directory for the PKI, configurations, logs and results")
	f.IntVar(&q.envoys, "envoys", 3, "how many envoys (data sites) to start")
	f.IntVar(&q.rounds, "rounds", 5, "how many federated rounds the experiment runs")
	f.StringVar(&q.data, "data", "auto", "auto (Fashion-MNIST if installed), fashion-mnist or synthetic")
	f.BoolVar(&q.verbose, "verbose", false, "show the parties' logs here instead of in WORKDIR/logs")
	f.BoolVar(&q.keepRunning, "keep-running", false, "after the experiment, keep the federation running until Ctrl-C")
	return cmd
}

func (q *quickstartOptions) validate() error {
	if q.envoys < 1 || q.envoys > 32 {
		return fmt.Errorf("--envoys %d: choose between 1 and 32", q.envoys)
	}
	if q.rounds < 1 {
		return fmt.Errorf("--rounds %d: choose at least 1", q.rounds)
	}
	switch q.data {
	case "auto":
		q.data, q.fellBack = "synthetic", true
		if _, err := os.Stat(filepath.Join(fashionMNIST, "train-images-idx3-ubyte.gz")); err == nil {
			q.data, q.fellBack = "fashion-mnist", false
		} else if _, err := os.Stat(filepath.Join(fashionMNIST, "train-images-idx3-ubyte")); err == nil {
			q.data, q.fellBack = "fashion-mnist", false
		}
	case "fashion-mnist":
		if _, err := os.Stat(fashionMNIST); err != nil {
			return fmt.Errorf("--data fashion-mnist: %s is missing: apt-get install dataset-fashion-mnist, or use --data synthetic", fashionMNIST)
		}
	case "synthetic":
	default:
		return fmt.Errorf("--data %q: use auto, fashion-mnist or synthetic", q.data)
	}
	return nil
}

func runQuickstart(ctx context.Context, opts *globalOptions, q *quickstartOptions, out, errOut io.Writer) error {
	start := time.Now()
	if err := q.validate(); err != nil {
		return err
	}
	work, err := filepath.Abs(q.workdir)
	if err != nil {
		return err
	}
	say := func(format string, args ...any) { fmt.Fprintf(out, format+"\n", args...) }
	say("fx quickstart: a federation of 1 director and %d envoys on 127.0.0.1, files in %s", q.envoys, shortPath(work))
	if q.data == "fashion-mnist" {
		say("data: Fashion-MNIST from %s, one shard per envoy", fashionMNIST)
	} else if q.fellBack {
		say("data: a generated data set (Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist)")
	} else {
		say("data: a generated data set, one shard per envoy")
	}

	// Each run starts from a clean federation; only the PKI is kept (and a
	// profile naming a federation that is gone goes too).
	for _, dir := range []string{"director", "envoys", "experiment", "logs", profileFile} {
		if err := os.RemoveAll(filepath.Join(work, dir)); err != nil {
			return err
		}
	}
	envoyNames := make([]string, q.envoys)
	for i := range envoyNames {
		envoyNames[i] = fmt.Sprintf("envoy-%d", i+1)
	}
	certs, err := quickstartPKI(filepath.Join(work, "pki"), envoyNames)
	if err != nil {
		return err
	}
	say("pki: certificate authority and certificates for the director, %d envoys and a researcher in %s", q.envoys, shortPath(filepath.Join(work, "pki")))

	logs, closeLogs, err := quickstartLogs(opts, q, work, errOut)
	if err != nil {
		return err
	}
	defer closeLogs()

	ctx, stop := context.WithCancel(ctx)
	defer stop()
	var wg sync.WaitGroup
	failures := make(chan error, q.envoys+1)
	defer wg.Wait()
	defer stop()

	// The director, on a port chosen now so the envoys' files can name it.
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	addr := lis.Addr().String()
	directorFile := filepath.Join(work, "director.yaml")
	if err := os.WriteFile(directorFile, []byte(directorYAML(work, addr, certs)), 0o600); err != nil {
		lis.Close()
		return err
	}
	settings, err := loadDirectorSettings(directorFile, nil)
	if err != nil {
		lis.Close()
		return fmt.Errorf("quickstart's director.yaml: %w", err)
	}
	dcfg, err := settings.Config(logs("director"))
	if err != nil {
		lis.Close()
		return err
	}
	dcfg.Listener = lis
	d, err := director.New(dcfg)
	if err != nil {
		lis.Close()
		return err
	}
	wg.Go(func() {
		if err := d.Run(ctx); err != nil && ctx.Err() == nil {
			failures <- fmt.Errorf("director: %w", err)
		}
	})
	say("director: listening on %s", addr)

	for i, name := range envoyNames {
		file := filepath.Join(work, "envoys", name+".yaml")
		if err := os.MkdirAll(filepath.Dir(file), 0o700); err != nil {
			return err
		}
		if err := os.WriteFile(file, []byte(envoyYAML(work, addr, name, certs.envoys[name], q.data, i+1, q.envoys)), 0o600); err != nil {
			return err
		}
		cfg, err := loadEnvoyConfig(file, nil)
		if err != nil {
			return fmt.Errorf("quickstart's %s: %w", file, err)
		}
		cfg.Logger, cfg.Version = logs(name), buildVersion()
		e, err := envoy.New(cfg)
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		wg.Go(func() {
			if err := e.Run(ctx); err != nil && ctx.Err() == nil {
				failures <- fmt.Errorf("%s: %w", name, err)
			}
		})
	}
	say("envoys: %s started, each with its own certificate and data shard", strings.Join(envoyNames, ", "))

	client, err := experiment.Dial(ctx, experiment.ClientConfig{
		Director: addr, ServerName: "localhost",
		Cert: certs.researcher.Cert, Key: certs.researcher.Key, CA: certs.researcher.CA,
	})
	if err != nil {
		return err
	}
	defer client.Close()
	if err := waitForEnvoys(ctx, client, q.envoys, failures); err != nil {
		return err
	}

	expDir := filepath.Join(work, "experiment")
	if err := os.MkdirAll(expDir, 0o700); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(expDir, experiment.PlanFile), []byte(quickstartPlan(q)), 0o600); err != nil {
		return err
	}
	exp, err := client.Submit(ctx, expDir, experiment.SubmitOptions{})
	if err != nil {
		return fmt.Errorf("submit: %w", err)
	}
	say("experiment %q submitted (%s): %d rounds of the built-in MLP, FedAvg over %d envoys", exp.GetName(), exp.GetId(), q.rounds, q.envoys)

	progress := newRoundPrinter(out, q.rounds, q.envoys)
	type result struct {
		exp *fxv1.Experiment
		err error
	}
	done := make(chan result, 1)
	go func() {
		e, err := client.WaitFunc(ctx, exp.GetName(), progress.event)
		done <- result{e, err}
	}()
	var final *fxv1.Experiment
	select {
	case r := <-done:
		if r.err != nil {
			return fmt.Errorf("experiment %s: %w (logs in %s)", exp.GetName(), r.err, filepath.Join(work, "logs"))
		}
		final = r.exp
	case err := <-failures:
		return fmt.Errorf("%w (logs in %s)", err, filepath.Join(work, "logs"))
	}

	bestPath := filepath.Join(work, "best.safetensors")
	info, err := client.ModelToFile(ctx, exp.GetName(), experiment.SelectBest, bestPath)
	if err != nil {
		return fmt.Errorf("download the best model: %w", err)
	}
	say("")
	b := final.GetBest()
	if b == nil {
		return fmt.Errorf("experiment %s finished without a best model (logs in %s)", exp.GetName(), filepath.Join(work, "logs"))
	}
	// The best model's own validation: the aggregated validation of the
	// next round scored it, on every envoy's validation data.
	v := progress.validation(int(b.GetRound()))
	say("best model: round %d of %d, validation %s on %s; saved to %s (%d bytes, safetensors)",
		b.GetRound(), q.rounds, formatMetrics(v.metrics), v.coverage(q.envoys), shortPath(bestPath), info.GetSize())
	test, err := quickstartTest(ctx, q, bestPath)
	if err != nil {
		return err
	}
	say("test: the best model on %s: %s", test.about, formatMetrics(test.metrics))

	if q.keepRunning {
		profile := filepath.Join(work, profileFile)
		if err := os.WriteFile(profile, []byte(profileYAML(addr)), 0o600); err != nil {
			return err
		}
		say("")
		say("the federation keeps running on %s until Ctrl-C; the researcher's settings are in %s:", addr, shortPath(profile))
		say("  export FX_PROFILE=%s", profile)
		say("  fx experiment list                        # the CLI reads $FX_PROFILE")
		say("  fx.Federation.from_profile()              # and so does Python: examples/notebooks/fashion_mnist.ipynb")
		select {
		case <-ctx.Done():
		case err := <-failures:
			return fmt.Errorf("%w (logs in %s)", err, filepath.Join(work, "logs"))
		}
	}
	stop()
	wg.Wait()
	say("federation stopped after %s", time.Since(start).Round(100*time.Millisecond))
	return nil
}

// shortPath shows a path under the working directory as ./PATH, and any
// other as it is (absolute).
func shortPath(path string) string {
	wd, err := os.Getwd()
	if err != nil {
		return path
	}
	rel, err := filepath.Rel(wd, path)
	if err != nil || rel == ".." || strings.HasPrefix(rel, "../") {
		return path
	}
	return "./" + rel
}

// profileYAML is the researcher's profile for the federation at addr, in
// the form `fx experiment --profile` reads; its paths are relative to the
// work directory it is written to.
func profileYAML(addr string) string {
	return fmt.Sprintf(`# The researcher's connection settings for the federation fx quickstart
# runs: fx experiment --profile THIS_FILE (or FX_PROFILE=THIS_FILE), and
# fx.Federation.from_profile(THIS_FILE) in Python. Paths are relative to
# this file's directory.
director: %s
server_name: localhost
cert: pki/researcher/researcher.crt
key: pki/researcher/researcher.key
ca: pki/researcher/ca.crt
`, addr)
}

// testResult is the final evaluation of the best model.
type testResult struct {
	about   string
	metrics map[string]float64
}

// quickstartTest scores the model in path on the data set's test split,
// which the envoys hold no part of in their training or validation data:
// the figure to quote, as nothing was chosen by it.
func quickstartTest(ctx context.Context, q *quickstartOptions, path string) (testResult, error) {
	c := dataset.Config{Kind: dataset.KindSynthetic, Seed: 1}
	if q.data == "fashion-mnist" {
		c = dataset.Config{Kind: dataset.KindIDX, Path: fashionMNIST, Seed: 1}
	}
	d, err := dataset.LoadTest(c)
	if err != nil {
		return testResult{}, fmt.Errorf("the test data: %w", err)
	}
	weights, _, err := tensor.ReadFile(path)
	if err != nil {
		return testResult{}, err
	}
	res, err := builtin.Evaluate(ctx, builtin.ModelMLP, quickstartHyper(q), weights, d)
	if err != nil {
		return testResult{}, fmt.Errorf("evaluating the best model: %w", err)
	}
	about := fmt.Sprintf("the %d generated test samples", d.Test.N)
	if q.data == "fashion-mnist" {
		about = fmt.Sprintf("the %d Fashion-MNIST test images", d.Test.N)
	}
	return testResult{about: about + ", which no envoy trained or validated on", metrics: res.Metrics}, nil
}

// quickstartCerts are the files each party uses.
type quickstartCerts struct {
	director   pki.Files
	researcher pki.Files
	envoys     map[string]pki.Files
}

// quickstartPKI opens the CA in dir, or makes it, and issues what is
// missing; existing certificates and keys are kept.
func quickstartPKI(dir string, envoys []string) (*quickstartCerts, error) {
	caDir := filepath.Join(dir, "ca")
	ca, err := pki.OpenCA(caDir)
	if err != nil {
		if ca, err = pki.InitCA(caDir, pki.InitOptions{Organization: "fx quickstart"}); err != nil {
			return nil, fmt.Errorf("pki: %w", err)
		}
	}
	issue := func(sub string, req pki.IssueRequest) (pki.Files, error) {
		out := filepath.Join(dir, sub)
		files := pki.PartyFiles(out, req.Name)
		if _, err := pki.NewKeyring(pki.KeyringConfig{Files: files}); err == nil {
			return files, nil
		}
		_, files, err := ca.IssueTo(out, req)
		if err != nil {
			return files, fmt.Errorf("pki: certificate for %s: %w", req.Name, err)
		}
		return files, nil
	}
	c := &quickstartCerts{envoys: map[string]pki.Files{}}
	if c.director, err = issue("director", pki.IssueRequest{Role: pki.RoleDirector, Name: "localhost", Hosts: []string{"localhost", "127.0.0.1"}}); err != nil {
		return nil, err
	}
	c.director.CRL = ca.CRLPath()
	if c.researcher, err = issue("researcher", pki.IssueRequest{Role: pki.RoleResearcher, Name: "researcher"}); err != nil {
		return nil, err
	}
	for _, name := range envoys {
		if c.envoys[name], err = issue(filepath.Join("envoys", name), pki.IssueRequest{Role: pki.RoleEnvoy, Name: name}); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// quickstartLogs gives each party a named logger writing to its own file in
// WORKDIR/logs, or to stderr with --verbose.
func quickstartLogs(opts *globalOptions, q *quickstartOptions, work string, errOut io.Writer) (func(name string) hclog.Logger, func(), error) {
	if q.verbose {
		root := opts.logger(errOut)
		return func(name string) hclog.Logger { return root.Named(name) }, func() {}, nil
	}
	dir := filepath.Join(work, "logs")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, nil, err
	}
	var mu sync.Mutex
	var files []*os.File
	logs := func(name string) hclog.Logger {
		f, err := os.OpenFile(filepath.Join(dir, name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
		if err != nil {
			return hclog.NewNullLogger()
		}
		mu.Lock()
		files = append(files, f)
		mu.Unlock()
		return opts.logger(f).Named(name)
	}
	return logs, func() {
		mu.Lock()
		defer mu.Unlock()
		for _, f := range files {
			f.Close()
		}
	}, nil
}

// waitForEnvoys waits until every envoy is online, or one of the parties
// fails, for at most 30 s.
func waitForEnvoys(ctx context.Context, c *experiment.Client, n int, failures <-chan error) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- c.WaitForEnvoys(ctx, n) }()
	select {
	case err := <-failures:
		return err
	case err := <-done:
		if err != nil {
			return fmt.Errorf("%w (see the logs)", err)
		}
		return nil
	}
}

func directorYAML(work, addr string, c *quickstartCerts) string {
	return fmt.Sprintf(`# The quickstart federation's director. Rerun it by hand with
#   fx director start --config %[1]s/director.yaml
listen_address: %[2]s
advertise:
  host: 127.0.0.1
  server_name: localhost
tls:
  cert: %[3]s
  key: %[4]s
  ca: %[5]s
  crl: %[6]s
data_dir: %[1]s/director
heartbeat_period: 2s
offline_after: 10s
review_policy: auto
max_concurrent_experiments: 2
aggregator:
  host: 127.0.0.1
`, work, addr, c.director.Cert, c.director.Key, c.director.CA, c.director.CRL)
}

func envoyYAML(work, addr, name string, f pki.Files, data string, shard, shards int) string {
	dataset := fmt.Sprintf(`  kind: idx
  path: %s
  shard: %d/%d
  seed: 1`, fashionMNIST, shard, shards)
	tags := "fashion-mnist"
	if data == "synthetic" {
		dataset = fmt.Sprintf(`  kind: synthetic
  shard: %d/%d
  seed: 1`, shard, shards)
		tags = "synthetic"
	}
	return fmt.Sprintf(`# The quickstart federation's %[1]s. Rerun it by hand with
#   fx envoy start --config %[2]s/envoys/%[1]s.yaml
name: %[1]s
director:
  address: %[3]s
  server_name: localhost
tls:
  cert: %[4]s
  key: %[5]s
  ca: %[6]s
work_dir: %[2]s/envoys/%[1]s
tags: [%[7]s]
shard:
%[8]s
review:
  policy: auto
`, name, work, addr, f.Cert, f.Key, f.CA, tags, dataset)
}

// quickstartHyper are the built-in MLP's settings: one local epoch per
// round with momentum SGD, which reaches about 0.85 on Fashion-MNIST's
// test images in five rounds over three envoys.
func quickstartHyper(q *quickstartOptions) map[string]any {
	hidden := 128
	if q.data == "synthetic" {
		hidden = 32
	}
	return map[string]any{"hidden": []any{hidden}, "lr": 0.05, "momentum": 0.9, "batch_size": 64, "epochs": 1}
}

// quickstartPlan trains the built-in MLP of quickstartHyper with FedAvg
// over every envoy.
func quickstartPlan(q *quickstartOptions) string {
	tag := "fashion-mnist"
	if q.data == "synthetic" {
		tag = "synthetic"
	}
	h := quickstartHyper(q)
	return fmt.Sprintf(`# Written by fx quickstart.
name: quickstart-%s-mlp
rounds: %d
participants: {min: %d, tags: [%s]}
runner:
  kind: builtin
  model: mlp
  hyperparameters: {hidden: %v, lr: %v, momentum: %v, batch_size: %v, epochs: %v}
aggregation: {algorithm: fedavg}
stragglers: {deadline: 5m, min_reporting: 1}
best_model: {metric: accuracy, mode: max}
`, tag, q.rounds, q.envoys, tag, h["hidden"], h["lr"], h["momentum"], h["batch_size"], h["epochs"])
}

// roundPrinter shows one line per round from the metric stream: the
// round's training, and the validation of the model the round made. That
// validation is the next round's aggregated_model_validation (after the
// last round, the final validation-only one), so a round's line appears
// once the next round has validated its model.
type roundPrinter struct {
	out    io.Writer
	rounds int
	envoys int
	mu     sync.Mutex
	train  map[int]map[string]float64 // round → train aggregate
	valid  map[int]validation         // model of round → its validation
}

// validation is the aggregated validation of one round's model: its
// metrics, and which envoys' data it covers.
type validation struct {
	metrics   map[string]float64
	samples   int64
	reporters map[string]bool
}

// coverage says what the validation was computed on.
func (v validation) coverage(envoys int) string {
	who := fmt.Sprintf("all %d envoys", envoys)
	switch {
	case envoys == 1 && len(v.reporters) == 1:
		who = "the envoy"
	case envoys == 2 && len(v.reporters) == 2:
		who = "both envoys"
	case len(v.reporters) < envoys:
		who = fmt.Sprintf("%d of the %d envoys", len(v.reporters), envoys)
	}
	return fmt.Sprintf("the validation data of %s (%d images)", who, v.samples)
}

func newRoundPrinter(out io.Writer, rounds, envoys int) *roundPrinter {
	return &roundPrinter{out: out, rounds: rounds, envoys: envoys, train: map[int]map[string]float64{}, valid: map[int]validation{}}
}

func (p *roundPrinter) event(ev *fxv1.MetricEvent) {
	p.mu.Lock()
	defer p.mu.Unlock()
	r := int(ev.GetRound())
	switch {
	case ev.GetTask() == runner.TaskTrain && ev.GetCollaborator() == "":
		p.train[r] = ev.GetMetrics()
	case ev.GetTask() == runner.TaskAggregatedValidation:
		// Round r validates the model of round r-1.
		v := p.valid[r-1]
		if v.reporters == nil {
			v.reporters = map[string]bool{}
		}
		if c := ev.GetCollaborator(); c != "" {
			v.reporters[c] = true
			p.valid[r-1] = v
			return
		}
		v.metrics, v.samples = ev.GetMetrics(), ev.GetSamples()
		p.valid[r-1] = v
		if model := r - 1; model >= 1 && model <= p.rounds {
			line := fmt.Sprintf("round %d/%d  |  training %s  |  global model: validation %s", model, p.rounds, formatMetrics(p.train[model]), formatMetrics(v.metrics))
			if len(v.reporters) < p.envoys {
				line += fmt.Sprintf(" (%d of %d envoys)", len(v.reporters), p.envoys)
			}
			fmt.Fprintln(p.out, line)
		}
	}
}

// validation is the aggregated validation of round's model.
func (p *roundPrinter) validation(round int) validation {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.valid[round]
}
