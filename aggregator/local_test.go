package aggregator_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/fx-fl/fx/pki"
	"github.com/fx-fl/fx/runner"
)

const localRound = `
name: test
rounds: 1
participants: {min: 2}
runner: {kind: builtin, model: mlp}
aggregation: {algorithm: %s, local: [%s]}
stragglers: {deadline: 30s, min_reporting: 2}
tasks: [train, locally_tuned_model_validation]
best_model: {task: locally_tuned_model_validation}
`

// weightOnly is goodTensors without the bias, which the plan keeps local.
func weightOnly(step float32) []rawTensor { return goodTensors(step)[:1] }

// With fc.bias local, the sites upload fc.weight alone; an upload that
// carries fc.bias is refused, so it never reaches the round. The round's
// model averages fc.weight ((1+3)/2 = 2 on each of 1..6, by fedavg over
// equal samples, or by a registered strategy) and keeps fc.bias at its
// initial [0 0].
func TestLocalTensorsStayOutOfTheRound(t *testing.T) {
	for _, alg := range []string{"fedavg", "fedadam", "median", "test-overshoot"} {
		t.Run(alg, func(t *testing.T) {
			f := newFederation(t, parsePlan(t, fmt.Sprintf(localRound, alg, "fc.bias")), "a", "b")
			f.start()
			ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
			defer cancel()
			for name, step := range map[string]float32{"a": 1, "b": 3} {
				conn := dial(t, f, pki.RoleEnvoy, name)
				err := send(ctx, conn, upload{experiment: experimentID, round: 1, collaborator: name, task: runner.TaskTrain, samples: 10, tensors: goodTensors(step)})
				if err == nil || !strings.Contains(err.Error(), `fc.bias`) {
					t.Fatalf("an upload with the local tensor: %v, want it refused naming fc.bias", err)
				}
				for _, u := range []upload{
					{collaborator: name, task: runner.TaskTrain, samples: 10, tensors: weightOnly(step)},
					{collaborator: name, task: runner.TaskLocalValidation, samples: 10, metrics: map[string]float64{"accuracy": 0.5}},
				} {
					u.experiment, u.round = experimentID, 1
					if err := send(ctx, conn, u); err != nil {
						t.Fatalf("%s's %s: %v", name, u.task, err)
					}
				}
			}
			if err := f.wait(20 * time.Second); err != nil {
				t.Fatalf("Run: %v", err)
			}
			m := readModel(t, f.dir, 1)
			if got := values(m, "fc.bias"); !equalFloats(got, []float32{0, 0}) {
				t.Fatalf("bias %v, want the initial [0 0]", got)
			}
			if len(m) != 2 {
				t.Fatalf("the round's model has %d tensors, want fc.weight and fc.bias", len(m))
			}
			w := values(m, "fc.weight")
			if alg == "fedadam" {
				// A server step moves every weight towards the mean,
				// by at most its lr; what matters here is that it ran.
				if equalFloats(w, []float32{1, 2, 3, 4, 5, 6}) {
					t.Fatalf("weight %v did not move", w)
				}
				return
			}
			if !equalFloats(w, []float32{3, 4, 5, 6, 7, 8}) {
				t.Fatalf("weight %v, want [3 4 5 6 7 8]", w)
			}
		})
	}
}

// A pattern that matches no tensor of the model fails the experiment at
// once, naming it, rather than aggregating what was meant to stay local;
// so does one that leaves nothing to aggregate.
func TestLocalPatternsMustFitTheModel(t *testing.T) {
	for _, c := range []struct{ local, want string }{
		{"'head.*'", `aggregation.local: "head.*" matches none of the model's tensors (fc.weight, fc.bias)`},
		{"'fc.*'", "matches every tensor of the model: nothing would be aggregated"},
	} {
		f := newFederation(t, parsePlan(t, fmt.Sprintf(localRound, "fedavg", c.local)), "a", "b")
		f.start()
		if err := f.wait(20 * time.Second); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Fatalf("local %s: Run: %v, want an error saying %q", c.local, err, c.want)
		}
	}
}
