package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/fx-fl/fx/dataset"
	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/internal/atomicfile"
	"github.com/fx-fl/fx/privacy"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner"
	"github.com/fx-fl/fx/runner/builtin"
	"github.com/fx-fl/fx/tensor"
)

// fashionDir is where Debian's dataset-fashion-mnist package installs the
// data (as fx quickstart expects it).
const fashionDir = "/usr/share/datasets/fashion-mnist"

// fashionHyperYAML is the built-in MLP every algorithm trains (see
// bench/notes/fashion.md for how it was chosen): two hidden layers of 256
// and 128, two local epochs of momentum SGD per round at a learning rate
// that decays by 0.9 a round, so that the late rounds settle.
const fashionHyperYAML = "{hidden: [256, 128], lr: 0.05, lr_decay: 0.9, momentum: 0.9, batch_size: 64, epochs: 2}"

// fashionAlgo is one federated algorithm of the benchmark: what its plan
// says beside the runner. The same settings serve every sharding.
type fashionAlgo struct {
	Name        string
	Aggregation string // the plan's aggregation, a YAML flow mapping
	Training    string // the plan's training ("": none)
	Hyper       string // the built-in MLP's hyper-parameters
	// MinReporting is the plan's stragglers.min_reporting (0: every
	// envoy); an asynchronous step closes with its buffer's K updates,
	// so FedBuff's must be at most K.
	MinReporting int
}

// fashionAlgos are the algorithms of issue 21's benchmark, run in this
// order. One whose plan does not validate (an fx without FedBuff) is
// reported as skipped, with the reason.
var fashionAlgos = []fashionAlgo{
	{Name: "fedavg", Aggregation: "{algorithm: fedavg}", Hyper: fashionHyperYAML},
	{Name: "fedprox", Aggregation: "{algorithm: fedavg}", Training: "{proximal_mu: 0.001}", Hyper: fashionHyperYAML},
	{Name: "scaffold", Aggregation: "{algorithm: scaffold}", Hyper: fashionHyperYAML},
	{Name: "fedadam", Aggregation: "{algorithm: fedadam, lr: 0.01, beta1: 0.9, beta2: 0.99, tau: 0.001}", Hyper: fashionHyperYAML},
	{Name: "fedbuff", Aggregation: "{algorithm: fedavg, mode: async, buffer: 3}", Hyper: fashionHyperYAML, MinReporting: 3},
}

// fashionSharding is how the training images are cut across the envoys,
// with the rounds run and the accuracy goal of issue 21.
type fashionSharding struct {
	Name   string
	Alpha  float64 // dataset.Config.DirichletAlpha (0: IID)
	Rounds int
	Goal   float64
}

// fashionPoint is one model's accuracy on the 10000 test images.
type fashionPoint struct {
	Round int // round (or centralised step); 0 is the initial model
	// Seconds from the submission (the start of centralised training)
	// until this model existed.
	Seconds  float64
	Accuracy float64
	// Step is the L2 norm of this model minus the previous round's (the
	// global update; 0 for round 0 and centralised steps), which says how
	// a DP clip norm compares with the updates.
	Step float64 `json:",omitempty"`
}

// fashionDP is what a DP curve's plan and sites said, and what the sites'
// ledgers recorded at the end.
type fashionDP struct {
	NoiseMultiplier, ClipNorm, Delta float64
	// Epsilon is what the plan's rounds spend at Delta by the accountant;
	// Budget is every envoy's privacy configuration.
	Epsilon float64
	Budget  string
	// Spent is each envoy's ε at Delta from its ledger after the run, and
	// Charged the rounds it recorded.
	Spent   []float64
	Charged []int
}

// fashionCurve is one experiment: an algorithm on a sharding.
type fashionCurve struct {
	Sharding  string
	Algorithm string
	Plan      string     // what the plan adds to the common part (runner, aggregation, training, privacy)
	Skipped   string     `json:",omitempty"` // why it was not run
	DP        *fashionDP `json:",omitempty"`
	Goal      float64
	Points    []fashionPoint
	// Best is the highest test accuracy of a round's model, at BestRound;
	// Reached is the first round at Goal or above (0: none).
	Best               float64
	BestRound, Reached int
	Uptime, UptimeEnd  string
}

