package exec

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"math"
	"os"
	osexec "os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/fx-fl/fx/dataset"
	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/runner"
	pysdk "github.com/fx-fl/fx/sdk/python"
	"github.com/fx-fl/fx/tensor"
)

// systemPython is the interpreter the reference runner is tested with:
// Debian's, which has numpy.
const systemPython = "/usr/bin/python3"

// pythonRunnerDir is the reference runner, relative to this package.
const pythonRunnerDir = "../../examples/python-runner"

// needPython skips a test when the system Python lacks numpy.
func needPython(t *testing.T) {
	t.Helper()
	if err := osexec.Command(systemPython, "-c", "import numpy").Run(); err != nil {
		t.Skipf("%s cannot import numpy (%v); the reference runner needs it", systemPython, err)
	}
}

// syntheticData is a small learnable data set, as an envoy loads it.
func syntheticData(t *testing.T) *dataset.Dataset {
	t.Helper()
	d, err := dataset.Load(dataset.Config{Kind: dataset.KindSynthetic, Shard: "1/2", Seed: 3, Features: 8, Classes: 3, TrainSamples: 600, ValidSamples: 200})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// pythonConfig runs the reference runner as the example plan does, at a
// site whose runners' PATH resolves python3 to Debian's, with the site's
// data and library as an envoy hands them over.
func pythonConfig(t *testing.T, log hclog.Logger, mode string) Config {
	t.Helper()
	dir, err := filepath.Abs(pythonRunnerDir)
	if err != nil {
		t.Fatal(err)
	}
	return Config{
		Dir:             dir,
		Command:         []string{"python3", "runner.py"},
		Mode:            mode,
		Timeout:         2 * time.Minute,
		Hyperparameters: map[string]any{"epochs": 3, "lr": 0.1, "batch_size": 32},
		Seed:            1,
		Dataset:         syntheticData(t),
		PythonLibrary:   pysdk.SiteLibrary,
		Env:             []string{"PATH=/usr/bin:/bin"},
		Logger:          log,
		WorkDir:         t.TempDir(),
	}
}

// softmaxModel is fx's softmax layout with small deterministic weights.
func softmaxModel(features, classes int64, dtype tensor.DType) tensor.Model {
	w := tensor.New("fc0.weight", dtype, []int64{classes, features})
	b := tensor.New("fc0.bias", dtype, []int64{classes})
	for _, t := range []*tensor.Tensor{w, b} {
		for i := range t.Elements() {
			v := float32(math.Sin(float64(i+1))) * 0.05
			switch dtype {
			case tensor.F32:
				t.Float32s()[i] = v
			case tensor.F64:
				t.Float64s()[i] = float64(v)
			case tensor.F16:
				binary.LittleEndian.PutUint16(t.Data[2*i:], tensor.Float32ToF16(v))
			case tensor.BF16:
				binary.LittleEndian.PutUint16(t.Data[2*i:], tensor.Float32ToBF16(v))
			}
		}
	}
	return tensor.Model{w, b}
}

// TestPythonRunnerTrainValidate runs the reference runner, written on the
// site library, in both modes: the library speaks both protocols.
func TestPythonRunnerTrainValidate(t *testing.T) {
	needPython(t)
	for _, mode := range []string{ModePersistent, ModePerTask} {
		t.Run(mode, func(t *testing.T) { testPythonRunner(t, mode) })
	}
}

func testPythonRunner(t *testing.T, mode string) {
	logs := &syncBuffer{}
	log := hclog.New(&hclog.LoggerOptions{Output: logs, Level: hclog.Info})
	r, err := New(pythonConfig(t, log, mode))
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if got := r.Command()[0]; got != systemPython {
		t.Errorf("python3 resolved to %s, want %s", got, systemPython)
	}
	ctx := context.Background()
	in := softmaxModel(8, 3, tensor.F32)

	before, err := r.Validate(ctx, runner.Task{Name: runner.TaskAggregatedValidation, Round: 0}, in)
	if err != nil {
		t.Fatalf("validate the initial model: %v", err)
	}
	trained, err := r.Train(ctx, runner.Task{Name: runner.TaskTrain, Round: 0}, in)
	if err != nil {
		t.Fatalf("train: %v\nlog:\n%s", err, logs)
	}
	if err := in.Matches(trained.Model); err != nil {
		t.Fatalf("trained model: %v", err)
	}
	if bytes.Equal(trained.Model[0].Data, in[0].Data) {
		t.Error("training left fc0.weight unchanged")
	}
	if trained.Samples != 300 {
		t.Errorf("train samples = %d, want 300 (shard 1/2 of 600)", trained.Samples)
	}
	after, err := r.Validate(ctx, runner.Task{Name: runner.TaskLocalValidation, Round: 0}, trained.Model)
	if err != nil {
		t.Fatalf("validate the trained model: %v", err)
	}
	for _, res := range []runner.Result{before, trained, after} {
		acc, ok := res.Metrics["accuracy"]
		if _, hasLoss := res.Metrics["loss"]; !ok || !hasLoss || acc < 0 || acc > 1 {
			t.Errorf("metrics %v lack a loss or an accuracy in [0, 1]", res.Metrics)
		}
	}
	if before.Samples != 100 || after.Samples != 100 {
		t.Errorf("validation samples = %d and %d, want 100", before.Samples, after.Samples)
	}
	if after.Metrics["accuracy"] < 0.8 || after.Metrics["accuracy"] <= before.Metrics["accuracy"] {
		t.Errorf("accuracy went from %.3f to %.3f; want above 0.8 after training", before.Metrics["accuracy"], after.Metrics["accuracy"])
	}
	if !strings.Contains(logs.String(), "epoch 3/3: loss") {
		t.Errorf("the runner's progress is not in the log:\n%s", logs)
	}

	// The same seed and round repeat exactly.
	again, err := r.Train(ctx, runner.Task{Name: runner.TaskTrain, Round: 0}, in)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(again.Model[0].Data, trained.Model[0].Data) {
		t.Error("a rerun of the same round trained different weights")
	}
}

func TestPythonRunnerDTypes(t *testing.T) {
	needPython(t)
	for _, dt := range []tensor.DType{tensor.F64, tensor.F16, tensor.BF16} {
		t.Run(string(dt), func(t *testing.T) {
			r, err := New(pythonConfig(t, nil, ModePersistent))
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			in := softmaxModel(8, 3, dt)
			res, err := r.Train(context.Background(), runner.Task{Name: runner.TaskTrain, Round: 1}, in)
			if err != nil {
				t.Fatalf("train: %v", err)
			}
			if err := in.Matches(res.Model); err != nil {
				t.Fatalf("trained model: %v", err)
			}
			if bytes.Equal(res.Model[0].Data, in[0].Data) {
				t.Error("training left fc0.weight unchanged")
			}
		})
	}
}

func TestPythonRunnerReportsErrors(t *testing.T) {
	needPython(t)
	tests := []struct {
		name  string
		model tensor.Model
		hyper map[string]any
		want  error
		text  string
	}{
		// The runner says what is wrong and goes on serving.
		{"model for other data", softmaxModel(784, 10, tensor.F32), nil, ErrReported,
			"this runner trains softmax regression"},
		// The runner cannot start: a traceback before it is ready.
		{"unknown hyperparameter", softmaxModel(8, 3, tensor.F32), map[string]any{"epoch": 1}, ErrExit,
			"unknown hyperparameters ['epoch']"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := pythonConfig(t, nil, ModePersistent)
			if tc.hyper != nil {
				c.Hyperparameters = tc.hyper
			}
			r, err := New(c)
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			_, err = r.Train(context.Background(), runner.Task{Name: runner.TaskTrain}, tc.model)
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.text) {
				t.Errorf("error %v, want %v naming %q", err, tc.want, tc.text)
			}
		})
	}
}

