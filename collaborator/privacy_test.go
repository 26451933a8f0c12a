package collaborator

import (
	"context"
	"errors"
	"fmt"
	"math"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/mock/gomock"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/fx-fl/fx/privacy"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner"
	"github.com/fx-fl/fx/tensor"
)

// dpModel is a model of finite F32 values (testModel's bytes are not all
// finite floats, and an update must be to be clipped), 3000 elements.
func dpModel() tensor.Model {
	var m tensor.Model
	for i, name := range []string{"w1", "b1", "w2"} {
		v := make([]float32, 1000)
		for j := range v {
			v[j] = float32(i) + float32(j)/1000
		}
		m = append(m, tensor.FromFloat32(name, []int64{1000}, v))
	}
	return m
}

// dpTrainer trains by adding the update elements[k] = step·(k%7 − 3) to
// the model's values in order, so its norm is far above a clip norm of 1.
func dpTrainer(step float32, samples int64) func(context.Context, runner.Task, tensor.Model) (runner.Result, error) {
	return func(_ context.Context, _ runner.Task, m tensor.Model) (runner.Result, error) {
		out := m.Clone()
		k := 0
		for i, x := range out {
			v := x.Float32s()
			for j := range v {
				v[j] += step * float32(k%7-3)
				k++
			}
			out[i] = tensor.FromFloat32(x.Name, x.Shape, v)
		}
		return runner.Result{Model: out, Samples: samples, Metrics: map[string]float64{"loss": 0.25}}, nil
	}
}

// flat is a model's values in order, as float64s.
func flat(m tensor.Model) []float64 {
	var out []float64
	for _, x := range m {
		for _, v := range x.Float32s() {
			out = append(out, float64(v))
		}
	}
	return out
}

// inOrder is m's tensors in the order of like's (a decoded upload comes
// in the encoder's order).
func inOrder(m, like tensor.Model) tensor.Model {
	idx := m.Index()
	out := make(tensor.Model, len(like))
	for i, x := range like {
		out[i] = idx[x.Name]
	}
	return out
}

// budget3 is the budget: ε = 3 at δ = 1e-5.
var budget3 = privacy.Budget{Epsilon: 3, Delta: 1e-5}

