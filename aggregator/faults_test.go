package aggregator_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/fx-fl/fx/aggregator"
	"github.com/fx-fl/fx/collaborator"
	"github.com/fx-fl/fx/internal/backoff"
	"github.com/fx-fl/fx/internal/testpki"
	"github.com/fx-fl/fx/pki"
	"github.com/fx-fl/fx/runner"
	"github.com/fx-fl/fx/tensor"
)

const shortDeadline = `
name: test
rounds: 3
participants: {min: 2}
runner: {kind: builtin, model: mlp}
stragglers: {deadline: 1500ms, min_reporting: 1}
`

// A collaborator that stops mid-round: the round closes at its deadline with
// the others; when it comes back it rejoins the round in progress.
func TestStragglerStopsAndRejoins(t *testing.T) {
	f := newFederation(t, parsePlan(t, shortDeadline), "alpha", "beta")
	f.start()
	ctx := t.Context()
	alpha := f.collab(ctx, "alpha", &stepRunner{Step: 1, Samples: 1}, t.TempDir())

	// beta blocks in its first train task, then is stopped.
	betaDir := t.TempDir()
	stuck := &stepRunner{Step: 3, Samples: 1, block: true}
	betaCtx, stopBeta := context.WithCancel(ctx)
	beta := f.collab(betaCtx, "beta", stuck, betaDir)
	f.sink.waitRounds(t, 1, 20*time.Second)
	stopBeta()
	<-beta

	r1 := f.sink.summaries()[0]
	if len(r1.Reported) != 1 || r1.Reported[0] != "alpha" || len(r1.Missing) != 1 || r1.Missing[0] != "beta" {
		t.Fatalf("round 1 reported %v, missing %v; want alpha alone, beta missing", r1.Reported, r1.Missing)
	}
	// Round 1 averaged alpha's update alone.
	if got := values(readModel(t, f.dir, 1), "fc.bias"); !equalFloats(got, []float32{1, 1}) {
		t.Fatalf("round 1 bias %v, want [1 1]", got)
	}

	// beta restarts with a working runner and the same work directory.
	beta = f.collab(ctx, "beta", &stepRunner{Step: 3, Samples: 1}, betaDir)
	if err := f.wait(30 * time.Second); err != nil {
		t.Fatalf("Run: %v", err)
	}
	if err := <-alpha; !finished(err) {
		t.Errorf("alpha: %v", err)
	}
	if err := <-beta; !finished(err) {
		t.Errorf("beta: %v", err)
	}
	// beta reported in a later training round.
	joined := false
	for _, s := range f.sink.summaries()[1:3] {
		for _, name := range s.Reported {
			joined = joined || name == "beta"
		}
	}
	if !joined {
		t.Fatalf("beta never reported after rejoining: %+v", f.sink.summaries())
	}
}

// An aggregator stopped mid-round and started again on its directory
// resumes from the next round, and the collaborators, which were never told
// to quit, reconnect and carry on to the end.
func TestAggregatorResumesFromCheckpoint(t *testing.T) {
	plan := parsePlan(t, threeRounds)
	f := newFederation(t, plan, "alpha", "beta")
	f.start()
	ctx := t.Context()
	gate := make(chan struct{})
	slowBeta := &gatedRunner{stepRunner: stepRunner{Step: 3, Samples: 1}, gate: gate, gateRound: 2}
	alpha := f.collab(ctx, "alpha", &stepRunner{Step: 1, Samples: 1}, t.TempDir())
	beta := f.collab(ctx, "beta", slowBeta, t.TempDir())
	f.sink.waitRounds(t, 1, 20*time.Second)
	// Round 2 cannot close while beta is held; stop the aggregator now.
	if err := f.stop(); err == nil {
		t.Fatal("a cancelled aggregator returned nil")
	}
	close(gate)

	f.sink = newSink()
	f.start()
	if err := f.wait(30 * time.Second); err != nil {
		t.Fatalf("resumed Run: %v", err)
	}
	for name, done := range map[string]<-chan error{"alpha": alpha, "beta": beta} {
		var q *collaborator.Quit
		if err := <-done; !errors.As(err, &q) || !strings.Contains(q.Reason, "finished") {
			t.Errorf("%s ended with %v; want the quit of a finished experiment", name, err)
		}
	}
	sums := f.sink.summaries()
	if len(sums) == 0 || sums[0].Round != 2 {
		t.Fatalf("resumed aggregator's first round is %+v, want round 2", sums)
	}
	// Three rounds of (1+3)/2 = 2 each.
	if got := values(readModel(t, f.dir, 3), "fc.bias"); !equalFloats(got, []float32{6, 6}) {
		t.Fatalf("final bias %v, want [6 6]", got)
	}
}

