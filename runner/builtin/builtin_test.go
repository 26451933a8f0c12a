package builtin

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math"
	"runtime"
	"slices"
	"strings"
	"testing"

	"github.com/fx-fl/fx/dataset"
	"github.com/fx-fl/fx/runner"
	"github.com/fx-fl/fx/tensor"
)

func synthetic(t testing.TB, c dataset.Config) *dataset.Dataset {
	t.Helper()
	c.Kind = dataset.KindSynthetic
	d, err := dataset.Load(c)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func newRunner(t testing.TB, model string, hyper map[string]any, d *dataset.Dataset) (*Runner, tensor.Model) {
	t.Helper()
	r, err := New(Config{Model: model, Hyperparameters: hyper, Data: d})
	if err != nil {
		t.Fatal(err)
	}
	m, err := InitialModel(model, hyper, d.SampleShape, d.Classes)
	if err != nil {
		t.Fatal(err)
	}
	return r, m
}

func TestInitialModel(t *testing.T) {
	tests := []struct {
		model  string
		hyper  map[string]any
		shape  []int64
		layout []string
	}{
		{ModelSoftmax, nil, []int64{28, 28}, []string{"fc0.weight [10 784]", "fc0.bias [10]"}},
		{ModelMLP, nil, []int64{28, 28}, []string{"fc0.weight [128 784]", "fc0.bias [128]", "fc1.weight [10 128]", "fc1.bias [10]"}},
		{ModelMLP, map[string]any{"hidden": []any{256, 128}}, []int64{3, 4}, []string{
			"fc0.weight [256 12]", "fc0.bias [256]", "fc1.weight [128 256]", "fc1.bias [128]", "fc2.weight [10 128]", "fc2.bias [10]"}},
	}
	for _, tc := range tests {
		t.Run(strings.Join(tc.layout, ","), func(t *testing.T) {
			m, err := InitialModel(tc.model, tc.hyper, tc.shape, 10)
			if err != nil {
				t.Fatal(err)
			}
			if err := m.Validate(); err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, tt := range m {
				if tt.DType != tensor.F32 {
					t.Errorf("%s is %s, want F32", tt.Name, tt.DType)
				}
				got = append(got, fmt.Sprint(tt.Name, " ", tt.Shape))
			}
			if !slices.Equal(got, tc.layout) {
				t.Errorf("layout %q, want %q", got, tc.layout)
			}
			// Hidden layers are He-initialised: std ≈ sqrt(2/fan_in).
			if tc.model == ModelMLP {
				w := m[0].Float32s()
				var ss float64
				for _, v := range w {
					ss += float64(v) * float64(v)
				}
				std, want := math.Sqrt(ss/float64(len(w))), math.Sqrt(2/float64(m[0].Shape[1]))
				if math.Abs(std-want) > 0.05*want {
					t.Errorf("fc0.weight std %.4f, want about %.4f", std, want)
				}
			}
			for _, tt := range m {
				if strings.HasSuffix(tt.Name, ".bias") && slices.ContainsFunc(tt.Float32s(), func(v float32) bool { return v != 0 }) {
					t.Errorf("%s is not zero", tt.Name)
				}
			}
			again, err := InitialModel(tc.model, tc.hyper, tc.shape, 10)
			if err != nil {
				t.Fatal(err)
			}
			for i := range m {
				if !bytes.Equal(m[i].Data, again[i].Data) {
					t.Errorf("%s differs between two calls", m[i].Name)
				}
			}
			hyper := map[string]any{"seed": 99}
			for k, v := range tc.hyper {
				hyper[k] = v
			}
			other, err := InitialModel(tc.model, hyper, tc.shape, 10)
			if err != nil {
				t.Fatal(err)
			}
			if bytes.Equal(m[0].Data, other[0].Data) {
				t.Error("seeds 0 and 99 give the same weights")
			}
		})
	}
}

func TestInitialModelErrors(t *testing.T) {
	tests := []struct {
		name    string
		model   string
		hyper   map[string]any
		shape   []int64
		classes int
		want    string
	}{
		{"unknown model", "resnet", nil, []int64{4}, 3, `unknown model "resnet"`},
		{"unknown key", ModelMLP, map[string]any{"dropout": 0.5}, []int64{4}, 3, `"dropout"`},
		{"one class", ModelSoftmax, nil, []int64{4}, 1, "1 classes"},
		{"empty shape", ModelSoftmax, nil, nil, 3, "empty sample shape"},
		{"zero dimension", ModelSoftmax, nil, []int64{4, 0}, 3, "non-positive"},
		{"too large", ModelMLP, map[string]any{"hidden": []any{65536, 65536}}, []int64{100}, 3, "parameters"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := InitialModel(tc.model, tc.hyper, tc.shape, tc.classes)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one mentioning %q", err, tc.want)
			}
		})
	}
}

