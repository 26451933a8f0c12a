package aggregator_test

import (
	"context"
	"errors"
	"math"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/fx-fl/fx/aggregator"
	"github.com/fx-fl/fx/collaborator"
	"github.com/fx-fl/fx/internal/testpki"
	"github.com/fx-fl/fx/pki"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner"
)

// deltaTensors is an asynchronous train upload by hand: the update d on
// every element of the test model (initialModel).
func deltaTensors(d float32) []rawTensor {
	return []rawTensor{
		{"fc.weight", fxv1.DType_DTYPE_F32, []int64{2, 3}, []float32{d, d, d, d, d, d}},
		{"fc.bias", fxv1.DType_DTYPE_F32, []int64{2}, []float32{d, d}},
	}
}

// pushDelta uploads the update d as name's train result trained from
// base's model, with samples samples.
func pushDelta(ctx context.Context, conn *grpc.ClientConn, name string, base int32, samples int64, d float32) error {
	return send(ctx, conn, upload{experiment: experimentID, collaborator: name, round: base, task: runner.TaskTrain, samples: samples, tensors: deltaTensors(d)})
}

// shifted is the test model with every element moved by d.
func shifted(d float32) (w, b []float32) {
	w = []float32{1, 2, 3, 4, 5, 6}
	for i := range w {
		w[i] += d
	}
	return w, []float32{d, d}
}

func checkModel(t *testing.T, dir string, round int, d float32) {
	t.Helper()
	m := readModel(t, dir, round)
	w, b := shifted(d)
	if got := values(m, "fc.weight"); !equalFloats(got, w) {
		t.Errorf("step %d: fc.weight %v, want %v", round, got, w)
	}
	if got := values(m, "fc.bias"); !equalFloats(got, b) {
		t.Errorf("step %d: fc.bias %v, want %v", round, got, b)
	}
}

