// Package collaborator runs one envoy's part of one experiment: it asks the
// experiment's aggregator for tasks (a long poll, never a sleep loop),
// downloads the round's global model as a stream, runs each task through a
// runner.Runner, and streams the results back.
//
// Network trouble is normal: every call has a deadline, failed calls are
// retried on the site's backoff schedule, and a result that was computed is
// re-sent, not recomputed. The round's results are kept until a later round
// starts: an aggregator restarted mid-round (a director restart) hands the
// round out again, and the collaborator uploads what it had computed, the
// trained weights included, and computes only what it had not. A
// collaborator restarted mid-round asks for its tasks again and gets only
// those it has not reported; the metrics of results computed but not yet
// uploaded are kept in its work directory (the trained weights are not: a
// restarted collaborator trains again).
package collaborator

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"go.opentelemetry.io/otel/attribute"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/fx-fl/fx/internal/atomicfile"
	"github.com/fx-fl/fx/internal/backoff"
	"github.com/fx-fl/fx/internal/idle"
	"github.com/fx-fl/fx/internal/membudget"
	"github.com/fx-fl/fx/internal/telemetry"
	"github.com/fx-fl/fx/internal/tracing"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner"
	"github.com/fx-fl/fx/tensor"
)

// Config is what a collaborator needs.
type Config struct {
	ExperimentID string
	// Name is the envoy's name, its certificate's CN.
	Name string
	// Address is the aggregator's host:port.
	Address string
	// DialOptions carry the TLS credentials (the envoy's certificate, the
	// federation CA, the aggregator's expected server name).
	DialOptions []grpc.DialOption
	Runner      runner.Runner
	// WorkDir keeps the round's results until they are uploaded.
	WorkDir string
	// InitialModel, if set, is a file that may hold round 1's model (the
	// archive's model.safetensors): when a download announces the digest
	// of what it holds, the collaborator reads it instead of downloading.
	InitialModel string
	Logger       hclog.Logger
	// MaxUnreachable bounds how long the aggregator may stay unreachable
	// before Run gives up; DefaultMaxUnreachable when zero.
	MaxUnreachable time.Duration
	// StallTimeout is how long a model download or a result upload may go
	// without moving a frame before it is abandoned and tried again: a
	// transfer takes as long as its size needs, but may not stand still.
	// DefaultStallTimeout when zero.
	StallTimeout time.Duration
	// Retry is the backoff between attempts of a failed call (the site's
	// retry schedule); DefaultRetry when zero.
	Retry backoff.Config
	// Metrics, if set, receive the round's phases, bytes moved and task
	// outcomes (see internal/telemetry).
	Metrics *telemetry.Metrics
	// Privacy, if set, clips and noises every trained model before it can
	// leave the site, and charges the site's ledger first (privacy.go).
	Privacy *Privacy
	// Local are the plan's aggregation.local: names or path.Match patterns
	// of the tensors this site keeps to itself (local.go).
	Local []string
	// Secure, if set, takes part in secure aggregation: the train upload
	// is the masked update (secure.go).
	Secure *Secure
	// Scaffold is set for a SCAFFOLD experiment (the plan's
	// aggregation.algorithm scaffold): train corrects the runner's
	// gradients by the control variates and uploads the change of the
	// site's own, which it keeps in WorkDir (scaffold.go).
	Scaffold bool
	// Async is set for asynchronous rounds (the plan's aggregation.mode
	// async): the train upload is the update, trained − global model,
	// which the aggregator sums across steps (fedbuff.go).
	Async bool
}

// Defaults for Config.
const (
	DefaultMaxUnreachable = 30 * time.Minute
	DefaultStallTimeout   = 30 * time.Second
	// pollTimeout bounds a GetTasks long poll; the server answers WAIT well
	// before it.
	pollTimeout = 2 * time.Minute
)

// DefaultRetry is the backoff of a collaborator whose Config names none.
var DefaultRetry = backoff.Config{Initial: 200 * time.Millisecond, Max: 15 * time.Second}

