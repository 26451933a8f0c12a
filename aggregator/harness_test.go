package aggregator_test

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"

	"github.com/fx-fl/fx/aggregator"
	"github.com/fx-fl/fx/collaborator"
	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/internal/testpki"
	"github.com/fx-fl/fx/pki"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner"
	"github.com/fx-fl/fx/tensor"
)

const experimentID = "exp-test"

// federation is an aggregator under test with its CA.
type federation struct {
	t       testing.TB
	ca      *testpki.CA
	server  *pki.Keyring
	dir     string
	plan    *experiment.Plan
	sink    *recordingSink
	addr    string
	agg     *aggregator.Aggregator
	cancel  context.CancelFunc
	done    chan error
	initial tensor.Model
	parts   []string
	// registered are the participants' registered sample counts; every
	// participant registered defaultRegistered unless a test changes it.
	registered map[string]aggregator.SampleCounts
	// grace is the aggregator's RejoinGrace; 0: the default.
	grace time.Duration
	// diskReserve and pauseRetry go to the aggregator's Config.
	diskReserve int64
	pauseRetry  time.Duration
	// serverOptions are added to the aggregator's (an interceptor that
	// counts calls, say).
	serverOptions []grpc.ServerOption
}

// defaultRegistered is what the tests' participants register: more samples
// than any of their results claims.
var defaultRegistered = aggregator.SampleCounts{Train: 1000, Valid: 1000}

func parsePlan(t *testing.T, yaml string) *experiment.Plan {
	t.Helper()
	p, err := experiment.ParsePlan([]byte(yaml))
	if err != nil {
		t.Fatalf("plan: %v", err)
	}
	return p
}

func initialModel() tensor.Model {
	return tensor.Model{
		tensor.FromFloat32("fc.weight", []int64{2, 3}, []float32{1, 2, 3, 4, 5, 6}),
		tensor.FromFloat32("fc.bias", []int64{2}, []float32{0, 0}),
	}
}

func newFederation(t testing.TB, plan *experiment.Plan, parts ...string) *federation {
	t.Helper()
	ca := testpki.New(t)
	f := &federation{
		t: t, ca: ca, server: ca.Keyring(pki.RoleDirector, "director"),
		dir: filepath.Join(t.TempDir(), "aggregator"), plan: plan,
		sink: newSink(), initial: initialModel(), parts: parts,
		registered: map[string]aggregator.SampleCounts{},
	}
	for _, name := range parts {
		f.registered[name] = defaultRegistered
	}
	return f
}

// start runs an aggregator on the federation's directory.
func (f *federation) start() {
	f.t.Helper()
	addr := "127.0.0.1:0"
	if f.addr != "" {
		addr = f.addr // a restart serves where the collaborators look
	}
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		f.t.Fatal(err)
	}
	agg, err := aggregator.New(aggregator.Config{
		ExperimentID:  experimentID,
		Plan:          f.plan,
		Participants:  f.parts,
		Registered:    f.registered,
		InitialModel:  f.initial,
		Dir:           f.dir,
		Listener:      lis,
		ServerOptions: append(testpki.ServerOptions(f.server, fxv1.AggregatorRoles()), f.serverOptions...),
		Sink:          f.sink,
		Logger:        testLogger(f.t, "aggregator"),
		PollWindow:    2 * time.Second,
		DiskReserve:   f.diskReserve,
		PauseRetry:    f.pauseRetry,
		RejoinGrace:   f.grace,
	})
	if err != nil {
		f.t.Fatalf("aggregator.New: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	f.agg, f.addr, f.cancel, f.done = agg, lis.Addr().String(), cancel, done
	go func() { done <- agg.Run(ctx) }()
	f.t.Cleanup(func() {
		cancel()
		err := <-done
		done <- err
	})
}

// stop cancels the aggregator and waits for it.
func (f *federation) stop() error {
	f.cancel()
	err := <-f.done
	f.done <- err // for Cleanup
	return err
}

// wait returns Run's result, failing the test after timeout.
func (f *federation) wait(timeout time.Duration) error {
	f.t.Helper()
	select {
	case err := <-f.done:
		f.done <- err
		return err
	case <-time.After(timeout):
		f.t.Fatalf("aggregator did not finish within %s", timeout)
		return nil
	}
}

// collab runs a collaborator for the named envoy; its result arrives on the
// returned channel.
func (f *federation) collab(ctx context.Context, name string, r runner.Runner, workDir string) <-chan error {
	f.t.Helper()
	k := f.ca.Keyring(pki.RoleEnvoy, name)
	c, err := collaborator.New(collaborator.Config{
		ExperimentID: experimentID,
		Name:         name,
		Address:      f.addr,
		DialOptions:  testpki.DialOptions(k, "localhost"),
		Runner:       r,
		WorkDir:      workDir,
		Logger:       testLogger(f.t, name),
	})
	if err != nil {
		f.t.Fatalf("collaborator.New: %v", err)
	}
	out := make(chan error, 1)
	go func() { out <- c.Run(ctx) }()
	return out
}

// runToEnd runs one collaborator per participant, each with its runner,
// until the experiment ends, and checks that every one was told to quit.
func (f *federation) runToEnd(ctx context.Context, runners []*stepRunner) {
	f.t.Helper()
	var results []<-chan error
	for i, name := range f.parts {
		results = append(results, f.collab(ctx, name, runners[i], f.t.TempDir()))
	}
	if err := f.wait(30 * time.Second); err != nil {
		f.t.Fatalf("Run: %v", err)
	}
	for i, res := range results {
		if err := <-res; !finished(err) {
			f.t.Errorf("collaborator %s: %v, want quit", f.parts[i], err)
		}
	}
}

// finished reports whether a collaborator's Run ended normally.
func finished(err error) bool {
	var q *collaborator.Quit
	return errors.As(err, &q)
}

// stepRunner is a deterministic runner: train adds Step to every weight and
// reports Samples samples; validation reports accuracy = Accuracy(round).
type stepRunner struct {
	Step     float32
	Samples  int64
	Accuracy func(round int) float64
	// block, when set, makes train wait until the context ends.
	block bool
	mu    sync.Mutex
	calls []runner.Task
}

func (s *stepRunner) Train(ctx context.Context, task runner.Task, m tensor.Model) (runner.Result, error) {
	s.record(task)
	if s.block {
		<-ctx.Done()
		return runner.Result{}, ctx.Err()
	}
	out := m.Clone()
	for _, t := range out {
		for i := range t.Float32s() {
			t.Float32s()[i] += s.Step
		}
	}
	return runner.Result{Model: out, Samples: s.Samples, Metrics: map[string]float64{"loss": 1 / float64(task.Round)}}, nil
}

func (s *stepRunner) Validate(_ context.Context, task runner.Task, _ tensor.Model) (runner.Result, error) {
	s.record(task)
	acc := 0.5
	if s.Accuracy != nil {
		acc = s.Accuracy(task.Round)
	}
	return runner.Result{Samples: s.Samples, Metrics: map[string]float64{"accuracy": acc}}, nil
}

func (s *stepRunner) record(t runner.Task) {
	s.mu.Lock()
	s.calls = append(s.calls, t)
	s.mu.Unlock()
}

func (s *stepRunner) tasks() []runner.Task {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]runner.Task(nil), s.calls...)
}