// TestLearnsSynthetic trains both models on generated clusters: accuracy
// must rise well above chance and the loss must fall.
func TestLearnsSynthetic(t *testing.T) {
	d := synthetic(t, dataset.Config{Features: 20, Classes: 5, TrainSamples: 2000, ValidSamples: 500, ClusterSpread: 1.5, Seed: 3})
	tests := []struct {
		model string
		hyper map[string]any
	}{
		{ModelSoftmax, map[string]any{"lr": 0.05, "batch_size": 32, "epochs": 3}},
		{ModelMLP, map[string]any{"hidden": []any{32, 16}, "lr": 0.05, "batch_size": 32, "epochs": 3, "weight_decay": 1e-4}},
	}
	for _, tc := range tests {
		t.Run(tc.model, func(t *testing.T) {
			r, m := newRunner(t, tc.model, tc.hyper, d)
			ctx := context.Background()
			before, err := r.Validate(ctx, runner.Task{Name: runner.TaskAggregatedValidation}, m)
			if err != nil {
				t.Fatal(err)
			}
			res, err := r.Train(ctx, runner.Task{Name: runner.TaskTrain, Round: 1}, m)
			if err != nil {
				t.Fatal(err)
			}
			if res.Samples != int64(d.Train.N) {
				t.Errorf("train samples %d, want %d", res.Samples, d.Train.N)
			}
			if err := m.Matches(res.Model); err != nil {
				t.Errorf("trained model changed layout: %v", err)
			}
			after, err := r.Validate(ctx, runner.Task{Name: runner.TaskLocalValidation, Round: 1}, res.Model)
			if err != nil {
				t.Fatal(err)
			}
			if after.Samples != int64(d.Valid.N) || after.Model != nil {
				t.Errorf("validate returned %d samples and a model %v", after.Samples, after.Model != nil)
			}
			t.Logf("%s: valid accuracy %.3f → %.3f, loss %.3f → %.3f; train accuracy %.3f loss %.3f", tc.model,
				before.Metrics["accuracy"], after.Metrics["accuracy"], before.Metrics["loss"], after.Metrics["loss"],
				res.Metrics["accuracy"], res.Metrics["loss"])
			// The clusters overlap: a linear model reaches about 0.87.
			if after.Metrics["accuracy"] < 0.8 {
				t.Errorf("validation accuracy %.3f after training, want ≥ 0.8", after.Metrics["accuracy"])
			}
			if after.Metrics["loss"] >= before.Metrics["loss"] {
				t.Errorf("loss did not fall: %.3f → %.3f", before.Metrics["loss"], after.Metrics["loss"])
			}
			if res.Metrics["accuracy"] < 0.8 || res.Metrics["loss"] <= 0 {
				t.Errorf("training metrics %v", res.Metrics)
			}
		})
	}
}

