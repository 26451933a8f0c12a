package collaborator

import (
	"context"
	"path/filepath"
	"slices"
	"testing"

	"go.uber.org/mock/gomock"
	"google.golang.org/grpc"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner"
	"github.com/fx-fl/fx/tensor"
)

// withTensor is m with the tensor name's data taken from src.
func withTensor(m, src tensor.Model, name string) tensor.Model {
	out := m.Clone()
	copy(out.Get(name).Data, src.Get(name).Data)
	return out
}

func names(m tensor.Model) []string {
	var out []string
	for _, t := range m {
		out = append(out, t.Name)
	}
	return out
}

// With fc.* local, over two rounds of different global models: round 1's
// tasks run on the global model as it is (the site has no fc.weight of its
// own yet); train's upload carries conv.* only; the trained fc.weight is
// kept in the work directory; round 2's tasks run on round 2's global
// model with the site's fc.weight from round 1 in it. A collaborator
// restarted on the same work directory and handed round 2 again starts
// from round 1's fc.weight still, not from what its first round 2 trained;
// handed round 3, from round 2's.
func TestLocalTensorsStayAndComeBack(t *testing.T) {
	work := t.TempDir()
	globals := map[int]tensor.Model{1: testModel(1), 2: testModel(50), 3: testModel(90)}
	r1 := shifted(globals[1], 3) // round 1's trained model
	// Round 2's model at this site: the global one with its own fc.weight.
	personal2 := withTensor(globals[2], r1, "fc.weight")
	r2 := shifted(personal2, 3)
	personal3 := withTensor(globals[3], r2, "fc.weight")

	run := func(t *testing.T, rounds []int, want map[int]tensor.Model) *rig {
		r := newRig(t, func(c *Config) { c.Local = []string{"fc.*"}; c.WorkDir = work })
		var answers []*fxv1.GetTasksResponse
		for _, n := range rounds {
			answers = append(answers, runTasks(n, runner.TaskAggregatedValidation, runner.TaskTrain, runner.TaskLocalValidation))
		}
		r.expectTasks(append(answers, quit("finished"))...)
		r.agg.EXPECT().FetchModel(gomock.Any(), gomock.Any()).DoAndReturn(
			func(_ context.Context, req *fxv1.FetchModelRequest, _ ...grpc.CallOption) (grpc.ServerStreamingClient[fxv1.FetchModelResponse], error) {
				return r.modelStream(modelMessages(t, globals[int(req.GetRound())], int(req.GetRound()), tensor.Position{}), -1, nil, nil), nil
			}).Times(len(rounds))
		r.acceptUploads(accept)
		for _, n := range rounds {
			is := func(m tensor.Model) bool { return tensor.Digest(m) == tensor.Digest(want[n]) }
			gomock.InOrder(
				r.runner.EXPECT().Validate(gomock.Any(), runner.Task{Name: runner.TaskAggregatedValidation, Round: n}, gomock.Cond(is)).Return(validation(0.5), nil),
				r.runner.EXPECT().Train(gomock.Any(), runner.Task{Name: runner.TaskTrain, Round: n}, gomock.Cond(is)).DoAndReturn(trainer(t, want[n], 3, 10)),
				r.runner.EXPECT().Validate(gomock.Any(), runner.Task{Name: runner.TaskLocalValidation, Round: n}, gomock.Cond(func(m tensor.Model) bool {
					return tensor.Digest(m) == tensor.Digest(shifted(want[n], 3))
				})).Return(validation(0.6), nil),
			)
		}
		if err := r.run(context.Background()); !isQuit(err, "finished") {
			t.Fatalf("Run = %v, want QUIT finished", err)
		}
		return r
	}

	r := run(t, []int{1, 2}, map[int]tensor.Model{1: globals[1], 2: personal2})
	var trains []tensor.Model
	for _, u := range r.uploads {
		if u.header.GetTask() == runner.TaskTrain {
			trains = append(trains, decodeFrames(t, u.frames))
		}
	}
	if len(trains) != 2 {
		t.Fatalf("%d train uploads, want 2", len(trains))
	}
	for i, up := range trains {
		if got := slices.Sorted(slices.Values(names(up))); !slices.Equal(got, []string{"conv.bias", "conv.weight"}) {
			t.Fatalf("round %d uploaded %v, want conv.weight and conv.bias only", i+1, got)
		}
	}
	if tensor.Digest(trains[0]) != tensor.Digest(r1[:2]) || tensor.Digest(trains[1]) != tensor.Digest(r2[:2]) {
		t.Error("the uploaded tensors are not the trained ones")
	}
	kept, meta, err := tensor.ReadFile(filepath.Join(work, localFile))
	if err != nil || meta[localRound] != "2" || tensor.Digest(kept) != tensor.Digest(r2[2:]) {
		t.Fatalf("kept %v (round %s, %v), want round 2's trained fc.weight", names(kept), meta[localRound], err)
	}

	t.Run("round 2 again after a restart", func(t *testing.T) {
		run(t, []int{2}, map[int]tensor.Model{2: personal2})
	})
	t.Run("round 3 after a restart", func(t *testing.T) {
		run(t, []int{3}, map[int]tensor.Model{3: personal3})
	})
}
