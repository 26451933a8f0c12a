package exec

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"math"
	"os"
	osexec "os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/fx-fl/fx/runner"
	"github.com/fx-fl/fx/tensor"
)

// syncBuffer is a bytes.Buffer safe for the logger's concurrent writers.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// testModel is a small softmax-shaped model.
func testModel() tensor.Model {
	return tensor.Model{
		tensor.FromFloat32("fc0.weight", []int64{2, 3}, []float32{1, 2, 3, 4, 5, 6}),
		tensor.FromFloat32("fc0.bias", []int64{2}, []float32{0.5, -0.5}),
	}
}

// fixture is an experiment directory holding fake runners, a spy directory
// the scripts report into (its path is in $SPY), and a log.
type fixture struct {
	dir, spy, work string
	log            *syncBuffer
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	f := &fixture{dir: t.TempDir(), spy: t.TempDir(), work: t.TempDir(), log: &syncBuffer{}}
	return f
}

// script writes an executable /bin/sh script into the experiment directory
// and returns the command that runs it.
func (f *fixture) script(t *testing.T, name, body string) []string {
	t.Helper()
	if err := os.WriteFile(filepath.Join(f.dir, name), []byte("#!/bin/sh\n"+body+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return []string{"./" + name}
}

func (f *fixture) config(command []string) Config {
	return Config{
		Dir:             f.dir,
		Command:         command,
		Mode:            ModePerTask,
		Timeout:         20 * time.Second,
		Hyperparameters: map[string]any{"lr": 0.1, "epochs": 2},
		Seed:            7,
		Data:            map[string]any{"kind": "synthetic", "shard": "2/4"},
		Env:             []string{"SPY=" + f.spy},
		Logger:          hclog.New(&hclog.LoggerOptions{Output: f.log, Level: hclog.Debug}),
		WorkDir:         f.work,
	}
}

func (f *fixture) runner(t *testing.T, c Config) *Runner {
	t.Helper()
	r, err := New(c)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return r
}

// spyFile reads a file a script left in the spy directory.
func (f *fixture) spyFile(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(f.spy, name))
	if err != nil {
		t.Fatalf("the script did not report %s: %v", name, err)
	}
	return strings.TrimSpace(string(b))
}

// workDirEntries lists what is left in the work directory: nothing, once
// every task directory was removed.
func (f *fixture) workDirEntries(t *testing.T) []string {
	t.Helper()
	ents, err := os.ReadDir(f.work)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

// writeModel writes a model into the spy directory for a script to copy.
func (f *fixture) writeModel(t *testing.T, name string, m tensor.Model) {
	t.Helper()
	if err := tensor.WriteFile(filepath.Join(f.spy, name), m, nil); err != nil {
		t.Fatal(err)
	}
}

// compact returns raw JSON without insignificant space.
func compact(t *testing.T, raw json.RawMessage) string {
	t.Helper()
	var b bytes.Buffer
	if err := json.Compact(&b, raw); err != nil {
		t.Fatal(err)
	}
	return b.String()
}

const goodMetrics = `echo '{"samples": 12, "metrics": {"loss": 0.25, "accuracy": 0.75}}' > "$FX_OUTPUT_METRICS"`

func TestTrainSuccess(t *testing.T) {
	f := newFixture(t)
	cmd := f.script(t, "train.sh", `
cp "$FX_TASK_JSON" "$SPY/task.json"
echo "$FX_TASK_DIR" > "$SPY/taskdir"
pwd > "$SPY/pwd"
echo "training on stdout"
echo "progress on stderr" >&2
cp "$FX_INPUT_MODEL" "$FX_OUTPUT_MODEL"
`+goodMetrics)
	r := f.runner(t, f.config(cmd))
	in := testModel()
	res, err := r.Train(context.Background(), runner.Task{Name: runner.TaskTrain, Round: 3}, in)
	if err != nil {
		t.Fatalf("Train: %v", err)
	}
	if res.Samples != 12 || res.Metrics["loss"] != 0.25 || res.Metrics["accuracy"] != 0.75 || len(res.Metrics) != 2 {
		t.Errorf("result = %d samples, %v; want 12 samples, loss 0.25, accuracy 0.75", res.Samples, res.Metrics)
	}
	if err := in.Matches(res.Model); err != nil {
		t.Fatalf("returned model: %v", err)
	}
	for i, tn := range res.Model {
		if tn.Name != in[i].Name || !bytes.Equal(tn.Data, in[i].Data) {
			t.Errorf("tensor %d is %q with different data; want the input's %q in input order", i, tn.Name, in[i].Name)
		}
	}

	var spec TaskSpec
	if err := json.Unmarshal([]byte(f.spyFile(t, "task.json")), &spec); err != nil {
		t.Fatalf("task.json: %v", err)
	}
	taskDir := f.spyFile(t, "taskdir")
	if spec.Protocol != ProtocolVersion || spec.Task != runner.TaskTrain || !spec.Train || spec.Round != 3 || spec.Seed != 7 {
		t.Errorf("task.json = %+v", spec)
	}
	if got := compact(t, spec.Hyperparameters); got != `{"epochs":2,"lr":0.1}` {
		t.Errorf("hyperparameters = %s", got)
	}
	if got := compact(t, spec.Data); got != `{"kind":"synthetic","shard":"2/4"}` {
		t.Errorf("data = %s", got)
	}
	if spec.TaskDir != taskDir || spec.InputModel != filepath.Join(taskDir, "input", "model.safetensors") ||
		spec.OutputModel != filepath.Join(taskDir, "output", "model.safetensors") ||
		spec.OutputMetrics != filepath.Join(taskDir, "output", "metrics.json") ||
		spec.OutputDir != filepath.Join(taskDir, "output") || spec.ExperimentDir != f.dir {
		t.Errorf("task.json paths = %+v, task dir %s", spec, taskDir)
	}
	if spec.TimeoutSeconds != 20 || spec.Deadline.IsZero() {
		t.Errorf("timeout %v, deadline %v", spec.TimeoutSeconds, spec.Deadline)
	}
	if got := f.spyFile(t, "pwd"); got != f.dir {
		t.Errorf("working directory = %s, want the experiment directory %s", got, f.dir)
	}
	if ents := f.workDirEntries(t); len(ents) != 0 {
		t.Errorf("task directories left behind: %v", ents)
	}
	log := f.log.String()
	for _, want := range []string{
		"exec: training on stdout: round=3 task=train stream=stdout",
		"exec: progress on stderr: round=3 task=train stream=stderr",
		"task done",
	} {
		if !strings.Contains(log, want) {
			t.Errorf("log lacks %q:\n%s", want, log)
		}
	}
}

func TestValidateSuccess(t *testing.T) {
	f := newFixture(t)
	cmd := f.script(t, "validate.sh", `
[ -z "${FX_OUTPUT_MODEL+set}" ] || { echo "FX_OUTPUT_MODEL is set for $FX_TASK" >&2; exit 9; }
[ "$FX_TASK" = locally_tuned_model_validation ] || exit 8
echo '{"samples": 5, "metrics": {"accuracy": 0.5}}' > "$FX_OUTPUT_METRICS"
echo junk > "$FX_OUTPUT_DIR/model.safetensors"
`)
	r := f.runner(t, f.config(cmd))
	res, err := r.Validate(context.Background(), runner.Task{Name: runner.TaskLocalValidation, Round: 1}, testModel())
	if err != nil {
		t.Fatalf("Validate: %v", err)
	}
	if res.Model != nil || res.Samples != 5 || res.Metrics["accuracy"] != 0.5 {
		t.Errorf("result = %+v; want 5 samples, accuracy 0.5 and no model", res)
	}
}

func TestTaskNameChecks(t *testing.T) {
	f := newFixture(t)
	r := f.runner(t, f.config(f.script(t, "never.sh", "exit 1")))
	ctx := context.Background()
	if _, err := r.Train(ctx, runner.Task{Name: runner.TaskAggregatedValidation}, testModel()); err == nil {
		t.Error("Train accepted a validation task")
	}
	if _, err := r.Validate(ctx, runner.Task{Name: runner.TaskTrain}, testModel()); err == nil {
		t.Error("Validate accepted the train task")
	}
	if _, err := r.Validate(ctx, runner.Task{Name: "bogus"}, testModel()); err == nil {
		t.Error("Validate accepted an unknown task")
	}
	if _, err := r.Train(ctx, runner.Task{Name: runner.TaskTrain}, nil); err == nil {
		t.Error("Train accepted an empty model")
	}
}

// lines makes the optional line count of a TestTaskFailures case.
func lines(n int) *int { return &n }

func TestTaskFailures(t *testing.T) {
	f := newFixture(t)
	wrong := testModel()
	wrong[0] = tensor.FromFloat32("fc0.weight", []int64{3, 2}, make([]float32, 6))
	f.writeModel(t, "wrong-shape.safetensors", wrong)
	nan := testModel()
	nan[1].Float32s()[1] = float32(math.NaN())
	f.writeModel(t, "nan.safetensors", nan)
	extra := append(testModel(), tensor.FromFloat32("fc1.bias", []int64{1}, []float32{0}))
	f.writeModel(t, "extra.safetensors", extra)

	copyModel := `cp "$FX_INPUT_MODEL" "$FX_OUTPUT_MODEL"` + "\n"
	metrics := func(doc string) string { return `printf '%s\n' '` + doc + `' > "$FX_OUTPUT_METRICS"` + "\n" }
	tests := []struct {
		name    string
		task    string // default train
		body    string
		is      error
		want    []string // substrings of the error
		notWant []string
		stderr  *int // the number of stderr lines the TaskError must carry, if set
	}{
		{
			name: "non-zero exit keeps the stderr tail",
			body: `echo "loading data" >&2
i=1; while [ $i -le 30 ]; do echo "step $i" >&2; i=$((i+1)); done
echo "ValueError: shapes do not align" >&2
exit 3`,
			is:      ErrExit,
			want:    []string{"train round 0", "exited with status 3", "ValueError: shapes do not align", "step 30", "step 12"},
			notWant: []string{"loading data", "step 11\n"},
			stderr:  lines(StderrTail),
		},
		{
			name:   "killed by a signal",
			body:   `echo "about to crash" >&2; kill -SEGV $$`,
			is:     ErrExit,
			want:   []string{"killed by signal 11", "about to crash"},
			stderr: lines(1),
		},
		{
			name:   "no stderr says so",
			body:   `exit 1`,
			is:     ErrExit,
			want:   []string{"exited with status 1", "wrote nothing to stderr"},
			stderr: lines(0),
		},
		{
			name: "missing output model",
			body: metrics(`{"samples": 3, "metrics": {}}`) + `echo "saved the model elsewhere" >&2`,
			is:   ErrOutput,
			want: []string{"wrote no output model", "model.safetensors", "saved the model elsewhere"},
		},
		{
			name: "missing metrics",
			body: copyModel,
			is:   ErrOutput,
			want: []string{"wrote no metrics", "metrics.json"},
		},
		{
			name: "missing metrics of a validation task",
			task: runner.TaskAggregatedValidation,
			body: `true`,
			is:   ErrOutput,
			want: []string{"aggregated_model_validation round 0", "wrote no metrics"},
		},
		{
			name: "malformed JSON",
			body: copyModel + metrics(`{"samples": 3, "metrics": {`),
			is:   ErrOutput,
			want: []string{"metrics.json is not the expected JSON object"},
		},
		{
			name: "two JSON documents",
			body: copyModel + metrics(`{"samples": 3, "metrics": {}} {}`),
			is:   ErrOutput,
			want: []string{"more than one JSON value"},
		},
		{
			name: "unknown key",
			body: copyModel + metrics(`{"samples": 3, "metrics": {}, "sample": 4}`),
			is:   ErrOutput,
			want: []string{`unknown field "sample"`},
		},
		{
			name: "missing samples",
			body: copyModel + metrics(`{"metrics": {"loss": 1}}`),
			is:   ErrOutput,
			want: []string{`no "samples"`},
		},
		{
			name: "negative samples",
			body: copyModel + metrics(`{"samples": -4, "metrics": {"loss": 1}}`),
			is:   ErrOutput,
			want: []string{`"samples" is -4`, "≥ 0"},
		},
		{
			name: "fractional samples",
			body: copyModel + metrics(`{"samples": 2.5, "metrics": {}}`),
			is:   ErrOutput,
			want: []string{`"samples" is 2.5, want a whole number`},
		},
		{
			name: "samples as a string",
			body: copyModel + metrics(`{"samples": "7", "metrics": {}}`),
			is:   ErrOutput,
			want: []string{`"samples" is "7", want a whole number`},
		},
		{
			name: "NaN metric as Python writes it",
			body: copyModel + metrics(`{"samples": 3, "metrics": {"accuracy": 0.5, "loss": NaN}}`),
			is:   ErrOutput,
			want: []string{`metric "loss" is NaN`, "finite"},
		},
		{
			name: "infinite metric",
			body: copyModel + metrics(`{"samples": 3, "metrics": {"loss": -Infinity}}`),
			is:   ErrOutput,
			want: []string{`metric "loss" is -Infinity`},
		},
		{
			name: "overflowing metric",
			body: copyModel + metrics(`{"samples": 3, "metrics": {"loss": 1e999}}`),
			is:   ErrOutput,
			want: []string{`metric "loss" is 1e999, which is not a finite float64`},
		},
		{
			name: "string metric",
			body: copyModel + metrics(`{"samples": 3, "metrics": {"loss": "low"}}`),
			is:   ErrOutput,
			want: []string{`metric "loss" is "low", want a number`},
		},
		{
			name: "NaN inside a string is just a string",
			body: copyModel + metrics(`{"samples": 3, "metrics": {"NaN Infinity": "x"}}`),
			is:   ErrOutput,
			want: []string{`metric "NaN Infinity" is "x", want a number`},
		},
		{
			name: "model with the wrong shape",
			body: `cp "$SPY/wrong-shape.safetensors" "$FX_OUTPUT_MODEL"` + "\n" + metrics(`{"samples": 3, "metrics": {}}`),
			is:   ErrOutput,
			want: []string{"does not match the input model", `tensor "fc0.weight" is F32[3 2], want F32[2 3]`},
		},
		{
			name: "model with an extra tensor",
			body: `cp "$SPY/extra.safetensors" "$FX_OUTPUT_MODEL"` + "\n" + metrics(`{"samples": 3, "metrics": {}}`),
			is:   ErrOutput,
			want: []string{"does not match the input model", `unknown tensor "fc1.bias"`},
		},
		{
			name: "model with a NaN",
			body: `cp "$SPY/nan.safetensors" "$FX_OUTPUT_MODEL"` + "\n" + metrics(`{"samples": 3, "metrics": {}}`),
			is:   ErrOutput,
			want: []string{`tensor "fc0.bias" element 1 is NaN`},
		},
		{
			name: "model that is not safetensors",
			body: `echo "not a model" > "$FX_OUTPUT_MODEL"` + "\n" + metrics(`{"samples": 3, "metrics": {}}`),
			is:   ErrOutput,
			want: []string{"output model (model.safetensors) is not a valid safetensors file"},
		},
		{
			name: "model that is a symbolic link",
			body: `ln -s "$FX_INPUT_MODEL" "$FX_OUTPUT_MODEL"` + "\n" + metrics(`{"samples": 3, "metrics": {}}`),
			is:   ErrOutput,
			want: []string{"is not a regular file"},
		},
		{
			name: "metrics that are a FIFO",
			body: copyModel + `mkfifo "$FX_OUTPUT_METRICS"`,
			is:   ErrOutput,
			want: []string{"metrics (metrics.json)", "is not a regular file"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			name := strings.NewReplacer(" ", "-", "/", "-").Replace(tc.name) + ".sh"
			r := f.runner(t, f.config(f.script(t, name, tc.body)))
			task := runner.Task{Name: runner.TaskTrain}
			call := r.Train
			if tc.task != "" {
				task.Name = tc.task
				call = r.Validate
			}
			_, err := call(context.Background(), task, testModel())
			if err == nil {
				t.Fatal("the task succeeded")
			}
			if !errors.Is(err, tc.is) {
				t.Errorf("error %q does not wrap %v", err, tc.is)
			}
			msg := err.Error()
			for _, w := range tc.want {
				if !strings.Contains(msg, w) {
					t.Errorf("error lacks %q:\n%s", w, msg)
				}
			}
			for _, w := range tc.notWant {
				if strings.Contains(msg+"\n", w) {
					t.Errorf("error holds %q:\n%s", w, msg)
				}
			}
			var te *TaskError
			if !errors.As(err, &te) {
				t.Fatalf("error %T is not a *TaskError", err)
			}
			if tc.stderr != nil && len(te.Stderr) != *tc.stderr {
				t.Errorf("TaskError.Stderr has %d lines, want %d: %q", len(te.Stderr), *tc.stderr, te.Stderr)
			}
		})
	}
	if ents := f.workDirEntries(t); len(ents) != 0 {
		t.Errorf("failed tasks left directories behind: %v", ents)
	}
}

func TestKeepFailed(t *testing.T) {
	f := newFixture(t)
	c := f.config(f.script(t, "fail.sh", `echo partial > "$FX_OUTPUT_DIR/partial"; exit 2`))
	c.KeepFailed = true
	r := f.runner(t, c)
	_, err := r.Train(context.Background(), runner.Task{Name: runner.TaskTrain, Round: 1}, testModel())
	var te *TaskError
	if !errors.As(err, &te) || te.KeptDir == "" {
		t.Fatalf("error %v does not name a kept directory", err)
	}
	if !strings.Contains(err.Error(), te.KeptDir) {
		t.Errorf("error does not mention %s: %v", te.KeptDir, err)
	}
	for _, p := range []string{"input/task.json", "input/model.safetensors", "output/partial"} {
		if _, err := os.Stat(filepath.Join(te.KeptDir, p)); err != nil {
			t.Errorf("kept directory lacks %s: %v", p, err)
		}
	}
}

func TestCleanEnvironment(t *testing.T) {
	t.Setenv("FX_TEST_ENVOY_SECRET", "hunter2")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "hunter3")
	f := newFixture(t)
	c := f.config(f.script(t, "env.sh", `env > "$SPY/env"; env; cp "$FX_INPUT_MODEL" "$FX_OUTPUT_MODEL"; `+goodMetrics))
	c.Env = append(c.Env, "SITE_VAR=allowed", "LANG=en_GB.UTF-8")
	r := f.runner(t, c)
	if _, err := r.Train(context.Background(), runner.Task{Name: runner.TaskTrain, Round: 4}, testModel()); err != nil {
		t.Fatalf("Train: %v", err)
	}
	if strings.Contains(f.log.String(), "hunter") {
		t.Errorf("the envoy's secrets reached the command:\n%s", f.log.String())
	}
	env := map[string]string{}
	for _, line := range strings.Split(f.spyFile(t, "env"), "\n") {
		k, v, _ := strings.Cut(line, "=")
		env[k] = v
	}
	taskDir := filepath.Dir(filepath.Dir(env[EnvTaskJSON]))
	want := map[string]string{
		"PATH":           DefaultPath,
		"HOME":           taskDir,
		"TMPDIR":         filepath.Join(taskDir, "tmp"),
		"LANG":           "en_GB.UTF-8", // the site's value wins over the default
		"SPY":            f.spy,
		"SITE_VAR":       "allowed",
		EnvProtocol:      "1",
		EnvTask:          runner.TaskTrain,
		EnvRound:         "4",
		EnvSeed:          "7",
		EnvExperimentDir: f.dir,
		EnvTaskDir:       taskDir,
		EnvTaskJSON:      filepath.Join(taskDir, "input", "task.json"),
		EnvInputModel:    filepath.Join(taskDir, "input", "model.safetensors"),
		EnvOutputDir:     filepath.Join(taskDir, "output"),
		EnvOutputModel:   filepath.Join(taskDir, "output", "model.safetensors"),
		EnvOutputMetrics: filepath.Join(taskDir, "output", "metrics.json"),
	}
	for k, v := range want {
		if env[k] != v {
			t.Errorf("%s=%q, want %q", k, env[k], v)
		}
	}
	// The shell itself may add these; nothing else may appear.
	shellVars := []string{"PWD", "OLDPWD", "SHLVL", "_"}
	for k := range env {
		if _, ok := want[k]; !ok && !slices.Contains(shellVars, k) {
			t.Errorf("unexpected variable %s=%q in the command's environment", k, env[k])
		}
	}
}

// processGone waits until pid has exited (a zombie awaiting its reaper
// counts as exited), failing the test after a deadline.
func processGone(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		err := syscall.Kill(pid, 0)
		if errors.Is(err, syscall.ESRCH) {
			return
		}
		if stat, rerr := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat"); rerr == nil {
			if i := bytes.LastIndexByte(stat, ')'); i > 0 && i+2 < len(stat) && stat[i+2] == 'Z' {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("process %d is still running", pid)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waitFile waits for a script to report a file, with a deadline.
func waitFile(t *testing.T, path string) string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if b, err := os.ReadFile(path); err == nil && bytes.HasSuffix(b, []byte("\n")) {
			return strings.TrimSpace(string(b))
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never appeared", path)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestTimeoutKillsProcessGroup(t *testing.T) {
	tests := []struct {
		name, body string
		grace      time.Duration
	}{
		{"command that exits on SIGTERM", `sleep 30 & echo $! > "$SPY/pid"; echo "waiting" >&2; wait`, time.Minute},
		{"command that ignores SIGTERM", `trap '' TERM; sleep 30 & echo $! > "$SPY/pid"; echo "stubborn" >&2; wait; wait`, 200 * time.Millisecond},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t)
			c := f.config(f.script(t, "slow.sh", tc.body))
			c.Timeout = 300 * time.Millisecond
			c.KillGrace = tc.grace
			r := f.runner(t, c)
			start := time.Now()
			_, err := r.Train(context.Background(), runner.Task{Name: runner.TaskTrain, Round: 2}, testModel())
			if took := time.Since(start); took > 10*time.Second {
				t.Errorf("the task took %s to time out", took)
			}
			if !errors.Is(err, ErrTimeout) {
				t.Fatalf("error %v does not wrap ErrTimeout", err)
			}
			if !strings.Contains(err.Error(), "timed out after 300ms") {
				t.Errorf("error does not say how long: %v", err)
			}
			pid, perr := strconv.Atoi(f.spyFile(t, "pid"))
			if perr != nil {
				t.Fatal(perr)
			}
			processGone(t, pid)
			if ents := f.workDirEntries(t); len(ents) != 0 {
				t.Errorf("task directories left behind: %v", ents)
			}
		})
	}
}

