package aggregator

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/fx-fl/fx/internal/parallel"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/secagg"
	"github.com/fx-fl/fx/tensor"
)

// Secure aggregation (aggregation.secure; docs/privacy.md): each round the
// aggregator runs package secagg's Server. The collaborators' messages of
// the key exchange and the unmasking come through the SecureAggregation
// RPC, which relays them (collaborators never talk to each other), and
// their train uploads are masked updates (trained − global, in fixed
// point, 4 bytes an element, sent as I32 tensors): staged until whole, as
// plain uploads are, then folded into the Server's sum. At the round's
// close the aggregator names the survivors and the dropped, collects the
// unmask responses, and the round's model is the global model plus the
// survivors' unmasked mean update; a server optimiser steps from it as from
// a plain FedAvg mean.
//
// The steps of the key exchange close when every active participant has
// sent its message, or, once at least the threshold t have, when half the
// time from the step's first message to the round's deadline has passed, so
// that a site lost before the step leaves the others time for the rest of
// the round. The unmasking waits for every survivor, and after
// secureUnmaskGrace for t of them.

// secureUnmaskGrace is how long the unmasking waits for every survivor
// before it settles for the threshold's worth of answers.
const secureUnmaskGrace = 10 * time.Second

// secureRound is one round's secure aggregation, guarded by the
// aggregator's mutex (the Server has its own locks).
type secureRound struct {
	srv       *secagg.Server
	threshold int
	// layout is the masked upload's: the aggregated tensors as I32, 4
	// bytes per element; index numbers them as the Server does.
	layout tensor.Model
	index  map[string]int

	// The messages as each collaborator sent them, so a repeat is harmless.
	adverts, shares, responses map[string][]byte
	weights                    map[string]float64 // advertised
	firstAdvert, firstShares   time.Time
	keyList                    []byte            // once the advertisements closed
	bundles                    map[string][]byte // once the shares closed
	request                    []byte            // once the inputs closed
	survivors                  []string
	failed                     string // why the round's secure aggregation failed
	// out are the sites that sit this round out: a step of the key
	// exchange closed without them, so no update of theirs can count.
	// GetTasks hands them nothing more in the round.
	out map[string]bool
	// staged counts the masked bytes staged in memory; it is atomic, as
	// stages are discarded under a.mu.
	staged atomic.Int64
}

// checkSecureLayout refuses, at start, a model that secure aggregation
// cannot sum: it sums float tensors only, so an integer tensor that is
// aggregated (a step counter) must be kept local instead.
func (a *Aggregator) checkSecureLayout(m tensor.Model) error {
	if !a.plan.Aggregation.Secure {
		return nil
	}
	for _, t := range m {
		if !t.DType.IsFloat() && !a.plan.Aggregation.IsLocal(t.Name) {
			return fmt.Errorf("aggregator: aggregation.secure sums float tensors only, and tensor %q is %s: keep it at the sites with aggregation.local, or leave it out of the model", t.Name, t.DType)
		}
	}
	return nil
}

// secureSumBytes is the size of a secure round's sum of layout, and of
// one masked upload: 4 bytes an element, whatever the dtype.
func secureSumBytes(layout tensor.Model) int64 {
	var n int64
	for _, t := range layout {
		n += t.Elements()
	}
	return 4 * n
}

