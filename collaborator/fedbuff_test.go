package collaborator

import (
	"context"
	"slices"
	"testing"

	"go.uber.org/mock/gomock"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner"
	"github.com/fx-fl/fx/tensor"
)

// TestAsyncUploadsTheUpdate: in asynchronous rounds the train upload is
// the update, trained − global (x = [1, 2, 3], y = [1.5, 1, 5]: Δ =
// [0.5, −1, 2]), an integer tensor its trained value, naming the step the
// site started from. An update the aggregator refuses as too stale
// (FailedPrecondition) is not an error: the site asks for tasks again and
// trains from the newest step's model, whose update counts.
func TestAsyncUploadsTheUpdate(t *testing.T) {
	r := newRig(t, func(c *Config) { c.Async = true })
	global := func(x float32) tensor.Model {
		count := tensor.New("count", tensor.I64, []int64{1})
		count.Data[0] = 7
		return tensor.Model{tensor.FromFloat32("w", []int64{3}, []float32{x, 2 * x, 3 * x}), count}
	}
	globals := map[int]tensor.Model{1: global(1), 4: global(2)}
	r.expectTasks(runTasks(1, runner.TaskTrain), runTasks(4, runner.TaskTrain), quit("finished"))
	r.agg.EXPECT().FetchModel(gomock.Any(), gomock.Any()).DoAndReturn(
		func(_ context.Context, req *fxv1.FetchModelRequest, _ ...grpc.CallOption) (grpc.ServerStreamingClient[fxv1.FetchModelResponse], error) {
			return r.modelStream(modelMessages(t, globals[int(req.GetRound())], int(req.GetRound()), tensor.Position{}), -1, nil, nil), nil
		}).Times(2)
	r.runner.EXPECT().Train(gomock.Any(), gomock.Any(), gomock.Any()).DoAndReturn(
		func(_ context.Context, _ runner.Task, m tensor.Model) (runner.Result, error) {
			y := m.Clone()
			w := y.Get("w").Float32s()
			w[0], w[1], w[2] = w[0]+0.5, w[1]-1, w[2]+2
			y.Get("count").Data[0]++
			return runner.Result{Model: y, Samples: 10}, nil
		}).Times(2)
	r.acceptUploads(func(h *fxv1.ResultHeader) error {
		if h.GetRound() == 1 {
			return status.Error(codes.FailedPrecondition, "train result from step 1 refused: it is 3 steps behind the current step 4, and aggregation.staleness.max is 2; start again from the newest model")
		}
		return nil
	})
	if err := r.run(context.Background()); !isQuit(err, "finished") {
		t.Fatalf("Run = %v, want QUIT finished", err)
	}
	var rounds []int32
	for _, u := range r.uploads {
		rounds = append(rounds, u.header.GetRound())
		m := decodeFrames(t, u.frames)
		if got := m.Get("w").Float32s(); !slices.Equal(got, []float32{0.5, -1, 2}) {
			t.Errorf("step %d: uploaded w %v, want the update [0.5 -1 2]", u.header.GetRound(), got)
		}
		if got := m.Get("count").Data[0]; got != 8 {
			t.Errorf("step %d: uploaded count %d, want the trained value 8", u.header.GetRound(), got)
		}
	}
	if !slices.Equal(rounds, []int32{1, 4}) {
		t.Errorf("train uploads named steps %v, want [1 4]: the refused one's, then the newest", rounds)
	}
}

// TestDelta: the update of every dtype: float ones subtract (F16 through
// float32), integer ones keep the trained value; a tensor the global model
// lacks is an error.
func TestDelta(t *testing.T) {
	f16 := func(v ...float32) *tensor.Tensor {
		x := tensor.New("h", tensor.F16, []int64{int64(len(v))})
		if err := x.SetFloat32(v); err != nil {
			t.Fatal(err)
		}
		return x
	}
	f64 := func(v ...float64) *tensor.Tensor {
		x := tensor.New("d", tensor.F64, []int64{int64(len(v))})
		copy(x.Float64s(), v)
		return x
	}
	base := tensor.Model{f16(1, 2), f64(0.25, -1)}
	trained := tensor.Model{f16(1.5, 0), f64(1, 1)}
	d, err := delta(base, trained)
	if err != nil {
		t.Fatal(err)
	}
	if h, _ := d.Get("h").Float32Copy(); !slices.Equal(h, []float32{0.5, -2}) {
		t.Errorf("F16 update %v, want [0.5 -2]", h)
	}
	if got := d.Get("d").Float64s(); !slices.Equal(got, []float64{0.75, 2}) {
		t.Errorf("F64 update %v, want [0.75 2]", got)
	}
	if tensor.Digest(base) == tensor.Digest(trained) || base.Get("d").Float64s()[0] != 0.25 {
		t.Error("delta changed its inputs")
	}
	if _, err := delta(tensor.Model{f64(1, 2)}, tensor.Model{f16(1, 2)}); err == nil {
		t.Error("an update of a tensor the global model lacks was made")
	}
}