// aggregator is what a collaborator calls on its aggregator: the calls of
// fxv1.AggregatorClient it makes, and no more, so that its unit tests stand
// in for the aggregator call by call (see mock_aggregator_test.go) and a
// call added to the service for someone else changes nothing here.
//
//go:generate go tool mockgen -destination=mock_aggregator_test.go -package=collaborator -mock_names=aggregator=MockAggregator . aggregator
//go:generate go tool mockgen -destination=mock_stream_test.go -package=collaborator google.golang.org/grpc ServerStreamingClient,ClientStreamingClient
//go:generate go tool mockgen -destination=mock_runner_test.go -package=collaborator github.com/fx-fl/fx/runner Runner
type aggregator interface {
	GetTasks(ctx context.Context, in *fxv1.GetTasksRequest, opts ...grpc.CallOption) (*fxv1.GetTasksResponse, error)
	FetchModel(ctx context.Context, in *fxv1.FetchModelRequest, opts ...grpc.CallOption) (grpc.ServerStreamingClient[fxv1.FetchModelResponse], error)
	UploadResult(ctx context.Context, opts ...grpc.CallOption) (grpc.ClientStreamingClient[fxv1.UploadResultRequest, fxv1.UploadResultResponse], error)
	UploadPosition(ctx context.Context, in *fxv1.UploadPositionRequest, opts ...grpc.CallOption) (*fxv1.UploadPositionResponse, error)
	SecureAggregation(ctx context.Context, in *fxv1.SecureAggregationRequest, opts ...grpc.CallOption) (*fxv1.SecureAggregationResponse, error)
}

// Collaborator runs one experiment's tasks at one site.
type Collaborator struct {
	cfg    Config
	log    hclog.Logger
	conn   io.Closer // the connection under client, closed when Run returns
	client aggregator
	// pause waits out one backoff delay (false if ctx ended first), and
	// now is the clock that judges MaxUnreachable: the system's, unless a
	// test counts the pauses instead of waiting them.
	pause func(ctx context.Context, d time.Duration) bool
	now   func() time.Time

	// the round whose global model is held, and the model
	modelRound int
	model      tensor.Model
	// results are the results computed in round resultsRound, by task,
	// kept after their upload until another round starts, in case the
	// round is handed out again.
	resultsRound int
	results      map[string]runner.Result
	// reserved is the model size the process's memory budget holds for
	// this collaborator (see membudget), and release gives it back.
	reserved int64
	release  func()
	// triedLocal is set once the InitialModel file was read.
	triedLocal bool
	// sec is the round's secure aggregation, once its keys are exchanged.
	sec *secureState
	// Under differential privacy (privacy.go): charging is the round's
	// charge while nothing of the round is released, and keeping writes
	// the released update in the background.
	charging *charge
	keeping  sync.WaitGroup
}

// New checks the configuration and prepares the connection (gRPC connects
// lazily, on the first call).
func New(cfg Config) (*Collaborator, error) {
	if err := cfg.check(); err != nil {
		return nil, err
	}
	conn, err := grpc.NewClient(cfg.Address, cfg.DialOptions...)
	if err != nil {
		return nil, fmt.Errorf("collaborator: aggregator address %q: %w", cfg.Address, err)
	}
	return newCollaborator(cfg, fxv1.NewAggregatorClient(conn), conn), nil
}

// newCollaborator is a collaborator of a checked configuration that calls
// client, whose connection is conn.
func newCollaborator(cfg Config, client aggregator, conn io.Closer) *Collaborator {
	return &Collaborator{
		cfg:    cfg,
		log:    cfg.Logger.Named("collaborator").With("experiment", cfg.ExperimentID),
		conn:   conn,
		client: client,
		pause:  backoff.Sleep,
		now:    time.Now,
	}
}

