package collaborator

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"runtime"
	"slices"
	"strings"
	"sync"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner"
	"github.com/fx-fl/fx/secagg"
	"github.com/fx-fl/fx/tensor"
)

// Secure is secure aggregation at this site (aggregation.secure;
// docs/privacy.md): the aggregator learns only the sum of the sites'
// updates. After training, the collaborator takes part in the round's key
// exchange through the aggregator (secagg's Participant: advertise its
// keys, share them), then uploads its update — trained − global, of the
// tensors that leave the site, after differential privacy if any — masked
// chunk by chunk (4 bytes an element, as I32 tensors), and once the
// round's tasks are done answers the aggregator's unmask request.
type Secure struct {
	// Threshold t and Range R, from the plan
	// (experiment.Plan.SecureThresholdOrDefault, SecureRangeOrDefault).
	Threshold int
	Range     float64
	// EqualWeights: the plan's aggregation.weights is equal, so the
	// update's weight is 1; else it is the trained samples.
	EqualWeights bool
}

// secureState is the collaborator's part in one round's secure
// aggregation, from its key exchange to its unmasking.
type secureState struct {
	round  int
	p      *secagg.Participant
	masker *secagg.Masker
}

// secureKeys runs the key exchange of round for a trained result: the
// participant advertises its keys and shares them through the aggregator,
// and gets the Masker of its update. A step that closed without this site
// leaves it out of the round (its upload will not be counted), which is
// not an error.
func (c *Collaborator) secureKeys(ctx context.Context, round int, res runner.Result) error {
	c.sec = nil
	s := c.cfg.Secure
	weight := float64(res.Samples)
	if s.EqualWeights {
		weight = 1
	}
	p, err := secagg.NewParticipant(secagg.ParticipantConfig{
		Session: secagg.Session{Experiment: c.cfg.ExperimentID, Round: uint64(round)},
		ID:      c.cfg.Name, Threshold: s.Threshold, Range: s.Range, Weight: weight,
	})
	if err != nil {
		return err
	}
	adv, err := p.Advertise()
	if err != nil {
		return err
	}
	msg, err := adv.MarshalBinary()
	if err != nil {
		return err
	}
	answer, ok, err := c.secureStep(ctx, round, fxv1.SecureAggregationRequest_ADVERTISE, msg)
	if !ok || err != nil {
		return err
	}
	var keys secagg.KeyList
	if err := keys.UnmarshalBinary(answer); err != nil {
		return fmt.Errorf("secure aggregation: the key list: %w", err)
	}
	shares, err := p.ShareKeys(&keys)
	if err != nil {
		return err
	}
	if msg, err = shares.MarshalBinary(); err != nil {
		return err
	}
	answer, ok, err = c.secureStep(ctx, round, fxv1.SecureAggregationRequest_SHARE_KEYS, msg)
	if !ok || err != nil {
		return err
	}
	var bundle secagg.ShareBundle
	if err := bundle.UnmarshalBinary(answer); err != nil {
		return fmt.Errorf("secure aggregation: the share bundle: %w", err)
	}
	m, err := p.Masker(&bundle)
	if err != nil {
		return err
	}
	c.sec = &secureState{round: round, p: p, masker: m}
	c.log.Info("secure aggregation: keys exchanged", "round", round, "participants", len(keys.Peers), "masked_against", m.Streams()-1)
	return nil
}

// secureUnmask answers round's unmask request, if this site took part in
// the round's key exchange: its shares of the survivors' self-mask seeds
// and of the dropped sites' mask keys (never both for one site).
func (c *Collaborator) secureUnmask(ctx context.Context, round int) error {
	sec := c.sec
	if sec == nil || sec.round != round {
		return nil
	}
	defer func() { c.sec = nil }()
	answer, ok, err := c.secureStep(ctx, round, fxv1.SecureAggregationRequest_UNMASK_REQUEST, nil)
	if !ok || err != nil {
		return err
	}
	var req secagg.UnmaskRequest
	if err := req.UnmarshalBinary(answer); err != nil {
		return fmt.Errorf("secure aggregation: the unmask request: %w", err)
	}
	resp, err := sec.p.Unmask(&req)
	if err != nil {
		return err
	}
	msg, err := resp.MarshalBinary()
	if err != nil {
		return err
	}
	if _, _, err := c.secureStep(ctx, round, fxv1.SecureAggregationRequest_UNMASK, msg); err != nil {
		return err
	}
	c.log.Info("secure aggregation: unmask request answered", "round", round, "survivors", len(req.Survivors), "dropped", req.Dropped)
	return nil
}

// secureStep sends a step's message and waits for the aggregator's
// answer (ok), asking again while the step is open. A step that closed
// without this site, or a round that moved on, is not ok and not an error:
// the site sits the round out.
func (c *Collaborator) secureStep(ctx context.Context, round int, step fxv1.SecureAggregationRequest_Step, msg []byte) ([]byte, bool, error) {
	req := &fxv1.SecureAggregationRequest{ExperimentId: c.cfg.ExperimentID, Collaborator: c.cfg.Name, Round: int32(round), Step: step, Message: msg}
	for {
		var resp *fxv1.SecureAggregationResponse
		err := c.retry(ctx, "secure aggregation "+step.String(), func(ctx context.Context) error {
			ctx, cancel := context.WithTimeout(ctx, pollTimeout)
			defer cancel()
			var err error
			resp, err = c.client.SecureAggregation(ctx, req)
			return err
		})
		if status.Code(err) == codes.FailedPrecondition {
			c.log.Warn("secure aggregation goes on without this site this round", "round", round, "step", step.String(), "reason", status.Convert(err).Message())
			return nil, false, nil
		}
		if err != nil {
			return nil, false, err
		}
		if resp.GetReady() {
			return resp.GetMessage(), true, nil
		}
	}
}