type fashionResult struct {
	Start             time.Time
	Uptime, UptimeEnd string
	Envoys            int
	Data              string
	// Central is the baseline: the fedavg settings trained on all the
	// envoys' training images in one process, one train task per step.
	Central      []fashionPoint
	CentralHyper string
	Curves       []fashionCurve
	// Updates are the later runs (-update) whose curves replaced or
	// joined this run's, each with its own time and load.
	Updates []fashionUpdate `json:",omitempty"`
}

// fashionUpdate is one -update run.
type fashionUpdate struct {
	Start             time.Time
	Uptime, UptimeEnd string
	Curves            []string // sharding and algorithm of each curve it ran
}

// curveKey names a curve within a result: its sharding, algorithm and
// whether it ran with DP.
func curveKey(c fashionCurve) string {
	k := c.Sharding + " " + c.Algorithm
	if c.DP != nil {
		k += " +DP"
	}
	return k
}

// mergeFashion puts the curves of a later run into an earlier result:
// each replaces the earlier curve of the same key in place, or is
// appended; the earlier centralised baseline stays unless the later run
// trained one.
func mergeFashion(old, later *fashionResult) *fashionResult {
	merged := *old
	merged.Curves = slices.Clone(old.Curves)
	u := fashionUpdate{Start: later.Start, Uptime: later.Uptime, UptimeEnd: later.UptimeEnd}
	for _, c := range later.Curves {
		u.Curves = append(u.Curves, curveKey(c))
		if i := slices.IndexFunc(merged.Curves, func(o fashionCurve) bool { return curveKey(o) == curveKey(c) }); i >= 0 {
			merged.Curves[i] = c
		} else {
			merged.Curves = append(merged.Curves, c)
		}
	}
	if len(later.Central) > 0 {
		merged.Central, merged.CentralHyper = later.Central, later.CentralHyper
	}
	merged.Updates = append(slices.Clone(old.Updates), u)
	return &merged
}

