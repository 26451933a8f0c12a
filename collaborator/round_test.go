package collaborator

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/mock/gomock"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner"
	"github.com/fx-fl/fx/tensor"
)

// TestARoundRunsItsTasksOnTheRoundsModelAndUploadsInPlanOrder: the round's
// model is downloaded once, each task runs on the model it is about (the
// global model, or the weights trained from it), and the results go up in
// plan order with their samples and metrics, the trained weights intact.
func TestARoundRunsItsTasksOnTheRoundsModelAndUploadsInPlanOrder(t *testing.T) {
	r := newRig(t)
	global := testModel(1)
	r.expectTasks(runTasks(1, runner.TaskAggregatedValidation, runner.TaskTrain, runner.TaskLocalValidation), quit("finished"))
	fetches := r.serveModel(global)
	r.acceptUploads(accept)
	gomock.InOrder(
		r.runner.EXPECT().Validate(gomock.Any(), runner.Task{Name: runner.TaskAggregatedValidation, Round: 1}, gomock.Cond(func(m tensor.Model) bool {
			return tensor.Digest(m) == tensor.Digest(global)
		})).Return(validation(0.6), nil),
		r.runner.EXPECT().Train(gomock.Any(), runner.Task{Name: runner.TaskTrain, Round: 1}, gomock.Any()).DoAndReturn(trainer(t, global, 3, 42)),
		r.runner.EXPECT().Validate(gomock.Any(), runner.Task{Name: runner.TaskLocalValidation, Round: 1}, gomock.Cond(func(m tensor.Model) bool {
			return tensor.Digest(m) == tensor.Digest(shifted(global, 3))
		})).Return(validation(0.7), nil),
	)
	if err := r.run(context.Background()); !isQuit(err, "finished") {
		t.Fatalf("Run = %v, want QUIT finished", err)
	}
	if len(*fetches) != 1 {
		t.Errorf("%d downloads, want 1", len(*fetches))
	}
	if want := []string{runner.TaskAggregatedValidation, runner.TaskTrain, runner.TaskLocalValidation}; !slices.Equal(r.uploaded(), want) {
		t.Errorf("uploaded %v, want %v", r.uploaded(), want)
	}
	train := r.uploadOf(runner.TaskTrain)
	if h := train.header; h.GetSampleCount() != 42 || h.GetMetrics()["loss"] != 0.5 || h.GetRound() != 1 || h.GetCollaborator() != "site-1" || h.GetExperimentId() != "exp" {
		t.Errorf("train header %v", h)
	}
	if got := decodeFrames(t, train.frames); tensor.Digest(got) != tensor.Digest(shifted(global, 3)) {
		t.Error("the uploaded weights are not the trained ones")
	}
	if h := r.uploadOf(runner.TaskLocalValidation).header; h.GetMetrics()["accuracy"] != 0.7 || h.GetSampleCount() != 10 {
		t.Errorf("local validation header %v", h)
	}
	if _, err := os.Stat(filepath.Join(r.cfg.WorkDir, "pending.json")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pending results left after QUIT (%v)", err)
	}
}

// TestTransientErrorsAreRetriedOnTheSchedulePermanentOnesEndTheRun: a call
// that fails with a transient code is made again after one backoff pause
// of the schedule's first delay (jittered into [Initial/2, Initial]); any
// other code ends the run at once with that error. NOT_FOUND from GetTasks
// is transient: the aggregator reached serves another experiment, which is
// what a director restart looks like until the envoy moves the
// collaborator.
func TestTransientErrorsAreRetriedOnTheSchedulePermanentOnesEndTheRun(t *testing.T) {
	for _, tc := range []struct {
		code      codes.Code
		transient bool
	}{
		{codes.Unavailable, true},
		{codes.DeadlineExceeded, true},
		{codes.ResourceExhausted, true},
		{codes.Aborted, true},
		{codes.Internal, true},
		{codes.Unknown, true},
		{codes.DataLoss, true},
		{codes.NotFound, true},
		{codes.PermissionDenied, false},
		{codes.Unauthenticated, false},
		{codes.InvalidArgument, false},
		{codes.FailedPrecondition, false},
		{codes.Unimplemented, false},
	} {
		t.Run(tc.code.String(), func(t *testing.T) {
			r := newRig(t)
			first := r.agg.EXPECT().GetTasks(gomock.Any(), gomock.Any(), gomock.Any()).Return(nil, status.Error(tc.code, "refused"))
			if tc.transient {
				r.agg.EXPECT().GetTasks(gomock.Any(), gomock.Any(), gomock.Any()).Return(quit("finished"), nil).After(first)
			}
			err := r.run(context.Background())
			pauses := r.pauses.recorded()
			if !tc.transient {
				if status.Code(err) != tc.code || len(pauses) != 0 {
					t.Fatalf("Run = %v after %d pauses; want %v at once", err, len(pauses), tc.code)
				}
				return
			}
			if !isQuit(err, "finished") {
				t.Fatalf("Run = %v, want the QUIT that followed the retry", err)
			}
			if len(pauses) != 1 || pauses[0] < testRetry.Initial/2 || pauses[0] > testRetry.Initial {
				t.Errorf("pauses %v, want one in [%v, %v]", pauses, testRetry.Initial/2, testRetry.Initial)
			}
		})
	}
}