func TestLeftoverProcessesAreKilled(t *testing.T) {
	f := newFixture(t)
	c := f.config(f.script(t, "leak.sh", `sleep 30 & echo $! > "$SPY/pid"
cp "$FX_INPUT_MODEL" "$FX_OUTPUT_MODEL"
`+goodMetrics))
	r := f.runner(t, c)
	start := time.Now()
	if _, err := r.Train(context.Background(), runner.Task{Name: runner.TaskTrain}, testModel()); err != nil {
		t.Fatalf("Train: %v", err)
	}
	if took := time.Since(start); took > 10*time.Second {
		t.Errorf("the task took %s: the runner waited for the leftover process", took)
	}
	pid, err := strconv.Atoi(f.spyFile(t, "pid"))
	if err != nil {
		t.Fatal(err)
	}
	processGone(t, pid)
}

// TestEscapedProcessDoesNotHang: a process that left the command's process
// group (and so cannot be killed with it) and holds its output open must not
// keep the task from ending.
func TestEscapedProcessDoesNotHang(t *testing.T) {
	if _, err := osexec.LookPath("setsid"); err != nil {
		t.Skip("no setsid program")
	}
	f := newFixture(t)
	c := f.config(f.script(t, "escape.sh", `setsid sh -c 'echo $$ > "$SPY/pid"; exec sleep 30' &
while [ ! -s "$SPY/pid" ]; do sleep 0.01; done
cp "$FX_INPUT_MODEL" "$FX_OUTPUT_MODEL"
`+goodMetrics))
	r := f.runner(t, c)
	start := time.Now()
	_, err := r.Train(context.Background(), runner.Task{Name: runner.TaskTrain}, testModel())
	if pid, perr := strconv.Atoi(f.spyFile(t, "pid")); perr == nil {
		syscall.Kill(pid, syscall.SIGKILL)
	}
	if err != nil {
		t.Fatalf("Train: %v", err)
	}
	if took := time.Since(start); took > drainTimeout+5*time.Second {
		t.Errorf("the task took %s", took)
	}
	if !strings.Contains(f.log.String(), "still holds its output open") {
		t.Errorf("the log does not mention the escaped process:\n%s", f.log.String())
	}
}