// check validates the configuration, fills in its defaults and makes the
// work directory.
func (cfg *Config) check() error {
	switch {
	case cfg.ExperimentID == "":
		return errors.New("collaborator: experiment id is empty")
	case cfg.Name == "":
		return errors.New("collaborator: name is empty")
	case cfg.Address == "":
		return errors.New("collaborator: aggregator address is empty")
	case cfg.Runner == nil:
		return errors.New("collaborator: no task runner")
	case cfg.WorkDir == "":
		return errors.New("collaborator: no work directory")
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	if cfg.MaxUnreachable <= 0 {
		cfg.MaxUnreachable = DefaultMaxUnreachable
	}
	if cfg.StallTimeout <= 0 {
		cfg.StallTimeout = DefaultStallTimeout
	}
	if cfg.Retry.Initial <= 0 || cfg.Retry.Max < cfg.Retry.Initial {
		cfg.Retry = DefaultRetry
	}
	if err := os.MkdirAll(cfg.WorkDir, 0o700); err != nil {
		return fmt.Errorf("collaborator: %w", err)
	}
	return nil
}

// Quit is returned by Run when the aggregator said the experiment is over
// for this collaborator; Reason says why (finished, cancelled, failed,
// dropped).
type Quit struct{ Reason string }

func (q *Quit) Error() string { return "aggregator said quit: " + q.Reason }

// RoundError is what Run returns when a task, or a call of a round, failed
// for good: Round is the round it failed in, which callers report beside
// Err.
type RoundError struct {
	Round int
	Err   error
}

func (e *RoundError) Error() string { return fmt.Sprintf("round %d: %v", e.Round, e.Err) }
func (e *RoundError) Unwrap() error { return e.Err }

// Run takes part in rounds until the aggregator says QUIT (a *Quit error,
// which callers may treat as the normal end), a task or call fails for good,
// the aggregator stays unreachable for MaxUnreachable, or ctx is cancelled.
func (c *Collaborator) Run(ctx context.Context) error {
	defer c.conn.Close()
	defer c.keeping.Wait()
	defer func() {
		if c.release != nil {
			c.release()
		}
	}()
	c.log.Info("joining experiment", "aggregator", c.cfg.Address)
	for {
		var resp *fxv1.GetTasksResponse
		var header metadata.MD // carries the round's trace context
		err := c.retry(ctx, "ask for tasks", func(ctx context.Context) error {
			ctx, cancel := context.WithTimeout(ctx, pollTimeout)
			defer cancel()
			var err error
			header = nil
			resp, err = c.client.GetTasks(ctx, &fxv1.GetTasksRequest{ExperimentId: c.cfg.ExperimentID, Collaborator: c.cfg.Name}, grpc.Header(&header))
			if status.Code(err) == codes.NotFound {
				// The aggregator at this address does not serve the
				// experiment: after a director restart its port may
				// serve another experiment until the envoy moves this
				// collaborator to the new address (or stops it).
				return status.Errorf(codes.Unavailable, "the aggregator reached does not serve this experiment (it moved?): %s", status.Convert(err).Message())
			}
			return err
		})
		if err != nil {
			return err
		}
		switch resp.GetAction() {
		case fxv1.GetTasksResponse_WAIT:
			continue
		case fxv1.GetTasksResponse_QUIT:
			c.log.Info("leaving experiment", "reason", resp.GetReason())
			c.clearPending()
			return &Quit{Reason: resp.GetReason()}
		case fxv1.GetTasksResponse_RUN:
			round := int(resp.GetRound())
			err := c.runRound(tracing.FromHeader(ctx, header), round, resp.GetTasks())
			switch {
			case err == nil:
			case ctx.Err() != nil:
				return ctx.Err()
			case status.Code(err) == codes.NotFound:
				// The round's model is gone, or the aggregator moved:
				// what to do is the next GetTasks's answer.
				c.log.Warn("the aggregator does not have what the round needs; asking for tasks again", "round", round, "error", err)
			default:
				return &RoundError{Round: round, Err: err}
			}
		default:
			return fmt.Errorf("aggregator answered with unknown action %v", resp.GetAction())
		}
	}
}

// runRound runs the round's tasks it has no result for and uploads the
// results in plan order, each as soon as it is ready, by an uploader that
// overlaps the tasks still to run: the trained weights travel while the
// local validation computes. The trained weights are needed only in
// memory: what must survive a restart between two uploads is just the
// metrics of the results not yet sent, a few bytes kept in the work
// directory. The results stay after their upload until another round
// starts: when a restarted aggregator hands this round out again, they are
// uploaded again rather than computed again.
func (c *Collaborator) runRound(ctx context.Context, round int, tasks []string) error {
	c.chargeAhead(round, tasks)
	dctx, download := tracing.Start(ctx, "download", c.spanAttrs(round)...)
	err := c.fetchModel(dctx, round)
	download.End()
	if err != nil {
		return err
	}
	if err := c.personalise(round); err != nil {
		return err
	}
	if c.resultsRound != round || c.results == nil {
		c.resultsRound, c.results = round, c.loadPending(round)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ready := make(chan taskResult, len(tasks))
	uploaded := make(chan error, 1)
	go func() { uploaded <- c.uploadInOrder(ctx, cancel, round, ready) }()
	var kept []string
	var runErr error
	tasksStart := time.Now()
	defer func() { c.cfg.Metrics.Phase(telemetry.PhaseTasks, time.Since(tasksStart)) }()
	for _, task := range tasks {
		if runErr = ctx.Err(); runErr != nil {
			break // cancelled, or the uploader found the round over
		}
		res, ok := c.results[task]
		if ok {
			kept = append(kept, task)
			// A round handed out again (its aggregator restarted) needs
			// a key exchange of its own for the kept update.
			if runner.IsTrain(task) && c.cfg.Secure != nil {
				if runErr = c.secureKeys(ctx, round, res); runErr != nil {
					break
				}
			}
		} else {
			start := time.Now()
			tctx, span := tracing.Start(ctx, "task "+task, c.spanAttrs(round)...)
			res, runErr = c.runTask(tctx, runner.Task{Name: task, Round: round})
			span.End()
			c.cfg.Metrics.RunnerTask(task, time.Since(start), runErr)
			if runErr != nil {
				runErr = fmt.Errorf("task %s: %w", task, runErr)
				break
			}
			c.log.Info("task done", "round", round, "task", task, "samples", res.Samples, "metrics", res.Metrics, "took", time.Since(start).Round(time.Millisecond))
			c.results[task] = res
			if runErr = c.savePending(round); runErr != nil {
				break
			}
		}
		ready <- taskResult{task: task, res: res}
	}
	close(ready)
	if len(kept) > 0 {
		c.log.Info("sending results computed before instead of computing them again", "round", round, "tasks", kept)
	}
	switch err := <-uploaded; {
	case errors.Is(err, errLate):
		return nil // the round moved on: ask for tasks again
	case err != nil:
		return err
	}
	if runErr == nil {
		runErr = c.secureUnmask(ctx, round)
	}
	return runErr
}

// spanAttrs label a collaborator's spans of round.
func (c *Collaborator) spanAttrs(round int) []attribute.KeyValue {
	return []attribute.KeyValue{attribute.String("collaborator", c.cfg.Name), attribute.Int("round", round)}
}

// taskResult is a task's result, ready to upload.
type taskResult struct {
	task string
	res  runner.Result
}

// errLate says the round closed without a result: not an error, the
// collaborator asks for tasks again.
var errLate = errors.New("the round moved on")

// uploadInOrder uploads the results in the order they come until ready is
// closed. On a late or failed upload it stops the round's remaining tasks
// (cancel) and returns errLate or the error.
func (c *Collaborator) uploadInOrder(ctx context.Context, cancel context.CancelFunc, round int, ready <-chan taskResult) error {
	for r := range ready {
		uctx, span := tracing.Start(ctx, "upload "+r.task, c.spanAttrs(round)...)
		late, err := c.upload(uctx, round, r.task, r.res)
		span.End()
		if err == nil && !late && runner.IsTrain(r.task) {
			err = c.confirmVariate(round) // SCAFFOLD's c_i⁺, now that c will have its Δc_i (scaffold.go)
		}
		if err == nil && late {
			err = errLate
		}
		if err != nil {
			cancel()
			return err
		}
	}
	return nil
}

// runTask runs one task on the right model.
func (c *Collaborator) runTask(ctx context.Context, task runner.Task) (runner.Result, error) {
	switch task.Name {
	case runner.TaskTrain:
		train := c.train
		if c.cfg.Privacy != nil {
			train = c.trainPrivately
		}
		if c.cfg.Scaffold {
			train = c.trainScaffold
		}
		res, err := train(ctx, task)
		if err == nil {
			err = c.keepLocal(task.Round, res.Model)
		}
		if err == nil && c.cfg.Secure != nil {
			err = c.secureKeys(ctx, task.Round, res)
		}
		return res, err
	case runner.TaskLocalValidation:
		trained, err := c.trainedWeights(ctx, task.Round)
		if err != nil {
			return runner.Result{}, err
		}
		return c.cfg.Runner.Validate(ctx, task, c.weights(trained))
	default:
		return c.cfg.Runner.Validate(ctx, task, c.weights(c.model))
	}
}

// train runs the train task and checks the trained model's layout.
func (c *Collaborator) train(ctx context.Context, task runner.Task) (runner.Result, error) {
	res, err := c.cfg.Runner.Train(ctx, task, c.model)
	if err != nil {
		return res, err
	}
	if err := c.model.Matches(res.Model); err != nil {
		return res, fmt.Errorf("the runner's trained model does not match the global model: %w", err)
	}
	return res, nil
}

// trainedWeights returns this round's trained weights: from its train
// result, or, when a restart lost them before the local validation was
// computed, by training again — the built-in runners are deterministic, so
// that gives the same weights.
func (c *Collaborator) trainedWeights(ctx context.Context, round int) (tensor.Model, error) {
	if res, ok := c.results[runner.TaskTrain]; ok && c.resultsRound == round && res.Model != nil {
		return res.Model, nil
	}
	c.log.Info("trained weights of this round were lost in a restart; training again for the local validation", "round", round)
	// Through runTask, so that under differential privacy these are the
	// weights the round released (see trainPrivately).
	res, err := c.runTask(ctx, runner.Task{Name: runner.TaskTrain, Round: round})
	if err != nil {
		return nil, err
	}
	return res.Model, nil
}

// pending is what savePending keeps: the metrics-only results of a round
// that are computed but maybe not yet uploaded.
type pending struct {
	Round   int                      `json:"round"`
	Results map[string]pendingResult `json:"results"`
}

type pendingResult struct {
	Samples int64              `json:"samples"`
	Metrics map[string]float64 `json:"metrics"`
}

func (c *Collaborator) pendingPath() string { return filepath.Join(c.cfg.WorkDir, "pending.json") }

// dropResults lets another round's results go, handing its trained
// weights back to a runner that reads the next ones into their memory.
func (c *Collaborator) dropResults() {
	c.keeping.Wait() // it may be writing the trained weights to a file
	if res, ok := c.results[runner.TaskTrain]; ok && res.Model != nil {
		if r, ok := c.cfg.Runner.(runner.Recycler); ok {
			r.Recycle(res.Model)
		}
	}
	c.results = nil
}

// savePending keeps the round's metrics-only results. The train result is
// not kept: if it was not uploaded before a restart, the round's train task
// is handed out again and runs again.
func (c *Collaborator) savePending(round int) error {
	p := pending{Round: round, Results: map[string]pendingResult{}}
	for task, res := range c.results {
		if !runner.IsTrain(task) {
			p.Results[task] = pendingResult{Samples: res.Samples, Metrics: res.Metrics}
		}
	}
	if err := atomicfile.ReplaceJSON(c.pendingPath(), p); err != nil {
		return fmt.Errorf("keep results until they are uploaded: %w", err)
	}
	return nil
}

// loadPending returns results computed for this round before a restart,
// never nil.
func (c *Collaborator) loadPending(round int) map[string]runner.Result {
	out := map[string]runner.Result{}
	data, err := os.ReadFile(c.pendingPath())
	if err != nil {
		return out
	}
	var p pending
	if json.Unmarshal(data, &p) != nil || p.Round != round {
		return out
	}
	for task, r := range p.Results {
		out[task] = runner.Result{Samples: r.Samples, Metrics: r.Metrics}
	}
	return out
}

func (c *Collaborator) clearPending() { os.Remove(c.pendingPath()) }

// fetchModel downloads the round's global model unless it is held already.
// A download that breaks goes on from where it stopped (the decoder's
// Position) rather than from the beginning: a round's model never changes.
func (c *Collaborator) fetchModel(ctx context.Context, round int) error {
	if c.model != nil && c.modelRound == round {
		return nil
	}
	var dec *tensor.Decoder    // the download so far, across attempts
	var want *fxv1.ModelHeader // what it announced
	start := time.Now()
	defer func() {
		if c.model != nil && c.modelRound == round {
			c.cfg.Metrics.Phase(telemetry.PhaseDownload, time.Since(start))
			c.cfg.Metrics.Transferred(telemetry.Received, time.Since(start))
			c.log.Info("model received", "round", round, "bytes", c.model.Bytes(), "took", time.Since(start).Round(time.Millisecond))
		}
	}()
	return c.retry(ctx, fmt.Sprintf("download the round %d model", round), func(ctx context.Context) error {
		ctx, progress, stop := idle.Watch(ctx, c.cfg.StallTimeout)
		defer stop()
		req := &fxv1.FetchModelRequest{ExperimentId: c.cfg.ExperimentID, Collaborator: c.cfg.Name, Round: int32(round)}
		if dec != nil {
			pos := dec.Position()
			req.ResumeTensors, req.ResumeBytes = int32(pos.Tensors), pos.Bytes
			c.log.Info("resuming the model download", "round", round, "tensors", pos.Tensors, "bytes", pos.Bytes, "of", want.GetBytes())
		}
		stream, err := c.client.FetchModel(ctx, req)
		if err != nil {
			return err
		}
		first, err := stream.Recv()
		if err != nil {
			return stalled(ctx, err)
		}
		h := first.GetHeader()
		var local tensor.Model // round 1's model from the archive, if it is that
		if dec == nil && h != nil {
			local = c.localModel(h)
		}
		switch {
		case h == nil:
			dec = nil
			return status.Error(codes.Internal, "model stream did not start with a header")
		case dec != nil && !proto.Equal(h, want):
			dec = nil // not the model the download began with: start over
			return status.Errorf(codes.Aborted, "the resumed download announced another model (%v, had %v)", h, want)
		case local != nil:
			if c.resultsRound != round {
				c.dropResults()
			}
			c.model, c.modelRound = local, round
			c.log.Info("round's model read from the experiment's own file instead of downloading it", "round", round, "file", c.cfg.InitialModel, "bytes", h.GetBytes())
			return nil // ends the download: its context is cancelled on return
		case dec == nil:
			// Another round's model and results are of no more use: the
			// new model is decoded into the old one's buffers, and the
			// results go.
			reuse := c.model
			c.model = nil
			if c.resultsRound != round {
				c.dropResults()
			}
			c.budget(h.GetBytes())
			// The header's size bounds what the frames may announce.
			dec, want = tensor.NewDecoder(tensor.DecoderConfig{MaxBytes: h.GetBytes(), Reuse: reuse}), h
		}
		for {
			msg, err := stream.Recv()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				return stalled(ctx, err) // resumable: the decoder holds what came
			}
			progress()
			c.cfg.Metrics.Moved(telemetry.Received, int64(len(msg.GetFrame().GetData())))
			if err := dec.Decode(msg.GetFrame()); err != nil {
				dec = nil
				return status.Error(codes.DataLoss, err.Error())
			}
		}
		m, err := dec.Finish()
		dec = nil
		if err != nil {
			return status.Error(codes.DataLoss, err.Error())
		}
		if int32(len(m)) != want.GetTensors() {
			return status.Errorf(codes.DataLoss, "model stream announced %d tensors, delivered %d", want.GetTensors(), len(m))
		}
		c.model, c.modelRound = m, round
		return nil
	})
}

// localModel returns the model in the InitialModel file if it is the one a
// download announces (by its digest), else nil. The file is read once.
func (c *Collaborator) localModel(h *fxv1.ModelHeader) tensor.Model {
	if h.GetDigest() == "" || c.cfg.InitialModel == "" || c.triedLocal {
		return nil
	}
	c.triedLocal = true
	// Reserved before the model is read, so that the memory budget does
	// not count it as the process's own (see membudget.Reserve).
	c.budget(h.GetBytes())
	m, _, err := tensor.ReadFile(c.cfg.InitialModel)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			c.log.Warn("cannot read the experiment's initial model; downloading it", "file", c.cfg.InitialModel, "error", err)
		}
		return nil
	}
	if tensor.Digest(m) != h.GetDigest() || m.Bytes() != h.GetBytes() {
		return nil
	}
	return m
}

