package aggregator_test

import (
	"context"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/fx-fl/fx/aggregator"
	"github.com/fx-fl/fx/pki"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner"
)

// oneTrainRound is a one-round plan with the given aggregation.weights,
// whose round closes once the given fraction of the participants have
// reported everything.
const oneTrainRound = `
name: test
rounds: 1
participants: {min: 2}
runner: {kind: builtin, model: mlp}
aggregation: {weights: %s}
stragglers: {deadline: 30s, percent: %v}
tasks: [train, locally_tuned_model_validation]
best_model: {task: locally_tuned_model_validation}
`

// An envoy that registered 100 samples and reports 2^62 for an update of
// 1e20-scale values (which, so weighted, overflows float32) is refused with
// a message naming the bound, and changes nothing: the honest envoy's round
// completes and its update alone is the round's model.
func TestInflatedSampleCountIsRefused(t *testing.T) {
	f := newFederation(t, parsePlan(t, fmt.Sprintf(oneTrainRound, "samples", 0.5)), "mallory", "honest")
	f.registered["mallory"] = aggregator.SampleCounts{Train: 100, Valid: 50}
	f.registered["honest"] = aggregator.SampleCounts{Train: 100, Valid: 50}
	f.start()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	mallory := dial(t, f, pki.RoleEnvoy, "mallory")
	honest := dial(t, f, pki.RoleEnvoy, "honest")

	huge := goodTensors(1e20)
	for _, u := range []struct {
		name, says string
		u          upload
	}{
		{"train", "sample_count 4611686018427387904 is above its bound of 100: envoy mallory registered 100 train samples",
			upload{experiment: experimentID, collaborator: "mallory", round: 1, task: runner.TaskTrain, samples: 1 << 62, tensors: huge}},
		{"validation", "sample_count 51 is above its bound of 50: envoy mallory registered 50 validation samples",
			upload{experiment: experimentID, collaborator: "mallory", round: 1, task: runner.TaskLocalValidation, samples: 51, metrics: map[string]float64{"accuracy": 1}}},
	} {
		err := send(ctx, mallory, u.u)
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(status.Convert(err).Message(), u.says) {
			t.Fatalf("%s with an inflated sample count: %v, want InvalidArgument saying %q", u.name, err, u.says)
		}
	}

	if err := send(ctx, honest, upload{experiment: experimentID, collaborator: "honest", round: 1, task: runner.TaskTrain, samples: 100, tensors: goodTensors(3)}); err != nil {
		t.Fatalf("honest train: %v", err)
	}
	if err := send(ctx, honest, upload{experiment: experimentID, collaborator: "honest", round: 1, task: runner.TaskLocalValidation, samples: 50, metrics: map[string]float64{"accuracy": 0.5}}); err != nil {
		t.Fatalf("honest validation: %v", err)
	}
	if err := f.wait(20 * time.Second); err != nil {
		t.Fatalf("Run: %v, want the honest envoy's round to complete", err)
	}
	if got := values(readModel(t, f.dir, 1), "fc.bias"); !equalFloats(got, []float32{3, 3}) {
		t.Fatalf("bias %v, want the honest update's [3 3] alone", got)
	}
	sums := f.sink.summaries()
	if len(sums) != 1 || len(sums[0].Reported) != 1 || sums[0].Reported[0] != "honest" {
		t.Fatalf("round summaries %+v, want round 1 with honest's report alone", sums)
	}
}

// aggregation.weights chooses each train update's weight: the samples it
// reports, the train samples its envoy registered, or the same for all.
func TestWeightPolicies(t *testing.T) {
	tests := []struct {
		weights string
		want    float32 // the round's bias: alpha steps by 1, beta by 5
	}{
		{"samples", (1*1 + 3*5) / 4.0},          // reported 1 and 3
		{"registered", (100*1 + 300*5) / 400.0}, // registered 100 and 300
		{"equal", (1 + 5) / 2.0},
	}
	for _, tc := range tests {
		t.Run(tc.weights, func(t *testing.T) {
			f := newFederation(t, parsePlan(t, fmt.Sprintf(oneTrainRound, tc.weights, 1)), "alpha", "beta")
			f.registered["alpha"] = aggregator.SampleCounts{Train: 100, Valid: 10}
			f.registered["beta"] = aggregator.SampleCounts{Train: 300, Valid: 10}
			f.start()
			ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
			defer cancel()
			conns := map[string]*grpc.ClientConn{"alpha": dial(t, f, pki.RoleEnvoy, "alpha"), "beta": dial(t, f, pki.RoleEnvoy, "beta")}
			for _, u := range []upload{
				{collaborator: "alpha", task: runner.TaskTrain, samples: 1, tensors: goodTensors(1)},
				{collaborator: "beta", task: runner.TaskTrain, samples: 3, tensors: goodTensors(5)},
				{collaborator: "alpha", task: runner.TaskLocalValidation, samples: 10, metrics: map[string]float64{"accuracy": 0.5}},
				{collaborator: "beta", task: runner.TaskLocalValidation, samples: 10, metrics: map[string]float64{"accuracy": 0.5}},
			} {
				u.experiment, u.round = experimentID, 1
				if err := send(ctx, conns[u.collaborator], u); err != nil {
					t.Fatalf("%s's %s: %v", u.collaborator, u.task, err)
				}
			}
			if err := f.wait(20 * time.Second); err != nil {
				t.Fatalf("Run: %v", err)
			}
			if got := values(readModel(t, f.dir, 1), "fc.bias"); !equalFloats(got, []float32{tc.want, tc.want}) {
				t.Fatalf("bias %v, want [%v %v]", got, tc.want, tc.want)
			}
		})
	}
}