func TestStartFailure(t *testing.T) {
	f := newFixture(t)
	// Executable, but neither a binary nor a script with a #! line.
	if err := os.WriteFile(filepath.Join(f.dir, "nohashbang"), []byte{0x7f, 'E', 'L', 'F', 0, 0}, 0o755); err != nil {
		t.Fatal(err)
	}
	r := f.runner(t, f.config([]string{"./nohashbang"}))
	_, err := r.Train(context.Background(), runner.Task{Name: runner.TaskTrain}, testModel())
	if !errors.Is(err, ErrStart) || !strings.Contains(err.Error(), "exec format error") {
		t.Errorf("error %v, want ErrStart with the reason", err)
	}
}

func TestContextCancellation(t *testing.T) {
	f := newFixture(t)
	c := f.config(f.script(t, "wait.sh", `sleep 30 & echo $! > "$SPY/pid"; wait`))
	r := f.runner(t, c)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		_, err := r.Validate(ctx, runner.Task{Name: runner.TaskAggregatedValidation, Round: 5}, testModel())
		done <- err
	}()
	pid, err := strconv.Atoi(waitFile(t, filepath.Join(f.spy, "pid")))
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	select {
	case err = <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the task did not stop after cancellation")
	}
	if !errors.Is(err, context.Canceled) || errors.Is(err, ErrTimeout) {
		t.Fatalf("error %v does not wrap context.Canceled alone", err)
	}
	if !strings.Contains(err.Error(), "aggregated_model_validation round 5: cancelled") {
		t.Errorf("error = %v", err)
	}
	processGone(t, pid)

	if _, err := r.Validate(ctx, runner.Task{Name: runner.TaskAggregatedValidation}, testModel()); !errors.Is(err, context.Canceled) {
		t.Errorf("a task on a cancelled context: %v", err)
	}
}