// TestExamplePlan checks that the example's plan is valid and that its
// command resolves at a site with /usr/bin in PATH.
func TestExamplePlan(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(pythonRunnerDir, experiment.PlanFile))
	if err != nil {
		t.Fatal(err)
	}
	plan, err := experiment.ParsePlan(b)
	if err != nil {
		t.Fatalf("plan.yaml: %v", err)
	}
	if plan.Runner.Kind != experiment.RunnerExec {
		t.Fatalf("runner.kind = %q", plan.Runner.Kind)
	}
	c := pythonConfig(t, nil, plan.Runner.Mode)
	c.Command = plan.Runner.Command
	c.Hyperparameters = plan.Runner.Hyperparameters
	c.Timeout = plan.Runner.Timeout.Std()
	c.Seed = plan.Runner.Seed
	if _, err := New(c); err != nil {
		t.Fatalf("the example plan's command does not resolve: %v", err)
	}
}

// TestPythonRunnerReusesModelFiles: over rounds, the persistent runner and
// fx.site write each model over a file of an earlier one instead of new
// files (the kernel's fresh pages are what makes big models slow), and
// every round still trains from its own global model.
func TestPythonRunnerReusesModelFiles(t *testing.T) {
	needPython(t)
	r, err := New(pythonConfig(t, hclog.NewNullLogger(), ModePersistent))
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	ctx := context.Background()
	global := softmaxModel(8, 3, tensor.F32)
	var settled time.Time
	for n := 1; n <= 6; n++ {
		trained, err := round(ctx, r, n, global)
		if err != nil {
			t.Fatalf("round %d: %v", n, err)
		}
		if bytes.Equal(trained[0].Data, global[0].Data) {
			t.Fatalf("round %d: training left fc0.weight unchanged", n)
		}
		global = trained
		if n == 2 {
			settled = time.Now() // by now both kept model files exist
		}
	}
	files, err := filepath.Glob(filepath.Join(r.persistent.scratch, "models", "*"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no model files: %v", err)
	}
	for _, f := range files {
		var st unix.Statx_t
		if err := unix.Statx(unix.AT_FDCWD, f, 0, unix.STATX_BTIME, &st); err != nil || st.Mask&unix.STATX_BTIME == 0 {
			t.Skipf("the file system does not tell when %s was made: %v", f, err)
		}
		if born := time.Unix(st.Btime.Sec, int64(st.Btime.Nsec)); born.After(settled) {
			t.Errorf("%s was made in round 3 or later (%s after round 2 ended): model files are not reused", filepath.Base(f), born.Sub(settled))
		}
	}
}