func fashionMain(args []string) error {
	fs := flag.NewFlagSet("fashion", flag.ExitOnError)
	envoys := fs.Int("envoys", 4, "envoys (data sites), each a process holding one shard")
	roundsIID := fs.Int("rounds-iid", 15, "rounds of every IID experiment")
	roundsSkew := fs.Int("rounds-skew", 20, "rounds of every label-skewed experiment")
	alpha := fs.Float64("alpha", 0.5, "the label skew's Dirichlet α")
	algos := fs.String("algorithms", "fedavg,fedprox,scaffold,fedadam,fedbuff", "comma-separated algorithms to run (of fedavg, fedprox, scaffold, fedadam, fedbuff)")
	shardings := fs.String("shardings", "iid,skew", "comma-separated shardings to run: iid, skew")
	hyper := fs.String("hyper", "", "the MLP's hyper-parameters for every algorithm, a YAML flow mapping (default "+fashionHyperYAML+")")
	central := fs.Bool("central", true, "train the centralised baseline")
	dp := fs.Bool("dp", true, "also run fedavg on IID with client-level DP at every site (-dp-epsilon at δ 1e-5 over -rounds-iid rounds)")
	dpEps := fs.Float64("dp-epsilon", 3, "the ε every site's budget allows at δ 1e-5; σ is the least that fits the rounds")
	// Every update of this MLP is far longer than C (clipping binds), so
	// C does not change how much signal survives the noise, only the
	// scale of the weights: 0.1 keeps the noised model's losses finite.
	dpClip := fs.Float64("dp-clip", 0.1, "the DP clip norm C")
	pkiDir, fxBin, out, keep := federationFlags(fs)
	plot := fs.String("plot", "", "draw the curves into this PNG with -plot-script (needs -out)")
	plotScript := fs.String("plot-script", "bench/fashion/plot.py", "the plotting script (python3 with matplotlib)")
	update := fs.Bool("update", false, "merge into the result already in -out: this run's curves replace those of the same sharding and algorithm (to re-run one algorithm without the others)")
	_ = fs.Parse(args)
	if _, err := os.Stat(fashionDir); err != nil {
		return fmt.Errorf("%s is missing: apt-get install dataset-fashion-mnist", fashionDir)
	}
	if *plot != "" && *out == "" {
		return errors.New("-plot draws from the JSON of -out: give both")
	}
	var runAlgos []fashionAlgo
	for _, name := range strings.Split(*algos, ",") {
		i := slices.IndexFunc(fashionAlgos, func(a fashionAlgo) bool { return a.Name == strings.TrimSpace(name) })
		if i < 0 {
			return fmt.Errorf("-algorithms: unknown %q (want fedavg, fedprox, scaffold, fedadam, fedbuff)", name)
		}
		a := fashionAlgos[i]
		if *hyper != "" {
			a.Hyper = *hyper
		}
		runAlgos = append(runAlgos, a)
	}
	var runShardings []fashionSharding
	for _, name := range strings.Split(*shardings, ",") {
		switch strings.TrimSpace(name) {
		case "iid":
			runShardings = append(runShardings, fashionSharding{Name: "IID", Rounds: *roundsIID, Goal: 0.88})
		case "skew":
			runShardings = append(runShardings, fashionSharding{Name: fmt.Sprintf("Dirichlet α = %g", *alpha), Alpha: *alpha, Rounds: *roundsSkew, Goal: 0.87})
		default:
			return fmt.Errorf("-shardings: unknown %q (want iid, skew)", name)
		}
	}
	setup, err := setUpFederation(*fxBin, "fxbench-fashion-", *keep, *pkiDir, *envoys)
	if err != nil {
		return err
	}
	defer setup.done()
	test, err := dataset.LoadTest(dataset.Config{Kind: dataset.KindIDX, Path: fashionDir, Seed: 1})
	if err != nil {
		return err
	}
	res := &fashionResult{Start: time.Now().UTC(), Uptime: uptime(), Envoys: *envoys,
		Data: fmt.Sprintf("Fashion-MNIST (%s), shards of the training images with seed 1 (20%% held out at each site for validation); accuracy on the %d t10k test images, which no envoy holds", fashionDir, test.Test.N)}
	fmt.Printf("fashion: %d envoys, load average %s\n", *envoys, loadAverage(res.Uptime))
	var earlier *fashionResult
	if *update {
		if *out == "" {
			return errors.New("-update merges into -out: give it")
		}
		b, err := os.ReadFile(*out)
		if err == nil {
			earlier = new(fashionResult)
			err = json.Unmarshal(b, earlier)
		}
		if err != nil {
			return fmt.Errorf("-update: %w", err)
		}
	}
	save := func() error {
		if *out == "" {
			return nil
		}
		if earlier != nil {
			return atomicfile.ReplaceJSON(*out, mergeFashion(earlier, res))
		}
		return atomicfile.ReplaceJSON(*out, res)
	}
	if *central {
		h := fashionHyperYAML
		if *hyper != "" {
			h = *hyper
		}
		res.CentralHyper = h
		if res.Central, err = fashionCentral(h, max(*roundsIID, *roundsSkew), test); err != nil {
			return fmt.Errorf("centralised: %w", err)
		}
	}
	for _, sh := range runShardings {
		for _, a := range runAlgos {
			c, err := fashionExperiment(setup, *envoys, sh, a, nil, test)
			if err != nil {
				return fmt.Errorf("%s on %s: %w", a.Name, sh.Name, err)
			}
			res.Curves = append(res.Curves, *c)
			if err := save(); err != nil {
				return err
			}
		}
	}
	if *dp {
		sh := fashionSharding{Name: "IID", Rounds: *roundsIID, Goal: 0.88}
		a := fashionAlgos[0]
		if *hyper != "" {
			a.Hyper = *hyper
		}
		sigma, err := privacy.MinNoise(1, sh.Rounds, *dpEps, 1e-5)
		if err != nil {
			return err
		}
		// Every site keeps a budget of ε at δ with this plan's σ and C
		// as its floor and ceiling: its ledger must accept every round.
		d := &fashionDP{NoiseMultiplier: sigma, ClipNorm: *dpClip, Delta: 1e-5,
			Budget: fmt.Sprintf("privacy: {budget: {epsilon: %v, delta: 1e-5, min_noise_multiplier: %v, max_clip_norm: %v}}", *dpEps, sigma, *dpClip)}
		rdp, err := privacy.SampledGaussian{Noise: sigma, Rate: 1, Steps: sh.Rounds}.RDP(privacy.DefaultOrders())
		if err != nil {
			return err
		}
		if d.Epsilon, _, err = privacy.Epsilon(privacy.DefaultOrders(), rdp, d.Delta); err != nil {
			return err
		}
		c, err := fashionExperiment(setup, *envoys, sh, a, d, test)
		if err != nil {
			return fmt.Errorf("%s with DP on %s: %w", a.Name, sh.Name, err)
		}
		res.Curves = append(res.Curves, *c)
	}
	res.UptimeEnd = uptime()
	fmt.Printf("\nfashion: accuracy on the %d test images per round (load average %s → %s)\n", test.Test.N, loadAverage(res.Uptime), loadAverage(res.UptimeEnd))
	if len(res.Central) > 0 {
		fmt.Printf("  %-28s %s\n", "centralised", fmtPoints(res.Central))
	}
	for _, c := range res.Curves {
		name := c.Sharding + " " + c.Algorithm
		if c.DP != nil {
			name += " +DP"
		}
		if c.Skipped != "" {
			fmt.Printf("  %-28s skipped: %s\n", name, c.Skipped)
			continue
		}
		fmt.Printf("  %-28s best %.4f at round %d; goal %.2f %s\n", name, c.Best, c.BestRound, c.Goal, reachedText(c))
	}
	if err := save(); err != nil {
		return err
	}
	if *plot != "" {
		cmd := exec.Command("/usr/bin/python3", *plotScript, *out, *plot)
		cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("plotting with %s: %w (python3-matplotlib installed?)", *plotScript, err)
		}
		fmt.Printf("wrote %s\n", *plot)
	}
	return nil
}