// TestDeterminism trains twice from the same model with the same seed and
// round: the weights must match bit for bit, also on one core (the layers
// are wide enough for parallelGemm to split the products). Another round or
// seed must give other weights (the shuffle differs), and the input model
// must be left untouched.
func TestDeterminism(t *testing.T) {
	d := synthetic(t, dataset.Config{Features: 12, Classes: 3, TrainSamples: 700, ValidSamples: 100, Seed: 1})
	hyper := map[string]any{"hidden": []any{200, 150}, "batch_size": 100, "epochs": 2, "seed": 5}
	r1, m := newRunner(t, ModelMLP, hyper, d)
	r2, _ := newRunner(t, ModelMLP, hyper, d)
	orig := m.Clone()
	ctx := context.Background()
	train := func(r *Runner, round int) tensor.Model {
		t.Helper()
		res, err := r.Train(ctx, runner.Task{Name: runner.TaskTrain, Round: round}, m)
		if err != nil {
			t.Fatal(err)
		}
		return res.Model
	}
	a, b := train(r1, 3), train(r2, 3)
	again := train(r1, 3) // a runner's state does not leak between tasks
	other := train(r1, 4)
	procs := runtime.GOMAXPROCS(1)
	single := train(r2, 3)
	runtime.GOMAXPROCS(procs)
	for i := range a {
		if !bytes.Equal(a[i].Data, b[i].Data) || !bytes.Equal(a[i].Data, again[i].Data) || !bytes.Equal(a[i].Data, single[i].Data) {
			t.Errorf("%s differs between identical runs", a[i].Name)
		}
		if !bytes.Equal(m[i].Data, orig[i].Data) {
			t.Errorf("Train changed its input tensor %s", m[i].Name)
		}
	}
	if bytes.Equal(a[0].Data, other[0].Data) {
		t.Error("rounds 3 and 4 trained identical weights")
	}
	hyper["seed"] = 6
	r3, err := New(Config{Model: ModelMLP, Hyperparameters: hyper, Data: d})
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(a[0].Data, train(r3, 3)[0].Data) {
		t.Error("seeds 5 and 6 trained identical weights")
	}
}

// TestModelOrder checks that the trained model lists its tensors in the
// order it was given them, whatever that order.
func TestModelOrder(t *testing.T) {
	d := synthetic(t, dataset.Config{Features: 4, Classes: 2, TrainSamples: 50, ValidSamples: 10})
	r, m := newRunner(t, ModelMLP, nil, d)
	m.Sort()
	res, err := r.Train(context.Background(), runner.Task{Name: runner.TaskTrain}, m)
	if err != nil {
		t.Fatal(err)
	}
	for i := range m {
		if res.Model[i].Name != m[i].Name {
			t.Fatalf("tensor %d is %s, want %s", i, res.Model[i].Name, m[i].Name)
		}
	}
}

func TestLayoutMismatch(t *testing.T) {
	d := synthetic(t, dataset.Config{Features: 6, Classes: 3, TrainSamples: 60, ValidSamples: 20})
	hyper := map[string]any{"hidden": []any{5}}
	r, good := newRunner(t, ModelMLP, hyper, d)
	wrongWidth, err := InitialModel(ModelMLP, map[string]any{"hidden": []any{7}}, d.SampleShape, d.Classes)
	if err != nil {
		t.Fatal(err)
	}
	softmax, err := InitialModel(ModelSoftmax, nil, d.SampleShape, d.Classes)
	if err != nil {
		t.Fatal(err)
	}
	renamed := good.Clone()
	renamed[1].Name = "fc0.beta"
	f64 := good.Clone()
	f64[3] = tensor.New("fc1.bias", tensor.F64, []int64{3})
	nan := good.Clone()
	nan[2].Float32s()[4] = float32(math.NaN())
	short := good.Clone()
	short[1].Data = short[1].Data[:8]
	tests := []struct {
		name  string
		model tensor.Model
		want  []string
	}{
		{"hidden width", wrongWidth, []string{"does not fit", "fc0.weight", "F32[7 6]", "want F32[5 6]"}},
		{"other model", softmax, []string{"does not fit", `"fc0.weight" is F32[3 6], want F32[5 6]`}},
		{"unknown tensor", renamed, []string{`unknown tensor "fc0.beta"`}},
		{"dtype", f64, []string{"fc1.bias", "F64"}},
		{"NaN", nan, []string{"fc1.weight", "element 4", "NaN"}},
		{"short data", short, []string{"fc0.bias", "needs 20 bytes, has 8"}},
		{"empty", nil, []string{`"fc0.weight" is missing`}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			for _, call := range []func(context.Context, runner.Task, tensor.Model) (runner.Result, error){r.Train, r.Validate} {
				_, err := call(context.Background(), runner.Task{Name: runner.TaskTrain}, tc.model)
				if err == nil {
					t.Fatal("no error")
				}
				for _, w := range append(tc.want, "builtin mlp") {
					if !strings.Contains(err.Error(), w) {
						t.Errorf("error %q does not mention %q", err, w)
					}
				}
			}
		})
	}
}