// secureOf returns round r's secure aggregation, made on first use.
// Callers hold a.mu.
func (a *Aggregator) secureOf(r *roundState) (*secureRound, error) {
	if r.sec != nil {
		return r.sec, nil
	}
	// The Server numbers the tensors in the order of their names, which
	// the sites know whatever order their model's file has.
	sorted := slices.SortedFunc(slices.Values(a.layout), func(x, y *tensor.Tensor) int { return strings.Compare(x.Name, y.Name) })
	floats := make(tensor.Model, len(sorted))
	masked := make(tensor.Model, len(sorted))
	index := make(map[string]int, len(sorted))
	for i, t := range sorted {
		floats[i] = &tensor.Tensor{Name: t.Name, DType: t.DType, Shape: t.Shape}
		masked[i] = &tensor.Tensor{Name: t.Name, DType: tensor.I32, Shape: t.Shape}
		index[t.Name] = i
	}
	t := a.plan.SecureThresholdOrDefault()
	srv, err := secagg.NewServer(secagg.ServerConfig{
		Session:   secagg.Session{Experiment: a.cfg.ExperimentID, Round: uint64(r.number)},
		Threshold: t, Range: a.plan.SecureRangeOrDefault(), Layout: floats,
	})
	if err != nil {
		return nil, err
	}
	if n := len(a.active()); t <= n/2 {
		a.log.Warn("secure aggregation's threshold is not a majority of the participants: two disjoint groups could each unmask", "threshold", t, "participants", n)
	}
	r.sec = &secureRound{
		srv: srv, threshold: t, layout: masked, index: index,
		adverts: map[string][]byte{}, shares: map[string][]byte{}, responses: map[string][]byte{},
		weights: map[string]float64{}, out: map[string]bool{},
	}
	return r.sec, nil
}

// SecureAggregation is one step of secure aggregation; see the protocol.
func (s *service) SecureAggregation(ctx context.Context, req *fxv1.SecureAggregationRequest) (*fxv1.SecureAggregationResponse, error) {
	name, err := s.participant(ctx, req.GetExperimentId(), req.GetCollaborator())
	if err != nil {
		return nil, err
	}
	a := s.a
	if !a.plan.Aggregation.Secure {
		return nil, status.Error(codes.FailedPrecondition, "this experiment does not use secure aggregation (aggregation.secure)")
	}
	step := req.GetStep()
	a.mu.Lock()
	r := a.round
	var sec *secureRound
	switch {
	case a.ended:
		err = status.Error(codes.FailedPrecondition, "the experiment has ended")
	case r == nil:
		err = status.Error(codes.FailedPrecondition, "no round is open")
	case int(req.GetRound()) != r.number:
		err = status.Errorf(codes.FailedPrecondition, "secure aggregation of round %d refused: the current round is %d", req.GetRound(), r.number)
	case r.closed && (step == fxv1.SecureAggregationRequest_ADVERTISE || step == fxv1.SecureAggregationRequest_SHARE_KEYS):
		err = status.Errorf(codes.FailedPrecondition, "round %d has closed", r.number)
	default:
		if sec, err = a.secureOf(r); err != nil {
			err = status.Errorf(codes.Internal, "secure aggregation: %v", err)
		} else {
			err = a.secureRecord(r, sec, name, step, req.GetMessage())
			a.sitOut(r, sec, name, step, err)
		}
	}
	a.mu.Unlock()
	if err != nil {
		return nil, err
	}
	window := time.NewTimer(a.cfg.PollWindow)
	defer window.Stop()
	for {
		a.mu.Lock()
		answer, ready, cutoff, err := a.secureAnswer(r, sec, name, step)
		a.sitOut(r, sec, name, step, err)
		changed := a.changed
		a.mu.Unlock()
		if err != nil || ready {
			return &fxv1.SecureAggregationResponse{Ready: ready, Message: answer}, err
		}
		var at <-chan time.Time
		if !cutoff.IsZero() {
			t := time.NewTimer(max(0, cutoff.Sub(a.cfg.Now())))
			defer t.Stop()
			at = t.C
		}
		select {
		case <-changed:
		case <-at:
		case <-window.C:
			return &fxv1.SecureAggregationResponse{}, nil
		case <-ctx.Done():
			return nil, status.FromContextError(ctx.Err()).Err()
		}
	}
}

