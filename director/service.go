package director

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/fx-fl/fx/aggregator"
	"github.com/fx-fl/fx/director/store"
	"github.com/fx-fl/fx/pki"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// service is the gRPC face of the Director: it learns who calls from the
// pki interceptors, applies ownership, calls the director's logic and maps
// its errors to status codes. Which role may call which RPC is enforced by
// the interceptors from the protocol's table before a handler runs.
type service struct {
	fxv1.UnimplementedDirectorServer
	d *Director
}

func caller(ctx context.Context) (pki.Identity, error) {
	id, ok := pki.IdentityFromContext(ctx)
	if !ok {
		return pki.Identity{}, fmt.Errorf("no verified client certificate: %w", ErrUnauthenticated)
	}
	return id, nil
}

// ---------------------------------------------------------------- envoys

func (s *service) RegisterEnvoy(ctx context.Context, req *fxv1.RegisterEnvoyRequest) (*fxv1.RegisterEnvoyResponse, error) {
	if err := pki.RequireCaller(ctx, req.GetEnvoyName()); err != nil {
		return nil, err
	}
	if err := s.d.registerEnvoy(ctx, req); err != nil {
		return nil, toStatus(err)
	}
	return &fxv1.RegisterEnvoyResponse{
		HeartbeatPeriod: durationpb.New(s.d.cfg.HeartbeatPeriod),
		OfflineAfter:    durationpb.New(s.d.cfg.OfflineAfter),
	}, nil
}

func (s *service) Heartbeat(ctx context.Context, req *fxv1.HeartbeatRequest) (*fxv1.HeartbeatResponse, error) {
	if err := pki.RequireCaller(ctx, req.GetEnvoyName()); err != nil {
		return nil, err
	}
	if err := s.d.heartbeat(req); err != nil {
		return nil, toStatus(err)
	}
	return &fxv1.HeartbeatResponse{NextHeartbeat: durationpb.New(s.d.cfg.HeartbeatPeriod)}, nil
}

func (s *service) WatchAssignments(req *fxv1.WatchAssignmentsRequest, stream grpc.ServerStreamingServer[fxv1.Assignment]) error {
	ctx := stream.Context()
	if err := pki.RequireCaller(ctx, req.GetEnvoyName()); err != nil {
		return err
	}
	d := s.d
	d.mu.Lock()
	env := d.envoys[req.GetEnvoyName()]
	if env == nil {
		d.mu.Unlock()
		return toStatus(fmt.Errorf("envoy %s is not registered with this director: call RegisterEnvoy: %w", req.GetEnvoyName(), ErrFailedPrecondition))
	}
	if d.stopped {
		d.mu.Unlock()
		return toStatus(fmt.Errorf("the director is shutting down: %w", errUnavailable))
	}
	replay := d.replayLocked(env)
	as := newAssignStream(len(replay))
	for _, a := range replay {
		as.ch <- a
	}
	env.streams[as] = struct{}{}
	d.mu.Unlock()
	defer func() {
		d.mu.Lock()
		delete(env.streams, as)
		d.mu.Unlock()
	}()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-as.kicked:
			return toStatus(fmt.Errorf("%s: %w", as.reason, errUnavailable))
		case a := <-as.ch:
			if err := stream.Send(a); err != nil {
				return err
			}
		}
	}
}

func (s *service) DownloadArchive(req *fxv1.DownloadArchiveRequest, stream grpc.ServerStreamingServer[fxv1.ArchiveChunk]) error {
	ctx := stream.Context()
	id, err := caller(ctx)
	if err != nil {
		return toStatus(err)
	}
	d := s.d
	d.mu.Lock()
	e := d.exps[req.GetExperimentId()]
	admin := id.Role == pki.RoleAdmin
	var size int64
	switch {
	case admin && e == nil:
		err = fmt.Errorf("experiment id %q: %w", req.GetExperimentId(), ErrNotFound)
	case !admin && (e == nil || e.parts[id.Name] == nil):
		err = fmt.Errorf("experiment %q was not offered to envoy %s: %w", req.GetExperimentId(), id.Name, ErrNotFound)
	case !admin && e.rec.Ended():
		err = fmt.Errorf("experiment %s has ended (%s): %w", e.rec.ID, e.rec.State, ErrFailedPrecondition)
	case req.GetOffset() < 0 || req.GetOffset() > e.rec.ArchiveSize:
		err = fmt.Errorf("offset %d is outside the archive's %d bytes: %w", req.GetOffset(), e.rec.ArchiveSize, ErrOutOfRange)
	default:
		size = e.rec.ArchiveSize
	}
	d.mu.Unlock()
	if err != nil {
		return toStatus(err)
	}
	f, err := os.Open(d.archivePath(req.GetExperimentId()))
	if err != nil {
		return toStatus(fmt.Errorf("archive of experiment %s: %w", req.GetExperimentId(), err))
	}
	defer f.Close()
	return toStatus(sendFile(f, req.GetOffset(), size, func(off int64, b []byte) error {
		return stream.Send(&fxv1.ArchiveChunk{Offset: off, Data: b})
	}))
}