// waitStep waits until the aggregator's current round is step (by asking
// for tasks as an envoy that has no update in it).
func waitStep(t *testing.T, ctx context.Context, conn *grpc.ClientConn, name string, step int32) {
	t.Helper()
	for {
		resp, err := fxv1.NewAggregatorClient(conn).GetTasks(ctx, &fxv1.GetTasksRequest{ExperimentId: experimentID, Collaborator: name})
		if err != nil {
			t.Fatalf("GetTasks: %v", err)
		}
		if resp.GetAction() == fxv1.GetTasksResponse_RUN && resp.GetRound() >= step {
			if resp.GetRound() != step {
				t.Fatalf("the aggregator is at step %d, want %d", resp.GetRound(), step)
			}
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("step %d did not start", step)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

const fedbuffPlan = `
name: fedbuff
rounds: 3
participants: {min: 3}
runner: {kind: builtin, model: mlp}
tasks: [train, locally_tuned_model_validation]
aggregation: {mode: async, buffer: 2, lr: 0.5, staleness: {exponent: 1, max: 1}}
best_model: {task: locally_tuned_model_validation}
`

// TestFedBuffHandComputed drives three sites' uploads by hand through an
// asynchronous experiment (K = 2, η_g = 0.5, f(s) = 1/(1+s), at most 1
// step stale), weighted by samples, from x0 = initialModel:
//
//	step 1: a Δ=1 (100 samples), b Δ=2 (300): closes at K = 2 without c;
//	        mean (100·1 + 300·2)/400 = 1.75, x1 = x0 + 0.5·1.75 = x0 + 0.875
//	step 2: a Δ=−1 fresh (100), then c Δ=4 from step 1 (200, s = 1, so
//	        weight 100); mean (−100 + 400)/200 = 1.5, x2 = x1 + 0.75 = x0 + 1.625
//	step 3: c from step 1 is refused (s = 2 > max 1); b Δ=2 from step 2
//	        (300, weight 150), c Δ=−2 fresh (50): mean (300 − 100)/200 = 1,
//	        x3 = x2 + 0.5 = x0 + 2.125
//
// Between them: a site whose update is in the current step gets no tasks
// and a second update of it is refused; results name their staleness.
func TestFedBuffHandComputed(t *testing.T) {
	f := newFederation(t, parsePlan(t, fedbuffPlan), "a", "b", "c")
	f.start()
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	a, b, c := dial(t, f, pki.RoleEnvoy, "a"), dial(t, f, pki.RoleEnvoy, "b"), dial(t, f, pki.RoleEnvoy, "c")
	ok := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}

	waitStep(t, ctx, a, "a", 1)
	ok(pushDelta(ctx, a, "a", 1, 100, 1))
	ok(pushDelta(ctx, b, "b", 1, 300, 2))
	waitStep(t, ctx, c, "c", 2)

	ok(pushDelta(ctx, a, "a", 2, 100, -1))
	// a's update is in step 2: it gets no tasks (the poll window passes
	// with WAIT), and another update of it is refused.
	resp, err := fxv1.NewAggregatorClient(a).GetTasks(ctx, &fxv1.GetTasksRequest{ExperimentId: experimentID, Collaborator: "a"})
	if err != nil || resp.GetAction() != fxv1.GetTasksResponse_WAIT {
		t.Fatalf("a, whose update is in the step, was answered %v (%v), want WAIT", resp, err)
	}
	if err := pushDelta(ctx, a, "a", 2, 100, 7); status.Code(err) != codes.AlreadyExists {
		t.Fatalf("a second update of a in step 2: %v, want AlreadyExists", err)
	}
	ok(pushDelta(ctx, c, "c", 1, 200, 4))
	waitStep(t, ctx, b, "b", 3)

	err = pushDelta(ctx, c, "c", 1, 200, 9)
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "staleness.max is 1") {
		t.Fatalf("an update 2 steps behind: %v, want FailedPrecondition naming staleness.max", err)
	}
	if err := pushDelta(ctx, c, "c", 4, 200, 9); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("an update from a step not started: %v, want FailedPrecondition", err)
	}
	ok(pushDelta(ctx, b, "b", 2, 300, 2))
	ok(pushDelta(ctx, c, "c", 3, 50, -2))
	if err := f.wait(30 * time.Second); err != nil {
		t.Fatalf("Run: %v", err)
	}

	checkModel(t, f.dir, 1, 0.875)
	checkModel(t, f.dir, 2, 1.625)
	checkModel(t, f.dir, 3, 2.125)
	rounds := f.sink.summaries()
	if len(rounds) != 3 {
		t.Fatalf("%d steps completed, want 3", len(rounds))
	}
	stale := func(s aggregator.RoundSummary) map[string]int {
		out := map[string]int{}
		for _, r := range s.Results {
			out[r.Collaborator] = r.Staleness
		}
		return out
	}
	for i, want := range []map[string]int{{"a": 0, "b": 0}, {"a": 0, "c": 1}, {"b": 1, "c": 0}} {
		if got := stale(rounds[i]); len(got) != len(want) || got["a"] != want["a"] || got["b"] != want["b"] || got["c"] != want["c"] {
			t.Errorf("step %d: results' staleness %v, want %v", i+1, got, want)
		}
	}
	if r := rounds[0].Reported; len(r) != 2 || r[0] != "a" || r[1] != "b" {
		t.Errorf("step 1 closed at K = 2 with the updates of %v, want [a b]", r)
	}
}