// secureRecord takes a collaborator's message of a step. Callers hold a.mu.
func (a *Aggregator) secureRecord(r *roundState, sec *secureRound, name string, step fxv1.SecureAggregationRequest_Step, msg []byte) error {
	invalid := func(err error) error {
		return status.Errorf(codes.InvalidArgument, "secure aggregation, %s from %s: %v", step, name, err)
	}
	// seen reports a repeat of the message recorded, and refuses another.
	seen := func(kept map[string][]byte) (bool, error) {
		old, ok := kept[name]
		if ok && !bytes.Equal(old, msg) {
			return true, status.Errorf(codes.FailedPrecondition, "secure aggregation: %s sent another %s in round %d (restarted mid-round?): its first stands, and a site cannot take part twice in one round", name, step, r.number)
		}
		return ok, nil
	}
	switch step {
	case fxv1.SecureAggregationRequest_ADVERTISE:
		if dup, err := seen(sec.adverts); dup || err != nil {
			return err
		}
		if sec.keyList != nil {
			return status.Errorf(codes.FailedPrecondition, "secure aggregation: the key advertisements of round %d closed without %s: it sits this round out", r.number, name)
		}
		var m secagg.AdvertiseKeys
		if err := m.UnmarshalBinary(msg); err != nil {
			return invalid(err)
		}
		if m.From != name {
			return status.Errorf(codes.PermissionDenied, "secure aggregation: %s sent keys in the name of %q", name, m.From)
		}
		if err := a.checkSecureWeight(name, m.Weight); err != nil {
			return invalid(err)
		}
		if err := sec.srv.Advertise(&m); err != nil {
			return invalid(err)
		}
		if sec.firstAdvert.IsZero() {
			sec.firstAdvert = a.cfg.Now()
		}
		sec.adverts[name], sec.weights[name] = slices.Clone(msg), m.Weight
	case fxv1.SecureAggregationRequest_SHARE_KEYS:
		if dup, err := seen(sec.shares); dup || err != nil {
			return err
		}
		if sec.keyList == nil || sec.adverts[name] == nil || sec.bundles != nil {
			return status.Errorf(codes.FailedPrecondition, "secure aggregation: round %d takes no shares from %s now (it is not in the key list, or the shares closed without it): it sits this round out", r.number, name)
		}
		var m secagg.EncryptedShares
		if err := m.UnmarshalBinary(msg); err != nil {
			return invalid(err)
		}
		if m.From != name {
			return status.Errorf(codes.PermissionDenied, "secure aggregation: %s sent shares in the name of %q", name, m.From)
		}
		if err := sec.srv.Shares(&m); err != nil {
			return invalid(err)
		}
		if sec.firstShares.IsZero() {
			sec.firstShares = a.cfg.Now()
		}
		sec.shares[name] = slices.Clone(msg)
	case fxv1.SecureAggregationRequest_UNMASK_REQUEST:
		if len(msg) > 0 {
			return invalid(errors.New("the unmask request step carries no message"))
		}
		if sec.adverts[name] == nil || (sec.bundles != nil && sec.bundles[name] == nil) {
			// Its keys went to another aggregator (this one restarted),
			// or the key exchange closed without it.
			return status.Errorf(codes.FailedPrecondition, "secure aggregation: %s holds no shares of round %d here", name, r.number)
		}
		return nil
	case fxv1.SecureAggregationRequest_UNMASK:
		if dup, err := seen(sec.responses); dup || err != nil {
			return err
		}
		if sec.request == nil {
			return status.Errorf(codes.FailedPrecondition, "secure aggregation: round %d has not asked to unmask", r.number)
		}
		var m secagg.UnmaskResponse
		if err := m.UnmarshalBinary(msg); err != nil {
			return invalid(err)
		}
		if m.From != name {
			return status.Errorf(codes.PermissionDenied, "secure aggregation: %s answered in the name of %q", name, m.From)
		}
		if err := sec.srv.AddUnmaskResponse(&m); err != nil {
			return invalid(err)
		}
		sec.responses[name] = slices.Clone(msg)
		a.broadcast()
		return nil
	default:
		return invalid(fmt.Errorf("unknown step %v", step))
	}
	a.broadcast()
	return nil
}