// encodeMasked sends the masked update of round's trained model: for each
// tensor that leaves the site, its elements of trained − global masked in
// fixed point, as an I32 tensor of the same name and shape. The masks
// depend only on the position, so a resumed upload (the encoder skipping
// what the aggregator has) sends the same bytes.
func (c *Collaborator) encodeMasked(enc *tensor.Encoder, round int, trained tensor.Model) error {
	sec := c.sec
	if sec == nil || sec.round != round {
		return status.Errorf(codes.FailedPrecondition, "secure aggregation: this site took no part in round %d's key exchange", round)
	}
	global, update := c.shared(c.model), c.shared(trained)
	// The aggregator numbers the tensors in the order of their names.
	order := slices.SortedFunc(slices.Values(update), func(x, y *tensor.Tensor) int { return strings.Compare(x.Name, y.Name) })
	index := make(map[string]int, len(order))
	for i, t := range order {
		index[t.Name] = i
	}
	for _, t := range update {
		i := index[t.Name]
		g := global.Get(t.Name)
		if !t.DType.IsFloat() || g == nil || g.DType != t.DType {
			return fmt.Errorf("secure aggregation sums float tensors only: tensor %q is %s", t.Name, t.DType)
		}
		r := &maskedReader{m: sec.masker, index: i, trained: t, global: g}
		if err := enc.EncodeFrom(t.Name, tensor.I32, t.Shape, r); err != nil {
			return err
		}
	}
	return nil
}

// maskedReader reads a tensor's masked update, 4 bytes an element, masking
// each read's elements on every core.
type maskedReader struct {
	m               *secagg.Masker
	index           int
	trained, global *tensor.Tensor
	next            int64 // the next element
}

func (r *maskedReader) Read(p []byte) (int, error) {
	left := r.trained.Elements() - r.next
	if left == 0 {
		return 0, io.EOF
	}
	n := min(int64(len(p)/4), left)
	if n == 0 {
		return 0, io.ErrShortBuffer
	}
	parts := int64(max(1, min(runtime.GOMAXPROCS(0), int(n/(1<<14)))))
	step := (n + parts - 1) / parts
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		ferr error
	)
	for lo := int64(0); lo < n; lo += step {
		hi := min(lo+step, n)
		wg.Go(func() {
			if err := r.mask(p[4*lo:4*hi], r.next+lo, hi-lo); err != nil {
				mu.Lock()
				ferr = err
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if ferr != nil {
		return 0, ferr
	}
	r.next += n
	return int(4 * n), nil
}

// mask writes into dst the masked update of n elements from elem.
func (r *maskedReader) mask(dst []byte, elem, n int64) error {
	size := int64(r.trained.DType.Size())
	t := r.trained.Data[elem*size : (elem+n)*size]
	g := r.global.Data[elem*size : (elem+n)*size]
	// The difference in float64 for F64, else float32 (F16 and BF16
	// differences are exact there).
	dt, delta := tensor.F32, make([]byte, 4*n)
	if r.trained.DType == tensor.F64 {
		dt, delta = tensor.F64, make([]byte, 8*n)
	}
	for k := int64(0); k < n; k++ {
		var d float64
		switch r.trained.DType {
		case tensor.F32:
			d = float64(math.Float32frombits(binary.LittleEndian.Uint32(t[4*k:]))) - float64(math.Float32frombits(binary.LittleEndian.Uint32(g[4*k:])))
		case tensor.F64:
			d = math.Float64frombits(binary.LittleEndian.Uint64(t[8*k:])) - math.Float64frombits(binary.LittleEndian.Uint64(g[8*k:]))
		case tensor.F16:
			d = float64(tensor.F16ToFloat32(binary.LittleEndian.Uint16(t[2*k:]))) - float64(tensor.F16ToFloat32(binary.LittleEndian.Uint16(g[2*k:])))
		case tensor.BF16:
			d = float64(tensor.BF16ToFloat32(binary.LittleEndian.Uint16(t[2*k:]))) - float64(tensor.BF16ToFloat32(binary.LittleEndian.Uint16(g[2*k:])))
		}
		if dt == tensor.F64 {
			binary.LittleEndian.PutUint64(delta[8*k:], math.Float64bits(d))
		} else {
			binary.LittleEndian.PutUint32(delta[4*k:], math.Float32bits(float32(d)))
		}
	}
	out, err := r.m.MaskChunk(r.index, elem, delta, dt, dst[:0])
	if err != nil {
		return err
	}
	if len(out) > 0 && &out[0] != &dst[0] {
		copy(dst, out)
	}
	return nil
}
