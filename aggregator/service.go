package aggregator

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"slices"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"

	"github.com/fx-fl/fx/internal/telemetry"
	"github.com/fx-fl/fx/internal/tracing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/fx-fl/fx/pki"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner"
	"github.com/fx-fl/fx/tensor"
)

// service is the Aggregator gRPC service of one experiment.
type service struct {
	fxv1.UnimplementedAggregatorServer
	a *Aggregator
}

// participant checks that the request comes from the envoy it names (by its
// certificate) and is for this aggregator's experiment, in which that envoy
// takes part. Every other request gets one NOT_FOUND, built from the
// request alone: whether the id is the one served here or not, a caller
// that does not take part learns nothing about it, so experiment ids cannot
// be probed.
func (s *service) participant(ctx context.Context, experimentID, collaborator string) (string, error) {
	if err := pki.RequireCaller(ctx, collaborator); err != nil {
		return "", err
	}
	s.a.mu.Lock()
	defer s.a.mu.Unlock()
	_, ok := s.a.parts[collaborator]
	if !ok || experimentID != s.a.cfg.ExperimentID {
		return "", status.Errorf(codes.NotFound, "envoy %s takes part in no experiment %q served here: use the experiment id and aggregator address of the director's Start assignment", collaborator, experimentID)
	}
	s.a.rejoined(collaborator)
	return collaborator, nil
}

// GetTasks is the long poll described in the protocol.
func (s *service) GetTasks(ctx context.Context, req *fxv1.GetTasksRequest) (*fxv1.GetTasksResponse, error) {
	name, err := s.participant(ctx, req.GetExperimentId(), req.GetCollaborator())
	if err != nil {
		return nil, err
	}
	a := s.a
	window := time.NewTimer(a.cfg.PollWindow)
	defer window.Stop()
	for {
		a.mu.Lock()
		p := a.parts[name]
		if a.stopping {
			a.mu.Unlock()
			return nil, status.Error(codes.Unavailable, "the aggregator is stopping; retry: the experiment continues when it is served again")
		}
		if a.ended || p.dropped != "" {
			reason := a.endWhy
			if p.dropped != "" {
				reason = "dropped from the experiment: " + p.dropped
			}
			p.quitSeen = true
			a.broadcast()
			a.mu.Unlock()
			return &fxv1.GetTasksResponse{Action: fxv1.GetTasksResponse_QUIT, Reason: reason}, nil
		}
		r := a.round
		// An asynchronous step hands a site no tasks once its update is
		// in: at most one per site per step (fedbuff.go).
		if tasks := r.remaining(name); !r.closed && len(tasks) > 0 && !a.sitsOut(r, name) && !(a.plan.Async() && r.trainers[name]) {
			p.task = tasks[0]
			progress := a.progressOf(p)
			a.mu.Unlock()
			a.cfg.Sink.Progress(progress)
			if tp := tracing.Inject(r.ctx); tp != "" {
				// The collaborator's spans of this round are the
				// round's children.
				_ = grpc.SetHeader(ctx, metadata.Pairs(tracing.RoundHeader, tp))
			}
			return &fxv1.GetTasksResponse{Action: fxv1.GetTasksResponse_RUN, Round: int32(r.number), Tasks: tasks}, nil
		}
		changed := a.changed
		a.mu.Unlock()
		select {
		case <-changed:
		case <-window.C:
			return &fxv1.GetTasksResponse{Action: fxv1.GetTasksResponse_WAIT}, nil
		case <-ctx.Done():
			return nil, status.FromContextError(ctx.Err()).Err()
		}
	}
}

func (a *Aggregator) progressOf(p *participant) Progress {
	return Progress{Collaborator: p.name, Round: a.round.number, Task: p.task, LastRound: p.lastRound}
}