// sitOut notes that a site sits round r out when a step of its key
// exchange refused it for the round. Callers hold a.mu.
func (a *Aggregator) sitOut(r *roundState, sec *secureRound, name string, step fxv1.SecureAggregationRequest_Step, err error) {
	key := step == fxv1.SecureAggregationRequest_ADVERTISE || step == fxv1.SecureAggregationRequest_SHARE_KEYS
	if key && status.Code(err) == codes.FailedPrecondition && a.round == r && !sec.out[name] {
		sec.out[name] = true
		a.log.Info("secure aggregation: a site sits the round out", "round", r.number, "collaborator", name, "reason", status.Convert(err).Message())
	}
}

// sitsOut reports whether name sits round r out (see secureRound.out).
// Callers hold a.mu.
func (a *Aggregator) sitsOut(r *roundState, name string) bool {
	return r.sec != nil && r.sec.out[name]
}

// checkSecureWeight checks an advertised weight against the plan's
// aggregation.weights: the upload's sample count must give it later.
func (a *Aggregator) checkSecureWeight(name string, w float64) error {
	bound := float64(a.maxWeight(name))
	if !(w >= 1 && w <= bound) || w != math.Trunc(w) {
		return fmt.Errorf("weight %v: want a whole number of samples from 1 to the %v this site may weigh (aggregation.weights: %s)", w, bound, a.plan.Aggregation.Weights)
	}
	return nil
}

// secureAnswer closes a step if it may close and returns its answer to
// name; not ready with the time at which it may close otherwise (zero:
// when something changes). Callers hold a.mu.
func (a *Aggregator) secureAnswer(r *roundState, sec *secureRound, name string, step fxv1.SecureAggregationRequest_Step) (msg []byte, ready bool, cutoff time.Time, err error) {
	if sec.failed != "" {
		return nil, false, time.Time{}, status.Errorf(codes.FailedPrecondition, "secure aggregation of round %d failed: %s", r.number, sec.failed)
	}
	if a.round != r {
		return nil, false, time.Time{}, status.Errorf(codes.FailedPrecondition, "round %d is over", r.number)
	}
	// closes: every active participant of want sent, or t have and the
	// cutoff passed.
	closes := func(sent map[string][]byte, want func(string) bool, first time.Time) (bool, time.Time) {
		all := true
		for _, p := range a.active() {
			if want(p) && sent[p] == nil {
				all = false
			}
		}
		if all && len(sent) > 0 {
			return true, time.Time{}
		}
		if len(sent) < sec.threshold || first.IsZero() {
			return false, time.Time{}
		}
		cut := first.Add(r.deadline.Sub(first) / 2)
		return !a.cfg.Now().Before(cut), cut
	}
	switch step {
	case fxv1.SecureAggregationRequest_ADVERTISE:
		if sec.keyList == nil {
			ok, cut := closes(sec.adverts, func(string) bool { return true }, sec.firstAdvert)
			if !ok {
				return nil, false, cut, nil
			}
			kl, err := sec.srv.KeyList()
			if err == nil {
				sec.keyList, err = kl.MarshalBinary()
			}
			if err != nil {
				sec.failed = err.Error()
				return nil, false, time.Time{}, status.Errorf(codes.FailedPrecondition, "%v", err)
			}
			a.log.Info("secure aggregation: keys advertised", "round", r.number, "participants", len(sec.adverts), "threshold", sec.threshold)
			a.broadcast()
		}
		if sec.adverts[name] == nil {
			return nil, false, time.Time{}, status.Errorf(codes.FailedPrecondition, "secure aggregation: the key advertisements of round %d closed without %s: it sits this round out", r.number, name)
		}
		return sec.keyList, true, time.Time{}, nil
	case fxv1.SecureAggregationRequest_SHARE_KEYS:
		if sec.bundles == nil {
			ok, cut := closes(sec.shares, func(p string) bool { return sec.adverts[p] != nil }, sec.firstShares)
			if !ok {
				return nil, false, cut, nil
			}
			bundles, err := sec.srv.Bundles()
			out := map[string][]byte{}
			for id, b := range bundles {
				if err == nil {
					out[id], err = b.MarshalBinary()
				}
			}
			if err != nil {
				sec.failed = err.Error()
				return nil, false, time.Time{}, status.Errorf(codes.FailedPrecondition, "%v", err)
			}
			sec.bundles = out
			a.log.Info("secure aggregation: shares exchanged", "round", r.number, "participants", len(out))
			a.broadcast()
		}
		if sec.bundles[name] == nil {
			return nil, false, time.Time{}, status.Errorf(codes.FailedPrecondition, "secure aggregation: the shares of round %d closed without %s: it sits this round out", r.number, name)
		}
		return sec.bundles[name], true, time.Time{}, nil
	case fxv1.SecureAggregationRequest_UNMASK_REQUEST:
		if sec.request == nil {
			return nil, false, time.Time{}, nil
		}
		return sec.request, true, time.Time{}, nil
	}
	return nil, true, time.Time{}, nil // UNMASK: recorded
}

