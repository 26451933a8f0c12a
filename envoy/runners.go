package envoy

import (
	"context"
	"errors"
	"fmt"
	"maps"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"

	"github.com/fx-fl/fx/dataset"
	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/runner"
	"github.com/fx-fl/fx/runner/builtin"
)

// RunnerFactory builds the task runner for an accepted plan on the site's
// data. dir is the unpacked experiment (runner files of an exec plan). It is
// called once at review, so that a plan this site cannot run is rejected
// with the reason rather than failing after it started, and again for every
// collaborator.
type RunnerFactory func(plan *experiment.Plan, dir string, data *dataset.Dataset) (runner.Runner, error)

// ErrExecUnsupported is the reason an offer with an exec runner is rejected:
// this envoy runs built-in models only.
var ErrExecUnsupported = errors.New("exec runner not supported by this envoy")

// DefaultRunner builds the runners this binary has: the built-in models.
// The plan's runner.seed seeds the model unless its hyperparameters name a
// seed of their own.
func DefaultRunner(plan *experiment.Plan, _ string, data *dataset.Dataset) (runner.Runner, error) {
	switch plan.Runner.Kind {
	case experiment.RunnerBuiltin:
		hp := maps.Clone(plan.Runner.Hyperparameters)
		if hp == nil {
			hp = map[string]any{}
		}
		if _, ok := hp["seed"]; !ok {
			hp["seed"] = plan.Runner.Seed
		}
		r, err := builtin.New(builtin.Config{Model: plan.Runner.Model, Hyperparameters: hp, Data: data})
		if err != nil {
			return nil, fmt.Errorf("builtin runner: %w", err)
		}
		return r, nil
	case experiment.RunnerExec:
		return nil, ErrExecUnsupported
	}
	return nil, fmt.Errorf("runner kind %q is not known to this envoy", plan.Runner.Kind)
}

// CollaboratorSpec is one collaborator to run.
type CollaboratorSpec struct {
	ExperimentID string
	// Name is the envoy's name, which the aggregator checks against the
	// certificate's CN.
	Name string
	// Address and ServerName say where the aggregator listens and the name
	// its certificate carries.
	Address    string
	ServerName string
	// Round is the aggregator's round when Start was sent; > 0 on rejoin.
	Round int32
	// DialOptions carry the envoy's mutual-TLS credentials.
	DialOptions []grpc.DialOption
	Runner      runner.Runner
	Plan        *experiment.Plan
	// Dir is the unpacked experiment, read-only.
	Dir string
	// WorkDir is the collaborator's own state (trained weights between
	// tasks); it survives an envoy restart and is removed on Stop.
	WorkDir string
	Logger  hclog.Logger
}

// CollaboratorFunc runs a collaborator until the experiment ends for it
// (nil), it fails (an error, which the envoy reports), or ctx is cancelled
// (the envoy stops it). It retries transient errors itself.
type CollaboratorFunc func(ctx context.Context, spec CollaboratorSpec) error