// FetchModel streams the model a round starts from.
func (s *service) FetchModel(req *fxv1.FetchModelRequest, stream fxv1.Aggregator_FetchModelServer) error {
	if _, err := s.participant(stream.Context(), req.GetExperimentId(), req.GetCollaborator()); err != nil {
		return err
	}
	round := int(req.GetRound())
	a := s.a
	a.mu.Lock()
	current := a.round.number
	model, done := a.useModel()
	if a.ended {
		current = a.lastRound() + 1
	}
	a.mu.Unlock()
	defer done()
	// A download that broke goes on where the collaborator's decoder is.
	start := time.Now()
	enc := tensor.NewEncoder(func(f *fxv1.TensorFrame) error {
		a.cfg.Metrics.Moved(telemetry.Sent, int64(len(f.GetData())))
		return stream.Send(&fxv1.FetchModelResponse{Part: &fxv1.FetchModelResponse_Frame{Frame: f}})
	})
	enc.ResumeAt(tensor.Position{Tensors: int(req.GetResumeTensors()), Bytes: req.GetResumeBytes()})
	var err error
	switch {
	case round == current && model != nil:
		header := &fxv1.ModelHeader{Round: int32(round), Tensors: int32(len(model)), Bytes: model.Bytes(), Digest: a.digestOf(round)}
		if err = stream.Send(&fxv1.FetchModelResponse{Part: &fxv1.FetchModelResponse_Header{Header: header}}); err == nil {
			err = enc.EncodeModel(model)
		}
	case round >= 1 && round <= current:
		err = sendModelFile(ModelPath(a.cfg.Dir, min(round-1, a.plan.Rounds)), round, a.digestOf(round), stream, enc)
	default:
		return status.Errorf(codes.NotFound, "round %d has not started (current round: %d)", round, current)
	}
	if err == nil {
		a.cfg.Metrics.Transferred(telemetry.Sent, time.Since(start))
	}
	return err
}

// digestOf is the digest the download of round's model announces: the
// initial model's for round 1, none for the others.
func (a *Aggregator) digestOf(round int) string {
	if round == 1 {
		return a.initialDigest
	}
	return ""
}

// sendModelFile streams the model a round starts from out of its round
// file, a chunk at a time: the aggregator keeps no copy of it in memory
// (and a download of an earlier round costs none either).
func sendModelFile(path string, round int, digest string, stream fxv1.Aggregator_FetchModelServer, enc *tensor.Encoder) error {
	f, err := os.Open(path)
	if err != nil {
		return status.Errorf(codes.NotFound, "the model of round %d is not kept: %v", round, err)
	}
	defer f.Close()
	r := bufio.NewReaderSize(f, tensor.MaxChunk)
	h, err := tensor.ReadHeader(r)
	if err != nil {
		return status.Errorf(codes.DataLoss, "the model of round %d cannot be read: %v", round, err)
	}
	header := &fxv1.ModelHeader{Round: int32(round), Tensors: int32(len(h.Tensors)), Bytes: h.DataSize, Digest: digest}
	if err := stream.Send(&fxv1.FetchModelResponse{Part: &fxv1.FetchModelResponse_Header{Header: header}}); err != nil {
		return err
	}
	return enc.EncodeTensors(r, h)
}