// TestFedBuffResumesFromLastStep: an aggregator stopped with one update in
// step 2's buffer resumes at step 2 from step 1's model; the buffered
// update is lost, so its site is handed step 2 again, and the step closes
// with the updates that arrive after the restart:
//
//	step 1: a Δ=1 (100), b Δ=2 (300): x1 = x0 + 0.875 (as above)
//	step 2: a Δ=10 is buffered, then lost; after the restart b Δ=2
//	        fresh (300), c Δ=4 from step 1 (200, weight 100):
//	        mean (600 + 400)/400 = 2.5, x2 = x1 + 1.25 = x0 + 2.125
func TestFedBuffResumesFromLastStep(t *testing.T) {
	plan := strings.Replace(fedbuffPlan, "rounds: 3", "rounds: 2", 1)
	f := newFederation(t, parsePlan(t, plan), "a", "b", "c")
	f.start()
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	a, b, c := dial(t, f, pki.RoleEnvoy, "a"), dial(t, f, pki.RoleEnvoy, "b"), dial(t, f, pki.RoleEnvoy, "c")
	if err := pushDelta(ctx, a, "a", 1, 100, 1); err != nil {
		t.Fatal(err)
	}
	if err := pushDelta(ctx, b, "b", 1, 300, 2); err != nil {
		t.Fatal(err)
	}
	f.sink.waitRounds(t, 1, 30*time.Second)
	if err := pushDelta(ctx, a, "a", 2, 100, 10); err != nil {
		t.Fatal(err)
	}
	if err := f.stop(); err == nil {
		t.Fatal("a cancelled aggregator returned nil")
	}

	f.start()
	waitStep(t, ctx, a, "a", 2) // a's buffered update was lost: it gets step 2's tasks again
	if err := pushDelta(ctx, b, "b", 2, 300, 2); err != nil {
		t.Fatal(err)
	}
	if err := pushDelta(ctx, c, "c", 1, 200, 4); err != nil {
		t.Fatal(err)
	}
	if err := f.wait(30 * time.Second); err != nil {
		t.Fatalf("Run: %v", err)
	}
	checkModel(t, f.dir, 1, 0.875)
	checkModel(t, f.dir, 2, 2.125)
}

// asyncCollab runs a collaborator of an asynchronous experiment.
func (f *federation) asyncCollab(ctx context.Context, name string, r runner.Runner, workDir string) <-chan error {
	f.t.Helper()
	c, err := collaborator.New(collaborator.Config{
		ExperimentID: experimentID, Name: name, Address: f.addr,
		DialOptions: testpki.DialOptions(f.ca.Keyring(pki.RoleEnvoy, name), "localhost"),
		Runner:      r, WorkDir: workDir, Logger: testLogger(f.t, name), Async: true,
	})
	if err != nil {
		f.t.Fatalf("collaborator.New: %v", err)
	}
	out := make(chan error, 1)
	go func() { out <- c.Run(ctx) }()
	return out
}

// TestFedBuffWithEverySiteIsFedAvg: with K = every participant, η_g = 1
// and so no stale update, real collaborators uploading their updates give
// the same models, step by step, as synchronous FedAvg of their trained
// models.
func TestFedBuffWithEverySiteIsFedAvg(t *testing.T) {
	const plan = `
name: same
rounds: 3
participants: {min: 3}
runner: {kind: builtin, model: mlp}
`
	run := func(yaml string, async bool) *federation {
		f := newFederation(t, parsePlan(t, yaml), "a", "b", "c")
		f.start()
		var results []<-chan error
		for i, name := range f.parts {
			r := &stepRunner{Step: float32(i*i) - 0.75, Samples: int64(10 * (i + 1))}
			if async {
				results = append(results, f.asyncCollab(t.Context(), name, r, t.TempDir()))
			} else {
				results = append(results, f.collab(t.Context(), name, r, t.TempDir()))
			}
		}
		if err := f.wait(30 * time.Second); err != nil {
			t.Fatalf("Run: %v", err)
		}
		for i, res := range results {
			if err := <-res; !finished(err) {
				t.Errorf("collaborator %s: %v, want quit", f.parts[i], err)
			}
		}
		return f
	}
	sync := run(plan, false)
	async := run(plan+"aggregation: {mode: async, buffer: 3}\n", true)
	for round := 1; round <= 3; round++ {
		want, got := readModel(t, sync.dir, round), readModel(t, async.dir, round)
		for _, name := range []string{"fc.weight", "fc.bias"} {
			w, g := values(want, name), values(got, name)
			for i := range w {
				if math.Abs(float64(w[i]-g[i])) > 1e-5 {
					t.Fatalf("round %d %s: async %v, FedAvg %v", round, name, g, w)
				}
			}
		}
	}
}