// reachedText says whether a curve reached its goal, and when.
func reachedText(c fashionCurve) string {
	if c.Reached > 0 {
		return fmt.Sprintf("reached at round %d", c.Reached)
	}
	return fmt.Sprintf("not reached in %d rounds", len(c.Points)-1)
}

func fmtPoints(ps []fashionPoint) string {
	var s []string
	for _, p := range ps {
		s = append(s, fmt.Sprintf("%d:%.4f", p.Round, p.Accuracy))
	}
	return strings.Join(s, " ")
}

// parseHyper decodes a YAML flow mapping of hyper-parameters, as a plan
// holds them, for the runner the evaluation builds.
func parseHyper(flow string) (map[string]any, error) {
	var m map[string]any
	if err := yaml.Unmarshal([]byte(flow), &m); err != nil {
		return nil, fmt.Errorf("hyper-parameters %s: %w", flow, err)
	}
	return m, nil
}

// fashionScore fills a curve's summary from its points: the best round
// and the first at the goal (round 0, the initial model, never counts).
func fashionScore(c *fashionCurve) {
	c.Best, c.BestRound, c.Reached = 0, 0, 0
	for _, p := range c.Points {
		if p.Round == 0 {
			continue
		}
		if p.Accuracy > c.Best {
			c.Best, c.BestRound = p.Accuracy, p.Round
		}
		if c.Reached == 0 && p.Accuracy >= c.Goal {
			c.Reached = p.Round
		}
	}
}