// UploadResult receives one task's result; see the protocol for the rules.
func (s *service) UploadResult(stream fxv1.Aggregator_UploadResultServer) error {
	first, err := stream.Recv()
	if errors.Is(err, io.EOF) {
		return status.Error(codes.InvalidArgument, "upload ended before its header")
	}
	if err != nil {
		return err // a refused first message (over a declared limit), or the stream's end
	}
	h := first.GetHeader()
	if h == nil {
		return status.Error(codes.InvalidArgument, "an upload must start with a ResultHeader")
	}
	name, err := s.participant(stream.Context(), h.GetExperimentId(), h.GetCollaborator())
	if err != nil {
		return err
	}
	if err := checkHeader(h); err != nil {
		return err
	}
	a := s.a
	if err := a.checkSamples(name, h); err != nil {
		return err
	}
	r, stale, err := a.openUpload(stream.Context(), name, h)
	if err != nil {
		return err
	}
	defer func() {
		a.mu.Lock()
		mark(r.inflight, name, h.Task, false)
		a.mu.Unlock()
	}()

	train := runner.IsTrain(h.Task)
	var st stage
	if train {
		var dec *tensor.Decoder
		if st, dec, err = a.trainStage(r, name, h); err != nil {
			return err
		}
		start, from := time.Now(), dec.Position().Bytes
		err := receiveFrames(dec, stream)
		a.cfg.Metrics.Moved(telemetry.Received, dec.Position().Bytes-from)
		if err == nil {
			a.cfg.Metrics.Transferred(telemetry.Received, time.Since(start))
		}
		if err != nil {
			if broken(stream.Context(), err) {
				a.keepPartial(r, name, &partialUpload{st: st, dec: dec, header: h})
				return err
			}
			st.Discard()
			return uploadError(err)
		}
	} else if msg, err := stream.Recv(); err != io.EOF {
		if err != nil {
			return err
		}
		_ = msg
		return status.Errorf(codes.InvalidArgument, "task %s returns metrics only, but the upload carries tensors", h.Task)
	}

	result := TaskResult{Collaborator: name, Task: h.Task, Samples: h.SampleCount, Metrics: h.Metrics, Staleness: stale}
	if err := a.countResult(r, result, st); err != nil {
		a.cfg.Metrics.Result(resultOutcome(err))
		return err
	}
	a.cfg.Metrics.Result("counted")
	a.mu.Lock()
	remaining := r.remaining(name)
	a.mu.Unlock()
	return stream.SendAndClose(&fxv1.UploadResultResponse{RemainingTasks: remaining})
}

// resultOutcome is the outcome label of a result the aggregator did not
// count: late when the round had closed without it.
func resultOutcome(err error) string {
	if status.Code(err) == codes.FailedPrecondition {
		return "late"
	}
	return "refused"
}

// checkHeader validates what a header says on its own.
func checkHeader(h *fxv1.ResultHeader) error {
	if err := runner.ValidateTaskName(h.Task); err != nil {
		return status.Error(codes.InvalidArgument, err.Error())
	}
	if h.SampleCount < 0 {
		return status.Errorf(codes.InvalidArgument, "sample count %d is negative", h.SampleCount)
	}
	if runner.IsTrain(h.Task) && h.SampleCount == 0 {
		return status.Error(codes.InvalidArgument, "a train result must report the samples it trained on (sample_count > 0): FedAvg weighs updates by it")
	}
	for _, k := range sortedKeys(h.Metrics) {
		if v := h.Metrics[k]; math.IsNaN(v) || math.IsInf(v, 0) {
			return status.Errorf(codes.InvalidArgument, "metric %q is %v; metrics must be finite", k, v)
		}
	}
	return nil
}

// checkSamples refuses a result that claims more samples than its envoy
// registered for the task (train samples for train, validation samples for
// the validations): the count weighs the update in FedAvg and the metrics in
// the round's aggregates, so a participant must not set it at will.
func (a *Aggregator) checkSamples(name string, h *fxv1.ResultHeader) error {
	reg := a.cfg.Registered[name]
	registered, kind := reg.Valid, "validation"
	if runner.IsTrain(h.Task) {
		registered, kind = reg.Train, "train"
	}
	if h.SampleCount > registered {
		return status.Errorf(codes.InvalidArgument,
			"%s result refused: sample_count %d is above its bound of %d: envoy %s registered %d %s samples with the director when the experiment started, and a result may claim no more (if the site's data grew, restart its envoy to register the new counts; they bound experiments started after that)",
			h.Task, h.SampleCount, registered, name, registered, kind)
	}
	return nil
}

