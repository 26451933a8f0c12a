package exec

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"testing/fstest"
	"time"

	"github.com/fx-fl/fx/dataset"
	"github.com/fx-fl/fx/runner"
	"github.com/fx-fl/fx/runner/sandbox"
	"github.com/fx-fl/fx/tensor"
)

// The test binary doubles as a persistent runner: started with
// FAKE_RUNNER=<behaviour> in its environment, TestMain runs fakeRunner
// instead of the tests. It speaks the protocol as a real runner would and
// misbehaves on the train task as the behaviour says.
func TestMain(m *testing.M) {
	sandbox.Main()
	if b := os.Getenv("FAKE_RUNNER"); b != "" {
		os.Exit(fakeRunner(b))
	}
	os.Exit(m.Run())
}

// fakeRunner serves tasks: train halves every weight, every task reports
// 10 samples and accuracy = round/10. It records its start and every task's
// input file in $SPY.
func fakeRunner(behaviour string) int {
	spy := os.Getenv("SPY")
	appendSpy := func(name, line string) {
		f, err := os.OpenFile(filepath.Join(spy, name), os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600)
		if err == nil {
			fmt.Fprintln(f, line)
			f.Close()
		}
	}
	appendSpy("starts", strconv.Itoa(os.Getpid()))
	in := os.NewFile(3, "control-in")
	out := os.NewFile(4, "control-out")
	send := func(v any) {
		b, _ := json.Marshal(v)
		out.Write(append(b, '\n'))
	}
	br := bufio.NewReader(in)
	var setup SetupMessage
	line, err := br.ReadBytes('\n')
	if err != nil || json.Unmarshal(line, &setup) != nil || setup.Type != msgSetup {
		fmt.Fprintln(os.Stderr, "fake runner: no setup message")
		return 2
	}
	appendSpy("setup", fmt.Sprintf("data_file=%s pythonpath=%s", setup.DataFile, os.Getenv("PYTHONPATH")))
	switch behaviour {
	case "missing-module":
		fmt.Fprintln(os.Stderr, "Traceback (most recent call last):")
		fmt.Fprintln(os.Stderr, `  File "train.py", line 1, in <module>`)
		fmt.Fprintln(os.Stderr, "ModuleNotFoundError: No module named 'torchvision'")
		return 1
	case "not-ready":
		send(map[string]any{"type": "done", "id": 1})
	default:
		send(map[string]any{"type": msgReady, "protocol": PersistentProtocolVersion})
	}
	for {
		line, err := br.ReadBytes('\n')
		if err != nil {
			return 0 // fx closed the pipe: stop
		}
		var msg TaskMessage
		if err := json.Unmarshal(line, &msg); err != nil {
			fmt.Fprintln(os.Stderr, "fake runner: bad message:", err)
			return 2
		}
		if msg.Type == msgStop {
			appendSpy("stops", "stop")
			return 0
		}
		appendSpy("inputs", msg.Task+" "+msg.InputModel)
		appendSpy("proximal_mu", fmt.Sprintf("%s %v", msg.Task, msg.ProximalMu))
		fmt.Printf("working on %s round %d\n", msg.Task, msg.Round)
		if msg.Train {
			switch behaviour {
			case "die":
				fmt.Fprintln(os.Stderr, "fake runner: dying in the middle of training")
				return 3
			case "hang":
				time.Sleep(time.Hour)
			case "flood":
				chunk := strings.Repeat("spam ", 1000) + "\n"
				for {
					os.Stdout.WriteString(chunk)
				}
			case "report":
				send(map[string]any{"type": msgFailed, "id": msg.ID, "error": "CUDA out of memory"})
				continue
			case "garbage":
				out.Write([]byte("this is not json\n"))
				continue
			case "wrong-id":
				send(map[string]any{"type": msgDone, "id": msg.ID + 7, "samples": 1})
				continue
			case "rename-only":
				// Takes the file fx lends for the output and writes nothing.
				if msg.OutputReuse != "" {
					if err := os.Rename(msg.OutputReuse, msg.OutputModel); err != nil {
						fmt.Fprintln(os.Stderr, "fake runner:", err)
						return 2
					}
					send(map[string]any{"type": msgDone, "id": msg.ID, "samples": 10})
					continue
				}
			}
			m, _, err := tensor.ReadFile(msg.InputModel)
			if err != nil {
				fmt.Fprintln(os.Stderr, "fake runner:", err)
				return 2
			}
			for _, t := range m {
				for i, v := range t.Float32s() {
					t.Float32s()[i] = v / 2
				}
			}
			switch behaviour {
			case "nan":
				m.Index()["fc0.weight"].Float32s()[1] = float32(math.NaN())
			case "wrong-shape":
				m.Index()["fc0.weight"].Shape = []int64{3, 2}
			case "wrong-dtype":
				w := m.Index()["fc0.weight"]
				w.DType, w.Shape = tensor.F64, []int64{3} // the same bytes as F64[3]
			}
			if err := tensor.WriteFile(msg.OutputModel, m, nil); err != nil {
				fmt.Fprintln(os.Stderr, "fake runner:", err)
				return 2
			}
		}
		send(map[string]any{"type": msgDone, "id": msg.ID, "samples": 10, "metrics": map[string]float64{"accuracy": float64(msg.Round) / 10}})
	}
}