// fashionPlan is the plan of one experiment, and the part of it that
// differs between experiments.
func fashionPlan(name string, rounds, envoys int, a fashionAlgo, dp *fashionDP) (plan, differs string) {
	differs = fmt.Sprintf("runner: {kind: builtin, model: mlp, hyperparameters: %s}\naggregation: %s\n", a.Hyper, a.Aggregation)
	if a.Training != "" {
		differs += "training: " + a.Training + "\n"
	}
	if dp != nil {
		differs += fmt.Sprintf("privacy: {dp: {noise_multiplier: %v, clip_norm: %v, delta: %v}}\n", dp.NoiseMultiplier, dp.ClipNorm, dp.Delta)
	}
	stragglers := fmt.Sprintf("stragglers: {deadline: 10m, min_reporting: %d}\n", envoys)
	if a.MinReporting > 0 {
		differs += fmt.Sprintf("stragglers: {deadline: 10m, min_reporting: %d}\n", a.MinReporting)
		stragglers = ""
	}
	plan = fmt.Sprintf(`name: %s
rounds: %d
participants: {min: %d, tags: [fashion-mnist]}
%sretention: {every: 1}
`, name, rounds, envoys, stragglers) + differs
	return plan, strings.TrimSpace(differs)
}

// fashionExperiment runs one curve on a federation of its own (a director
// and the envoys as fx processes, fresh work directories and, under DP,
// fresh ledgers), then downloads every round's global model as a
// researcher would and scores it on the test images.
func fashionExperiment(setup *federationSetup, n int, sh fashionSharding, a fashionAlgo, dp *fashionDP, test *dataset.Dataset) (*fashionCurve, error) {
	kind := a.Name
	if dp != nil {
		kind += "-dp"
	}
	skew := "iid"
	if sh.Alpha > 0 {
		skew = fmt.Sprintf("alpha%g", sh.Alpha)
	}
	name := "fashion-" + skew + "-" + kind
	plan, differs := fashionPlan(name, sh.Rounds, n, a, dp)
	c := &fashionCurve{Sharding: sh.Name, Algorithm: a.Name, Plan: differs, DP: dp, Goal: sh.Goal, Uptime: uptime()}
	if _, err := experiment.ParsePlan([]byte(plan)); err != nil {
		if a.Name == "fedbuff" {
			c.Skipped = strings.Join(strings.Fields(fmt.Sprintf("this fx refuses the plan (%v)", err)), " ")
			fmt.Printf("== %s: skipped: %s\n", name, c.Skipped)
			return c, nil
		}
		return nil, err
	}
	hyper, err := parseHyper(a.Hyper)
	if err != nil {
		return nil, err
	}
	fmt.Printf("== %s (%s, %d rounds, load average %s)\n%s\n", name, sh.Name, sh.Rounds, loadAverage(c.Uptime), differs)
	var site string
	if dp != nil {
		site = dp.Budget + "\n"
	}
	dir := filepath.Join(setup.work, name)
	fed, err := startProcFederation(setup.bin, setup.pki, n, dir, fedOptions{
		python: "/usr/bin/python3", threads: "1", tag: "fashion-mnist", envoyYAML: site,
		shard: func(i, n int) string {
			if sh.Alpha > 0 {
				return fmt.Sprintf("{kind: idx, path: %s, shard: %d/%d, seed: 1, dirichlet_alpha: %v}", fashionDir, i, n, sh.Alpha)
			}
			return fmt.Sprintf("{kind: idx, path: %s, shard: %d/%d, seed: 1}", fashionDir, i, n)
		},
	})
	if err != nil {
		return nil, err
	}
	defer fed.stop()
	expDir := filepath.Join(dir, "experiment")
	if err := os.MkdirAll(expDir, 0o700); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(expDir, experiment.PlanFile), []byte(plan), 0o600); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Hour)
	defer cancel()
	submitted := time.Now()
	if _, err := fed.client.Submit(ctx, expDir, experiment.SubmitOptions{}); err != nil {
		return nil, fmt.Errorf("submit: %w", err)
	}
	// Every aggregate event of a round carries the round's completion
	// time (a DP round has no train aggregate, so any marks it).
	done := map[int]time.Time{}
	exp, err := fed.client.WaitFunc(ctx, name, func(ev *fxv1.MetricEvent) {
		if ev.GetCollaborator() != "" {
			return
		}
		r := int(ev.GetRound())
		if _, seen := done[r]; !seen {
			done[r] = ev.GetTime().AsTime()
			msg := fmt.Sprintf("%s: round %d done at %.1fs", name, r, done[r].Sub(submitted).Seconds())
			if r > sh.Rounds { // the validation that follows the last round
				msg = fmt.Sprintf("%s: final validation at %.1fs", name, done[r].Sub(submitted).Seconds())
			}
			if ev.GetTask() == runner.TaskAggregatedValidation && r > 1 {
				msg += fmt.Sprintf(" (sites' validation of round %d's model: %.4f)", r-1, ev.GetMetrics()["accuracy"])
			}
			fmt.Println(msg)
		}
	})
	if err != nil {
		return nil, fmt.Errorf("%w (logs in %s)", err, dir)
	}
	if exp.GetState() != fxv1.ExperimentState_FINISHED {
		return nil, fmt.Errorf("experiment ended %s: %s (logs in %s)", exp.GetState(), exp.GetReason(), dir)
	}
	var prev tensor.Model
	for r := 0; r <= sh.Rounds; r++ {
		var at float64
		if r > 0 {
			t, ok := done[r]
			if !ok {
				return nil, fmt.Errorf("no aggregate of round %d", r)
			}
			at = t.Sub(submitted).Seconds()
		}
		m, _, err := fed.client.Model(ctx, name, experiment.SelectRound(r))
		if err != nil {
			return nil, fmt.Errorf("the model of round %d: %w", r, err)
		}
		acc, err := fashionAccuracy(ctx, hyper, m, test)
		if err != nil {
			return nil, fmt.Errorf("the model of round %d: %w", r, err)
		}
		pt := fashionPoint{Round: r, Seconds: at, Accuracy: acc}
		if r > 0 {
			pt.Step = distance(prev, m)
		}
		c.Points, prev = append(c.Points, pt), m
	}
	fashionScore(c)
	fmt.Printf("%s: test accuracy per round %s; best %.4f at round %d, goal %.2f %s\n", name, fmtPoints(c.Points), c.Best, c.BestRound, c.Goal, reachedText(*c))
	fed.stop()
	if dp != nil {
		if err := readLedgers(dir, n, dp); err != nil {
			return nil, err
		}
		fmt.Printf("%s: σ %.3f, C %v: ε %.3f at δ %v by the accountant; the sites' ledgers: ε %v over %v rounds\n", name, dp.NoiseMultiplier, dp.ClipNorm, dp.Epsilon, dp.Delta, dp.Spent, dp.Charged)
	}
	c.UptimeEnd = uptime()
	return c, nil
}