// openUpload checks that the result is due in the current round and marks
// it in flight, so a concurrent duplicate is refused. In asynchronous
// rounds the header's round is the one whose model the result was computed
// from, and stale is how far the current round is ahead of it (fedbuff.go).
//
// An asynchronous step that has its K train updates, or is closing, takes
// no more; a train upload that arrives meanwhile waits for the next step
// and counts there, rather than being refused as late and trained again.
func (a *Aggregator) openUpload(ctx context.Context, name string, h *fxv1.ResultHeader) (r *roundState, stale int, err error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for a.plan.Async() && (a.round.closed || runner.IsTrain(h.Task) && a.asyncReady(a.round)) && !a.ended && !a.stopping {
		changed := a.changed
		a.mu.Unlock()
		select {
		case <-changed:
		case <-ctx.Done():
			a.mu.Lock()
			return nil, 0, status.FromContextError(ctx.Err()).Err()
		}
		a.mu.Lock()
	}
	r = a.round
	if a.ended {
		return nil, 0, status.Error(codes.FailedPrecondition, "the experiment has ended; the result is late")
	}
	if stale, err = a.staleness(r, int(h.Round), h.Task); err != nil {
		return nil, 0, err
	}
	switch {
	case r.closed:
		return nil, 0, status.Errorf(codes.FailedPrecondition, "round %d has closed; the result is late", r.number)
	case a.parts[name].dropped != "":
		return nil, 0, status.Errorf(codes.FailedPrecondition, "envoy %s was dropped from the experiment: %s", name, a.parts[name].dropped)
	case !slices.Contains(r.tasks, h.Task):
		return nil, 0, status.Errorf(codes.InvalidArgument, "task %s is not part of round %d (tasks: %v)", h.Task, r.number, r.tasks)
	case r.reported[name][h.Task]:
		return nil, 0, status.Errorf(codes.AlreadyExists, "%s already reported %s in round %d", name, h.Task, r.number)
	case r.inflight[name][h.Task]:
		return nil, 0, status.Errorf(codes.AlreadyExists, "an upload of %s for round %d from %s is already in progress", h.Task, r.number, name)
	}
	mark(r.inflight, name, h.Task, true)
	return r, stale, nil
}

// countResult counts a received result, unless its round closed
// meanwhile. A train update has been checked whole by now (layout, every
// element finite, every tensor complete), so it is acknowledged at once and
// folded into the round's sum in the background: the collaborator does not
// wait for the fold, and the round's close waits for every fold in progress.
func (a *Aggregator) countResult(r *roundState, result TaskResult, st stage) error {
	a.mu.Lock()
	if r.closed || a.round != r {
		a.mu.Unlock()
		if st != nil {
			st.Discard()
		}
		return status.Errorf(codes.FailedPrecondition, "round %d closed while the result was arriving; it is late", r.number)
	}
	if st != nil && a.plan.Async() && a.asyncReady(r) {
		// Opened before the step had its K updates, and others filled it
		// meanwhile: a step counts K, no more (fedbuff.go).
		a.mu.Unlock()
		st.Discard()
		return status.Errorf(codes.FailedPrecondition, "step %d had its %d updates while this one was arriving; train again from the newest model", r.number, a.buffer)
	}
	p := a.parts[result.Collaborator]
	mark(r.reported, result.Collaborator, result.Task, true)
	r.results = append(r.results, result)
	if st != nil {
		r.trainers[result.Collaborator] = true
		r.committing.Add(1)
		go func() {
			defer r.committing.Done()
			if err := st.Commit(a.weight(result)); err != nil {
				st.Discard()
				a.mu.Lock()
				r.commitErr = errors.Join(r.commitErr, fmt.Errorf("the update of %s could not be added: %w", result.Collaborator, err))
				a.mu.Unlock()
			}
		}()
	}
	p.task = ""
	if rest := r.remaining(result.Collaborator); len(rest) > 0 {
		p.task = rest[0]
	} else {
		p.lastRound = min(r.number, a.plan.Rounds)
	}
	progress := a.progressOf(p)
	a.broadcast()
	a.mu.Unlock()
	a.cfg.Sink.Progress(progress)
	a.requestClose()
	return nil
}