func openTestLedger(t *testing.T, dir string) *privacy.Ledger {
	t.Helper()
	l, err := privacy.Open(filepath.Join(dir, "privacy.json"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

// rewriter is a runner that keeps copies of what it trained, as the exec
// runner's persistent process does: it records what it is told was
// rewritten.
type rewriter struct {
	runner.Runner
	told *[]tensor.Model
}

func (r rewriter) Rewritten(m tensor.Model) { *r.told = append(*r.told, m) }

func withPrivacy(p *Privacy) func(*Config) { return func(c *Config) { c.Privacy = p } }

// TestDPUploadsTheClippedAndNoisedUpdateNotTheTrainedOne: with privacy on,
// the round is charged to the ledger and what leaves the site is
// global + Δ·C/‖Δ‖ + noise of standard deviation σC: not the trained
// model, clipped to C, and noised. The train metrics stay at the site, the
// sample count goes, and the local validation scores the released model.
func TestDPUploadsTheClippedAndNoisedUpdateNotTheTrainedOne(t *testing.T) {
	// Little noise, so that the clipping shows beside it; a budget to match.
	const clip, sigma = 1.0, 0.05
	ledger := openTestLedger(t, t.TempDir())
	lax := privacy.Budget{Epsilon: 1000, Delta: 1e-5}
	var rewritten []tensor.Model
	r := newRig(t, withPrivacy(&Privacy{Noise: sigma, Clip: clip, Delta: 1e-5, Ledger: ledger, Dataset: "site-1", Budget: lax, Name: "alice/dp"}),
		func(c *Config) { c.Runner = rewriter{Runner: c.Runner, told: &rewritten} })
	global := dpModel()
	r.expectTasks(runTasks(1, runner.TaskTrain, runner.TaskLocalValidation), quit("finished"))
	r.serveModel(global)
	r.acceptUploads(accept)
	var validated tensor.Model
	gomock.InOrder(
		r.runner.EXPECT().Train(gomock.Any(), gomock.Any(), gomock.Any()).DoAndReturn(dpTrainer(0.1, 42)),
		r.runner.EXPECT().Validate(gomock.Any(), runner.Task{Name: runner.TaskLocalValidation, Round: 1}, gomock.Any()).DoAndReturn(
			func(_ context.Context, _ runner.Task, m tensor.Model) (runner.Result, error) {
				validated = m.Clone()
				return validation(0.5), nil
			}),
	)
	if err := r.run(context.Background()); !isQuit(err, "finished") {
		t.Fatalf("Run = %v, want QUIT finished", err)
	}

	up := r.uploadOf(runner.TaskTrain)
	if h := up.header; h.GetSampleCount() != 42 || len(h.GetMetrics()) != 0 {
		t.Errorf("train header %v: want 42 samples and no metrics (they were computed on the raw training)", h)
	}
	sent := decodeFrames(t, up.frames)
	raw, _ := dpTrainer(0.1, 42)(context.Background(), runner.Task{}, global)
	if tensor.Digest(sent) == tensor.Digest(raw.Model) {
		t.Fatal("the raw trained model left the site")
	}
	if tensor.Digest(validated) != tensor.Digest(sent) {
		t.Error("the local validation did not score the released model")
	}
	if len(rewritten) != 1 || tensor.Digest(rewritten[0]) != tensor.Digest(sent) {
		t.Errorf("the runner was told of %d rewritten models, want the released one: a copy it keeps of the raw trained weights would reach the local validation", len(rewritten))
	}

	// residual = sent − (global + Δ·C/‖Δ‖) is the noise alone: its
	// standard deviation is σC. An unclipped update would leave residuals
	// of the order of Δ's elements (0.1 to 0.3); no noise, none at all.
	g, d := flat(global), flat(raw.Model)
	var norm float64
	for i := range d {
		d[i] -= g[i]
		norm += d[i] * d[i]
	}
	norm = math.Sqrt(norm)
	if norm < 10*clip {
		t.Fatalf("the test's update has norm %v: it must be far above the clip norm", norm)
	}
	var sum, sumSq float64
	s := flat(inOrder(sent, global))
	for i := range s {
		res := s[i] - (g[i] + d[i]*clip/norm)
		sum += res
		sumSq += res * res
	}
	n := float64(len(s))
	std := math.Sqrt(sumSq/n - (sum/n)*(sum/n))
	if want := sigma * clip; math.Abs(std-want) > 0.1*want || math.Abs(sum/n) > 0.1*want {
		t.Errorf("the noise has mean %.4g and standard deviation %.4g, want 0 and σC = %v", sum/n, std, want)
	}

	entries, err := ledger.Entries("site-1")
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 || entries[0].Experiment != "exp" || entries[0].Name != "alice/dp" || entries[0].Round != 1 || entries[0].Noise != sigma || entries[0].Clip != clip {
		t.Errorf("ledger entries %+v, want round 1 of exp at σ %v", entries, sigma)
	}
}

// TestDPARoundTheBudgetRefusesUploadsNothing: a round the budget cannot
// afford ends the collaborator's part with the ledger's reason, charges
// nothing, sends nothing of the training, and stops the training, which
// the charge runs beside.
func TestDPARoundTheBudgetRefusesUploadsNothing(t *testing.T) {
	ledger := openTestLedger(t, t.TempDir())
	// At σ = 1 a single round spends ε ≈ 4.75, above 3.
	r := newRig(t, withPrivacy(&Privacy{Noise: 1, Clip: 1, Ledger: ledger, Dataset: "site-1", Budget: budget3}))
	global := dpModel()
	r.expectTasks(runTasks(3, runner.TaskAggregatedValidation, runner.TaskTrain, runner.TaskLocalValidation))
	r.serveModel(global)
	r.acceptUploads(accept)
	r.runner.EXPECT().Validate(gomock.Any(), runner.Task{Name: runner.TaskAggregatedValidation, Round: 3}, gomock.Any()).Return(validation(0.5), nil)
	stopped := make(chan struct{})
	r.runner.EXPECT().Train(gomock.Any(), gomock.Any(), gomock.Any()).DoAndReturn(
		func(ctx context.Context, _ runner.Task, _ tensor.Model) (runner.Result, error) {
			<-ctx.Done() // a training that would run on: the refusal must stop it
			close(stopped)
			return runner.Result{}, ctx.Err()
		})
	err := r.run(context.Background())
	select {
	case <-stopped:
	default:
		t.Error("the training was not stopped")
	}
	var re *RoundError
	if !errors.As(err, &re) || re.Round != 3 || !errors.Is(err, privacy.ErrRefused) {
		t.Fatalf("Run = %v, want a round 3 error matching privacy.ErrRefused", err)
	}
	for _, want := range []string{"task train", "the trained update stays at this site", "would bring ε", "above this site's budget of 3"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("%q does not say %q", err, want)
		}
	}
	if got := r.uploaded(); slices.Contains(got, runner.TaskTrain) || slices.Contains(got, runner.TaskLocalValidation) {
		t.Errorf("uploaded %v after the refusal", got)
	}
	if entries, _ := ledger.Entries("site-1"); len(entries) != 0 {
		t.Errorf("a refused round was charged: %+v", entries)
	}
}

// charged waits until the ledger holds the round's charge; the bound only
// keeps a broken build from hanging.
func charged(ledger *privacy.Ledger, round int) error {
	for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		if ok, err := ledger.Charged("site-1", "exp", round); err != nil || ok {
			return err
		}
	}
	return fmt.Errorf("round %d was not charged before its training ended", round)
}

// TestDPChargeStartsWithTheRound: the round is charged while its first
// task runs, not after the training: the first task waits for the charge
// and would wait for good if it came later.
func TestDPChargeStartsWithTheRound(t *testing.T) {
	ledger := openTestLedger(t, t.TempDir())
	lax := privacy.Budget{Epsilon: 1000, Delta: 1e-5}
	r := newRig(t, withPrivacy(&Privacy{Noise: 1, Clip: 1, Delta: 1e-5, Ledger: ledger, Dataset: "site-1", Budget: lax}))
	r.expectTasks(runTasks(1, runner.TaskAggregatedValidation, runner.TaskTrain), quit("finished"))
	r.serveModel(dpModel())
	r.acceptUploads(accept)
	gomock.InOrder(
		r.runner.EXPECT().Validate(gomock.Any(), gomock.Any(), gomock.Any()).DoAndReturn(
			func(context.Context, runner.Task, tensor.Model) (runner.Result, error) {
				return validation(0.5), charged(ledger, 1)
			}),
		r.runner.EXPECT().Train(gomock.Any(), gomock.Any(), gomock.Any()).DoAndReturn(dpTrainer(0.1, 42)),
	)
	if err := r.run(context.Background()); !isQuit(err, "finished") {
		t.Fatalf("Run = %v, want QUIT finished", err)
	}
	if entries, _ := ledger.Entries("site-1"); len(entries) != 1 {
		t.Errorf("the ledger holds %d charges for one release, want 1", len(entries))
	}
}

// TestDPChargeRunsBesideTheTraining: without a charge started ahead, the
// train task charges while the runner trains, and an attempt whose
// training failed leaves a charge that the round's next attempt in the
// process uses rather than charging again.
func TestDPChargeRunsBesideTheTraining(t *testing.T) {
	ledger := openTestLedger(t, t.TempDir())
	lax := privacy.Budget{Epsilon: 1000, Delta: 1e-5}
	r := newRig(t, withPrivacy(&Privacy{Noise: 1, Clip: 1, Delta: 1e-5, Ledger: ledger, Dataset: "site-1", Budget: lax}))
	r.c.model, r.c.modelRound = dpModel(), 1
	gomock.InOrder(
		r.runner.EXPECT().Train(gomock.Any(), gomock.Any(), gomock.Any()).DoAndReturn(
			func(context.Context, runner.Task, tensor.Model) (runner.Result, error) {
				if err := charged(ledger, 1); err != nil {
					return runner.Result{}, err
				}
				return runner.Result{}, errors.New("out of memory")
			}),
		r.runner.EXPECT().Train(gomock.Any(), gomock.Any(), gomock.Any()).DoAndReturn(dpTrainer(0.1, 42)),
	)
	task := runner.Task{Name: runner.TaskTrain, Round: 1}
	if _, err := r.c.trainPrivately(context.Background(), task); err == nil || !strings.Contains(err.Error(), "out of memory") {
		t.Fatalf("first attempt: %v, want the training's error", err)
	}
	if _, err := r.c.trainPrivately(context.Background(), task); err != nil {
		t.Fatalf("second attempt: %v", err)
	}
	r.c.keeping.Wait()
	if entries, _ := ledger.Entries("site-1"); len(entries) != 1 {
		t.Errorf("the ledger holds %d charges for one release, want 1", len(entries))
	}
}

// TestDPReleaseIsChargedOnceAndReplayedAfterARestart: the noised update is
// charged once whether it is sent again to an aggregator that hands the
// round out again, or by a collaborator restarted before its upload went
// through — which sends the bytes it had released, without training or
// charging again.
func TestDPReleaseIsChargedOnceAndReplayedAfterARestart(t *testing.T) {
	ledger := openTestLedger(t, t.TempDir())
	p := &Privacy{Noise: 5, Clip: 1, Ledger: ledger, Dataset: "site-1", Budget: budget3}
	global := dpModel()

	// The round handed out twice: trained, charged and noised once.
	first := newRig(t, withPrivacy(p))
	first.expectTasks(runTasks(1, runner.TaskTrain), runTasks(1, runner.TaskTrain), runTasks(2, runner.TaskTrain))
	first.serveModel(global)
	// Round 2's upload is refused for good: the run ends with round 2
	// released and charged but not sent.
	first.acceptUploads(func(h *fxv1.ResultHeader) error {
		if h.GetRound() == 2 {
			return status.Error(codes.PermissionDenied, "certificate revoked")
		}
		return nil
	})
	first.runner.EXPECT().Train(gomock.Any(), gomock.Any(), gomock.Any()).DoAndReturn(dpTrainer(0.1, 7)).Times(2)
	if err := first.run(context.Background()); err == nil || !strings.Contains(err.Error(), "certificate revoked") {
		t.Fatalf("the first run ended with %v, want the refused upload", err)
	}
	first.mu.Lock()
	one, again, two := decodeFrames(t, first.uploads[0].frames), decodeFrames(t, first.uploads[1].frames), decodeFrames(t, first.uploads[2].frames)
	first.mu.Unlock()
	if tensor.Digest(one) != tensor.Digest(again) {
		t.Error("the round handed out again was sent with other bytes")
	}
	charged := func() []int {
		entries, err := ledger.Entries("site-1")
		if err != nil {
			t.Fatal(err)
		}
		var rounds []int
		for _, e := range entries {
			rounds = append(rounds, e.Round)
		}
		return rounds
	}
	if got := charged(); !slices.Equal(got, []int{1, 2}) {
		t.Fatalf("charged rounds %v, want [1 2]", got)
	}

	// Restarted, it sends round 2's released bytes; its runner is not
	// asked to train.
	second := newRig(t, withPrivacy(p), func(c *Config) { c.WorkDir = first.cfg.WorkDir })
	second.expectTasks(runTasks(2, runner.TaskTrain), quit("finished"))
	second.serveModel(global)
	second.acceptUploads(accept)
	if err := second.run(context.Background()); !isQuit(err, "finished") {
		t.Fatalf("Run = %v", err)
	}
	up := second.uploadOf(runner.TaskTrain)
	if tensor.Digest(decodeFrames(t, up.frames)) != tensor.Digest(two) || up.header.GetSampleCount() != 7 {
		t.Errorf("after the restart it sent other bytes (or samples %d) than it had released", up.header.GetSampleCount())
	}
	if got := charged(); !slices.Equal(got, []int{1, 2}) {
		t.Errorf("charged rounds %v after the restart, want [1 2]", got)
	}

	// A ledger that does not hold the charge (restored from an older
	// backup) gets no uncharged bytes: the round is trained and charged.
	fresh := openTestLedger(t, t.TempDir())
	q := *p
	q.Ledger = fresh
	third := newRig(t, withPrivacy(&q), func(c *Config) { c.WorkDir = first.cfg.WorkDir })
	third.expectTasks(runTasks(2, runner.TaskTrain), quit("finished"))
	third.serveModel(global)
	third.acceptUploads(accept)
	third.runner.EXPECT().Train(gomock.Any(), gomock.Any(), gomock.Any()).DoAndReturn(dpTrainer(0.1, 7))
	if err := third.run(context.Background()); !isQuit(err, "finished") {
		t.Fatalf("Run = %v", err)
	}
	if entries, _ := fresh.Entries("site-1"); len(entries) != 1 || entries[0].Round != 2 {
		t.Errorf("the other ledger holds %+v, want round 2", entries)
	}
}
