package director

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"path/filepath"
	"slices"
	"time"

	"go.opentelemetry.io/otel/trace"

	"github.com/fx-fl/fx/internal/telemetry"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"

	"github.com/fx-fl/fx/aggregator"
	"github.com/fx-fl/fx/experiment"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner/builtin"
	"github.com/fx-fl/fx/tensor"
)

// InitialModelFile is the optional initial model at an archive's root.
const InitialModelFile = experiment.InitialModelFile

// LaunchSpec is everything needed to run one experiment's aggregator.
type LaunchSpec struct {
	ExperimentID string
	Plan         *experiment.Plan
	// Participants are the envoys taking part (not dropped), by name.
	Participants []string
	// Registered are the sample counts each participant had registered when
	// the experiment started; they bound what its results may claim.
	Registered map[string]aggregator.SampleCounts
	// Shards are the participants' dataset shards, for building a built-in
	// model's initial weights.
	Shards map[string]*fxv1.DatasetShard
	// ArchivePath is the experiment archive, which may hold model.safetensors.
	ArchivePath string
	// Limits bound unpacking the archive.
	Limits experiment.Limits
	// Dir is the aggregator's directory: checkpoints, models, round files.
	Dir           string
	Listener      net.Listener
	ServerOptions []grpc.ServerOption
	Sink          aggregator.Sink
	Logger        hclog.Logger
	// DiskReserve and PauseRetry: see Config.
	DiskReserve int64
	PauseRetry  time.Duration
	// Serving is called once the aggregator serves (aggregator.Config's
	// Serving); the director tells the participants its address only then.
	Serving func()
	// Metrics, if set, are the director's series, which the aggregator
	// records its rounds into.
	Metrics *telemetry.Metrics
	// Trace is the experiment's span, the parent of its rounds' (invalid
	// when tracing is off).
	Trace trace.SpanContext
	// DirectorAddress is where this director serves, as its own host can
	// dial it, and ServerName the name its certificate carries: where an
	// aggregator process reports (see Process).
	DirectorAddress string
	ServerName      string
}

// Aggregator is a launched aggregator, as the director drives it.
type Aggregator interface {
	// Run serves rounds until the last completes (nil), one fails (error),
	// or ctx is cancelled (ctx.Err()).
	Run(ctx context.Context) error
	// Drop removes a participant that reported a failure.
	Drop(collaborator, reason string)
}

//go:generate go tool mockgen -destination=mock_launcher_test.go -package=director -mock_names=Aggregator=MockAggregator,Launcher=MockLauncher . Launcher,Aggregator

// Launcher starts aggregators and reads what they left on disk. The
// director depends on this interface rather than on package aggregator
// directly so that its lifecycle can be tested with a fake aggregator whose
// rounds a test drives.
type Launcher interface {
	Launch(spec LaunchSpec) (Aggregator, error)
	// History returns the rounds completed in an aggregator directory and the
	// best model so far (see aggregator.History).
	History(dir string) ([]aggregator.RoundSummary, *aggregator.Best, error)
}

// InProcess runs aggregators as goroutines of the director.
type InProcess struct{}

// History implements Launcher.
func (InProcess) History(dir string) ([]aggregator.RoundSummary, *aggregator.Best, error) {
	return aggregator.History(dir)
}

// Launch implements Launcher. The initial model comes, in order of
// preference, from an earlier launch's round-0 file (a relaunch after a
// restart: the aggregator resumes from its checkpoint anyway; a damaged
// one is passed over, and the aggregator's resume judges it), from the
// archive's model.safetensors, or from the built-in model's initialiser for
// the participants' data shapes.
func (InProcess) Launch(spec LaunchSpec) (Aggregator, error) {
	initial, err := initialModel(spec)
	if err != nil {
		return nil, err
	}
	return aggregator.New(aggregator.Config{
		ExperimentID:  spec.ExperimentID,
		Plan:          spec.Plan,
		Participants:  spec.Participants,
		Registered:    spec.Registered,
		InitialModel:  initial,
		Dir:           spec.Dir,
		Listener:      spec.Listener,
		ServerOptions: spec.ServerOptions,
		Sink:          spec.Sink,
		Logger:        spec.Logger,
		DiskReserve:   spec.DiskReserve,
		PauseRetry:    spec.PauseRetry,
		Serving:       spec.Serving,
		Metrics:       spec.Metrics,
		Trace:         spec.Trace,
	})
}

