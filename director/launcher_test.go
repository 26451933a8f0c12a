package director

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fx-fl/fx/aggregator"
	"github.com/fx-fl/fx/experiment"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/tensor"
)

func writeArchive(t *testing.T, plan string, model tensor.Model) string {
	t.Helper()
	src := t.TempDir()
	must(t, os.WriteFile(filepath.Join(src, experiment.PlanFile), []byte(plan), 0o600))
	if model != nil {
		must(t, tensor.WriteFile(filepath.Join(src, InitialModelFile), model, nil))
	}
	path := filepath.Join(t.TempDir(), "archive")
	f, err := os.Create(path)
	must(t, err)
	must(t, experiment.Pack(src, f))
	must(t, f.Close())
	return path
}

func TestInitialModel(t *testing.T) {
	softmax := "name: s\nrounds: 1\nrunner: {kind: builtin, model: softmax}\n"
	exec := "name: x\nrounds: 1\nrunner: {kind: exec, command: [python3, train.py]}\n"
	shard := func(shape []int64, classes int32) *fxv1.DatasetShard {
		return &fxv1.DatasetShard{SampleShape: shape, Classes: classes, TrainSamples: 1}
	}
	given := tensor.Model{tensor.New("w", tensor.F32, []int64{2, 3})}
	tests := []struct {
		name    string
		plan    string
		model   tensor.Model
		shards  map[string]*fxv1.DatasetShard
		tensors []string
		err     string
	}{
		{"built-in from shard shapes", softmax, nil, map[string]*fxv1.DatasetShard{"a": shard([]int64{4}, 3), "b": shard([]int64{4}, 3)}, []string{"fc0.weight", "fc0.bias"}, ""},
		{"archive's model wins", softmax, given, map[string]*fxv1.DatasetShard{"a": shard([]int64{4}, 3)}, []string{"w"}, ""},
		{"exec with a model", exec, given, nil, []string{"w"}, ""},
		{"exec without a model", exec, nil, nil, nil, "model.safetensors"},
		{"shapes differ", softmax, nil, map[string]*fxv1.DatasetShard{"a": shard([]int64{4}, 3), "b": shard([]int64{5}, 3)}, nil, "different shapes"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			plan, err := experiment.ParsePlan([]byte(tt.plan))
			must(t, err)
			spec := LaunchSpec{ExperimentID: "x", Plan: plan, Shards: tt.shards,
				ArchivePath: writeArchive(t, tt.plan, tt.model), Dir: filepath.Join(t.TempDir(), "aggregator")}
			m, err := initialModel(spec)
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("error %v, want it to mention %q", err, tt.err)
				}
				return
			}
			must(t, err)
			var names []string
			for _, x := range m {
				names = append(names, x.Name)
			}
			if strings.Join(names, ",") != strings.Join(tt.tensors, ",") {
				t.Errorf("tensors %v, want %v", names, tt.tensors)
			}
			if _, err := os.Stat(filepath.Join(filepath.Dir(spec.Dir), "unpack")); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("scratch directory left behind: %v", err)
			}
		})
	}
}

// TestInitialModelOfARelaunch: a relaunch takes the round-0 file an
// earlier launch kept, and passes over a damaged one (before, it failed
// every relaunch, and so the experiment, for good).
func TestInitialModelOfARelaunch(t *testing.T) {
	plan := "name: x\nrounds: 1\nrunner: {kind: exec, command: [python3, train.py]}\n"
	p, err := experiment.ParsePlan([]byte(plan))
	must(t, err)
	archived := tensor.Model{tensor.New("archived", tensor.F32, []int64{2})}
	for name, c := range map[string]struct {
		write func(path string) error
		want  string
	}{
		"kept": {func(path string) error {
			return tensor.WriteFile(path, tensor.Model{tensor.New("kept", tensor.F32, []int64{1})}, nil)
		}, "kept"},
		"damaged": {func(path string) error {
			return os.WriteFile(path, []byte("\x10\x00\x00\x00\x00\x00\x00\x00{\"w\":"), 0o600)
		}, "archived"},
	} {
		t.Run(name, func(t *testing.T) {
			spec := LaunchSpec{ExperimentID: "x", Plan: p, ArchivePath: writeArchive(t, plan, archived), Dir: filepath.Join(t.TempDir(), "aggregator")}
			path := aggregator.ModelPath(spec.Dir, 0)
			must(t, os.MkdirAll(filepath.Dir(path), 0o700))
			must(t, c.write(path))
			m, err := initialModel(spec)
			must(t, err)
			if len(m) != 1 || m[0].Name != c.want {
				t.Fatalf("initial model %v, want the %s one", m, c.want)
			}
		})
	}
}

// TestInProcessLaunch runs a real aggregator until it has written its
// initial model and checkpoint, then stops it, and relaunches it from the
// same directory as after a director restart.
func TestInProcessLaunch(t *testing.T) {
	plan := "name: s\nrounds: 2\nrunner: {kind: builtin, model: softmax}\n"
	p, err := experiment.ParsePlan([]byte(plan))
	must(t, err)
	dir := filepath.Join(t.TempDir(), "aggregator")
	archivePath := writeArchive(t, plan, nil)
	for launch := 1; launch <= 2; launch++ {
		lis, err := net.Listen("tcp", "127.0.0.1:0")
		must(t, err)
		agg, err := InProcess{}.Launch(LaunchSpec{
			ExperimentID: "exp", Plan: p, Participants: []string{"a"},
			Registered:  map[string]aggregator.SampleCounts{"a": {Train: 1}},
			Shards:      map[string]*fxv1.DatasetShard{"a": {SampleShape: []int64{4}, Classes: 2, TrainSamples: 1}},
			ArchivePath: archivePath, Dir: dir, Listener: lis,
		})
		must(t, err)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- agg.Run(ctx) }()
		eventually(t, "initial model written", func() bool { return fileExists(aggregator.ModelPath(dir, 0)) })
		hist, _, err := InProcess{}.History(dir)
		must(t, err)
		if len(hist) != 0 {
			t.Errorf("launch %d: history %v before any round", launch, hist)
		}
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("launch %d: Run = %v, want context.Canceled", launch, err)
		}
	}
}