func TestLongLines(t *testing.T) {
	f := newFixture(t)
	c := f.config(f.script(t, "long.sh", `
head -c 20000 /dev/zero | tr '\0' 'x' >&2
printf '\nlast words\n' >&2
exit 1`))
	r := f.runner(t, c)
	_, err := r.Train(context.Background(), runner.Task{Name: runner.TaskTrain}, testModel())
	var te *TaskError
	if !errors.As(err, &te) {
		t.Fatalf("error %v", err)
	}
	if len(te.Stderr) != 2 || len(te.Stderr[0]) > maxLineBytes+64 || !strings.HasSuffix(te.Stderr[0], "[line cut]") || te.Stderr[1] != "last words" {
		t.Errorf("stderr tail = %d lines, first %d bytes", len(te.Stderr), len(te.Stderr[0]))
	}
}

func TestNewRefuses(t *testing.T) {
	f := newFixture(t)
	f.script(t, "ok.sh", "true")
	if err := os.WriteFile(filepath.Join(f.dir, "plain.sh"), []byte("true\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	outside := t.TempDir()
	if err := os.WriteFile(filepath.Join(outside, "evil.sh"), []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Join(outside, "evil.sh"), filepath.Join(f.dir, "link.sh")); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(f.dir, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		mod  func(*Config)
		want string
	}{
		{"no directory", func(c *Config) { c.Dir = "" }, "no experiment directory"},
		{"missing directory", func(c *Config) { c.Dir = filepath.Join(f.dir, "nope") }, "no such file"},
		{"no command", func(c *Config) { c.Command = nil }, "runner.command is empty"},
		{"empty program", func(c *Config) { c.Command = []string{" "} }, "program name is empty"},
		{"dot-dot", func(c *Config) { c.Command = []string{"../evil.sh"} }, "leaves the experiment directory"},
		{"dot-dot inside", func(c *Config) { c.Command = []string{"./sub/../../evil.sh"} }, "leaves the experiment directory"},
		{"symlink out", func(c *Config) { c.Command = []string{"./link.sh"} }, "outside the experiment directory"},
		{"missing script", func(c *Config) { c.Command = []string{"./missing.sh"} }, "no such file"},
		{"not executable", func(c *Config) { c.Command = []string{"./plain.sh"} }, "is not executable"},
		{"a directory", func(c *Config) { c.Command = []string{"./sub"} }, "not a regular file"},
		{"not in PATH", func(c *Config) { c.Command = []string{"fx-no-such-program"} }, `"fx-no-such-program" not found in the runners' PATH`},
		{"relative python", func(c *Config) { c.Command = []string{"python3", "x.py"}; c.Python = "venv/bin/python3" }, "must be an absolute path"},
		{"missing python", func(c *Config) { c.Command = []string{"python", "x.py"}; c.Python = "/nonexistent/python3" }, "exec.python"},
		{"bad mode", func(c *Config) { c.Mode = "forking" }, `mode "forking"`},
		{"NUL argument", func(c *Config) { c.Command = []string{"./ok.sh", "a\x00b"} }, "NUL"},
		{"reserved env", func(c *Config) { c.Env = []string{"FX_OUTPUT_DIR=/etc"} }, "reserved for the runner protocol"},
		{"env without =", func(c *Config) { c.Env = []string{"JUSTANAME"} }, "not KEY=VALUE"},
		{"bad env name", func(c *Config) { c.Env = []string{"A-B=1"} }, "is not a letter"},
		{"env twice", func(c *Config) { c.Env = []string{"A=1", "A=2"} }, "set twice"},
		{"negative timeout", func(c *Config) { c.Timeout = -time.Second }, "negative"},
		{"hyperparameters not JSON", func(c *Config) { c.Hyperparameters = map[string]any{"lr": math.Inf(1)} }, "hyperparameters cannot be handed to the command as JSON"},
		{"data not JSON", func(c *Config) { c.Data = map[string]any{"f": func() {}} }, "data settings cannot be handed"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := f.config([]string{"./ok.sh"})
			tc.mod(&c)
			_, err := New(c)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("New: %v, want an error containing %q", err, tc.want)
			}
		})
	}
}