// TestAnUnreachableAggregatorIsGivenUpAfterMaxUnreachable: every pause of
// a call that keeps failing is within its step of the schedule (doubling
// from Initial, capped at Max, jittered down to half), and the run gives up
// once the aggregator has been unreachable for MaxUnreachable, not before.
func TestAnUnreachableAggregatorIsGivenUpAfterMaxUnreachable(t *testing.T) {
	r := newRig(t, func(c *Config) { c.MaxUnreachable = 10 * time.Second })
	calls := 0
	r.agg.EXPECT().GetTasks(gomock.Any(), gomock.Any(), gomock.Any()).DoAndReturn(func(context.Context, *fxv1.GetTasksRequest, ...grpc.CallOption) (*fxv1.GetTasksResponse, error) {
		calls++
		return nil, status.Error(codes.Unavailable, "connection refused")
	}).AnyTimes()
	err := r.run(context.Background())
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "unreachable for 10s") {
		t.Fatalf("Run = %v, want the aggregator unreachable for 10s", err)
	}
	pauses := r.pauses.recorded()
	var total time.Duration
	step := testRetry.Initial
	for i, d := range pauses {
		if d < step/2 || d > step {
			t.Errorf("pause %d is %v, want within [%v, %v]", i, d, step/2, step)
		}
		step = min(2*step, testRetry.Max)
		total += d
	}
	if last := pauses[len(pauses)-1]; total-last > r.cfg.MaxUnreachable || total <= r.cfg.MaxUnreachable {
		t.Errorf("gave up after %v of pauses (%d calls), want just past %v", total, calls, r.cfg.MaxUnreachable)
	}
	if calls != len(pauses)+1 {
		t.Errorf("%d calls for %d pauses", calls, len(pauses))
	}
}

// TestALateUploadEndsTheRoundAndTheNextRoundRuns: when the aggregator
// refuses a result because the round closed without it (FAILED_PRECONDITION),
// the round's remaining tasks are abandoned, nothing else of that round is
// uploaded, and the collaborator asks for tasks again and runs the next
// round.
func TestALateUploadEndsTheRoundAndTheNextRoundRuns(t *testing.T) {
	r := newRig(t)
	global := testModel(1)
	r.expectTasks(runTasks(1, runner.TaskTrain, runner.TaskLocalValidation), runTasks(2, runner.TaskTrain), quit("finished"))
	r.serveModel(global)
	r.acceptUploads(func(h *fxv1.ResultHeader) error {
		if h.GetRound() == 1 {
			return status.Error(codes.FailedPrecondition, "round 1 closed without this result")
		}
		return nil
	})
	r.runner.EXPECT().Train(gomock.Any(), gomock.Any(), gomock.Any()).DoAndReturn(trainer(t, global, 1, 5)).Times(2)
	// Round 1's local validation, if it starts before the refusal, is
	// stopped by it.
	r.runner.EXPECT().Validate(gomock.Any(), runner.Task{Name: runner.TaskLocalValidation, Round: 1}, gomock.Any()).DoAndReturn(
		func(ctx context.Context, _ runner.Task, _ tensor.Model) (runner.Result, error) {
			<-ctx.Done()
			return runner.Result{}, ctx.Err()
		}).MaxTimes(1)
	if err := r.run(context.Background()); !isQuit(err, "finished") {
		t.Fatalf("Run = %v, want QUIT after round 2", err)
	}
	var rounds []int32
	r.mu.Lock()
	for _, u := range r.uploads {
		rounds = append(rounds, u.header.GetRound())
	}
	r.mu.Unlock()
	if want := []string{runner.TaskTrain, runner.TaskTrain}; !slices.Equal(r.uploaded(), want) || !slices.Equal(rounds, []int32{1, 2}) {
		t.Errorf("uploaded %v of rounds %v, want round 1's refused train and round 2's", r.uploaded(), rounds)
	}
}