// fakeConfig runs the test binary as a persistent runner.
func (f *fixture) fakeConfig(t *testing.T, behaviour string) Config {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	c := f.config([]string{exe})
	c.Mode = ModePersistent
	c.Env = []string{"FAKE_RUNNER=" + behaviour, "SPY=" + f.spy}
	c.KillGrace = time.Second
	return c
}

// spyLines returns the lines a runner appended to a spy file.
func (f *fixture) spyLines(t *testing.T, name string) []string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(f.spy, name))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	return strings.Split(strings.TrimSpace(string(b)), "\n")
}

// round runs a round's three tasks as a collaborator does: the global
// model for the first validation and for training, the trained weights
// for the local validation.
func round(ctx context.Context, r *Runner, n int, global tensor.Model) (trained tensor.Model, err error) {
	if _, err := r.Validate(ctx, runner.Task{Name: runner.TaskAggregatedValidation, Round: n}, global); err != nil {
		return nil, err
	}
	res, err := r.Train(ctx, runner.Task{Name: runner.TaskTrain, Round: n}, global)
	if err != nil {
		return nil, err
	}
	if _, err := r.Validate(ctx, runner.Task{Name: runner.TaskLocalValidation, Round: n}, res.Model); err != nil {
		return nil, err
	}
	return res.Model, nil
}