func TestCommandResolution(t *testing.T) {
	f := newFixture(t)
	f.script(t, "ok.sh", "true")
	bin := t.TempDir()
	if err := os.WriteFile(filepath.Join(bin, "site-tool"), []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		command []string
		env     []string
		want    string
	}{
		{"relative with a slash", []string{"./ok.sh", "--x"}, nil, filepath.Join(f.dir, "ok.sh")},
		{"absolute", []string{"/bin/sh", "ok.sh"}, nil, "/bin/sh"},
		{"site PATH", []string{"site-tool"}, []string{"PATH=relative/dir:" + bin}, filepath.Join(bin, "site-tool")},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := f.config(tc.command)
			c.Env = tc.env
			r := f.runner(t, c)
			got := r.Command()
			if got[0] != tc.want || !slices.Equal(got[1:], tc.command[1:]) {
				t.Errorf("Command() = %q, want %s and the arguments", got, tc.want)
			}
		})
	}
	// The envoy's own PATH never decides what runs: it may point at an
	// interpreter without the site's packages (a pyenv shim, a venv).
	t.Run("not the envoy PATH", func(t *testing.T) {
		t.Setenv("PATH", bin)
		if _, err := New(f.config([]string{"site-tool"})); err == nil {
			t.Error("a program found only in the envoy's PATH was accepted")
		}
	})
	t.Run("site python", func(t *testing.T) {
		t.Setenv("PATH", bin) // a python3 here must not win
		if err := os.WriteFile(filepath.Join(bin, "python3"), []byte("#!/bin/sh\n"), 0o755); err != nil {
			t.Fatal(err)
		}
		for _, name := range []string{"python", "python3"} {
			c := f.config([]string{name, "train.py"})
			c.Python = filepath.Join(bin, "site-tool")
			if got := f.runner(t, c).Command(); got[0] != c.Python || got[1] != "train.py" {
				t.Errorf("%s resolved to %q, want the site's interpreter %s", name, got, c.Python)
			}
		}
	})
}