// budget reserves memory for a model of the given size: the round's model
// and the trained weights kept until they are uploaded.
func (c *Collaborator) budget(modelBytes int64) {
	if modelBytes == c.reserved {
		return
	}
	if c.release != nil {
		c.release()
	}
	c.reserved, c.release = modelBytes, membudget.Reserve(2*modelBytes, 0)
}

// upload sends a result, retrying on transient errors. late reports that
// the round closed without it, which is not an error: the collaborator
// carries on with the next round.
func (c *Collaborator) upload(ctx context.Context, round int, task string, res runner.Result) (late bool, err error) {
	attempt := 0
	if runner.IsTrain(task) && c.cfg.Secure != nil && (c.sec == nil || c.sec.round != round) {
		c.log.Warn("result not counted: this site took no part in the round's secure aggregation", "round", round, "task", task)
		return true, nil
	}
	upload := c.shared(res.Model) // the local tensors stay here
	if runner.IsTrain(task) && c.cfg.Async {
		var err error
		if upload, err = delta(c.shared(c.model), upload); err != nil {
			return false, err
		}
	}
	if runner.IsTrain(task) {
		start := time.Now()
		defer func() {
			if err == nil && !late {
				c.cfg.Metrics.Phase(telemetry.PhaseUpload, time.Since(start))
				c.cfg.Metrics.Transferred(telemetry.Sent, time.Since(start))
				c.log.Info("trained model uploaded", "round", round, "bytes", c.shared(res.Model).Bytes(), "took", time.Since(start).Round(time.Millisecond))
			}
		}()
	}
	err = c.retry(ctx, "upload "+task, func(ctx context.Context) error {
		attempt++
		ctx, progress, stop := idle.Watch(ctx, c.cfg.StallTimeout)
		defer stop()
		// A train upload that broke goes on from what the aggregator kept.
		var from tensor.Position
		if runner.IsTrain(task) && attempt > 1 {
			from = c.uploadPosition(ctx, round, task)
		}
		stream, err := c.client.UploadResult(ctx)
		if err != nil {
			return err
		}
		header := &fxv1.ResultHeader{
			ExperimentId: c.cfg.ExperimentID, Collaborator: c.cfg.Name,
			Round: int32(round), Task: task, SampleCount: res.Samples, Metrics: res.Metrics,
			ResumeTensors: int32(from.Tensors), ResumeBytes: from.Bytes,
		}
		if err := stream.Send(&fxv1.UploadResultRequest{Part: &fxv1.UploadResultRequest_Header{Header: header}}); err != nil {
			_, err = stream.CloseAndRecv()
			return err
		}
		if runner.IsTrain(task) {
			enc := tensor.NewEncoder(func(f *fxv1.TensorFrame) error {
				defer progress()
				c.cfg.Metrics.Moved(telemetry.Sent, int64(len(f.GetData())))
				return stream.Send(&fxv1.UploadResultRequest{Part: &fxv1.UploadResultRequest_Frame{Frame: f}})
			})
			enc.ResumeAt(from)
			var err error
			if c.cfg.Secure != nil {
				err = c.encodeMasked(enc, round, res.Model)
			} else {
				err = enc.EncodeModel(upload)
			}
			if err != nil && !errors.Is(err, io.EOF) {
				return stalled(ctx, err)
			}
		}
		_, err = stream.CloseAndRecv()
		return stalled(ctx, err)
	})
	switch status.Code(err) {
	case codes.OK:
		return false, nil
	case codes.AlreadyExists:
		// Reported before a restart or a lost answer: the aggregator has it.
		return false, nil
	case codes.FailedPrecondition:
		c.log.Warn("result not counted", "round", round, "task", task, "reason", status.Convert(err).Message())
		return true, nil
	}
	return false, err
}