func TestPersistentServesEveryTask(t *testing.T) {
	f := newFixture(t)
	c := f.fakeConfig(t, "ok")
	var lines []OutputLine
	linesCh := make(chan OutputLine, 100)
	c.Output = func(l OutputLine) { linesCh <- l }
	c.Dataset = &dataset.Dataset{
		Train:       dataset.Split{X: []float32{1, 2, 3, 4}, Y: []int32{0, 1}, N: 2},
		Valid:       dataset.Split{X: []float32{5, 6}, Y: []int32{1}, N: 1},
		SampleShape: []int64{2}, Classes: 2, Description: "test data",
	}
	c.PythonLibrary = fstest.MapFS{"fx/site.py": {Data: []byte("# the site library\n")}}
	r := f.runner(t, c)
	ctx := context.Background()
	global := testModel()
	for n := 1; n <= 3; n++ {
		trained, err := round(ctx, r, n, global)
		if err != nil {
			t.Fatalf("round %d: %v", n, err)
		}
		if got, want := trained[0].Float32s()[0], global[0].Float32s()[0]/2; got != want {
			t.Fatalf("round %d: trained fc0.weight[0] = %v, want %v", n, got, want)
		}
		global = trained // the next round starts from what this one made
	}
	if starts := f.spyLines(t, "starts"); len(starts) != 1 {
		t.Errorf("%d runner processes started for 9 tasks, want 1: %q", len(starts), starts)
	}
	// Each model reached the runner as one file: the global model's file
	// serves both tasks that take it, the trained weights' file the local
	// validation.
	inputs := f.spyLines(t, "inputs")
	if len(inputs) != 9 {
		t.Fatalf("the runner saw %d tasks, want 9: %q", len(inputs), inputs)
	}
	for i := 0; i < 9; i += 3 {
		amv, train, ltmv := strings.Fields(inputs[i])[1], strings.Fields(inputs[i+1])[1], strings.Fields(inputs[i+2])[1]
		if amv != train {
			t.Errorf("round %d: validation read %s, training %s: the global model was written twice", i/3+1, amv, train)
		}
		if ltmv == train || !strings.Contains(filepath.Base(ltmv), "trained-") {
			t.Errorf("round %d: the local validation read %s, want the file the runner trained into", i/3+1, ltmv)
		}
	}
	setup := f.spyLines(t, "setup")
	if len(setup) != 1 || !strings.Contains(setup[0], "data_file="+filepath.Join(f.work, DataFileName)) ||
		!strings.Contains(setup[0], "pythonpath="+filepath.Join(f.work, LibraryDirName)) {
		t.Errorf("setup = %q, want the data file and the library on PYTHONPATH", setup)
	}
	data, meta, err := tensor.ReadFile(filepath.Join(f.work, DataFileName))
	if err != nil {
		t.Fatal(err)
	}
	idx := data.Index()
	if got := idx[DataTrainX].Float32s(); len(got) != 4 || got[3] != 4 || meta["classes"] != "2" || meta["sample_shape"] != "[2]" {
		t.Errorf("data file: train.x %v, metadata %v", got, meta)
	}
	if y := idx[DataValidY]; y.DType != tensor.I64 || len(y.Data) != 8 || y.Data[0] != 1 {
		t.Errorf("data file: valid.y is %s %v", y.DType, y.Data)
	}
	if b, err := os.ReadFile(filepath.Join(f.work, LibraryDirName, "fx", "site.py")); err != nil || string(b) != "# the site library\n" {
		t.Errorf("library file: %q, %v", b, err)
	}
	pid, _ := strconv.Atoi(f.spyLines(t, "starts")[0])
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	processGone(t, pid)
	if stops := f.spyLines(t, "stops"); len(stops) != 1 {
		t.Errorf("the runner was not asked to stop: %q", stops)
	}
	close(linesCh)
	for l := range linesCh {
		lines = append(lines, l)
	}
	if len(lines) != 9 || lines[4].Text != "working on train round 2" || lines[4].Task != runner.TaskTrain || lines[4].Round != 2 || lines[4].Stream != "stdout" {
		t.Errorf("output lines: %+v", lines)
	}
	if ents, _ := filepath.Glob(filepath.Join(f.work, "runner-*")); len(ents) != 0 {
		t.Errorf("Close left scratch directories: %q", ents)
	}
}

