package collaborator

import (
	"context"
	"errors"
	"io"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"

	"github.com/fx-fl/fx/internal/testpki"
	"github.com/fx-fl/fx/pki"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner"
	"github.com/fx-fl/fx/tensor"
)

// stallingAggregator serves one round with a train task. Its first model
// download and its first upload stand still halfway; the next ones go
// through. Then it says QUIT.
type stallingAggregator struct {
	fxv1.UnimplementedAggregatorServer
	model tensor.Model

	mu                 sync.Mutex
	fetches, uploads   int
	uploaded, finished bool
	resumedAt          []int64 // each download's resume_bytes
}

func (s *stallingAggregator) GetTasks(ctx context.Context, _ *fxv1.GetTasksRequest) (*fxv1.GetTasksResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.uploaded {
		s.finished = true
		return &fxv1.GetTasksResponse{Action: fxv1.GetTasksResponse_QUIT, Reason: "done"}, nil
	}
	return &fxv1.GetTasksResponse{Action: fxv1.GetTasksResponse_RUN, Round: 1, Tasks: []string{runner.TaskTrain}}, nil
}

func (s *stallingAggregator) FetchModel(req *fxv1.FetchModelRequest, stream fxv1.Aggregator_FetchModelServer) error {
	s.mu.Lock()
	s.fetches++
	first := s.fetches == 1
	s.resumedAt = append(s.resumedAt, req.GetResumeBytes())
	s.mu.Unlock()
	if err := stream.Send(&fxv1.FetchModelResponse{Part: &fxv1.FetchModelResponse_Header{Header: &fxv1.ModelHeader{
		Round: 1, Tensors: int32(len(s.model)), Bytes: s.model.Bytes()}}}); err != nil {
		return err
	}
	frames := 0
	enc := tensor.NewEncoder(func(f *fxv1.TensorFrame) error {
		if frames++; first && frames == 4 {
			<-stream.Context().Done() // stand still until the client gives up
			return stream.Context().Err()
		}
		return stream.Send(&fxv1.FetchModelResponse{Part: &fxv1.FetchModelResponse_Frame{Frame: f}})
	})
	enc.ResumeAt(tensor.Position{Tensors: int(req.GetResumeTensors()), Bytes: req.GetResumeBytes()})
	return enc.EncodeModel(s.model)
}

func (s *stallingAggregator) UploadResult(stream fxv1.Aggregator_UploadResultServer) error {
	s.mu.Lock()
	s.uploads++
	first := s.uploads == 1
	s.mu.Unlock()
	frames := 0
	for {
		_, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
		if frames++; first && frames == 3 {
			<-stream.Context().Done()
			return stream.Context().Err()
		}
	}
	s.mu.Lock()
	s.uploaded = true
	s.mu.Unlock()
	return stream.SendAndClose(&fxv1.UploadResultResponse{})
}

// echoRunner trains nothing: it returns the model it was given.
type echoRunner struct{}

func (echoRunner) Train(_ context.Context, _ runner.Task, m tensor.Model) (runner.Result, error) {
	return runner.Result{Model: m.Clone(), Samples: 1}, nil
}

func (echoRunner) Validate(context.Context, runner.Task, tensor.Model) (runner.Result, error) {
	return runner.Result{Samples: 1}, nil
}