// readLedgers reads what every envoy's ledger recorded for its data (the
// dataset is named after the envoy).
func readLedgers(dir string, n int, dp *fashionDP) error {
	for i := 1; i <= n; i++ {
		l, err := privacy.Open(filepath.Join(dir, envoyName(i), "privacy.json"))
		if err != nil {
			return err
		}
		entries, err := l.Entries(envoyName(i))
		if err == nil {
			var eps float64
			if eps, err = privacy.EpsilonOf(entries, dp.Delta); err == nil {
				steps := 0
				for _, e := range entries {
					steps += e.Steps
				}
				dp.Spent, dp.Charged = append(dp.Spent, eps), append(dp.Charged, steps)
			}
		}
		l.Close()
		if err != nil {
			return fmt.Errorf("%s's ledger: %w", envoyName(i), err)
		}
	}
	return nil
}

// distance is the L2 norm of b − a over the float32 tensors of a that b
// has too (SCAFFOLD's control variates left out).
func distance(a, b tensor.Model) float64 {
	byName := map[string]*tensor.Tensor{}
	for _, t := range b {
		byName[t.Name] = t
	}
	var sum float64
	for _, t := range a {
		u := byName[t.Name]
		if u == nil || t.DType != tensor.F32 || u.DType != tensor.F32 || experiment.IsControlVariate(t.Name) {
			continue
		}
		x, y := t.Float32s(), u.Float32s()
		for i := range min(len(x), len(y)) {
			d := float64(y[i] - x[i])
			sum += d * d
		}
	}
	return math.Sqrt(sum)
}