// slowRunner's first train waits until release is closed, having sent
// the round it trains from on started; every train takes pace.
type slowRunner struct {
	stepRunner
	release chan struct{}
	started chan int
	pace    time.Duration
	once    sync.Once
}

func (s *slowRunner) Train(ctx context.Context, task runner.Task, m modelT) (runner.Result, error) {
	first := false
	s.once.Do(func() { first = true })
	if first && s.release != nil {
		s.started <- task.Round
		select {
		case <-s.release:
		case <-ctx.Done():
			return runner.Result{}, ctx.Err()
		}
	}
	select {
	case <-time.After(s.pace):
	case <-ctx.Done():
		return runner.Result{}, ctx.Err()
	}
	return s.stepRunner.Train(ctx, task, m)
}

// TestFedBuffSlowSiteTrainsAgain: real collaborators, K = 2 of 3, at most
// 1 step stale. The slow site's first update is held until the others
// have taken two steps without it; the aggregator refuses it as too stale,
// and the site, rather than failing, starts again from the newest model,
// and its next update counts. The fast sites never wait for it.
func TestFedBuffSlowSiteTrainsAgain(t *testing.T) {
	const plan = `
name: slow
rounds: 10
participants: {min: 3}
runner: {kind: builtin, model: mlp}
tasks: [aggregated_model_validation, train, locally_tuned_model_validation]
aggregation: {mode: async, buffer: 2, staleness: {max: 1}}
`
	f := newFederation(t, parsePlan(t, plan), "a", "b", "slow")
	f.start()
	// As the envoy does when the director says the experiment is over, a
	// site still training at the end is stopped.
	ctx, stop := context.WithCancel(t.Context())
	defer stop()
	slow := &slowRunner{stepRunner: stepRunner{Step: 5, Samples: 10}, release: make(chan struct{}), started: make(chan int, 1)}
	fast := func(step float32) *slowRunner {
		return &slowRunner{stepRunner: stepRunner{Step: step, Samples: 10}, pace: 100 * time.Millisecond}
	}
	results := []<-chan error{
		f.asyncCollab(ctx, "a", fast(1), t.TempDir()),
		f.asyncCollab(ctx, "b", fast(2), t.TempDir()),
		f.asyncCollab(ctx, "slow", slow, t.TempDir()),
	}
	base := <-slow.started
	f.sink.waitRounds(t, base+1, 60*time.Second) // the step after base is over too: 2 steps behind
	close(slow.release)
	if err := f.wait(60 * time.Second); err != nil {
		t.Fatalf("Run: %v", err)
	}
	stop()
	for i, res := range results {
		if err := <-res; !finished(err) && !errors.Is(err, context.Canceled) {
			t.Errorf("collaborator %d: %v, want quit", i, err)
		}
	}
	counted := 0
	for _, s := range f.sink.summaries() {
		for _, r := range s.Results {
			if r.Collaborator == "slow" && r.Task == runner.TaskTrain {
				counted++
				if s.Round <= base+1 || r.Staleness > 1 {
					t.Errorf("step %d counted the slow site's update %d steps stale: its first, from step %d, had to be refused", s.Round, r.Staleness, base)
				}
			}
		}
	}
	if counted == 0 {
		t.Error("the slow site's later update never counted: it did not start again from the newest model")
	}
	var trainedFrom []int
	for _, c := range slow.tasks() {
		if c.Name == runner.TaskTrain {
			trainedFrom = append(trainedFrom, c.Round)
		}
	}
	if len(trainedFrom) < 2 || trainedFrom[0] != base || trainedFrom[1] < base+2 {
		t.Errorf("the slow site trained from steps %v: want step %d, then the newest (≥ %d) after its refusal", trainedFrom, base, base+2)
	}
}