// uploadPosition asks how much of a broken train upload the aggregator
// kept; nothing (the zero Position) if it kept none or cannot say.
func (c *Collaborator) uploadPosition(ctx context.Context, round int, task string) tensor.Position {
	resp, err := c.client.UploadPosition(ctx, &fxv1.UploadPositionRequest{
		ExperimentId: c.cfg.ExperimentID, Collaborator: c.cfg.Name, Round: int32(round), Task: task})
	if err != nil {
		return tensor.Position{}
	}
	from := tensor.Position{Tensors: int(resp.GetTensors()), Bytes: resp.GetBytes()}
	if from != (tensor.Position{}) {
		c.log.Info("resuming the upload", "round", round, "task", task, "tensors", from.Tensors, "bytes", from.Bytes)
	}
	return from
}

// stalled turns the cancellation of a transfer that stood still (see
// idle.Watch) into a retryable DeadlineExceeded that says so; other errors
// pass unchanged.
func stalled(ctx context.Context, err error) error {
	if stall := idle.Stalled(ctx); err != nil && stall != nil {
		return status.Error(codes.DeadlineExceeded, stall.Error())
	}
	return err
}

// transient reports whether a failed call is worth repeating.
func transient(err error) bool {
	switch status.Code(err) {
	case codes.Unavailable, codes.DeadlineExceeded, codes.ResourceExhausted, codes.Aborted, codes.Internal, codes.Unknown, codes.DataLoss:
		return true
	}
	return false
}