// TestQuitInTheMiddleOfARound: the experiment is cancelled while the
// collaborator's round is under way. Its train upload is refused, its
// local validation is stopped, and the next GetTasks says QUIT: Run
// returns that QUIT, with the pending results of the round cleared.
func TestQuitInTheMiddleOfARound(t *testing.T) {
	r := newRig(t)
	global := testModel(1)
	r.expectTasks(runTasks(1, runner.TaskAggregatedValidation, runner.TaskTrain, runner.TaskLocalValidation), quit("cancelled"))
	r.serveModel(global)
	r.acceptUploads(func(h *fxv1.ResultHeader) error {
		if runner.IsTrain(h.GetTask()) {
			return status.Error(codes.FailedPrecondition, "experiment cancelled")
		}
		return nil
	})
	r.runner.EXPECT().Validate(gomock.Any(), runner.Task{Name: runner.TaskAggregatedValidation, Round: 1}, gomock.Any()).Return(validation(0.5), nil)
	r.runner.EXPECT().Train(gomock.Any(), gomock.Any(), gomock.Any()).DoAndReturn(trainer(t, global, 1, 5))
	r.runner.EXPECT().Validate(gomock.Any(), runner.Task{Name: runner.TaskLocalValidation, Round: 1}, gomock.Any()).DoAndReturn(
		func(ctx context.Context, _ runner.Task, _ tensor.Model) (runner.Result, error) {
			<-ctx.Done()
			return runner.Result{}, ctx.Err()
		}).MaxTimes(1)
	if err := r.run(context.Background()); !isQuit(err, "cancelled") {
		t.Fatalf("Run = %v, want QUIT cancelled", err)
	}
	if slices.Contains(r.uploaded(), runner.TaskLocalValidation) {
		t.Error("the local validation was uploaded after the round was refused")
	}
	if _, err := os.Stat(filepath.Join(r.cfg.WorkDir, "pending.json")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pending results left after QUIT (%v)", err)
	}
}

// TestPendingResultsAreReplayedForTheirRoundOnly: the metrics a
// collaborator computed before a restart (pending.json in its work
// directory) are uploaded instead of computed again when the same round is
// handed out, and ignored for any other round or when unreadable.
func TestPendingResultsAreReplayedForTheirRoundOnly(t *testing.T) {
	kept := pending{Round: 3, Results: map[string]pendingResult{
		runner.TaskAggregatedValidation: {Samples: 9, Metrics: map[string]float64{"accuracy": 0.25}},
	}}
	for _, tc := range []struct {
		name     string
		pending  []byte
		round    int
		replayed bool
	}{
		{"same round", mustJSON(t, kept), 3, true},
		{"another round", mustJSON(t, kept), 4, false},
		{"damaged file", []byte(`{"round": 3, "results": `), 3, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t)
			if err := os.WriteFile(filepath.Join(r.cfg.WorkDir, "pending.json"), tc.pending, 0o600); err != nil {
				t.Fatal(err)
			}
			global := testModel(2)
			r.expectTasks(runTasks(tc.round, runner.TaskAggregatedValidation, runner.TaskTrain), quit("finished"))
			r.serveModel(global)
			r.acceptUploads(accept)
			r.runner.EXPECT().Train(gomock.Any(), gomock.Any(), gomock.Any()).DoAndReturn(trainer(t, global, 1, 5))
			if !tc.replayed {
				r.runner.EXPECT().Validate(gomock.Any(), runner.Task{Name: runner.TaskAggregatedValidation, Round: tc.round}, gomock.Any()).Return(validation(0.75), nil)
			}
			if err := r.run(context.Background()); !isQuit(err, "finished") {
				t.Fatalf("Run = %v", err)
			}
			h := r.uploadOf(runner.TaskAggregatedValidation).header
			want := 0.75
			if tc.replayed {
				want = 0.25
			}
			if h.GetMetrics()["accuracy"] != want || h.GetRound() != int32(tc.round) {
				t.Errorf("uploaded %v, want accuracy %v for round %d", h, want, tc.round)
			}
		})
	}
}