// sendFile streams f from offset to size in MaxChunk pieces.
func sendFile(f *os.File, offset, size int64, send func(off int64, b []byte) error) error {
	buf := make([]byte, MaxChunk)
	for off := offset; off < size; {
		n, err := f.ReadAt(buf[:min(int64(len(buf)), size-off)], off)
		if n > 0 {
			if err := send(off, buf[:n]); err != nil {
				return err
			}
			off += int64(n)
		}
		if err != nil && !(errors.Is(err, io.EOF) && off >= size) {
			return fmt.Errorf("reading %s: %w", f.Name(), err)
		}
	}
	return nil
}

func (s *service) AnswerOffer(ctx context.Context, req *fxv1.AnswerOfferRequest) (*fxv1.AnswerOfferResponse, error) {
	if err := pki.RequireCaller(ctx, req.GetEnvoyName()); err != nil {
		return nil, err
	}
	d := s.d
	d.mu.Lock()
	defer d.mu.Unlock()
	e := d.exps[req.GetExperimentId()]
	if e == nil {
		return nil, toStatus(fmt.Errorf("experiment %q was not offered to envoy %s: %w", req.GetExperimentId(), req.GetEnvoyName(), ErrNotFound))
	}
	if err := d.answerLocked(e, req.GetEnvoyName(), req.GetAccept(), req.GetReason()); err != nil {
		return nil, toStatus(err)
	}
	return &fxv1.AnswerOfferResponse{State: e.rec.State}, nil
}

func (s *service) ReportFailure(ctx context.Context, req *fxv1.ReportFailureRequest) (*fxv1.ReportFailureResponse, error) {
	if err := pki.RequireCaller(ctx, req.GetEnvoyName()); err != nil {
		return nil, err
	}
	if req.GetReason() == "" {
		return nil, toStatus(fmt.Errorf("reason is empty: say what went wrong, for the researcher: %w", ErrInvalidArgument))
	}
	d := s.d
	d.mu.Lock()
	e := d.exps[req.GetExperimentId()]
	if e == nil {
		d.mu.Unlock()
		return nil, toStatus(fmt.Errorf("envoy %s does not take part in experiment %q: %w", req.GetEnvoyName(), req.GetExperimentId(), ErrNotFound))
	}
	agg, err := d.reportFailureLocked(e, req.GetEnvoyName(), req.GetRound(), req.GetReason())
	d.mu.Unlock()
	if err != nil {
		return nil, toStatus(err)
	}
	if agg != nil {
		agg.Drop(req.GetEnvoyName(), req.GetReason())
	}
	return &fxv1.ReportFailureResponse{}, nil
}

// ----------------------------------------------------------- researchers

func (s *service) SubmitExperiment(stream grpc.ClientStreamingServer[fxv1.SubmitExperimentRequest, fxv1.SubmitExperimentResponse]) error {
	id, err := caller(stream.Context())
	if err != nil {
		return toStatus(err)
	}
	exp, err := s.d.submit(id.Name, newIdleStream(stream.Context(), stream, s.d.cfg.UploadIdleTimeout))
	if err != nil {
		return toStatus(err)
	}
	return stream.SendAndClose(&fxv1.SubmitExperimentResponse{Experiment: exp})
}

