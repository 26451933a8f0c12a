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

// krumRound is a one-round plan for five sites with the given aggregation,
// closing once every site has reported or at the deadline.
const krumRound = `
name: test
rounds: 1
participants: {min: 5}
runner: {kind: builtin, model: mlp}
aggregation: %s
stragglers: {deadline: %s, min_reporting: 1}
tasks: [train, locally_tuned_model_validation]
best_model: {task: locally_tuned_model_validation}
`

var fiveSites = []string{"mallory", "s1", "s2", "s3", "s5"}

// sendRound uploads a train result that steps every weight by steps[name],
// and a validation, for each named site, in order.
func sendRound(t *testing.T, f *federation, sites []string, steps map[string]float32) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	for _, name := range sites {
		conn := dial(t, f, pki.RoleEnvoy, name)
		for _, u := range []upload{
			{collaborator: name, task: runner.TaskTrain, samples: 10, tensors: goodTensors(steps[name])},
			{collaborator: name, task: runner.TaskLocalValidation, samples: 10, metrics: map[string]float64{"accuracy": 0.5}},
		} {
			u.experiment, u.round = experimentID, 1
			if err := send(ctx, conn, u); err != nil {
				t.Fatalf("%s's %s: %v", name, u.task, err)
			}
		}
	}
}

// Four honest sites step the model by 1, 2, 3 and 5 and mallory by 1e6.
// goodTensors(s) and goodTensors(t) differ by s−t in each of their 8
// elements, so their squared distance is 8(s−t)². With byzantine 1 each
// score sums the 2 smallest distances to the others:
//
//	step 1: 8+32 = 40   step 2: 8+8 = 16   step 3: 8+32 = 40
//	step 5: 32+72 = 104   mallory: about 8e12
//
// Krum's model is the step-2 update; multi-Krum's (select 0: all but one)
// the mean of the four honest ones, (1+2+3+5)/4 = 2.75; the mean of all
// five, which fedavg would give, is about 2e5.
func TestKrumLeavesOutTheByzantineSite(t *testing.T) {
	steps := map[string]float32{"mallory": 1e6, "s1": 1, "s2": 2, "s3": 3, "s5": 5}
	tests := []struct {
		aggregation string
		want        float32
	}{
		{"{algorithm: krum, byzantine: 1}", 2},
		{"{algorithm: multi_krum, byzantine: 1}", 2.75},
	}
	for _, tc := range tests {
		t.Run(tc.aggregation, func(t *testing.T) {
			f := newFederation(t, parsePlan(t, fmt.Sprintf(krumRound, tc.aggregation, "30s")), fiveSites...)
			f.start()
			sendRound(t, f, fiveSites, steps)
			if err := f.wait(20 * time.Second); err != nil {
				t.Fatalf("Run: %v", err)
			}
			if got := values(readModel(t, f.dir, 1), "fc.bias"); !equalFloats(got, []float32{tc.want, tc.want}) {
				t.Fatalf("bias %v, want [%v %v]", got, tc.want, tc.want)
			}
		})
	}
}

// A round that closes at its deadline with fewer updates than Krum needs
// (2f+3 = 5 here, as participants.min promised) fails the experiment with
// a reason that says so.
func TestKrumFailsARoundWithTooFewUpdates(t *testing.T) {
	f := newFederation(t, parsePlan(t, fmt.Sprintf(krumRound, "{algorithm: krum, byzantine: 1}", "2s")), fiveSites...)
	f.start()
	sendRound(t, f, []string{"s1", "s2", "s3"}, map[string]float32{"s1": 1, "s2": 2, "s3": 3})
	err := f.wait(20 * time.Second)
	want := "round 1: aggregation failed: krum: 3 updates cannot outweigh 1 Byzantine ones: Krum needs at least 2f+3 = 5"
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("Run: %v, want an error saying %q", err, want)
	}
}