func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestResultsSurviveARestartOfTheCollaborator: a collaborator whose round
// failed after a validation was computed (and before its upload) leaves
// the validation's metrics in the work directory; the collaborator that
// takes over the round with the same work directory sends them instead of
// computing them again.
func TestResultsSurviveARestartOfTheCollaborator(t *testing.T) {
	global := testModel(6)
	first := newRig(t)
	first.expectTasks(runTasks(2, runner.TaskAggregatedValidation, runner.TaskTrain))
	first.serveModel(global)
	// The aggregator is gone for good after the download: nothing is
	// uploaded before the round fails.
	first.agg.EXPECT().UploadResult(gomock.Any()).Return(nil, status.Error(codes.PermissionDenied, "certificate revoked")).MaxTimes(1)
	first.runner.EXPECT().Validate(gomock.Any(), gomock.Any(), gomock.Any()).Return(validation(0.125), nil)
	// Whichever comes first ends the run: the refused upload (then the
	// train task may never start) or the killed train task.
	first.runner.EXPECT().Train(gomock.Any(), gomock.Any(), gomock.Any()).Return(runner.Result{}, errors.New("killed")).MaxTimes(1)
	if err := first.run(context.Background()); err == nil {
		t.Fatal("the first run did not fail")
	}

	second := newRig(t, func(c *Config) { c.WorkDir = first.cfg.WorkDir })
	second.expectTasks(runTasks(2, runner.TaskAggregatedValidation, runner.TaskTrain), quit("finished"))
	second.serveModel(global)
	second.acceptUploads(accept)
	second.runner.EXPECT().Train(gomock.Any(), gomock.Any(), gomock.Any()).DoAndReturn(trainer(t, global, 1, 5))
	if err := second.run(context.Background()); !isQuit(err, "finished") {
		t.Fatalf("Run = %v", err)
	}
	if h := second.uploadOf(runner.TaskAggregatedValidation).header; h.GetMetrics()["accuracy"] != 0.125 {
		t.Errorf("uploaded %v, want the first run's accuracy 0.125", h)
	}
}

// TestARoundHandedOutAgainIsUploadedNotComputedAgain: an aggregator
// restarted mid-round hands the same round out again; the collaborator
// sends the results it holds, trained weights included, without running
// a task or downloading the model again; in a new round it computes anew.
func TestARoundHandedOutAgainIsUploadedNotComputedAgain(t *testing.T) {
	r := newRig(t)
	global := testModel(1)
	r.expectTasks(runTasks(1, runner.TaskTrain, runner.TaskLocalValidation), runTasks(1, runner.TaskTrain, runner.TaskLocalValidation), runTasks(2, runner.TaskLocalValidation), quit("finished"))
	fetches := r.serveModel(global)
	r.acceptUploads(accept)
	r.runner.EXPECT().Train(gomock.Any(), gomock.Any(), gomock.Any()).DoAndReturn(trainer(t, global, 1, 5)).Times(1)
	r.runner.EXPECT().Validate(gomock.Any(), runner.Task{Name: runner.TaskLocalValidation, Round: 1}, gomock.Any()).Return(validation(0.5), nil).Times(1)
	// Round 2's local validation has no train result of its round: it
	// trains again for it.
	r.runner.EXPECT().Train(gomock.Any(), runner.Task{Name: runner.TaskTrain, Round: 2}, gomock.Any()).DoAndReturn(trainer(t, global, 1, 5)).Times(1)
	r.runner.EXPECT().Validate(gomock.Any(), runner.Task{Name: runner.TaskLocalValidation, Round: 2}, gomock.Any()).Return(validation(0.6), nil).Times(1)
	if err := r.run(context.Background()); !isQuit(err, "finished") {
		t.Fatalf("Run = %v", err)
	}
	want := []string{runner.TaskTrain, runner.TaskLocalValidation, runner.TaskTrain, runner.TaskLocalValidation, runner.TaskLocalValidation}
	if !slices.Equal(r.uploaded(), want) {
		t.Errorf("uploaded %v, want %v", r.uploaded(), want)
	}
	if len(*fetches) != 2 {
		t.Errorf("%d downloads, want 2 (one per round)", len(*fetches))
	}
	r.mu.Lock()
	again := decodeFrames(t, r.uploads[2].frames)
	r.mu.Unlock()
	if tensor.Digest(again) != tensor.Digest(shifted(global, 1)) {
		t.Error("the trained weights sent again are not the ones trained")
	}
}

