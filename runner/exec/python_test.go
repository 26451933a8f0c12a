package exec

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"math"
	"os"
	osexec "os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/fx-fl/fx/dataset"
	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/runner"
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

// pythonConfig runs the reference runner as the example plan does, with
// /usr/bin first in the PATH that resolves python3.
func pythonConfig(t *testing.T, log hclog.Logger, data map[string]any) Config {
	t.Helper()
	dir, err := filepath.Abs(pythonRunnerDir)
	if err != nil {
		t.Fatal(err)
	}
	return Config{
		Dir:             dir,
		Command:         []string{"python3", "runner.py"},
		Mode:            ModePerTask,
		Timeout:         2 * time.Minute,
		Hyperparameters: map[string]any{"epochs": 3, "lr": 0.1, "batch_size": 32},
		Seed:            1,
		Data:            data,
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

var syntheticData = map[string]any{
	"kind": "synthetic", "shard": "1/2", "seed": 3,
	"features": 8, "classes": 3, "train_samples": 600, "valid_samples": 200,
}

func TestPythonRunnerTrainValidate(t *testing.T) {
	needPython(t)
	logs := &syncBuffer{}
	log := hclog.New(&hclog.LoggerOptions{Output: logs, Level: hclog.Info})
	r, err := New(pythonConfig(t, log, syntheticData))
	if err != nil {
		t.Fatal(err)
	}
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
	if !strings.Contains(logs.String(), "runner.py: epoch 3/3: loss") {
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
			r, err := New(pythonConfig(t, nil, syntheticData))
			if err != nil {
				t.Fatal(err)
			}
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
		data  map[string]any
		want  string
	}{
		{"model for other data", softmaxModel(784, 10, tensor.F32), nil, syntheticData,
			"runner.py: error: the input model's fc0.weight is [10, 784] but the data (8 features, 3 classes) needs [3, 8]"},
		{"unknown hyperparameter", softmaxModel(8, 3, tensor.F32), map[string]any{"epoch": 1}, syntheticData,
			"unknown hyperparameters ['epoch']"},
		{"unsupported data", softmaxModel(8, 3, tensor.F32), nil, map[string]any{"kind": "csv", "path": "/x.csv"},
			"data kind 'csv' is not supported"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := pythonConfig(t, nil, tc.data)
			if tc.hyper != nil {
				c.Hyperparameters = tc.hyper
			}
			r, err := New(c)
			if err != nil {
				t.Fatal(err)
			}
			_, err = r.Train(context.Background(), runner.Task{Name: runner.TaskTrain}, tc.model)
			if !errors.Is(err, ErrExit) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %v, want ErrExit naming %q", err, tc.want)
			}
		})
	}
}

// writeIDX writes an IDX file of unsigned bytes, gzipped if asked.
func writeIDX(t *testing.T, path string, dims []uint32, data []byte, gz bool) {
	t.Helper()
	var b bytes.Buffer
	b.Write([]byte{0, 0, 0x08, byte(len(dims))})
	for _, d := range dims {
		binary.Write(&b, binary.BigEndian, d)
	}
	b.Write(data)
	out := b.Bytes()
	if gz {
		var z bytes.Buffer
		zw := gzip.NewWriter(&z)
		zw.Write(out)
		zw.Close()
		out = z.Bytes()
		path += ".gz"
	}
	if err := os.WriteFile(path, out, 0o600); err != nil {
		t.Fatal(err)
	}
}

// splitDigest is what runner.py describe-data prints for one split.
type splitDigest struct {
	Samples int    `json:"samples"`
	X       string `json:"x_sha256"`
	Y       string `json:"y_sha256"`
}

func digestSplit(s dataset.Split) splitDigest {
	x := make([]byte, 4*len(s.X))
	for i, v := range s.X {
		binary.LittleEndian.PutUint32(x[4*i:], math.Float32bits(v))
	}
	y := make([]byte, 4*len(s.Y))
	for i, v := range s.Y {
		binary.LittleEndian.PutUint32(y[4*i:], uint32(v))
	}
	hx, hy := sha256.Sum256(x), sha256.Sum256(y)
	return splitDigest{Samples: s.N, X: hex.EncodeToString(hx[:]), Y: hex.EncodeToString(hy[:])}
}

// TestPythonShardsMatchGo checks that the reference runner cuts IDX data
// into exactly the shards fx's own loader cuts, so an exec experiment and a
// builtin one see the same samples at every site.
func TestPythonShardsMatchGo(t *testing.T) {
	needPython(t)
	dir := t.TempDir()
	const side, nTrain, nTest = 3, 103, 37
	image := func(n int, salt byte) []byte {
		b := make([]byte, n*side*side)
		for i := range b {
			b[i] = byte(i*7) + salt
		}
		return b
	}
	labels := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte((i * 5) % 10)
		}
		return b
	}
	writeIDX(t, filepath.Join(dir, "train-images-idx3-ubyte"), []uint32{nTrain, side, side}, image(nTrain, 1), true)
	writeIDX(t, filepath.Join(dir, "train-labels-idx1-ubyte"), []uint32{nTrain}, labels(nTrain), false)
	writeIDX(t, filepath.Join(dir, "t10k-images-idx3-ubyte"), []uint32{nTest, side, side}, image(nTest, 2), false)
	writeIDX(t, filepath.Join(dir, "t10k-labels-idx1-ubyte"), []uint32{nTest}, labels(nTest), true)

	script := filepath.Join(pythonRunnerDir, "runner.py")
	for _, tc := range []struct {
		shard string
		seed  int64
	}{{"", 0}, {"2/3", 11}, {"4/4", -5}, {"1/7", 1 << 40}} {
		t.Run(tc.shard, func(t *testing.T) {
			d, err := dataset.LoadIDX(dataset.Config{Kind: dataset.KindIDX, Path: dir, Shard: tc.shard, Seed: tc.seed})
			if err != nil {
				t.Fatal(err)
			}
			settings, _ := json.Marshal(map[string]any{"kind": "idx", "path": dir, "shard": tc.shard, "seed": tc.seed})
			out, err := osexec.Command(systemPython, script, "describe-data", string(settings)).Output()
			if err != nil {
				t.Fatalf("describe-data: %v", err)
			}
			var got struct {
				Features, Classes int
				Train, Valid      splitDigest
			}
			if err := json.Unmarshal(out, &got); err != nil {
				t.Fatalf("describe-data printed %s: %v", out, err)
			}
			if got.Features != d.Features() || got.Classes != d.Classes {
				t.Errorf("python sees %d features and %d classes, Go %d and %d", got.Features, got.Classes, d.Features(), d.Classes)
			}
			if want := digestSplit(d.Train); got.Train != want {
				t.Errorf("training shard: python %+v, Go %+v", got.Train, want)
			}
			if want := digestSplit(d.Valid); got.Valid != want {
				t.Errorf("validation shard: python %+v, Go %+v", got.Valid, want)
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
	c := pythonConfig(t, nil, nil)
	c.Command = plan.Runner.Command
	c.Hyperparameters = plan.Runner.Hyperparameters
	c.Timeout = plan.Runner.Timeout.Std()
	c.Seed = plan.Runner.Seed
	if _, err := New(c); err != nil {
		t.Fatalf("the example plan's command does not resolve: %v", err)
	}
}