func TestPersistentFailures(t *testing.T) {
	tests := []struct {
		behaviour string
		want      error
		text      string
		restarts  bool // the failure ends the process; the next task starts another
	}{
		{"die", ErrExit, "exited with status 3", true},
		{"hang", ErrTimeout, "runner.timeout", true},
		{"flood", ErrFlood, "more than 1048576 bytes", true},
		{"nan", ErrOutput, "NaN", false},
		{"wrong-shape", ErrOutput, "does not match the input model", false},
		{"wrong-dtype", ErrOutput, "F64", false},
		{"report", ErrReported, "CUDA out of memory", false},
		{"garbage", ErrOutput, "not the expected JSON", true},
		{"wrong-id", ErrOutput, "for id", true},
	}
	for _, tc := range tests {
		t.Run(tc.behaviour, func(t *testing.T) {
			f := newFixture(t)
			c := f.fakeConfig(t, tc.behaviour)
			c.MaxOutputBytes = 1 << 20
			if tc.behaviour == "hang" {
				c.Timeout = time.Second
			}
			r := f.runner(t, c)
			defer r.Close()
			ctx := context.Background()
			global := testModel()
			before := global[0].Clone()
			if _, err := r.Validate(ctx, runner.Task{Name: runner.TaskAggregatedValidation, Round: 1}, global); err != nil {
				t.Fatalf("validation before the failure: %v", err)
			}
			_, err := r.Train(ctx, runner.Task{Name: runner.TaskTrain, Round: 1}, global)
			var te *TaskError
			if !errors.As(err, &te) || !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.text) {
				t.Fatalf("Train: %v, want a *TaskError wrapping %v and saying %q", err, tc.want, tc.text)
			}
			if te.Task != runner.TaskTrain || te.Round != 1 {
				t.Errorf("the error names task %q round %d", te.Task, te.Round)
			}
			if tc.behaviour == "die" && !strings.Contains(err.Error(), "dying in the middle of training") {
				t.Errorf("the error lacks the runner's last stderr line: %v", err)
			}
			if tc.behaviour == "report" && strings.Contains(te.Summary(), "CUDA") {
				t.Errorf("Summary quotes the runner: %s", te.Summary())
			}
			if !tensor.SameLayout(before, global[0]) || string(before.Data) != string(global[0].Data) {
				t.Error("the input model changed")
			}
			// The runner carries on: the next task runs, in a new process
			// only if the failure ended the old one.
			if _, err := r.Validate(ctx, runner.Task{Name: runner.TaskAggregatedValidation, Round: 2}, global); err != nil {
				t.Fatalf("the task after the failure: %v", err)
			}
			starts := len(f.spyLines(t, "starts"))
			if want := map[bool]int{true: 2, false: 1}[tc.restarts]; starts != want {
				t.Errorf("%d processes started, want %d", starts, want)
			}
		})
	}
}

func TestPersistentStartFailures(t *testing.T) {
	t.Run("missing module", func(t *testing.T) {
		f := newFixture(t)
		r := f.runner(t, f.fakeConfig(t, "missing-module"))
		err := r.Check(context.Background())
		var te *TaskError
		if !errors.As(err, &te) || !errors.Is(err, ErrExit) {
			t.Fatalf("Check: %v, want a *TaskError wrapping ErrExit", err)
		}
		// fx's own words name the module and the interpreter, without
		// quoting the runner.
		if s := te.Summary(); !strings.Contains(s, `"torchvision"`) || !strings.Contains(s, r.Command()[0]) || !strings.Contains(s, "exec.python") {
			t.Errorf("Summary = %s", s)
		}
		_, err = r.Train(context.Background(), runner.Task{Name: runner.TaskTrain, Round: 1}, testModel())
		if !errors.Is(err, ErrExit) || !strings.Contains(err.Error(), "before it was ready") || !strings.Contains(err.Error(), "No module named") {
			t.Errorf("Train: %v", err)
		}
	})
	t.Run("no ready message", func(t *testing.T) {
		f := newFixture(t)
		r := f.runner(t, f.fakeConfig(t, "not-ready"))
		err := r.Check(context.Background())
		if !errors.Is(err, ErrOutput) || !strings.Contains(err.Error(), "runner.mode: per_task") {
			t.Errorf("Check: %v", err)
		}
	})
	t.Run("ready", func(t *testing.T) {
		f := newFixture(t)
		r := f.runner(t, f.fakeConfig(t, "ok"))
		if err := r.Check(context.Background()); err != nil {
			t.Fatalf("Check: %v", err)
		}
		starts := f.spyLines(t, "starts")
		pid, _ := strconv.Atoi(starts[0])
		processGone(t, pid)
		if ents, _ := filepath.Glob(filepath.Join(f.work, "runner-*")); len(ents) != 0 {
			t.Errorf("Check left scratch directories: %q", ents)
		}
	})
}

