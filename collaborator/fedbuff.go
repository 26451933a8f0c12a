package collaborator

import (
	"fmt"

	"github.com/fx-fl/fx/tensor"
)

// Asynchronous rounds (the plan's aggregation.mode async, FedBuff; see
// aggregator/fedbuff.go). Nothing changes in how a site asks for tasks and
// runs them: it trains from the model of the step the aggregator hands out,
// uploads naming that step, and asks again, getting the newest step's model
// (or waiting, if its update is in that step already). What changes is the
// train upload, which is the update Δ = y − x rather than the trained
// model y: the aggregator sums updates trained from different models
// without keeping any of them. The validations run as in a synchronous
// round: aggregated_model_validation scores the model the site starts
// from, locally_tuned_model_validation its trained weights.

// delta returns the update of trained from base for an asynchronous
// upload: trained − base for float tensors, and an integer tensor's
// trained value (the aggregator takes integer tensors as they are).
func delta(base, trained tensor.Model) (tensor.Model, error) {
	index := base.Index()
	out := make(tensor.Model, 0, len(trained))
	for _, y := range trained {
		x := index[y.Name]
		if x == nil || !tensor.SameLayout(x, y) {
			return nil, fmt.Errorf("the trained %s does not fit the global model", y.Name)
		}
		d := tensor.New(y.Name, y.DType, y.Shape)
		switch y.DType {
		case tensor.F32:
			ds, xs, ys := d.Float32s(), x.Float32s(), y.Float32s()
			for i := range ds {
				ds[i] = ys[i] - xs[i]
			}
		case tensor.F64:
			ds, xs, ys := d.Float64s(), x.Float64s(), y.Float64s()
			for i := range ds {
				ds[i] = ys[i] - xs[i]
			}
		case tensor.F16, tensor.BF16:
			copy(d.Data, y.Data)
			if err := tensor.CombineFloat32(d, x, func(x, y float32) float32 { return y - x }); err != nil {
				return nil, err
			}
		default:
			copy(d.Data, y.Data)
		}
		out = append(out, d)
	}
	return out, nil
}