// recordingSink keeps what the aggregator reports.
type recordingSink struct {
	mu       sync.Mutex
	rounds   []aggregator.RoundSummary
	best     *aggregator.Best
	progress []aggregator.Progress
	// pauses are the reasons Paused gave, "" for each Resumed.
	pauses  []string
	changed chan struct{}
	// onRound, if set, is called at every completed round.
	onRound func()
}

func newSink() *recordingSink { return &recordingSink{changed: make(chan struct{}, 1000)} }

func (s *recordingSink) RoundCompleted(r aggregator.RoundSummary, best *aggregator.Best) {
	s.mu.Lock()
	s.rounds = append(s.rounds, r)
	s.best = best
	s.mu.Unlock()
	if s.onRound != nil {
		s.onRound()
	}
	select {
	case s.changed <- struct{}{}:
	default:
	}
}

func (s *recordingSink) Progress(p aggregator.Progress) {
	s.mu.Lock()
	s.progress = append(s.progress, p)
	s.mu.Unlock()
}

func (s *recordingSink) Paused(reason string) {
	s.mu.Lock()
	s.pauses = append(s.pauses, reason)
	s.mu.Unlock()
	select {
	case s.changed <- struct{}{}:
	default:
	}
}

func (s *recordingSink) Resumed() { s.Paused("") }

func (s *recordingSink) pauseLog() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.pauses...)
}

func (s *recordingSink) summaries() []aggregator.RoundSummary {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]aggregator.RoundSummary(nil), s.rounds...)
}

// waitRounds waits until n rounds have completed.
func (s *recordingSink) waitRounds(t *testing.T, n int, timeout time.Duration) {
	t.Helper()
	deadline := time.After(timeout)
	for {
		if len(s.summaries()) >= n {
			return
		}
		select {
		case <-s.changed:
		case <-deadline:
			t.Fatalf("only %d of %d rounds completed within %s", len(s.summaries()), n, timeout)
		}
	}
}

// testLogger shows warnings and errors on stderr; goroutines may outlive a
// test by a moment, so it does not write through t.Log.
func testLogger(_ testing.TB, name string) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{Name: name, Level: hclog.Warn, Output: os.Stderr})
}

// model reads a kept model.
func readModel(t *testing.T, dir string, round int) tensor.Model {
	t.Helper()
	m, _, err := tensor.ReadFile(aggregator.ModelPath(dir, round))
	if err != nil {
		t.Fatalf("model of round %d: %v", round, err)
	}
	return m
}

func values(m tensor.Model, name string) []float32 {
	return append([]float32(nil), m.Get(name).Float32s()...)
}

func equalFloats(a, b []float32) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

type (
	runnerTask   = runner.Task
	runnerResult = runner.Result
	modelT       = tensor.Model
)