func initialModel(spec LaunchSpec) (tensor.Model, error) {
	if path := aggregator.ModelPath(spec.Dir, 0); fileExists(path) {
		m, _, err := tensor.ReadFile(path)
		if err == nil {
			return m, nil
		}
		if spec.Logger != nil {
			spec.Logger.Warn("the initial model an earlier launch kept cannot be read; making it again", "path", path, "error", err)
		}
	}
	m, found, err := archiveModel(spec)
	if err != nil || found {
		return m, err
	}
	return builtinInitialModel(spec)
}

// builtinInitialModel is the initial model of a plan without one of its
// own: the built-in model's initial weights for the participants' data.
func builtinInitialModel(spec LaunchSpec) (tensor.Model, error) {
	plan := spec.Plan
	if need := plan.InitialModelNeed(); need != "" {
		return nil, fmt.Errorf("the archive has no %s: %s", InitialModelFile, need)
	}
	// Every participant must hold data of one shape, or no single model fits.
	names := slices.Sorted(maps.Keys(spec.Shards))
	if len(names) == 0 {
		return nil, errors.New("no participant shard to size the built-in model by")
	}
	first := spec.Shards[names[0]]
	for _, n := range names[1:] {
		s := spec.Shards[n]
		if !slices.Equal(s.GetSampleShape(), first.GetSampleShape()) || s.GetClasses() != first.GetClasses() {
			return nil, fmt.Errorf("envoys %s and %s hold data of different shapes (%v, %d classes vs %v, %d classes): one built-in model cannot fit both; select envoys by participants.sample_shape",
				names[0], n, first.GetSampleShape(), first.GetClasses(), s.GetSampleShape(), s.GetClasses())
		}
	}
	m, err := builtin.InitialModel(plan.Runner.Model, plan.Runner.Hyperparameters, first.GetSampleShape(), int(first.GetClasses()))
	if err != nil {
		return nil, fmt.Errorf("built-in %s model for samples %v and %d classes: %w", plan.Runner.Model, first.GetSampleShape(), first.GetClasses(), err)
	}
	return m, nil
}

// archiveModel reads model.safetensors from the archive, when it holds one.
// The archive is unpacked into a scratch directory beside the aggregator's
// (the experiment package validates every entry on the way), and the
// scratch directory is removed afterwards.
func archiveModel(spec LaunchSpec) (tensor.Model, bool, error) {
	man, err := experiment.Inspect(spec.ArchivePath, spec.Limits)
	if err != nil {
		return nil, false, fmt.Errorf("archive: %w", err)
	}
	if !slices.ContainsFunc(man.Files, func(f experiment.FileInfo) bool { return f.Path == InitialModelFile }) {
		return nil, false, nil
	}
	scratch := filepath.Join(filepath.Dir(spec.Dir), "unpack")
	if err := os.RemoveAll(scratch); err != nil {
		return nil, false, err
	}
	defer os.RemoveAll(scratch)
	if _, err := experiment.Unpack(spec.ArchivePath, scratch, spec.Limits); err != nil {
		return nil, false, fmt.Errorf("archive: %w", err)
	}
	m, _, err := tensor.ReadFile(filepath.Join(scratch, InitialModelFile))
	if err != nil {
		return nil, false, fmt.Errorf("archive's %s: %w", InitialModelFile, err)
	}
	return m, true, nil
}

func fileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}