// secureTrainStage is where a secure round's train upload goes: a masked
// update, checked against the masked layout and staged until whole.
func (a *Aggregator) secureTrainStage(r *roundState, name string, h *fxv1.ResultHeader) (stage, *tensor.Decoder, error) {
	a.mu.Lock()
	sec := r.sec
	if sec == nil || sec.bundles == nil || sec.bundles[name] == nil {
		a.mu.Unlock()
		return nil, nil, status.Errorf(codes.FailedPrecondition, "round %d uses secure aggregation, and %s took no part in its key exchange: its update cannot be counted", r.number, name)
	}
	w := a.weight(TaskResult{Collaborator: name, Samples: h.GetSampleCount()})
	if w != sec.weights[name] {
		a.mu.Unlock()
		return nil, nil, status.Errorf(codes.InvalidArgument, "sample_count %d gives weight %v, but %s advertised weight %v for its masked update", h.GetSampleCount(), w, name, sec.weights[name])
	}
	a.mu.Unlock()
	st := &secureStage{a: a, sec: sec, name: name}
	dec := tensor.NewDecoder(tensor.DecoderConfig{Layout: sec.layout, OnChunk: func(t *tensor.Tensor, elem int64, data []byte) error {
		return st.Keep(t.Name, elem, data, t.DType)
	}})
	return st, dec, nil
}

// secureStage keeps a masked upload until it is whole: in memory (the
// received chunks) while the round's staged uploads fit in one model's
// StageBudget, in an unlinked temporary file beyond. Only a whole upload
// is folded into the sum: one partly in it could be neither counted nor
// dropped.
type secureStage struct {
	a    *Aggregator
	sec  *secureRound
	name string

	mu     sync.Mutex
	pieces []maskedPiece
	inMem  int64
	file   *os.File
	fileAt int64
}

type maskedPiece struct {
	tensor int
	elem   int64
	data   []byte // nil: n bytes at at in the file
	at     int64
	n      int
}

func (s *secureStage) Keep(name string, elem int64, raw []byte, dtype tensor.DType) error {
	i, ok := s.sec.index[name]
	if !ok || dtype != tensor.I32 {
		return fmt.Errorf("tensor %q: not a masked tensor of the round", name)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	a := s.a
	n := int64(len(raw))
	if s.sec.staged.Add(n) <= StageBudget(a.modelBytes) {
		s.inMem += n
		s.pieces = append(s.pieces, maskedPiece{tensor: i, elem: elem, data: raw, n: len(raw)})
		return nil
	}
	s.sec.staged.Add(-n)
	if s.file == nil {
		f, err := os.CreateTemp(a.cfg.Dir, "secure-stage-*")
		if err != nil {
			return fmt.Errorf("stage a masked upload: %w", err)
		}
		os.Remove(f.Name()) // unlinked: gone with its descriptor
		s.file = f
	}
	if _, err := s.file.WriteAt(raw, s.fileAt); err != nil {
		return fmt.Errorf("stage a masked upload: %w", err)
	}
	s.pieces = append(s.pieces, maskedPiece{tensor: i, elem: elem, at: s.fileAt, n: len(raw)})
	s.fileAt += int64(len(raw))
	return nil
}

// Commit folds the whole masked upload into the sum and marks it complete.
// The weight was checked against the advertised one when the upload began.
func (s *secureStage) Commit(float64) error {
	s.mu.Lock()
	defer s.release()
	defer s.mu.Unlock()
	var buf []byte
	for _, p := range s.pieces {
		data := p.data
		if data == nil {
			if cap(buf) < p.n {
				buf = make([]byte, p.n)
			}
			data = buf[:p.n]
			if _, err := s.file.ReadAt(data, p.at); err != nil && !errors.Is(err, io.EOF) {
				return fmt.Errorf("read back a staged masked upload: %w", err)
			}
		}
		if err := s.sec.srv.AddMaskedChunk(s.name, p.tensor, p.elem, data); err != nil {
			return err
		}
	}
	return s.sec.srv.InputDone(s.name)
}

func (s *secureStage) Discard() { s.release() }

// release gives back the stage's memory budget and file.
func (s *secureStage) release() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.sec.staged.Add(-s.inMem)
	s.inMem, s.pieces = 0, nil
	if s.file != nil {
		s.file.Close()
		s.file = nil
	}
}