// retry calls f until it succeeds, fails for good, or the aggregator has
// been unreachable for MaxUnreachable, pausing between attempts on the
// Retry schedule. The log says once that the aggregator is unreachable and
// once that it is back, not at every attempt.
func (c *Collaborator) retry(ctx context.Context, what string, f func(context.Context) error) error {
	var since time.Time
	b := backoff.New(c.cfg.Retry)
	for {
		err := f(ctx)
		if err == nil || !transient(err) || ctx.Err() != nil {
			if err == nil && !since.IsZero() {
				c.log.Info("aggregator reachable again", "after", c.now().Sub(since).Round(time.Second))
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if err != nil && status.Code(err) != codes.AlreadyExists && status.Code(err) != codes.FailedPrecondition {
				return fmt.Errorf("%s: %w", what, err)
			}
			return err
		}
		if since.IsZero() {
			since = c.now()
			c.log.Warn("aggregator unreachable; retrying with backoff", "call", what, "error", status.Convert(err).Message())
		}
		if c.now().Sub(since) > c.cfg.MaxUnreachable {
			return fmt.Errorf("%s: aggregator unreachable for %s: %w", what, c.cfg.MaxUnreachable, err)
		}
		if !c.pause(ctx, b.Next()) {
			return ctx.Err()
		}
	}
}