// trainStage returns the stage and decoder a train upload goes on with: the
// ones a broken upload left, if the header resumes it from where they are,
// else new ones (a kept upload that is not resumed is dropped: the
// collaborator started over).
func (a *Aggregator) trainStage(r *roundState, name string, h *fxv1.ResultHeader) (stage, *tensor.Decoder, error) {
	a.mu.Lock()
	p := r.takePartial(name)
	a.mu.Unlock()
	if resume := (tensor.Position{Tensors: int(h.GetResumeTensors()), Bytes: h.GetResumeBytes()}); resume != (tensor.Position{}) {
		if p == nil || p.dec.Position() != resume || !sameResult(p.header, h) {
			if p != nil {
				p.st.Discard()
			}
			return nil, nil, status.Errorf(codes.Aborted, "nothing kept to resume this upload from at tensor %d, byte %d: send the whole result", resume.Tensors, resume.Bytes)
		}
		return p.st, p.dec, nil
	}
	if p != nil {
		p.st.Discard()
	}
	if a.plan.Aggregation.Secure {
		return a.secureTrainStage(r, name, h)
	}
	st, err := a.newStage(r)
	if err != nil {
		return nil, nil, status.Errorf(codes.Internal, "stage upload: %v", err)
	}
	dec := tensor.NewDecoder(tensor.DecoderConfig{Layout: a.layout, OnChunk: func(t *tensor.Tensor, elem int64, data []byte) error {
		return st.Keep(t.Name, elem, data, t.DType)
	}})
	return st, dec, nil
}

// sameResult reports whether two headers describe the same result,
// whatever position they resume from.
func sameResult(a, b *fxv1.ResultHeader) bool {
	x, y := proto.CloneOf(a), proto.CloneOf(b)
	x.ResumeTensors, x.ResumeBytes, y.ResumeTensors, y.ResumeBytes = 0, 0, 0, 0
	return proto.Equal(x, y)
}

// receiveFrames feeds an upload's frames to dec until the stream ends,
// then checks that the model is complete.
func receiveFrames(dec *tensor.Decoder, stream fxv1.Aggregator_UploadResultServer) error {
	for {
		msg, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			_, err := dec.Finish()
			return err
		}
		if err != nil {
			return err
		}
		if msg.GetFrame() == nil {
			return status.Error(codes.InvalidArgument, "a second ResultHeader in one upload")
		}
		if err := dec.Decode(msg.GetFrame()); err != nil {
			return err
		}
	}
}

// broken reports whether an upload failed because its connection did (the
// collaborator may resume it), not because of what it sent.
func broken(ctx context.Context, err error) bool {
	if ctx.Err() != nil {
		return true
	}
	switch status.Code(err) {
	case codes.Canceled, codes.DeadlineExceeded, codes.Unavailable:
		return true
	}
	return false
}

// keepPartial keeps a broken train upload for the collaborator to resume,
// unless the round has moved on.
func (a *Aggregator) keepPartial(r *roundState, name string, p *partialUpload) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if r.closed || a.round != r {
		p.st.Discard()
		return
	}
	if old := r.takePartial(name); old != nil {
		old.st.Discard()
	}
	r.partial[name] = p
}

// UploadPosition says how much of a broken train upload is kept.
func (s *service) UploadPosition(ctx context.Context, req *fxv1.UploadPositionRequest) (*fxv1.UploadPositionResponse, error) {
	name, err := s.participant(ctx, req.GetExperimentId(), req.GetCollaborator())
	if err != nil {
		return nil, err
	}
	a := s.a
	a.mu.Lock()
	defer a.mu.Unlock()
	r := a.round
	// The kept upload's header names the round it was for: the current
	// one, or in asynchronous rounds the one its model came from.
	if r == nil || !runner.IsTrain(req.GetTask()) || r.partial[name] == nil || r.partial[name].header.GetRound() != req.GetRound() {
		return &fxv1.UploadPositionResponse{}, nil
	}
	pos := r.partial[name].dec.Position()
	return &fxv1.UploadPositionResponse{Tensors: int32(pos.Tensors), Bytes: pos.Bytes}, nil
}

// uploadError turns a failed tensor stream into a status that says why.
func uploadError(err error) error {
	if _, ok := status.FromError(err); ok && status.Code(err) != codes.Unknown {
		return err
	}
	if errors.Is(err, io.EOF) {
		return status.Error(codes.InvalidArgument, "the upload ended before the model was complete")
	}
	return status.Error(codes.InvalidArgument, fmt.Sprintf("update refused: %v", err))
}