// secureMean closes a secure round's inputs, unmasks their sum with the
// survivors' answers, and returns the round's new model of the aggregated
// tensors: the global model plus the survivors' weighted mean update.
func (a *Aggregator) secureMean(ctx context.Context, r *roundState) (tensor.Model, error) {
	a.mu.Lock()
	sec := r.sec
	if sec == nil || sec.bundles == nil {
		err := fmt.Errorf("secure aggregation: the round's key exchange did not complete (fewer than the threshold of %d sites took part in time)", a.plan.SecureThresholdOrDefault())
		if sec != nil {
			err = a.withLeavers(sec, err)
		}
		a.mu.Unlock()
		return nil, err
	}
	a.mu.Unlock()
	req, err := sec.srv.UnmaskRequest() // waits for folds under way
	var msg []byte
	if err == nil {
		msg, err = req.MarshalBinary()
	}
	a.mu.Lock()
	if err != nil {
		err = a.withLeavers(sec, err)
		sec.failed = err.Error()
		a.broadcast()
		a.mu.Unlock()
		return nil, err
	}
	sec.request, sec.survivors = msg, req.Survivors
	a.broadcast()
	a.mu.Unlock()
	a.log.Info("secure aggregation: unmasking", "round", r.number, "survivors", req.Survivors, "dropped", req.Dropped)

	asked := time.Now()
	deadline := time.NewTimer(max(a.plan.Stragglers.Deadline.Std(), secureUnmaskGrace))
	defer deadline.Stop()
	grace := time.NewTimer(secureUnmaskGrace)
	defer grace.Stop()
	graceOver := false
	for {
		a.mu.Lock()
		answered, all := len(sec.responses), true
		for _, v := range req.Survivors {
			if sec.responses[v] == nil {
				all = false
			}
		}
		changed := a.changed
		a.mu.Unlock()
		if all || (graceOver && answered >= sec.threshold) {
			break
		}
		select {
		case <-changed:
		case <-grace.C:
			graceOver = true
		case <-deadline.C:
			err := fmt.Errorf("secure aggregation: %d sites answered the unmask request within %s, fewer than the threshold %d", answered, time.Since(asked).Round(time.Second), sec.threshold)
			a.mu.Lock()
			err = a.withLeavers(sec, err)
			sec.failed = err.Error()
			a.broadcast()
			a.mu.Unlock()
			return nil, err
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	res, err := sec.srv.Result()
	if err != nil {
		a.mu.Lock()
		err = a.withLeavers(sec, err)
		sec.failed = err.Error()
		a.broadcast()
		a.mu.Unlock()
		return nil, err
	}
	global, err := a.currentShared(r)
	if err != nil {
		return nil, err
	}
	mean, err := addMean(global, res)
	res.Release() // the sum: the round's save, running beside the next round, keeps r and its Server (memoryNeed)
	if err != nil {
		return nil, err
	}
	byName := mean.Index() // back in the model's order
	out := make(tensor.Model, len(a.layout))
	for i, l := range a.layout {
		out[i] = byName[l.Name]
	}
	return out, nil
}

// withLeavers adds to the failure of a secure round why the sites that
// advertised keys in it and were dropped since left (the reason their
// envoy reported: a share that failed to open, say), so that the
// researcher reads why the round fell short and not only by how much.
// Callers hold a.mu.
func (a *Aggregator) withLeavers(sec *secureRound, err error) error {
	var why []string
	for _, name := range sortedKeys(sec.adverts) {
		if p := a.parts[name]; p != nil && p.dropped != "" {
			why = append(why, fmt.Sprintf("%s left the round: %s", name, p.dropped))
		}
	}
	if len(why) == 0 {
		return err
	}
	return fmt.Errorf("%w; %s", err, strings.Join(why, "; "))
}

// currentShared is the aggregated tensors of the model round r started
// from: in memory when it is kept, else read from its round file.
func (a *Aggregator) currentShared(r *roundState) (tensor.Model, error) {
	a.mu.Lock()
	m, done := a.useModel()
	a.mu.Unlock()
	defer done()
	kept := m != nil // another's memory: add to a copy
	if !kept {
		var err error
		if m, _, err = tensor.ReadFile(ModelPath(a.cfg.Dir, r.number-1)); err != nil {
			return nil, fmt.Errorf("secure aggregation: the round's global model: %w", err)
		}
	}
	shared := a.shared(m)
	out := make(tensor.Model, len(r.sec.layout))
	for i, l := range r.sec.layout {
		t := shared.Get(l.Name)
		if t == nil || !t.DType.IsFloat() {
			return nil, fmt.Errorf("secure aggregation: the round's global model has no float tensor %q", l.Name)
		}
		if kept {
			t = t.Clone()
		}
		out[i] = t
	}
	return out, nil
}

// addMean adds the unmasked mean update to g, in place, chunk by chunk on
// every core.
func addMean(g tensor.Model, res *secagg.Result) (tensor.Model, error) {
	const chunk = 1 << 16
	type job struct {
		t  int
		lo int64
	}
	var jobs []job
	for i, t := range g {
		for lo := int64(0); lo < t.Elements(); lo += chunk {
			jobs = append(jobs, job{i, lo})
		}
	}
	err := parallel.Each(len(jobs), func() func(int) error {
		buf := make([]byte, 8*chunk)
		return func(k int) error {
			j := jobs[k]
			t := g[j.t]
			d := buf[:8*min(int64(chunk), t.Elements()-j.lo)]
			if err := res.MeanChunk(j.t, j.lo, d, tensor.F64); err != nil {
				return err
			}
			addInto(t, j.lo, d)
			return nil
		}
	})
	return g, err
}

// addInto adds the float64 little-endian values of delta to t's elements
// from lo, in t's dtype.
func addInto(t *tensor.Tensor, lo int64, delta []byte) {
	size := int64(t.DType.Size())
	for k := int64(0); k < int64(len(delta)/8); k++ {
		d := math.Float64frombits(binary.LittleEndian.Uint64(delta[8*k:]))
		b := t.Data[(lo+k)*size:]
		switch t.DType {
		case tensor.F32:
			v := math.Float32frombits(binary.LittleEndian.Uint32(b))
			binary.LittleEndian.PutUint32(b, math.Float32bits(float32(float64(v)+d)))
		case tensor.F64:
			v := math.Float64frombits(binary.LittleEndian.Uint64(b))
			binary.LittleEndian.PutUint64(b, math.Float64bits(v+d))
		case tensor.F16:
			v := tensor.F16ToFloat32(binary.LittleEndian.Uint16(b))
			binary.LittleEndian.PutUint16(b, tensor.Float32ToF16(float32(float64(v)+d)))
		case tensor.BF16:
			v := tensor.BF16ToFloat32(binary.LittleEndian.Uint16(b))
			binary.LittleEndian.PutUint16(b, tensor.Float32ToBF16(float32(float64(v)+d)))
		}
	}
}
