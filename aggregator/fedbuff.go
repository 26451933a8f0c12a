package aggregator

import (
	"fmt"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/fx-fl/fx/tensor"
)

// Asynchronous rounds (aggregation.mode async; FedBuff, see
// experiment/fedbuff.go). A server step is a round of the synchronous
// machinery, with its round file, checkpoint, write-behind, resume and
// director events unchanged; what differs is when it closes and what it
// accepts:
//
//   - It closes as soon as K train updates are in (K = the plan's
//     BufferFor the participants, no more than those still taking part),
//     not when every site has reported. The deadline and min_reporting
//     apply as in a synchronous round; stragglers.percent does not.
//   - A site is handed the current step's tasks whenever it asks, unless
//     its train update is in that step already: at most one update per
//     site per step, so a site that has contributed waits for the next.
//   - An upload names the step whose model it started from (its base);
//     it counts in the current step if that is at most staleness.max steps
//     ahead, weighed by the staleness function on top of its usual weight.
//     Older ones are refused (FailedPrecondition, with the reason, which
//     the site logs before it starts again from the newest model). Metric
//     results count in the step that is current when they arrive.
//   - A train upload is the site's update Δ = y − x_base for float tensors
//     (integer tensors carry their trained value, which FedAvg's rule takes
//     as for a synchronous round), so the running sum holds Σ w·f(s)·Δ in
//     the memory of one model and no old model is kept: at the close,
//     asyncStep turns the mean into x + η_g·mean, from the global model
//     the aggregator keeps in memory between steps (keepsModel).
//
// A restarted aggregator resumes from the last completed step; updates in
// the buffer at the crash are lost, and their sites train again.

// asyncReady reports whether an asynchronous training step may close
// before its deadline: K train updates are in, or as many as the
// participants still taking part, if fewer. Callers hold a.mu.
func (a *Aggregator) asyncReady(r *roundState) bool {
	return len(r.trainers) >= max(1, min(a.buffer, len(a.active())))
}

// staleness is how many steps the current round r is ahead of base, the
// round whose model a result was computed from; an error (FailedPrecondition,
// which the site logs as "not counted") when the result cannot count in r.
// A synchronous round takes only its own results. Callers hold a.mu.
func (a *Aggregator) staleness(r *roundState, base int, task string) (int, error) {
	if base == r.number {
		return 0, nil
	}
	if !a.plan.Async() || base > r.number || base < 1 {
		return 0, status.Errorf(codes.FailedPrecondition, "result for round %d refused: the current round is %d", base, r.number)
	}
	s := r.number - base
	if r.number > a.plan.TrainingRounds() {
		return 0, status.Errorf(codes.FailedPrecondition, "%s result from step %d refused: the training steps are over (step %d scores the final model); the result is late", task, base, r.number)
	}
	if limit := a.plan.MaxStaleness(); s > limit {
		return 0, status.Errorf(codes.FailedPrecondition, "%s result from step %d refused: it is %d steps behind the current step %d, and aggregation.staleness.max is %d; start again from the newest model",
			task, base, s, r.number, limit)
	}
	return s, nil
}

// asyncStep turns a step's mean update (Σ w·f(s)·Δ / Σ w·f(s), in avg)
// into the next global model from global, in avg's memory:
// x + lr·mean for float tensors; an integer tensor keeps avg's value,
// FedAvg's. With lr 1, every site in and none stale, that is FedAvg of the
// trained models.
func asyncStep(global, avg tensor.Model, lr float64) (tensor.Model, error) {
	if global == nil {
		return nil, fmt.Errorf("asynchronous step: no global model to step from")
	}
	index := global.Index()
	eta := float32(lr)
	for _, u := range avg {
		g := index[u.Name]
		if g == nil || !tensor.SameLayout(g, u) {
			return nil, fmt.Errorf("asynchronous step: the mean update's %s does not fit the global model", u.Name)
		}
		switch u.DType {
		case tensor.F32:
			us, gs := u.Float32s(), g.Float32s()
			for i, d := range us {
				us[i] = gs[i] + eta*d
			}
		case tensor.F64:
			us, gs := u.Float64s(), g.Float64s()
			for i, d := range us {
				us[i] = gs[i] + lr*d
			}
		case tensor.F16, tensor.BF16:
			if err := tensor.CombineFloat32(u, g, func(x, d float32) float32 { return x + eta*d }); err != nil {
				return nil, err
			}
		}
		if err := u.CheckFinite(); err != nil {
			return nil, fmt.Errorf("asynchronous step: %w (lower aggregation.lr)", err)
		}
	}
	return avg, nil
}