// TestAModelDownloadCutMidStream: a download that breaks goes on from the
// bytes the collaborator holds when the stream announces the same model
// again, starts over when it announces another or sends a damaged frame,
// and either way the round runs on the whole, right model.
func TestAModelDownloadCutMidStream(t *testing.T) {
	global := testModel(4)
	unavailable := status.Error(codes.Unavailable, "connection reset")
	for _, tc := range []struct {
		name string
		cuts []cut
		// from is where each download started. The stream is the model
		// header, then per tensor in name order a header frame and its
		// data in frames of 1 MiB: conv.bias (1 MiB + 4000 bytes),
		// conv.weight (1 MiB), fc.weight (1 MiB + 8000).
		from []tensor.Position
	}{
		{"cut in the middle of a tensor", []cut{{after: 3, err: unavailable}}, []tensor.Position{{}, {Tensors: 1, Bytes: 1 << 20}}},
		{"cut twice", []cut{{after: 3, err: unavailable}, {after: 3, err: unavailable}}, []tensor.Position{{}, {Tensors: 1, Bytes: 1 << 20}, {Tensors: 2, Bytes: 1<<20 + 4000}}},
		{"cut before the first frame", []cut{{after: 1, err: unavailable}}, []tensor.Position{{}, {}}},
		{"the resumed stream announces another model", []cut{{after: 3, err: unavailable}, {after: -1, edit: func(msgs []*fxv1.FetchModelResponse) {
			msgs[0].GetHeader().Bytes++
		}}}, []tensor.Position{{}, {Tensors: 1, Bytes: 1 << 20}, {}}},
		{"a damaged frame", []cut{{after: -1, edit: func(msgs []*fxv1.FetchModelResponse) {
			msgs[2].GetFrame().Frame = &fxv1.TensorFrame_Data{Data: msgs[2].GetFrame().GetData()[:100]}
		}}}, []tensor.Position{{}, {}}},
		{"no header", []cut{{after: -1, edit: func(msgs []*fxv1.FetchModelResponse) {
			msgs[0] = msgs[1]
		}}}, []tensor.Position{{}, {}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t)
			r.expectTasks(runTasks(1, runner.TaskTrain), quit("finished"))
			fetches := r.serveModel(global, tc.cuts...)
			r.acceptUploads(accept)
			r.runner.EXPECT().Train(gomock.Any(), gomock.Any(), gomock.Any()).DoAndReturn(trainer(t, global, 1, 5))
			if err := r.run(context.Background()); !isQuit(err, "finished") {
				t.Fatalf("Run = %v", err)
			}
			var from []tensor.Position
			for _, req := range *fetches {
				from = append(from, tensor.Position{Tensors: int(req.GetResumeTensors()), Bytes: req.GetResumeBytes()})
			}
			if !slices.Equal(from, tc.from) {
				t.Errorf("downloads started at %v, want %v", from, tc.from)
			}
		})
	}
}

