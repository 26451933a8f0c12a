package exec

import (
	"context"
	"encoding/json"
	"math"
	"reflect"
	"strings"
	"testing"

	"github.com/fx-fl/fx/runner"
)

// TestTasksCarryProximalMu: the plan's training.proximal_mu reaches the
// command with every task, in both protocols.
func TestTasksCarryProximalMu(t *testing.T) {
	ctx := context.Background()
	t.Run("persistent", func(t *testing.T) {
		f := newFixture(t)
		c := f.fakeConfig(t, "ok")
		c.ProximalMu = 0.25
		r := f.runner(t, c)
		defer r.Close()
		if _, err := round(ctx, r, 1, testModel()); err != nil {
			t.Fatal(err)
		}
		want := []string{
			runner.TaskAggregatedValidation + " 0.25",
			runner.TaskTrain + " 0.25",
			runner.TaskLocalValidation + " 0.25",
		}
		if got := f.spyLines(t, "proximal_mu"); !reflect.DeepEqual(got, want) {
			t.Errorf("the runner saw proximal_mu %q, want %q", got, want)
		}
	})
	t.Run("per task", func(t *testing.T) {
		f := newFixture(t)
		c := f.config(f.script(t, "train.sh", `cp "$FX_TASK_JSON" "$SPY/task.json"
cp "$FX_INPUT_MODEL" "$FX_OUTPUT_MODEL"
`+goodMetrics))
		c.ProximalMu = 0.01
		r := f.runner(t, c)
		if _, err := r.Train(ctx, runner.Task{Name: runner.TaskTrain, Round: 2}, testModel()); err != nil {
			t.Fatal(err)
		}
		var spec map[string]any
		if err := json.Unmarshal([]byte(f.spyFile(t, "task.json")), &spec); err != nil {
			t.Fatal(err)
		}
		if spec["proximal_mu"] != 0.01 {
			t.Errorf("task.json proximal_mu = %v, want 0.01", spec["proximal_mu"])
		}
	})
	t.Run("refused", func(t *testing.T) {
		f := newFixture(t)
		for _, mu := range []float64{-1, math.NaN(), math.Inf(1)} {
			c := f.config(f.script(t, "x.sh", "exit 0"))
			c.ProximalMu = mu
			if _, err := New(c); err == nil || !strings.Contains(err.Error(), "training.proximal_mu") {
				t.Errorf("μ %v: error %v, want one naming training.proximal_mu", mu, err)
			}
		}
	})
}