// gatedRunner's train waits for gate in gateRound.
type gatedRunner struct {
	stepRunner
	gate      chan struct{}
	gateRound int
}

func (g *gatedRunner) Train(ctx context.Context, task runnerTask, m modelT) (runnerResult, error) {
	if task.Round == g.gateRound {
		select {
		case <-g.gate:
		case <-ctx.Done():
			return runnerResult{}, ctx.Err()
		}
	}
	return g.stepRunner.Train(ctx, task, m)
}

// failingValidator refuses to validate: a collaborator that uses it must
// take its validation results from what it saved before a restart.
type failingValidator struct{ stepRunner }

func (*failingValidator) Validate(context.Context, runnerTask, modelT) (runnerResult, error) {
	return runnerResult{}, errors.New("validation must not run again")
}

// A collaborator restarted between uploading its train result and its
// validation result sends the validation metrics it computed before, from
// its work directory, instead of recomputing them.
func TestRestartedCollaboratorSendsSavedResults(t *testing.T) {
	f := newFederation(t, parsePlan(t, `
name: test
rounds: 1
participants: {min: 1}
runner: {kind: builtin, model: mlp}
tasks: [train, locally_tuned_model_validation]
best_model: {task: locally_tuned_model_validation}
`), "alpha")
	f.start()
	ctx := t.Context()
	// Before the "restart": train was uploaded, and the local validation
	// computed and saved, but not uploaded.
	if err := send(ctx, dial(t, f, pki.RoleEnvoy, "alpha"), upload{experiment: experimentID, collaborator: "alpha", round: 1, task: runner.TaskTrain, samples: 1, tensors: goodTensors(1)}); err != nil {
		t.Fatal(err)
	}
	work := t.TempDir()
	saved := `{"round": 1, "results": {"locally_tuned_model_validation": {"samples": 7, "metrics": {"accuracy": 0.77}}}}`
	if err := os.WriteFile(filepath.Join(work, "pending.json"), []byte(saved), 0o600); err != nil {
		t.Fatal(err)
	}
	done := f.collab(ctx, "alpha", &failingValidator{}, work)
	if err := f.wait(20 * time.Second); err != nil {
		t.Fatalf("Run: %v", err)
	}
	if err := <-done; !finished(err) {
		t.Fatalf("collaborator: %v", err)
	}
	res := f.sink.summaries()[0].Results
	var got *aggregator.TaskResult
	for i := range res {
		if res[i].Task == runner.TaskLocalValidation {
			got = &res[i]
		}
	}
	if got == nil || got.Samples != 7 || got.Metrics["accuracy"] != 0.77 {
		t.Fatalf("local validation result %+v, want the saved one (7 samples, accuracy 0.77)", got)
	}
	if _, err := os.Stat(filepath.Join(work, "pending.json")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("pending.json left behind after the upload: %v", err)
	}
}

// cutProxy forwards connections to target; the first one it cuts once
// limit bytes have gone one way: from target to the client (a download),
// or from the client to target (an upload).
type cutProxy struct {
	lis  net.Listener
	cuts atomic.Int32
}

func newCutProxy(t *testing.T, target string, limit int64, upload bool) *cutProxy {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &cutProxy{lis: lis}
	t.Cleanup(func() { lis.Close() })
	copyCut := func(dst, src net.Conn, cut bool) {
		defer dst.Close()
		defer src.Close()
		if !cut {
			_, _ = io.Copy(dst, src)
			return
		}
		if n, _ := io.CopyN(dst, src, limit); n == limit {
			p.cuts.Add(1)
		}
	}
	go func() {
		for first := true; ; first = false {
			client, err := lis.Accept()
			if err != nil {
				return
			}
			server, err := net.Dial("tcp", target)
			if err != nil {
				client.Close()
				continue
			}
			go copyCut(server, client, first && upload)
			go copyCut(client, server, first && !upload)
		}
	}()
	return p
}

