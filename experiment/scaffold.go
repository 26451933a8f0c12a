package experiment

import (
	"strings"

	"github.com/fx-fl/fx/runner"
)

// AlgScaffold is SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic
// Controlled Averaging for Federated Learning", option II control
// variates): the sites correct every local gradient by c − c_i, the server's
// control variate minus their own, and the aggregator steps the global model
// by aggregation.lr (the server learning rate η_g, default 1) times the mean
// update and the server variate by |S|/N times the mean change of the
// sites' variates. See docs/experiments.md, SCAFFOLD.
const AlgScaffold = "scaffold"

// ScaffoldPrefix starts the names of the control-variate tensors of a
// SCAFFOLD experiment: the global model carries the server's variate c as
// ScaffoldPrefix + name for each of its float tensors, and a site's train
// upload carries the change of its own variate, Δc_i, under the same names.
const ScaffoldPrefix = runner.ControlVariatePrefix

// DefaultScaffoldLR is SCAFFOLD's server learning rate η_g when
// aggregation.lr is 0: the new global model is the mean of the sites'.
const DefaultScaffoldLR = 1.0

// Scaffold reports whether the plan runs SCAFFOLD.
func (p *Plan) Scaffold() bool { return p.Aggregation.Algorithm == AlgScaffold }

// ScaffoldLR is SCAFFOLD's server learning rate: aggregation.lr, or
// DefaultScaffoldLR.
func (p *Plan) ScaffoldLR() float64 {
	if lr := p.Aggregation.LR; lr > 0 {
		return lr
	}
	return DefaultScaffoldLR
}

// IsControlVariate reports whether a tensor name is one of SCAFFOLD's
// control variates rather than a weight of the model.
func IsControlVariate(name string) bool { return strings.HasPrefix(name, ScaffoldPrefix) }

// validateScaffold refuses what SCAFFOLD does not combine with (yet).
func (p *Plan) validateScaffold(v *problems) {
	if !p.Scaffold() {
		return
	}
	a := &p.Aggregation
	if p.Runner.Kind == RunnerExec && p.Runner.Mode == RunnerModePerTask {
		v.add("aggregation.algorithm", "scaffold hands your code its gradient correction through the persistent runner protocol only: remove runner.mode per_task (persistent is the default)")
	}
	if p.Evaluation() {
		v.add("aggregation.algorithm", "scaffold changes how sites train, and this plan's tasks do not train: use fedavg, or add train to tasks")
	}
	if a.Secure {
		v.add("aggregation.secure", "cannot be combined with scaffold yet: the control variates are not masked; use fedavg or a server optimiser, or turn secure off")
	}
	if len(a.Local) > 0 {
		v.add("aggregation.local", "cannot be combined with scaffold yet: personalised layers would need control variates of the shared tensors only; remove local, or use fedavg")
	}
	if p.Privacy.DP != nil {
		v.add("privacy.dp", "cannot be combined with scaffold yet: a site's upload carries its control variate's change, which differential privacy does not clip or noise; use fedavg or a server optimiser with dp")
	}
	if a.Beta1 != 0 || a.Beta2 != 0 || a.Tau != 0 {
		v.add("aggregation.algorithm", "scaffold takes only lr (its server learning rate) of the server optimisers' keys: remove beta1, beta2 and tau")
	}
}