func TestPersistentCancellation(t *testing.T) {
	f := newFixture(t)
	r := f.runner(t, f.fakeConfig(t, "hang"))
	defer r.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := r.Train(ctx, runner.Task{Name: runner.TaskTrain, Round: 1}, testModel())
		done <- err
	}()
	waitFile(t, filepath.Join(f.spy, "inputs"))
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("Train: %v, want context.Canceled", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Train did not return after its context was cancelled")
	}
	pid, _ := strconv.Atoi(f.spyLines(t, "starts")[0])
	processGone(t, pid)
}

// TestPersistentSandboxed runs the persistent protocol through the
// sandbox's trampoline: the control pipes reach the contained command, and
// it cannot read what the policy hides.
func TestPersistentSandboxed(t *testing.T) {
	if _, err := sandbox.Check(); err != nil {
		t.Skipf("no sandbox here: %v", err)
	}
	f := newFixture(t)
	secret := filepath.Join(t.TempDir(), "envoy.key")
	if err := os.WriteFile(secret, []byte("key"), 0o600); err != nil {
		t.Fatal(err)
	}
	c := f.fakeConfig(t, "ok")
	exe, _ := os.Executable()
	c.Contain = sandbox.Policy{ReadOnly: []string{f.dir, exe}, ReadWrite: []string{f.work, f.spy}, Hidden: []string{secret}}.Apply
	r := f.runner(t, c)
	defer r.Close()
	if _, err := round(context.Background(), r, 1, testModel()); err != nil {
		t.Fatalf("a round in the sandbox: %v", err)
	}
	if starts := f.spyLines(t, "starts"); len(starts) != 1 {
		t.Errorf("%d processes for a round", len(starts))
	}
}

// TestPersistentStartsAhead: Start starts the process before the first
// task, which then uses it.
func TestPersistentStartsAhead(t *testing.T) {
	f := newFixture(t)
	r := f.runner(t, f.fakeConfig(t, "ok"))
	defer r.Close()
	r.Start(context.Background())
	waitFile(t, filepath.Join(f.spy, "starts"))
	if _, err := round(context.Background(), r, 1, testModel()); err != nil {
		t.Fatal(err)
	}
	if starts := f.spyLines(t, "starts"); len(starts) != 1 {
		t.Errorf("%d processes: the first task did not use the one started ahead", len(starts))
	}
}

// TestPersistentCloseBeforeStartRuns: a Close that comes while a Start
// waits to start the process leaves no process behind.
func TestPersistentCloseBeforeStartRuns(t *testing.T) {
	f := newFixture(t)
	r := f.runner(t, f.fakeConfig(t, "ok"))
	// Hold the runner busy so that Start's goroutine waits for the lock.
	r.persistent.mu.Lock()
	r.Start(context.Background())
	closed := make(chan error, 1)
	go func() { closed <- r.Close() }()
	for r.persistent.closes.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	r.persistent.mu.Unlock()
	if err := <-closed; err != nil {
		t.Fatal(err)
	}
	// Close waited for the Start: had it started a process, it would have
	// reported its start.
	if starts := f.spyLines(t, "starts"); len(starts) != 0 {
		t.Errorf("a process was started for a runner being closed: %q", starts)
	}
}

// TestModelFilesDoNotKeepModels: the runner's kept model files know their
// models by identity without holding them, so a model the collaborator let
// go is freed although its file is kept; a model still held is found.
func TestModelFilesDoNotKeepModels(t *testing.T) {
	ps := &persistent{}
	held := tensor.Model{tensor.New("w", tensor.F32, []int64{1 << 20})}
	ps.remember(held, filepath.Join(t.TempDir(), "held.safetensors"))
	dropped := tensor.Model{tensor.New("w", tensor.F32, []int64{1 << 20})}
	ps.remember(dropped, filepath.Join(t.TempDir(), "dropped.safetensors"))
	dropped = nil
	runtime.GC()
	if ps.files[1].model[0].Value() != nil {
		t.Error("a kept model file keeps its model in memory after everyone else let it go")
	}
	if !ps.files[0].is(held) || ps.files[0].is(tensor.Model{tensor.New("w", tensor.F32, []int64{1 << 20})}) {
		t.Error("a kept file does not know its model by identity")
	}
	runtime.KeepAlive(held)
}