// A participant with no registered counts cannot be launched, and an
// experiment none of whose participants registered train samples is
// refused at once rather than failing its first round.
func TestRegisteredCountsAreRequired(t *testing.T) {
	for _, tc := range []struct {
		name       string
		registered map[string]aggregator.SampleCounts
		want       string
	}{
		{"missing", map[string]aggregator.SampleCounts{"alpha": defaultRegistered}, "participant beta has no registered sample counts"},
		{"no train samples", map[string]aggregator.SampleCounts{"alpha": {Valid: 10}, "beta": {Valid: 10}}, "registered any train samples"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFederation(t, parsePlan(t, fmt.Sprintf(oneTrainRound, "samples", 1)), "alpha", "beta")
			lis, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer lis.Close()
			_, err = aggregator.New(aggregator.Config{
				ExperimentID: experimentID, Plan: f.plan, Participants: f.parts, Registered: tc.registered,
				InitialModel: f.initial, Dir: f.dir, Listener: lis,
			})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("New: %v, want an error saying %q", err, tc.want)
			}
		})
	}
}

// An envoy that does not take part in the experiment learns nothing about
// experiment ids from the aggregator: the id it serves and any other give
// the same NOT_FOUND, which never names the id served. A participant that
// names another id gets the same answer.
func TestExperimentIDsCannotBeProbed(t *testing.T) {
	f := newFederation(t, parsePlan(t, fmt.Sprintf(oneTrainRound, "samples", 1)), "alpha", "beta")
	f.start()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	mallory := dial(t, f, pki.RoleEnvoy, "mallory")
	alpha := dial(t, f, pki.RoleEnvoy, "alpha")

	calls := map[string]func(conn *grpc.ClientConn, name, id string) error{
		"GetTasks": func(conn *grpc.ClientConn, name, id string) error {
			_, err := fxv1.NewAggregatorClient(conn).GetTasks(ctx, &fxv1.GetTasksRequest{ExperimentId: id, Collaborator: name})
			return err
		},
		"FetchModel": func(conn *grpc.ClientConn, name, id string) error {
			stream, err := fxv1.NewAggregatorClient(conn).FetchModel(ctx, &fxv1.FetchModelRequest{ExperimentId: id, Collaborator: name, Round: 1})
			if err != nil {
				return err
			}
			_, err = stream.Recv()
			return err
		},
		"UploadResult": func(conn *grpc.ClientConn, name, id string) error {
			return send(ctx, conn, upload{experiment: id, collaborator: name, round: 1, task: runner.TaskTrain, samples: 1, tensors: goodTensors(1)})
		},
	}
	const unknown = "exp-unknown"
	for rpc, call := range calls {
		served := call(mallory, "mallory", experimentID)
		other := call(mallory, "mallory", unknown)
		wrongID := call(alpha, "alpha", unknown)
		for _, err := range []error{served, other, wrongID} {
			if status.Code(err) != codes.NotFound {
				t.Errorf("%s: %v, want NotFound", rpc, err)
			}
		}
		a := strings.ReplaceAll(status.Convert(served).Message(), experimentID, "ID")
		b := strings.ReplaceAll(status.Convert(other).Message(), unknown, "ID")
		if a != b {
			t.Errorf("%s: a non-participant can tell the served id from another:\n  served: %s\n  other:  %s", rpc, a, b)
		}
		for _, err := range []error{other, wrongID} {
			if msg := status.Convert(err).Message(); strings.Contains(msg, experimentID) {
				t.Errorf("%s: a call for %s was answered with the id served: %s", rpc, unknown, msg)
			}
		}
	}
}

// Sites that registered (and claim) 2^62 samples, with finite metrics near
// float64's largest, must not overflow the round's metric means either: the
// round completes with their weighted mean.
func TestMetricMeansCannotOverflow(t *testing.T) {
	f := newFederation(t, parsePlan(t, fmt.Sprintf(oneTrainRound, "samples", 1)), "alpha", "beta")
	for _, name := range f.parts {
		f.registered[name] = aggregator.SampleCounts{Train: 1 << 62, Valid: 1 << 62}
	}
	f.start()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	for _, name := range f.parts {
		conn := dial(t, f, pki.RoleEnvoy, name)
		for _, u := range []upload{
			{task: runner.TaskTrain, tensors: goodTensors(1)},
			{task: runner.TaskLocalValidation, metrics: map[string]float64{"loss": 1e308}},
		} {
			u.experiment, u.collaborator, u.round, u.samples = experimentID, name, 1, 1<<62
			if err := send(ctx, conn, u); err != nil {
				t.Fatalf("%s's %s: %v", name, u.task, err)
			}
		}
	}
	if err := f.wait(20 * time.Second); err != nil {
		t.Fatalf("Run: %v", err)
	}
	if got := f.sink.summaries()[0].Aggregates[runner.TaskLocalValidation]["loss"]; got != 1e308 {
		t.Fatalf("aggregated loss %v, want 1e308", got)
	}
}