// TestStalledTransfersAreTriedAgain: a model download and an upload that
// stand still are abandoned after StallTimeout and tried again, however
// long a transfer that moves may take; the download goes on from where it
// stopped; the round then completes.
func TestStalledTransfersAreTriedAgain(t *testing.T) {
	ca := testpki.New(t)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	// Five tensors of 2.5 MiB: frames enough to stall in the middle.
	var model tensor.Model
	for _, name := range []string{"a", "b", "c", "d", "e"} {
		model = append(model, tensor.New(name, tensor.F32, []int64{640 << 10}))
	}
	agg := &stallingAggregator{model: model}
	srv := grpc.NewServer(testpki.ServerOptions(ca.Keyring(pki.RoleDirector, "director"), fxv1.AggregatorRoles())...)
	fxv1.RegisterAggregatorServer(srv, agg)
	go srv.Serve(lis)
	defer srv.Stop()

	c, err := New(Config{
		ExperimentID: "exp", Name: "site-1", Address: lis.Addr().String(),
		DialOptions: testpki.DialOptions(ca.Keyring(pki.RoleEnvoy, "site-1"), "localhost"),
		Runner:      echoRunner{}, WorkDir: t.TempDir(),
		StallTimeout: time.Second, // long beside a frame's time even on a loaded machine
		Retry:        DefaultRetry,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var quit *Quit
	if err := c.Run(ctx); !errors.As(err, &quit) {
		t.Fatalf("Run = %v, want the aggregator's QUIT after the round", err)
	}
	agg.mu.Lock()
	defer agg.mu.Unlock()
	if agg.fetches != 2 || agg.uploads != 2 || !agg.finished {
		t.Errorf("%d downloads and %d uploads (want 2 each: a stalled one and its retry), finished %v", agg.fetches, agg.uploads, agg.finished)
	}
	// The stalled download had three frames: a header and 2 MiB of the
	// first tensor's 2.5; its retry went on from there, mid-tensor.
	if want := []int64{0, 2 << 20}; !slices.Equal(agg.resumedAt, want) {
		t.Errorf("downloads resumed at bytes %v, want %v", agg.resumedAt, want)
	}
}

// overlapAggregator serves one round of train and local validation and
// records the order results arrive in; trainArrived is closed when the
// train upload is in.
type overlapAggregator struct {
	fxv1.UnimplementedAggregatorServer
	model        tensor.Model
	trainArrived chan struct{}

	mu       sync.Mutex
	received []string
}

func (s *overlapAggregator) GetTasks(context.Context, *fxv1.GetTasksRequest) (*fxv1.GetTasksResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.received) == 2 {
		return &fxv1.GetTasksResponse{Action: fxv1.GetTasksResponse_QUIT, Reason: "done"}, nil
	}
	return &fxv1.GetTasksResponse{Action: fxv1.GetTasksResponse_RUN, Round: 1, Tasks: []string{runner.TaskTrain, runner.TaskLocalValidation}}, nil
}

func (s *overlapAggregator) FetchModel(_ *fxv1.FetchModelRequest, stream fxv1.Aggregator_FetchModelServer) error {
	if err := stream.Send(&fxv1.FetchModelResponse{Part: &fxv1.FetchModelResponse_Header{Header: &fxv1.ModelHeader{
		Round: 1, Tensors: int32(len(s.model)), Bytes: s.model.Bytes()}}}); err != nil {
		return err
	}
	return tensor.SendModel(s.model, func(f *fxv1.TensorFrame) error {
		return stream.Send(&fxv1.FetchModelResponse{Part: &fxv1.FetchModelResponse_Frame{Frame: f}})
	})
}

func (s *overlapAggregator) UploadResult(stream fxv1.Aggregator_UploadResultServer) error {
	var task string
	for {
		msg, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
		if h := msg.GetHeader(); h != nil {
			task = h.GetTask()
		}
	}
	s.mu.Lock()
	s.received = append(s.received, task)
	s.mu.Unlock()
	if task == runner.TaskTrain {
		close(s.trainArrived)
	}
	return stream.SendAndClose(&fxv1.UploadResultResponse{})
}

// waitingRunner's local validation waits for the train result to reach the
// aggregator: it can finish only if the upload overlaps it.
type waitingRunner struct {
	echoRunner
	trainArrived chan struct{}
}

func (r waitingRunner) Validate(ctx context.Context, task runner.Task, _ tensor.Model) (runner.Result, error) {
	if task.Name != runner.TaskLocalValidation {
		return runner.Result{Samples: 1}, nil
	}
	select {
	case <-r.trainArrived:
		return runner.Result{Samples: 1}, nil
	case <-ctx.Done():
		return runner.Result{}, ctx.Err()
	}
}

// TestUploadOverlapsTheRemainingTasks: the trained weights are uploaded
// while the local validation runs, not after it, and the results still
// arrive in plan order.
func TestUploadOverlapsTheRemainingTasks(t *testing.T) {
	ca := testpki.New(t)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	arrived := make(chan struct{})
	agg := &overlapAggregator{model: tensor.Model{tensor.New("w", tensor.F32, []int64{1 << 20})}, trainArrived: arrived}
	srv := grpc.NewServer(testpki.ServerOptions(ca.Keyring(pki.RoleDirector, "director"), fxv1.AggregatorRoles())...)
	fxv1.RegisterAggregatorServer(srv, agg)
	go srv.Serve(lis)
	defer srv.Stop()
	c, err := New(Config{
		ExperimentID: "exp", Name: "site-1", Address: lis.Addr().String(),
		DialOptions: testpki.DialOptions(ca.Keyring(pki.RoleEnvoy, "site-1"), "localhost"),
		Runner:      waitingRunner{trainArrived: arrived}, WorkDir: t.TempDir(),
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var quit *Quit
	if err := c.Run(ctx); !errors.As(err, &quit) {
		t.Fatalf("Run = %v, want QUIT after the round (a deadline here: the validation waited for an upload that came only after it)", err)
	}
	agg.mu.Lock()
	defer agg.mu.Unlock()
	if want := []string{runner.TaskTrain, runner.TaskLocalValidation}; !slices.Equal(agg.received, want) {
		t.Errorf("results arrived as %v, want %v", agg.received, want)
	}
}