// TestAnUploadCutMidStreamGoesOnFromWhatTheAggregatorKept: a train upload
// that breaks asks the aggregator how much it kept and sends the rest; if
// the aggregator cannot say, it sends it all again.
func TestAnUploadCutMidStreamGoesOnFromWhatTheAggregatorKept(t *testing.T) {
	global := testModel(5)
	trained := shifted(global, 2)
	for _, tc := range []struct {
		name     string
		position *fxv1.UploadPositionResponse // nil: the call fails
		// kept is the frames of the broken attempt the aggregator kept.
		kept int
	}{
		// The stream is per tensor in name order a header frame and its
		// data in frames of 1 MiB (see TestAModelDownloadCutMidStream); the
		// first attempt breaks after 3 frames, the first tensor's.
		{"the aggregator kept part of a tensor", &fxv1.UploadPositionResponse{Tensors: 1, Bytes: 1 << 20}, 2},
		{"the aggregator kept all that came", &fxv1.UploadPositionResponse{Tensors: 1, Bytes: 1<<20 + 4000}, 3},
		{"the aggregator kept nothing", &fxv1.UploadPositionResponse{}, 0},
		{"the aggregator cannot say", nil, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t)
			r.expectTasks(runTasks(1, runner.TaskTrain), quit("finished"))
			r.serveModel(global)
			r.acceptUploads(accept, 3)
			r.runner.EXPECT().Train(gomock.Any(), gomock.Any(), gomock.Any()).DoAndReturn(trainer(t, global, 2, 5))
			call := r.agg.EXPECT().UploadPosition(gomock.Any(), gomock.Any())
			if tc.position != nil {
				call.Return(tc.position, nil)
			} else {
				call.Return(nil, status.Error(codes.Unimplemented, "no such call"))
			}
			if err := r.run(context.Background()); !isQuit(err, "finished") {
				t.Fatalf("Run = %v", err)
			}
			r.mu.Lock()
			defer r.mu.Unlock()
			if len(r.uploads) != 2 {
				t.Fatalf("%d upload attempts, want 2", len(r.uploads))
			}
			retry := r.uploads[1]
			if got, want := retry.header.GetResumeBytes(), tc.position.GetBytes(); got != want {
				t.Errorf("retry resumed at byte %d, want %d", got, want)
			}
			frames := append(slices.Clone(r.uploads[0].frames[:tc.kept]), retry.frames...)
			if tensor.Digest(decodeFrames(t, frames)) != tensor.Digest(trained) {
				t.Error("what the aggregator kept and the retry sent is not the trained model")
			}
		})
	}
}

// TestFailedTasksEndTheRunWithTheirRound: a runner's error, or trained
// weights that do not match the global model, end the run with a
// RoundError naming the round; nothing of the failed task is uploaded.
func TestFailedTasksEndTheRunWithTheirRound(t *testing.T) {
	global := testModel(1)
	for _, tc := range []struct {
		name  string
		train func(context.Context, runner.Task, tensor.Model) (runner.Result, error)
		want  string
	}{
		{"runner error", func(context.Context, runner.Task, tensor.Model) (runner.Result, error) {
			return runner.Result{}, errors.New("CUDA out of memory")
		}, "CUDA out of memory"},
		{"another model", func(context.Context, runner.Task, tensor.Model) (runner.Result, error) {
			return runner.Result{Model: global[:1].Clone(), Samples: 1}, nil
		}, "does not match the global model"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t)
			r.expectTasks(runTasks(7, runner.TaskAggregatedValidation, runner.TaskTrain, runner.TaskLocalValidation))
			r.serveModel(global)
			r.acceptUploads(accept)
			r.runner.EXPECT().Validate(gomock.Any(), gomock.Any(), gomock.Any()).Return(validation(0.5), nil)
			r.runner.EXPECT().Train(gomock.Any(), gomock.Any(), gomock.Any()).DoAndReturn(tc.train)
			err := r.run(context.Background())
			var re *RoundError
			if !errors.As(err, &re) || re.Round != 7 || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Run = %v, want a round 7 error saying %q", err, tc.want)
			}
			if want := []string{runner.TaskAggregatedValidation}; !slices.Equal(r.uploaded(), want) {
				t.Errorf("uploaded %v, want %v", r.uploaded(), want)
			}
		})
	}
}