// fashionAccuracy scores a model on the test images.
func fashionAccuracy(ctx context.Context, hyper map[string]any, m tensor.Model, test *dataset.Dataset) (float64, error) {
	r, err := builtin.Evaluate(ctx, builtin.ModelMLP, hyper, m, test)
	if err != nil {
		return 0, err
	}
	return r.Metrics["accuracy"], nil
}

// fashionCentral trains the model on all the training images the envoys
// share (the same 80%, in one process), one train task per step, and
// scores each step's model on the test images.
func fashionCentral(hyperYAML string, steps int, test *dataset.Dataset) ([]fashionPoint, error) {
	hyper, err := parseHyper(hyperYAML)
	if err != nil {
		return nil, err
	}
	d, err := dataset.Load(dataset.Config{Kind: dataset.KindIDX, Path: fashionDir, Seed: 1})
	if err != nil {
		return nil, err
	}
	ctx := context.Background()
	r, err := builtin.New(builtin.Config{Model: builtin.ModelMLP, Hyperparameters: hyper, Data: d})
	if err != nil {
		return nil, err
	}
	m, err := builtin.InitialModel(builtin.ModelMLP, hyper, d.SampleShape, d.Classes)
	if err != nil {
		return nil, err
	}
	fmt.Printf("centralised: %d training images, %s\n", d.Train.N, hyperYAML)
	start := time.Now()
	acc, err := fashionAccuracy(ctx, hyper, m, test)
	if err != nil {
		return nil, err
	}
	points := []fashionPoint{{Round: 0, Accuracy: acc}}
	for step := 1; step <= steps; step++ {
		tr, err := r.Train(ctx, runner.Task{Name: runner.TaskTrain, Round: step}, m)
		if err != nil {
			return nil, err
		}
		m = tr.Model
		at := time.Since(start).Seconds()
		if acc, err = fashionAccuracy(ctx, hyper, m, test); err != nil {
			return nil, err
		}
		points = append(points, fashionPoint{Round: step, Seconds: at, Accuracy: acc})
		fmt.Printf("centralised: step %d: test accuracy %.4f, %.1fs\n", step, acc, at)
	}
	return points, nil
}