// resolveLocked finds the experiment a reference names, as the caller may
// see it: a researcher sees only its own, and another owner's experiment
// is reported as not found so that names do not leak.
func (d *Director) resolveLocked(id pki.Identity, ref *fxv1.ExperimentRef) (*expState, error) {
	admin := id.Role == pki.RoleAdmin
	visible := func(e *expState) bool { return admin || e.rec.Owner == id.Name }
	if ref.GetId() != "" {
		if e := d.exps[ref.GetId()]; e != nil && visible(e) {
			return e, nil
		}
		return nil, fmt.Errorf("experiment id %q: %w", ref.GetId(), ErrNotFound)
	}
	if ref.GetName() == "" {
		return nil, fmt.Errorf("name the experiment by id, or by name (and owner): %w", ErrInvalidArgument)
	}
	owner := ref.GetOwner()
	if owner == "" {
		owner = id.Name
	}
	for _, e := range d.exps {
		if e.rec.Owner == owner && e.rec.Name == ref.GetName() && visible(e) {
			return e, nil
		}
	}
	return nil, fmt.Errorf("experiment %q of %s: %w", ref.GetName(), owner, ErrNotFound)
}

// withExperiment runs fn under the lock on the experiment ref names.
func (s *service) withExperiment(ctx context.Context, ref *fxv1.ExperimentRef, fn func(id pki.Identity, e *expState) error) error {
	id, err := caller(ctx)
	if err != nil {
		return err
	}
	s.d.mu.Lock()
	defer s.d.mu.Unlock()
	e, err := s.d.resolveLocked(id, ref)
	if err != nil {
		return err
	}
	return fn(id, e)
}

func (s *service) GetExperiment(ctx context.Context, req *fxv1.GetExperimentRequest) (*fxv1.Experiment, error) {
	var out *fxv1.Experiment
	err := s.withExperiment(ctx, req.GetExperiment(), func(_ pki.Identity, e *expState) error {
		out = s.d.toProtoLocked(e)
		return nil
	})
	return out, toStatus(err)
}

func (s *service) ListExperiments(ctx context.Context, req *fxv1.ListExperimentsRequest) (*fxv1.ListExperimentsResponse, error) {
	id, err := caller(ctx)
	if err != nil {
		return nil, toStatus(err)
	}
	owner := id.Name
	if id.Role == pki.RoleAdmin {
		owner = req.GetOwner()
	}
	d := s.d
	d.mu.Lock()
	defer d.mu.Unlock()
	var cands []*expState
	for _, e := range d.exps {
		if owner != "" && e.rec.Owner != owner {
			continue
		}
		if len(req.GetStates()) > 0 && !slices.Contains(req.GetStates(), e.rec.State) {
			continue
		}
		cands = append(cands, e)
	}
	exps, next, err := page("ListExperiments", req.GetPageSize(), req.GetPageToken(), cands, newestFirst, d.toProtoLocked)
	if err != nil {
		return nil, toStatus(err)
	}
	return &fxv1.ListExperimentsResponse{Experiments: exps, NextPageToken: next}, nil
}

// newestFirst is an experiment's key in listings: newest first, then by
// id. Times are mapped to an order-preserving unsigned integer and
// inverted, so a later time sorts first as text.
func newestFirst(e *expState) string {
	t := uint64(e.rec.CreatedAt.UnixNano()) ^ 1<<63
	return fmt.Sprintf("%016x/%s", ^t, e.rec.ID)
}

func (s *service) WatchMetrics(req *fxv1.WatchMetricsRequest, stream grpc.ServerStreamingServer[fxv1.MetricEvent]) error {
	if req.GetAfterSequence() < 0 {
		return toStatus(fmt.Errorf("after_sequence %d is negative: use 0 for every event: %w", req.GetAfterSequence(), ErrInvalidArgument))
	}
	return follow(s, stream.Context(), req.GetExperiment(), req.GetAfterSequence(), true,
		func(e *expState, after int64) ([]*fxv1.MetricEvent, int64, <-chan struct{}) {
			events := e.metrics.after(after)
			if len(events) > 0 {
				after = events[len(events)-1].GetSequence()
			}
			return events, after, e.metrics.changed
		}, stream.Send)
}