// TestAResultTheAggregatorHasAlreadyCounts: ALREADY_EXISTS (reported
// before a restart, or the answer was lost) is success: no retry, and the
// round goes on.
func TestAResultTheAggregatorHasAlreadyCounts(t *testing.T) {
	r := newRig(t)
	global := testModel(1)
	r.expectTasks(runTasks(1, runner.TaskTrain, runner.TaskLocalValidation), quit("finished"))
	r.serveModel(global)
	r.acceptUploads(func(h *fxv1.ResultHeader) error {
		if runner.IsTrain(h.GetTask()) {
			return status.Error(codes.AlreadyExists, "already reported")
		}
		return nil
	})
	r.runner.EXPECT().Train(gomock.Any(), gomock.Any(), gomock.Any()).DoAndReturn(trainer(t, global, 1, 5))
	r.runner.EXPECT().Validate(gomock.Any(), gomock.Any(), gomock.Any()).Return(validation(0.5), nil)
	if err := r.run(context.Background()); !isQuit(err, "finished") {
		t.Fatalf("Run = %v", err)
	}
	if want := []string{runner.TaskTrain, runner.TaskLocalValidation}; !slices.Equal(r.uploaded(), want) || len(r.pauses.recorded()) != 0 {
		t.Errorf("uploaded %v after %d pauses, want %v and no retry", r.uploaded(), len(r.pauses.recorded()), want)
	}
}

// TestCancellationAtEveryStep: whichever step of a round the collaborator
// is in when its context is cancelled (the envoy stops, or the director
// removes the experiment), Run returns the context's error, and no task or
// call for tasks starts after it.
func TestCancellationAtEveryStep(t *testing.T) {
	for _, step := range []string{
		"ask for tasks", "backoff pause", "download", "validate", "train",
		"upload", "upload position", "local validation",
	} {
		t.Run(step, func(t *testing.T) {
			r := newRig(t)
			global := testModel(3)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			var mu sync.Mutex
			var cancelled bool
			var late []string // steps begun after the cancel
			// at marks the beginning of a step: it cancels the run at the
			// chosen one and returns the error a real call then returns.
			at := func(ctx context.Context, name string) error {
				mu.Lock()
				defer mu.Unlock()
				// The uploads run beside the tasks: a task may begin while
				// an upload is being cancelled, so only a cancel on the
				// tasks' own side must keep them from starting.
				byUploader := step == "upload" || step == "upload position"
				if cancelled && (name == "ask for tasks" || !byUploader && (name == "validate" || name == "train" || name == "local validation")) {
					late = append(late, name)
				}
				if name == step {
					cancelled = true
					cancel()
				}
				if ctx.Err() != nil {
					return status.FromContextError(ctx.Err()).Err()
				}
				return nil
			}
			asked := 0
			r.agg.EXPECT().GetTasks(gomock.Any(), gomock.Any(), gomock.Any()).DoAndReturn(func(ctx context.Context, _ *fxv1.GetTasksRequest, _ ...grpc.CallOption) (*fxv1.GetTasksResponse, error) {
				if err := at(ctx, "ask for tasks"); err != nil {
					return nil, err
				}
				if asked++; asked == 1 {
					return nil, status.Error(codes.Unavailable, "connection refused")
				}
				return runTasks(1, runner.TaskAggregatedValidation, runner.TaskTrain, runner.TaskLocalValidation), nil
			}).AnyTimes()
			r.pauses.onPause = func() { at(ctx, "backoff pause") }
			r.agg.EXPECT().FetchModel(gomock.Any(), gomock.Any()).DoAndReturn(func(ctx context.Context, req *fxv1.FetchModelRequest, _ ...grpc.CallOption) (grpc.ServerStreamingClient[fxv1.FetchModelResponse], error) {
				n := 0
				return r.modelStream(modelMessages(t, global, 1, tensor.Position{}), -1, nil, func() error {
					if n++; n == 3 {
						return at(ctx, "download")
					}
					return nil
				}), nil
			}).AnyTimes()
			r.runner.EXPECT().Validate(gomock.Any(), gomock.Any(), gomock.Any()).DoAndReturn(func(ctx context.Context, task runner.Task, _ tensor.Model) (runner.Result, error) {
				name := "validate"
				if task.Name == runner.TaskLocalValidation {
					name = "local validation"
				}
				if err := at(ctx, name); err != nil {
					return runner.Result{}, ctx.Err()
				}
				return validation(0.5), nil
			}).AnyTimes()
			r.runner.EXPECT().Train(gomock.Any(), gomock.Any(), gomock.Any()).DoAndReturn(func(ctx context.Context, task runner.Task, m tensor.Model) (runner.Result, error) {
				if err := at(ctx, "train"); err != nil {
					return runner.Result{}, ctx.Err()
				}
				return trainer(t, global, 1, 5)(ctx, task, m)
			}).AnyTimes()
			trainUploads := 0
			r.agg.EXPECT().UploadResult(gomock.Any()).DoAndReturn(func(ctx context.Context, _ ...grpc.CallOption) (grpc.ClientStreamingClient[fxv1.UploadResultRequest, fxv1.UploadResultResponse], error) {
				s := NewMockClientStreamingClient[fxv1.UploadResultRequest, fxv1.UploadResultResponse](r.ctrl)
				frames, cut := 0, false
				s.EXPECT().Send(gomock.Any()).DoAndReturn(func(msg *fxv1.UploadResultRequest) error {
					if h := msg.GetHeader(); h != nil && runner.IsTrain(h.GetTask()) {
						trainUploads++
						cut = trainUploads == 1 // the first breaks, so that the retry asks where
					}
					if msg.GetFrame() == nil {
						return nil
					}
					if frames++; frames == 2 {
						if cut || at(ctx, "upload") != nil {
							return io.EOF
						}
					}
					return nil
				}).AnyTimes()
				s.EXPECT().CloseAndRecv().DoAndReturn(func() (*fxv1.UploadResultResponse, error) {
					switch {
					case ctx.Err() != nil:
						return nil, status.FromContextError(ctx.Err()).Err()
					case cut:
						return nil, status.Error(codes.Unavailable, "connection cut")
					}
					return &fxv1.UploadResultResponse{}, nil
				}).AnyTimes()
				return s, nil
			}).AnyTimes()
			r.agg.EXPECT().UploadPosition(gomock.Any(), gomock.Any()).DoAndReturn(func(ctx context.Context, _ *fxv1.UploadPositionRequest, _ ...grpc.CallOption) (*fxv1.UploadPositionResponse, error) {
				if err := at(ctx, "upload position"); err != nil {
					return nil, err
				}
				return &fxv1.UploadPositionResponse{}, nil
			}).AnyTimes()

			err := r.run(ctx)
			var re *RoundError
			if !errors.Is(err, context.Canceled) || errors.As(err, &re) {
				t.Fatalf("Run = %v, want context.Canceled, and not as a round's failure (which the envoy would report as the site's)", err)
			}
			mu.Lock()
			defer mu.Unlock()
			if !cancelled {
				t.Fatalf("the run ended (%v) before the step %q", err, step)
			}
			if len(late) > 0 {
				t.Errorf("%v began after the cancel", late)
			}
		})
	}
}