// TestLentFileIsNoModel: a runner that takes the old file lent for its
// output and writes nothing does not pass an old model off as trained.
func TestLentFileIsNoModel(t *testing.T) {
	f := newFixture(t)
	r := f.runner(t, f.fakeConfig(t, "rename-only"))
	ctx := context.Background()
	global := testModel()
	for n := 1; ; n++ {
		trained, err := round(ctx, r, n, global)
		if err != nil {
			if !errors.Is(err, ErrOutput) || !strings.Contains(err.Error(), "not a valid safetensors file") {
				t.Fatalf("round %d: %v, want the output refused as no model", n, err)
			}
			if n < 2 {
				t.Fatalf("round %d failed before any file could be lent: %v", n, err)
			}
			return
		}
		if n == 5 {
			t.Fatal("5 rounds passed: no file was ever lent, or an old model passed for trained")
		}
		global = trained
	}
}

// TestRewrittenModelIsWrittenAgain: trained weights the collaborator
// changed in place after training (differential privacy noises them) reach
// the local validation with their new values, not as the file the runner
// trained into.
func TestRewrittenModelIsWrittenAgain(t *testing.T) {
	f := newFixture(t)
	r := f.runner(t, f.fakeConfig(t, "ok"))
	ctx := context.Background()
	res, err := r.Train(ctx, runner.Task{Name: runner.TaskTrain, Round: 1}, testModel())
	if err != nil {
		t.Fatal(err)
	}
	for _, tn := range res.Model {
		for i := range tn.Float32s() {
			tn.Float32s()[i] = 42
		}
	}
	r.Rewritten(res.Model)
	if _, err := r.Validate(ctx, runner.Task{Name: runner.TaskLocalValidation, Round: 1}, res.Model); err != nil {
		t.Fatal(err)
	}
	inputs := f.spyLines(t, "inputs")
	if len(inputs) != 2 {
		t.Fatalf("the runner saw %d tasks, want 2: %q", len(inputs), inputs)
	}
	path := strings.Fields(inputs[1])[1]
	if strings.Contains(filepath.Base(path), "trained-") {
		t.Fatalf("the local validation read %s, the file the runner trained into", path)
	}
	got, _, err := tensor.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if v := got[0].Float32s()[0]; v != 42 {
		t.Errorf("the local validation's model holds %v, want the rewritten 42", v)
	}
}

// TestTrainReadsIntoRecycledWeights: trained weights handed back with
// Recycle take the next trained model, in place of new memory, and the
// next model is right.
func TestTrainReadsIntoRecycledWeights(t *testing.T) {
	f := newFixture(t)
	r := f.runner(t, f.fakeConfig(t, "ok"))
	ctx := context.Background()
	global := testModel()
	first, err := r.Train(ctx, runner.Task{Name: runner.TaskTrain, Round: 1}, global)
	if err != nil {
		t.Fatal(err)
	}
	buffers := map[string]*byte{}
	for _, tn := range first.Model {
		buffers[tn.Name] = &tn.Data[0]
	}
	r.Recycle(first.Model)
	second, err := r.Train(ctx, runner.Task{Name: runner.TaskTrain, Round: 2}, global)
	if err != nil {
		t.Fatal(err)
	}
	for _, tn := range second.Model {
		if &tn.Data[0] != buffers[tn.Name] {
			t.Errorf("tensor %s of the second trained model is in new memory, not the recycled one's", tn.Name)
		}
		if got, want := tn.Float32s()[0], global.Get(tn.Name).Float32s()[0]/2; got != want {
			t.Errorf("tensor %s[0] = %v, want %v", tn.Name, got, want)
		}
	}
	third, err := r.Train(ctx, runner.Task{Name: runner.TaskTrain, Round: 3}, global)
	if err != nil {
		t.Fatal(err)
	}
	if &third.Model[0].Data[0] == &second.Model[0].Data[0] {
		t.Error("a model nobody recycled was read over")
	}
}
