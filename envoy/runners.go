package envoy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	osexec "os/exec"
	"path/filepath"

	"github.com/fx-fl/fx/internal/telemetry"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"

	"github.com/fx-fl/fx/collaborator"
	"github.com/fx-fl/fx/dataset"
	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/runner"
	"github.com/fx-fl/fx/runner/builtin"
	"github.com/fx-fl/fx/runner/exec"
	pysdk "github.com/fx-fl/fx/sdk/python"
)

// RunnerInput is what a task runner is built from at this site.
type RunnerInput struct {
	Plan *experiment.Plan
	// Dir is the unpacked experiment (an exec runner's command and files).
	Dir string
	// WorkDir is scratch space private to the envoy (exec task directories).
	WorkDir string
	// Data is the site's data set, loaded at start-up.
	Data *dataset.Dataset
	// DataConfig is the data owner's description of the data (the shard
	// setting), which an exec runner's command loads by itself.
	DataConfig dataset.Config
	// Exec is the site's policy for exec runners.
	Exec   ExecConfig
	Logger hclog.Logger
	// Output, when set, receives every line an exec runner's command
	// writes (the site shares them with the researcher).
	Output func(exec.OutputLine)
	// Contain confines an exec runner's command (the site's sandbox); nil
	// runs it unconfined (exec.sandbox: false).
	Contain func(*osexec.Cmd) error
	// SandboxErr, when set, is why this site refuses exec runners: it
	// should sandbox them and cannot.
	SandboxErr error
}

// A runner that holds resources between tasks (an exec runner's process)
// implements io.Closer; whoever builds one closes it when done with it.

// checker is a runner that can be started once at review, so that a plan
// it cannot run (a module its interpreter lacks) is declined at the offer.
type checker interface {
	Check(ctx context.Context) error
}

// starter is a runner that can start ahead of its first task.
type starter interface {
	Start(ctx context.Context)
}

// closeRunner closes r if it holds anything.
func closeRunner(r runner.Runner) error {
	if c, ok := r.(io.Closer); ok {
		return c.Close()
	}
	return nil
}

// RunnerFactory builds the task runner of an accepted plan. It is called at
// review, so that a plan this site cannot run is rejected with the reason
// rather than failing after it started, and again for every collaborator.
type RunnerFactory func(in RunnerInput) (runner.Runner, error)

// ErrExecRefused is the reason an exec plan is rejected at a site whose
// configuration sets exec.allow to false.
var ErrExecRefused = errors.New("exec runners are not allowed at this site (exec.allow is false): it runs built-in models only")

// DefaultRunner builds the runners this binary has: the built-in models,
// and the experiment's own command through the runner protocol.
func DefaultRunner(in RunnerInput) (runner.Runner, error) {
	plan := in.Plan
	switch plan.Runner.Kind {
	case experiment.RunnerBuiltin:
		// The plan's runner.seed seeds the model unless its
		// hyperparameters name a seed of their own.
		hp := maps.Clone(plan.Runner.Hyperparameters)
		if hp == nil {
			hp = map[string]any{}
		}
		if _, ok := hp["seed"]; !ok {
			hp["seed"] = plan.Runner.Seed
		}
		r, err := builtin.New(builtin.Config{Model: plan.Runner.Model, Hyperparameters: hp, Data: in.Data, ProximalMu: plan.Training.ProximalMu})
		if err != nil {
			return nil, fmt.Errorf("builtin runner: %w", err)
		}
		return r, nil
	case experiment.RunnerExec:
		if !in.Exec.Allow {
			return nil, ErrExecRefused
		}
		if in.SandboxErr != nil {
			return nil, in.SandboxErr
		}
		data, err := dataSettings(in.DataConfig, in.Data)
		if err != nil {
			return nil, err
		}
		r, err := exec.New(exec.Config{
			Dir:             in.Dir,
			Command:         plan.Runner.Command,
			Mode:            plan.Runner.Mode,
			Python:          in.Exec.Python,
			Timeout:         plan.Runner.Timeout.Std(),
			Hyperparameters: plan.Runner.Hyperparameters,
			Seed:            plan.Runner.Seed,
			ProximalMu:      plan.Training.ProximalMu,
			Data:            data,
			Dataset:         in.Data,
			PythonLibrary:   pysdk.SiteLibrary,
			Env:             in.Exec.Env,
			Logger:          in.Logger,
			Output:          in.Output,
			Contain:         in.Contain,
			WorkDir:         in.WorkDir,
		})
		if err != nil {
			return nil, err
		}
		return r, nil
	}
	return nil, fmt.Errorf("runner kind %q is not known to this envoy", plan.Runner.Kind)
}

// dataSettings is the data owner's shard setting as an exec runner's
// command reads it (docs/runner-protocol.md): the options the owner set,
// the path made absolute (the command runs in the experiment directory),
// and the shapes and class count of the loaded data.
func dataSettings(c dataset.Config, d *dataset.Dataset) (map[string]any, error) {
	m := map[string]any{"kind": c.Kind, "seed": c.Seed}
	if c.Path != "" {
		abs, err := filepath.Abs(c.Path)
		if err != nil {
			return nil, fmt.Errorf("shard.path: %w", err)
		}
		m["path"] = abs
	}
	set := func(key string, v any, isSet bool) {
		if isSet {
			m[key] = v
		}
	}
	set("shard", c.Shard, c.Shard != "")
	set("dirichlet_alpha", c.DirichletAlpha, c.DirichletAlpha != 0)
	set("label_column", c.LabelColumn, c.LabelColumn != "")
	set("valid_fraction", c.ValidFraction, c.ValidFraction != 0)
	set("features", c.Features, c.Features != 0)
	set("train_samples", c.TrainSamples, c.TrainSamples != 0)
	set("valid_samples", c.ValidSamples, c.ValidSamples != 0)
	set("cluster_spread", c.ClusterSpread, c.ClusterSpread != 0)
	if d != nil {
		m["sample_shape"] = d.SampleShape
		m["classes"] = d.Classes
	}
	return m, nil
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
	// DialOptions carry the envoy's mutual-TLS credentials, reconnection
	// on the site's retry schedule, and a dialer that follows the
	// aggregator when the director says it moved.
	DialOptions []grpc.DialOption
	// Retry is the site's retry schedule, for the collaborator's calls.
	Retry  RetryConfig
	Runner runner.Runner
	Plan   *experiment.Plan
	// Dir is the unpacked experiment, read-only.
	Dir string
	// WorkDir is the collaborator's own state (trained weights between
	// tasks); it survives an envoy restart and is removed on Stop.
	WorkDir string
	Logger  hclog.Logger
	// Metrics, if set, receive the collaborator's transfers and tasks.
	Metrics *telemetry.Metrics
	// Privacy, if set, is the differential privacy every trained model
	// gets before it leaves the site: the plan's, charged to the site's
	// ledger when it keeps a budget.
	Privacy *collaborator.Privacy
}

// CollaboratorFunc runs a collaborator until the experiment ends for it
// (nil), it fails (an error, which the envoy reports), or ctx is cancelled
// (the envoy stops it). It retries transient errors itself.
type CollaboratorFunc func(ctx context.Context, spec CollaboratorSpec) error