func TestQuoteNonFinite(t *testing.T) {
	tests := []struct{ in, want string }{
		{`{"a": NaN}`, `{"a": "NaN"}`},
		{`[Infinity,-Infinity]`, `["Infinity","-Infinity"]`},
		{`{"NaN": "Infinity \" NaN"}`, `{"NaN": "Infinity \" NaN"}`},
		{`{"a\\": NaN}`, `{"a\\": "NaN"}`},
		{`{"a": 1}`, `{"a": 1}`},
	}
	for _, tc := range tests {
		if got := string(quoteNonFinite([]byte(tc.in))); got != tc.want {
			t.Errorf("quoteNonFinite(%s) = %s, want %s", tc.in, got, tc.want)
		}
	}
}

// TestConcurrentTasks: tasks have their own directories, so a Runner may run
// several at once and each gets its own results.
func TestConcurrentTasks(t *testing.T) {
	f := newFixture(t)
	r := f.runner(t, f.config(f.script(t, "round.sh", `cp "$FX_INPUT_MODEL" "$FX_OUTPUT_MODEL"
echo "{\"samples\": $FX_ROUND, \"metrics\": {\"round\": $FX_ROUND}}" > "$FX_OUTPUT_METRICS"`)))
	const n = 4
	var wg sync.WaitGroup
	results := make([]runner.Result, n)
	errs := make([]error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i], errs[i] = r.Train(context.Background(), runner.Task{Name: runner.TaskTrain, Round: i + 1}, testModel())
		}()
	}
	wg.Wait()
	for i := range n {
		if errs[i] != nil {
			t.Errorf("round %d: %v", i+1, errs[i])
		} else if results[i].Samples != int64(i+1) || results[i].Metrics["round"] != float64(i+1) {
			t.Errorf("round %d got %+v", i+1, results[i])
		}
	}
	if ents := f.workDirEntries(t); len(ents) != 0 {
		t.Errorf("task directories left behind: %v", ents)
	}
}