// follow streams an experiment's sequence of items to a watcher. poll,
// called under the director's lock, returns the items after a sequence,
// the sequence that leaves it caught up to, and a channel closed at the
// next change; send is called for each item outside the lock (a slow
// watcher must not hold the director up). With wait, follow then waits for
// changes until the experiment has ended (or was removed) and nothing is
// left to send; without, it returns once caught up.
func follow[T any](s *service, ctx context.Context, ref *fxv1.ExperimentRef, after int64, wait bool,
	poll func(e *expState, after int64) ([]T, int64, <-chan struct{}), send func(T) error) error {
	var e *expState
	if err := s.withExperiment(ctx, ref, func(_ pki.Identity, found *expState) error {
		e = found
		return nil
	}); err != nil {
		return toStatus(err)
	}
	d := s.d
	for {
		d.mu.Lock()
		items, last, changed := poll(e, after)
		ended := e.rec.Ended() && e.run == nil
		removed := d.exps[e.rec.ID] != e
		d.mu.Unlock()
		for _, it := range items {
			if err := send(it); err != nil {
				return err
			}
		}
		after = last
		switch {
		case len(items) > 0:
			continue
		case !wait || ended || removed:
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-d.shutdown:
			return toStatus(fmt.Errorf("the director is shutting down; watch again after sequence %d: %w", after, errUnavailable))
		case <-changed:
		}
	}
}

func (s *service) DownloadModel(req *fxv1.DownloadModelRequest, stream grpc.ServerStreamingServer[fxv1.DownloadModelResponse]) error {
	var (
		round   int
		dir     string
		metrics map[string]float64
	)
	err := s.withExperiment(stream.Context(), req.GetExperiment(), func(_ pki.Identity, e *expState) error {
		dir = s.d.aggregatorDir(e.rec.ID)
		switch req.GetSelector() {
		case fxv1.ModelSelector_BEST:
			if e.metrics.best == nil {
				return fmt.Errorf("experiment %s has no best model yet: no round has been scored on %s: %w", e.rec.Name, e.plan.BestModel.Metric, ErrNotFound)
			}
			round = e.metrics.best.Round
		case fxv1.ModelSelector_LAST:
			if e.metrics.round() == 0 {
				return fmt.Errorf("experiment %s has no completed round yet: %w", e.rec.Name, ErrNotFound)
			}
			round = min(e.metrics.round(), e.plan.TrainingRounds()) // an evaluation's model is the one it was given
		case fxv1.ModelSelector_ROUND:
			if req.GetRound() < 0 {
				return fmt.Errorf("round %d is negative: use 0 for the initial model: %w", req.GetRound(), ErrInvalidArgument)
			}
			round = int(req.GetRound())
		default:
			return fmt.Errorf("selector: choose BEST, LAST or ROUND: %w", ErrInvalidArgument)
		}
		metrics = e.metrics.modelMetrics(round)
		return nil
	})
	if err != nil {
		return toStatus(err)
	}
	path := aggregator.ModelPath(dir, round)
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return toStatus(fmt.Errorf("the model of round %d is not kept: %w", round, ErrNotFound))
	}
	if err != nil {
		return toStatus(err)
	}
	defer f.Close()
	// Hash from the open file, then stream the same file: the aggregator
	// replaces model files by rename, so what is sent matches the digest.
	h := sha256.New()
	size, err := io.Copy(h, f)
	if err != nil {
		return toStatus(fmt.Errorf("reading %s: %w", path, err))
	}
	info := &fxv1.ModelInfo{Round: int32(round), Size: size, Sha256: hex.EncodeToString(h.Sum(nil)), Metrics: metrics}
	if err := stream.Send(&fxv1.DownloadModelResponse{Part: &fxv1.DownloadModelResponse_Info{Info: info}}); err != nil {
		return err
	}
	return toStatus(sendFile(f, 0, size, func(_ int64, b []byte) error {
		return stream.Send(&fxv1.DownloadModelResponse{Part: &fxv1.DownloadModelResponse_Chunk{Chunk: b}})
	}))
}

func (s *service) CancelExperiment(ctx context.Context, req *fxv1.CancelExperimentRequest) (*fxv1.Experiment, error) {
	var out *fxv1.Experiment
	err := s.withExperiment(ctx, req.GetExperiment(), func(id pki.Identity, e *expState) error {
		reason := req.GetReason()
		if reason == "" {
			reason = "cancelled by " + id.Name
		}
		if err := s.d.endLocked(e, fxv1.ExperimentState_CANCELLED, reason); err != nil {
			return err
		}
		out = s.d.toProtoLocked(e)
		return nil
	})
	return out, toStatus(err)
}