// TestTransferResumesAfterAConnectionCut: the connection a collaborator
// downloads the model on, or uploads its trained weights on, is cut
// halfway; the collaborator reconnects and the transfer goes on from where
// it stopped, not from the beginning (for an upload the aggregator kept
// what arrived and says how much), and the round completes with the model
// intact.
func TestTransferResumesAfterAConnectionCut(t *testing.T) {
	for _, tc := range []struct {
		name   string
		upload bool
		logged string
	}{
		// The first connection's aggregator-to-collaborator bytes are the
		// 8 MiB download, its collaborator-to-aggregator bytes the requests
		// and then the 8 MiB upload: a cut at 3 MiB falls in the first
		// tensor either way.
		{"download", false, `resuming the model download: .*bytes=[1-9]`},
		{"upload", true, `resuming the upload: .*bytes=[1-9]`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFederation(t, parsePlan(t, `
name: test
rounds: 1
participants: {min: 1}
runner: {kind: builtin, model: mlp}
tasks: [train, locally_tuned_model_validation]
best_model: {task: locally_tuned_model_validation}
`), "alpha")
			f.initial = tensor.Model{tensor.New("fc.weight", tensor.F32, []int64{1 << 21}), tensor.New("fc.bias", tensor.F32, []int64{2})}
			f.start()
			proxy := newCutProxy(t, f.addr, 3<<20, tc.upload)
			out := runLogged(t, f, proxy.lis.Addr().String(), "")
			if proxy.cuts.Load() != 1 {
				t.Fatal("the proxy never cut the connection: the test shows nothing")
			}
			if !regexp.MustCompile(tc.logged).MatchString(out) {
				t.Errorf("the collaborator did not resume the %s where it broke; its log:\n%s", tc.name, out)
			}
			got := readModel(t, f.dir, 1).Get("fc.weight").Float32s()
			for _, i := range []int{0, len(got) / 2, len(got) - 1} {
				if got[i] != 1 {
					t.Errorf("weight %d of the aggregated model is %v, want 0 + 1", i, got[i])
				}
			}
		})
	}
}

// runLogged runs collaborator alpha against the aggregator at addr (its
// own, or a proxy's) with a quick retry schedule until the experiment ends,
// and returns what it logged.
func runLogged(t *testing.T, f *federation, addr, initialModel string) string {
	t.Helper()
	var log bytes.Buffer
	var mu sync.Mutex
	c, err := collaborator.New(collaborator.Config{
		ExperimentID: experimentID, Name: "alpha", Address: addr,
		DialOptions: testpki.DialOptions(f.ca.Keyring(pki.RoleEnvoy, "alpha"), "localhost"),
		Runner:      &stepRunner{Step: 1, Samples: 1}, WorkDir: t.TempDir(), InitialModel: initialModel,
		Logger: hclog.New(&hclog.LoggerOptions{Name: "alpha", Output: &lockedWriter{w: &log, mu: &mu}}),
		Retry:  backoff.Config{Initial: 10 * time.Millisecond, Max: 100 * time.Millisecond},
	})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- c.Run(t.Context()) }()
	if err := f.wait(time.Minute); err != nil {
		t.Fatalf("Run: %v", err)
	}
	if err := <-done; !finished(err) {
		t.Fatalf("collaborator: %v", err)
	}
	mu.Lock()
	defer mu.Unlock()
	return log.String()
}

// lockedWriter serialises writes to w.
type lockedWriter struct {
	w  io.Writer
	mu *sync.Mutex
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// TestRoundOneFromTheCollaboratorsOwnModel: round 1's download announces
// the initial model's digest; a collaborator whose file (the archive's
// model.safetensors) holds that model reads it instead of downloading it,
// and one whose file holds another model downloads the round's.
func TestRoundOneFromTheCollaboratorsOwnModel(t *testing.T) {
	for _, same := range []bool{true, false} {
		t.Run(map[bool]string{true: "same model", false: "another model"}[same], func(t *testing.T) {
			f := newFederation(t, parsePlan(t, `
name: test
rounds: 2
participants: {min: 1}
runner: {kind: builtin, model: mlp}
tasks: [train, locally_tuned_model_validation]
best_model: {task: locally_tuned_model_validation}
`), "alpha")
			f.start()
			own := initialModel()
			if !same {
				own[0].Float32s()[0] = 42
			}
			file := filepath.Join(t.TempDir(), "model.safetensors")
			if err := tensor.WriteFile(file, own, map[string]string{"written_by": "the researcher"}); err != nil {
				t.Fatal(err)
			}
			read := strings.Count(runLogged(t, f, f.addr, file), "instead of downloading it")
			if want := map[bool]int{true: 1, false: 0}[same]; read != want {
				t.Errorf("the collaborator read its own file for %d rounds, want %d", read, want)
			}
			// Either way round 1 trained the initial model: every weight + 1.
			if got, want := readModel(t, f.dir, 1).Get("fc.weight").Float32s()[0], initialModel()[0].Float32s()[0]+1; got != want {
				t.Errorf("round 1's model starts %v, want %v", got, want)
			}
		})
	}
}