// recyclingRunner is a runner that takes trained weights back.
type recyclingRunner struct {
	runner.Runner
	mu       sync.Mutex
	recycled []tensor.Model
}

func (r *recyclingRunner) Recycle(m tensor.Model) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.recycled = append(r.recycled, m)
}

// TestTrainedWeightsGoBackToTheRunner: once the next round's model
// arrives, the last round's trained weights are handed back to a runner
// that reads the next ones into their memory, and only then.
func TestTrainedWeightsGoBackToTheRunner(t *testing.T) {
	rec := &recyclingRunner{}
	r := newRig(t, func(c *Config) { rec.Runner = c.Runner; c.Runner = rec })
	global := testModel(1)
	r.expectTasks(runTasks(1, runner.TaskTrain), runTasks(2, runner.TaskTrain), quit("finished"))
	r.serveModel(global)
	r.acceptUploads(accept)
	var trained []tensor.Model
	train := trainer(t, global, 1, 5)
	r.runner.EXPECT().Train(gomock.Any(), gomock.Any(), gomock.Any()).DoAndReturn(
		func(ctx context.Context, task runner.Task, m tensor.Model) (runner.Result, error) {
			res, err := train(ctx, task, m)
			rec.mu.Lock()
			if len(rec.recycled) != len(trained) {
				t.Errorf("round %d: %d models recycled before it trained, want %d", task.Round, len(rec.recycled), len(trained))
			}
			rec.mu.Unlock()
			trained = append(trained, res.Model)
			return res, err
		}).Times(2)
	if err := r.run(context.Background()); !isQuit(err, "finished") {
		t.Fatalf("Run = %v, want QUIT after round 2", err)
	}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if len(rec.recycled) != 1 || len(trained) != 2 || &rec.recycled[0][0].Data[0] != &trained[0][0].Data[0] {
		t.Fatalf("recycled %d models, want round 1's trained weights once", len(rec.recycled))
	}
}