// reportFashion writes the section of `fxbench fashion` (fashion.json):
// per sharding, each algorithm's test accuracy per round against issue
// 21's goal, the centralised baseline, and the DP curve beside the
// non-private one.
func reportFashion(p func(string, ...any), dir string) {
	p("## Federated Fashion-MNIST: learning quality per algorithm\n\n")
	var r fashionResult
	if b, err := os.ReadFile(filepath.Join(dir, "fashion.json")); err != nil || json.Unmarshal(b, &r) != nil || len(r.Curves) == 0 {
		p("Not measured (no fashion.json of this benchmark).\n\n")
		return
	}
	p("`fxbench fashion`: for each sharding and algorithm, a federation of its own — a director and %d envoys as separate `fx` processes over mTLS on 127.0.0.1 — runs the built-in MLP; ", r.Envoys)
	p("every round's global model is then downloaded as a researcher would (`fx experiment model --round`) and scored on the held-out test set. Data: %s. ", r.Data)
	p("Goals (issue 21): IID ≥ 0.88 within 15 rounds; Dirichlet α = 0.5 label skew ≥ 0.87 within 20 rounds with the best algorithm. ")
	p("Started %s; load average (1, 5, 15 min) %s → %s. The curves: [fashion.png](fashion.png).\n\n", r.Start.Format("2006-01-02 15:04 MST"), loadAverage(r.Uptime), loadAverage(r.UptimeEnd))
	for _, u := range r.Updates {
		p("Re-run later with `-update`, started %s (load average %s → %s): %s.\n\n", u.Start.Format("2006-01-02 15:04 MST"), loadAverage(u.Uptime), loadAverage(u.UptimeEnd), strings.Join(u.Curves, ", "))
	}
	p("![test accuracy per round](fashion.png)\n\n")
	p("| sharding | algorithm | best test accuracy (round) | goal | first round at the goal | wall time (s) | test accuracy per round (1, 2, …) |\n|---|---|---|---|---|---|---|\n")
	if len(r.Central) > 1 {
		last := r.Central[len(r.Central)-1]
		c := fashionCurve{Goal: 0.88, Points: r.Central}
		fashionScore(&c)
		p("| centralised (baseline) | one process, all %d shards' training images, one train task per step | %.4f (%d) | — | %s | %.1f | %s |\n", r.Envoys, c.Best, c.BestRound, roundOrNone(c.Reached, 0.88), last.Seconds, accuracies(r.Central))
	}
	for _, c := range r.Curves {
		name := c.Algorithm
		if c.DP != nil {
			name += fmt.Sprintf(" + DP (σ %.2f, C %v: ε %.2f at δ %v)", c.DP.NoiseMultiplier, c.DP.ClipNorm, c.DP.Epsilon, c.DP.Delta)
		}
		if c.Skipped != "" {
			p("| %s | %s | skipped: %s | | | | |\n", c.Sharding, name, strings.ReplaceAll(strings.Join(strings.Fields(c.Skipped), " "), "|", "/"))
			continue
		}
		met := "not met"
		if c.Reached > 0 {
			met = "**met**"
		}
		p("| %s | %s | %.4f (%d) | ≥ %.2f: %s | %s | %.1f | %s |\n", c.Sharding, name, c.Best, c.BestRound, c.Goal, met, roundOrNone(c.Reached, c.Goal), c.Points[len(c.Points)-1].Seconds, accuracies(c.Points))
	}
	p("\nWhat each plan adds to `rounds`, `participants: {min: %d}`, `stragglers` and `retention: {every: 1}`:\n\n", r.Envoys)
	seen := map[string]bool{}
	for _, c := range r.Curves {
		key := c.Algorithm
		if c.DP != nil {
			key += " + DP"
		}
		if seen[key] || c.Plan == "" {
			continue
		}
		seen[key] = true
		p("- %s: `%s`", key, strings.ReplaceAll(c.Plan, "\n", "`, `"))
		if c.DP != nil {
			p("; every envoy: `%s`; the ledgers recorded ε %s over %v rounds", c.DP.Budget, fmtFloats(c.DP.Spent, "%.3f"), c.DP.Charged)
			for _, plain := range r.Curves {
				if plain.DP == nil && plain.Skipped == "" && plain.Sharding == c.Sharding && plain.Algorithm == c.Algorithm && len(plain.Points) > 1 {
					p("; the non-private run's global update (the mean of the sites') had L2 norm %.2f in round 1 and %.2f in round %d, against C = %v",
						plain.Points[1].Step, plain.Points[len(plain.Points)-1].Step, len(plain.Points)-1, c.DP.ClipNorm)
				}
			}
		}
		p("\n")
	}
	if r.CentralHyper != "" {
		p("- centralised: the same MLP, `%s`\n", r.CentralHyper)
	}
	p("\n")
}

// accuracies lists a curve's test accuracies from round 1 on.
func accuracies(ps []fashionPoint) string {
	var s []string
	for _, x := range ps {
		if x.Round > 0 {
			s = append(s, fmt.Sprintf("%.4f", x.Accuracy))
		}
	}
	return strings.Join(s, ", ")
}

func roundOrNone(round int, goal float64) string {
	if round == 0 {
		return fmt.Sprintf("none (%.2f not reached)", goal)
	}
	return fmt.Sprintf("%d", round)
}

func fmtFloats(v []float64, format string) string {
	s := make([]string, len(v))
	for i, x := range v {
		s[i] = fmt.Sprintf(format, x)
	}
	return strings.Join(s, ", ")
}