func (s *service) RemoveExperiment(ctx context.Context, req *fxv1.RemoveExperimentRequest) (*fxv1.RemoveExperimentResponse, error) {
	var e *expState
	err := s.withExperiment(ctx, req.GetExperiment(), func(_ pki.Identity, found *expState) error {
		if !found.rec.Ended() {
			return fmt.Errorf("experiment %s is %s: cancel it before removing it: %w", found.rec.Name, found.rec.State, ErrFailedPrecondition)
		}
		e = found
		return nil
	})
	if err != nil {
		return nil, toStatus(err)
	}
	if err := s.d.remove(ctx, e); err != nil {
		return nil, toStatus(err)
	}
	return &fxv1.RemoveExperimentResponse{}, nil
}

// remove deletes an ended experiment: once its last aggregator has let go of
// its files, the record goes first (so a crash halfway leaves files without
// a record, which nothing serves, rather than a record without files), then
// the files.
func (d *Director) remove(ctx context.Context, e *expState) error {
	d.mu.Lock()
	last := e.lastRun
	d.mu.Unlock()
	if last != nil {
		select {
		case <-last.done:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.exps[e.rec.ID] != e {
		return fmt.Errorf("experiment %s: %w", e.rec.ID, ErrNotFound)
	}
	if err := d.store.Update(func(tx store.Tx) error { return tx.DeleteExperiment(e.rec.ID) }); err != nil {
		return fmt.Errorf("store: %w", err)
	}
	delete(d.exps, e.rec.ID)
	e.metrics.notify()
	if err := os.RemoveAll(d.experimentDir(e.rec.ID)); err != nil {
		d.log.Error("experiment removed but its files remain", "experiment", e.rec.ID, "error", err)
	}
	d.log.Info("experiment removed", "experiment", e.rec.ID, "name", e.rec.Name, "owner", e.rec.Owner)
	return nil
}

func (s *service) ListEnvoys(ctx context.Context, req *fxv1.ListEnvoysRequest) (*fxv1.ListEnvoysResponse, error) {
	id, err := caller(ctx)
	if err != nil {
		return nil, toStatus(err)
	}
	out, err := s.d.listEnvoys(req, id)
	return out, toStatus(err)
}

func (s *service) SearchDatasets(ctx context.Context, req *fxv1.SearchDatasetsRequest) (*fxv1.SearchDatasetsResponse, error) {
	id, err := caller(ctx)
	if err != nil {
		return nil, toStatus(err)
	}
	out, err := s.d.searchDatasets(req, id)
	return out, toStatus(err)
}

// ---------------------------------------------------------------- admins

func (s *service) ApproveExperiment(ctx context.Context, req *fxv1.ReviewExperimentRequest) (*fxv1.Experiment, error) {
	var out *fxv1.Experiment
	err := s.withExperiment(ctx, req.GetExperiment(), func(id pki.Identity, e *expState) error {
		if err := s.d.approveLocked(e); err != nil {
			return err
		}
		s.d.log.Info("experiment approved", "experiment", e.rec.ID, "by", id.Name)
		out = s.d.toProtoLocked(e)
		return nil
	})
	return out, toStatus(err)
}

func (s *service) RejectExperiment(ctx context.Context, req *fxv1.ReviewExperimentRequest) (*fxv1.Experiment, error) {
	if req.GetReason() == "" {
		return nil, toStatus(fmt.Errorf("reason is empty: say why the experiment is rejected, for the researcher: %w", ErrInvalidArgument))
	}
	var out *fxv1.Experiment
	err := s.withExperiment(ctx, req.GetExperiment(), func(id pki.Identity, e *expState) error {
		if e.rec.State != fxv1.ExperimentState_PENDING {
			return fmt.Errorf("experiment %s is %s, not PENDING: only a pending experiment can be rejected: %w", e.rec.Name, e.rec.State, ErrFailedPrecondition)
		}
		if err := s.d.endLocked(e, fxv1.ExperimentState_REJECTED, req.GetReason()); err != nil {
			return err
		}
		s.d.log.Info("experiment rejected", "experiment", e.rec.ID, "by", id.Name)
		out = s.d.toProtoLocked(e)
		return nil
	})
	return out, toStatus(err)
}
