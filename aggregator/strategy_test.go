package aggregator_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fx-fl/fx/aggregator"
	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/pki"
	"github.com/fx-fl/fx/runner"
	"github.com/fx-fl/fx/tensor"
)

// overshoot is a strategy for the tests: the global model moved by scale
// (aggregation.options.scale, default 1) times the weighted mean update.
// It records what it was given.
type overshoot struct {
	mu   sync.Mutex
	seen []aggregator.StrategyRound
}

func (s *overshoot) CheckOptions(o map[string]any) error {
	if v, ok := o["scale"]; ok {
		if _, isFloat := v.(float64); !isFloat {
			return fmt.Errorf("scale must be a number such as 1.5, got %v", v)
		}
	}
	return nil
}

func (s *overshoot) Aggregate(_ context.Context, r aggregator.StrategyRound) (tensor.Model, error) {
	s.mu.Lock()
	s.seen = append(s.seen, r)
	s.mu.Unlock()
	scale := 1.0
	if v, ok := r.Options["scale"].(float64); ok {
		scale = v
	}
	if scale == 0 {
		return tensor.Model{r.Global[0]}, nil // a broken result, for the test that expects one
	}
	var total float64
	for _, u := range r.Updates {
		total += u.Weight
	}
	out := make(tensor.Model, len(r.Global))
	for i, g := range r.Global {
		gv := g.Float32s()
		next := make([]float32, len(gv))
		for _, u := range r.Updates {
			uv := u.Model[i].Float32s()
			for j := range next {
				next[j] += float32(u.Weight / total * scale * float64(uv[j]-gv[j]))
			}
		}
		for j := range next {
			next[j] += gv[j]
		}
		out[i] = tensor.FromFloat32(g.Name, g.Shape, next)
	}
	return out, nil
}

var testOvershoot = &overshoot{}

func init() { aggregator.RegisterStrategy("test-overshoot", testOvershoot) }

const strategyRound = `
name: test
rounds: 1
participants: {min: 2}
runner: {kind: builtin, model: mlp}
aggregation: {algorithm: test-overshoot, options: %s}
stragglers: {deadline: 30s, min_reporting: 2}
tasks: [train, locally_tuned_model_validation]
best_model: {task: locally_tuned_model_validation}
`

// sendWeighted uploads, for each site, a train result stepping every
// weight by its step and claiming its samples, then a validation.
func sendWeighted(t *testing.T, f *federation, sites map[string][2]float32) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	for name, s := range sites {
		conn := dial(t, f, pki.RoleEnvoy, name)
		for _, u := range []upload{
			{collaborator: name, task: runner.TaskTrain, samples: int64(s[1]), tensors: goodTensors(s[0])},
			{collaborator: name, task: runner.TaskLocalValidation, samples: 10, metrics: map[string]float64{"accuracy": 0.5}},
		} {
			u.experiment, u.round = experimentID, 1
			if err := send(ctx, conn, u); err != nil {
				t.Fatalf("%s's %s: %v", name, u.task, err)
			}
		}
	}
}

// Site a steps every weight by 1 with 10 samples, b by 3 with 30: the
// weighted mean step is (10·1 + 30·3)/40 = 2.5, and scale 2 makes the
// round's bias 0 + 2·2.5 = 5 and its weights 1..6 + 5.
func TestRegisteredStrategyAggregatesTheRound(t *testing.T) {
	testOvershoot.mu.Lock()
	testOvershoot.seen = nil
	testOvershoot.mu.Unlock()
	f := newFederation(t, parsePlan(t, fmt.Sprintf(strategyRound, "{scale: 2.0}")), "a", "b")
	f.start()
	sendWeighted(t, f, map[string][2]float32{"a": {1, 10}, "b": {3, 30}})
	if err := f.wait(20 * time.Second); err != nil {
		t.Fatalf("Run: %v", err)
	}
	m := readModel(t, f.dir, 1)
	if got := values(m, "fc.bias"); !equalFloats(got, []float32{5, 5}) {
		t.Fatalf("bias %v, want [5 5]", got)
	}
	if got := values(m, "fc.weight"); !equalFloats(got, []float32{6, 7, 8, 9, 10, 11}) {
		t.Fatalf("weight %v, want [6 7 8 9 10 11]", got)
	}
	testOvershoot.mu.Lock()
	defer testOvershoot.mu.Unlock()
	if len(testOvershoot.seen) != 1 {
		t.Fatalf("the strategy ran %d times, want once", len(testOvershoot.seen))
	}
	r := testOvershoot.seen[0]
	var weights []float64
	for _, u := range r.Updates {
		weights = append(weights, u.Weight)
	}
	if r.Number != 1 || len(weights) != 2 || weights[0]+weights[1] != 40 || weights[0]*weights[1] != 300 {
		t.Fatalf("round %d with weights %v, want round 1 with the samples 10 and 30", r.Number, weights)
	}
	if got := values(r.Global, "fc.weight"); !equalFloats(got, []float32{1, 2, 3, 4, 5, 6}) {
		t.Fatalf("the strategy's global model is %v, want the initial one", got)
	}
}

// A strategy that returns a model the sites could not load fails the
// round, naming the strategy and what is wrong.
func TestRegisteredStrategyBadResultFailsTheRound(t *testing.T) {
	f := newFederation(t, parsePlan(t, fmt.Sprintf(strategyRound, "{scale: 0.0}")), "a", "b")
	f.start()
	sendWeighted(t, f, map[string][2]float32{"a": {1, 10}, "b": {3, 30}})
	err := f.wait(20 * time.Second)
	want := `round 1: aggregation failed: strategy test-overshoot returned a model unlike the global one: tensor "fc.bias" is missing`
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("Run: %v, want an error saying %q", err, want)
	}
}

func TestRegisteredStrategyOptionsCheckedWithThePlan(t *testing.T) {
	_, err := experiment.ParsePlan([]byte(fmt.Sprintf(strategyRound, "{scale: twice}")))
	if err == nil || !strings.Contains(err.Error(), "aggregation.options: for test-overshoot: scale must be a number") {
		t.Fatalf("plan: %v, want the strategy's complaint about scale", err)
	}
	defer func() {
		if r := recover(); r == nil || !strings.Contains(fmt.Sprint(r), "already registered") {
			t.Fatalf("a second registration: %v, want a panic saying it is taken", r)
		}
	}()
	aggregator.RegisterStrategy("test-overshoot", testOvershoot)
}