func TestCancel(t *testing.T) {
	d := synthetic(t, dataset.Config{Features: 8, Classes: 2, TrainSamples: 500, ValidSamples: 50})
	r, m := newRunner(t, ModelMLP, map[string]any{"batch_size": 10}, d)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := r.Train(ctx, runner.Task{Name: runner.TaskTrain, Round: 2}, m); !errors.Is(err, context.Canceled) {
		t.Errorf("Train: error %v, want context.Canceled", err)
	}
	if _, err := r.Validate(ctx, runner.Task{Name: runner.TaskAggregatedValidation}, m); !errors.Is(err, context.Canceled) {
		t.Errorf("Validate: error %v, want context.Canceled", err)
	}
	// The runner stays usable.
	if _, err := r.Train(context.Background(), runner.Task{Name: runner.TaskTrain, Round: 2}, m); err != nil {
		t.Fatal(err)
	}
}

func TestNewErrors(t *testing.T) {
	d := synthetic(t, dataset.Config{Features: 3, Classes: 2, TrainSamples: 20, ValidSamples: 5})
	broken := *d
	broken.Train.Y = broken.Train.Y[:3]
	tests := []struct {
		name string
		c    Config
		want string
	}{
		{"no data", Config{Model: ModelMLP}, "no data set"},
		{"unknown model", Config{Model: "svm", Data: d}, `unknown model "svm"`},
		{"unknown key", Config{Model: ModelSoftmax, Data: d, Hyperparameters: map[string]any{"epoch": 2}}, `unknown hyper-parameter "epoch"`},
		{"inconsistent data", Config{Model: ModelSoftmax, Data: &broken}, "train split"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := New(tc.c)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one mentioning %q", err, tc.want)
			}
		})
	}
}

func TestNoValidationSplit(t *testing.T) {
	d := synthetic(t, dataset.Config{Features: 3, Classes: 2, TrainSamples: 20, ValidSamples: 5})
	d.Valid = dataset.Split{}
	r, m := newRunner(t, ModelSoftmax, nil, d)
	if _, err := r.Validate(context.Background(), runner.Task{Name: runner.TaskAggregatedValidation}, m); !errors.Is(err, ErrNoValidation) {
		t.Fatalf("error %v, want ErrNoValidation", err)
	}
}

func TestDivergence(t *testing.T) {
	d := synthetic(t, dataset.Config{Features: 8, Classes: 3, TrainSamples: 200, ValidSamples: 20})
	r, m := newRunner(t, ModelSoftmax, map[string]any{"lr": 1e38}, d)
	_, err := r.Train(context.Background(), runner.Task{Name: runner.TaskTrain}, m)
	if err == nil || !strings.Contains(err.Error(), "diverged") || !strings.Contains(err.Error(), "lower lr") {
		t.Fatalf("error %v, want a divergence report", err)
	}
}
