package director

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/fx-fl/fx/aggregator"
	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/internal/atomicfile"
	"github.com/fx-fl/fx/internal/backoff"
	"github.com/fx-fl/fx/pki"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/tensor"
)

// An aggregator process (`fx aggregator run --spec FILE`) is one
// experiment's aggregator outside the director, started by the Process
// launcher. Everything it needs is in its launch spec, a JSON file the
// director writes; what it does it reports to the director over mutual TLS
// (Director.AggregatorChannel), presenting the director's own certificate,
// whose files the spec names; how it ended it writes to the spec's outcome
// file. This file is the child's side; launcher_process.go the director's.

// ProcessSpec is an aggregator process's launch spec.
type ProcessSpec struct {
	ExperimentID string `json:"experiment_id"`
	// Plan is the experiment's plan (YAML, as the director stores it).
	Plan string `json:"plan"`
	// Participants are the envoys taking part (not dropped), by name.
	Participants []string `json:"participants"`
	// Registered are the sample counts each registered when the
	// experiment started (see aggregator.Config).
	Registered map[string]aggregator.SampleCounts `json:"registered"`
	// InitialModel is a safetensors file holding round 0's model; read
	// only when Dir holds no checkpoint (the aggregator resumes from it
	// otherwise), and then required.
	InitialModel string `json:"initial_model,omitempty"`
	// Dir is the aggregator's directory: checkpoints, models, round files.
	Dir string `json:"dir"`
	// ListenFD, when positive, is an inherited listening socket to serve
	// on (the director binds the port, so that the address survives a
	// restart of the process); otherwise Listen, host:port, is bound.
	ListenFD int    `json:"listen_fd,omitempty"`
	Listen   string `json:"listen,omitempty"`
	// TLS are the certificate and key the aggregator presents (the
	// director's), the federation's root and its CRL.
	TLS pki.Files `json:"tls"`
	// Director is the address of the director to report to, and
	// ServerName the name its certificate must carry.
	Director   string `json:"director"`
	ServerName string `json:"server_name"`
	// Token is this start's secret: the director accepts a channel only
	// with it. The file is the director's, mode 0600.
	Token string `json:"token"`
	// Outcome is where the process writes how the experiment ended
	// (ProcessOutcome); a process that ends without writing it crashed or
	// was stopped.
	Outcome string `json:"outcome"`
	// DiskReserve and PauseRetry: see Config.
	DiskReserve int64         `json:"disk_reserve,omitempty"`
	PauseRetry  time.Duration `json:"pause_retry,omitempty"`
	// DirectorGrace is how long the process goes on without reaching the
	// director before it gives up and exits (a director that died and did
	// not take its children with it); DefaultDirectorGrace when zero.
	DirectorGrace time.Duration `json:"director_grace,omitempty"`
}

// DefaultDirectorGrace: see ProcessSpec.DirectorGrace.
const DefaultDirectorGrace = 2 * time.Minute

// ProcessOutcome is how an aggregator process's experiment ended: every
// round completed (Finished), or it failed for Failed's reason.
type ProcessOutcome struct {
	Finished bool   `json:"finished,omitempty"`
	Failed   string `json:"failed,omitempty"`
}

// WriteProcessSpec writes a spec atomically, readable by its owner only
// (it names the key the process presents and holds its token).
func WriteProcessSpec(path string, spec *ProcessSpec) error {
	return atomicfile.WriteJSON(path, spec)
}

// ReadProcessSpec reads and checks a spec.
func ReadProcessSpec(path string) (*ProcessSpec, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("launch spec: %w", err)
	}
	var s ProcessSpec
	if err := json.Unmarshal(data, &s); err != nil {
		return nil, fmt.Errorf("launch spec %s: %w", path, err)
	}
	var missing []string
	for _, f := range []struct{ name, v string }{
		{"experiment_id", s.ExperimentID}, {"plan", s.Plan}, {"dir", s.Dir}, {"director", s.Director},
		{"token", s.Token}, {"outcome", s.Outcome}, {"tls.Cert", s.TLS.Cert}, {"tls.Key", s.TLS.Key}, {"tls.CA", s.TLS.CA},
	} {
		if f.v == "" {
			missing = append(missing, f.name)
		}
	}
	if s.ListenFD <= 0 && s.Listen == "" {
		missing = append(missing, "listen_fd or listen")
	}
	if len(s.Participants) == 0 {
		missing = append(missing, "participants")
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("launch spec %s: missing %v", path, missing)
	}
	return &s, nil
}

// RunAggregatorProcess runs the aggregator that the spec at path describes
// until its experiment ends, which it records in the spec's outcome file
// (nil: the outcome is written, whatever it is), or ctx is cancelled (nil,
// no outcome: the experiment goes on at the next start). An error is a
// failure of this process: the spec cannot be read, the director cannot be
// reached for the spec's DirectorGrace, or the director refused the
// channel; the launcher starts the process again.
func RunAggregatorProcess(ctx context.Context, path string, logger hclog.Logger) error {
	if logger == nil {
		logger = hclog.NewNullLogger()
	}
	spec, err := ReadProcessSpec(path)
	if err != nil {
		return err
	}
	log := logger.Named("aggregator-process").With("experiment", spec.ExperimentID)
	// A failure the experiment cannot get past, however often the process
	// starts, ends it with the reason.
	fail := func(err error) error {
		log.Error("the experiment fails", "error", err)
		return writeOutcome(spec.Outcome, ProcessOutcome{Failed: err.Error()})
	}
	plan, err := experiment.ParseStoredPlan([]byte(spec.Plan))
	if err != nil {
		return fail(fmt.Errorf("plan: %w", err))
	}
	k, err := pki.NewKeyring(pki.KeyringConfig{Files: spec.TLS, Logger: logger.Named("tls")})
	if err != nil {
		return fmt.Errorf("tls: %w", err)
	}
	var initial tensor.Model
	if !fileExists(filepath.Join(spec.Dir, "checkpoint.json")) { // see package aggregator's layout
		if spec.InitialModel == "" {
			return fail(errors.New("no initial model and no checkpoint to resume from"))
		}
		if initial, _, err = tensor.ReadFile(spec.InitialModel); err != nil {
			return fail(fmt.Errorf("initial model: %w", err))
		}
	}
	lis, err := processListener(spec)
	if err != nil {
		return err
	}
	rep := newReporter(spec, k, log)
	agg, err := aggregator.New(aggregator.Config{
		ExperimentID:  spec.ExperimentID,
		Plan:          plan,
		Participants:  spec.Participants,
		Registered:    spec.Registered,
		InitialModel:  initial,
		Dir:           spec.Dir,
		Listener:      lis,
		ServerOptions: pki.ServerOptions(k, AggregatorRules()),
		Sink:          rep,
		Logger:        logger,
		DiskReserve:   spec.DiskReserve,
		PauseRetry:    spec.PauseRetry,
		Serving:       rep.serving,
	})
	if err != nil {
		lis.Close()
		return fail(err)
	}
	initial = nil
	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	repDone := make(chan error, 1)
	go func() {
		err := rep.run(runCtx, agg)
		if err != nil {
			stop() // nobody hears this aggregator: stop it, and let the launcher start another
		}
		repDone <- err
	}()
	log.Info("aggregator process starting", "pid", os.Getpid(), "dir", spec.Dir, "director", spec.Director)
	err = agg.Run(runCtx)
	if ctx.Err() != nil && runCtx.Err() != nil && errors.Is(err, runCtx.Err()) {
		stop()
		<-repDone
		log.Info("aggregator process stopped; the experiment goes on at its next start")
		return nil
	}
	if runCtx.Err() != nil && errors.Is(err, runCtx.Err()) {
		return <-repDone // the reporter gave up
	}
	// The experiment ended: record how, then tell the director what is
	// still queued (it reads the last rounds from disk anyway).
	outcome := ProcessOutcome{Finished: err == nil}
	if err != nil {
		outcome.Failed = err.Error()
	}
	werr := writeOutcome(spec.Outcome, outcome)
	rep.flush(5 * time.Second)
	stop()
	<-repDone
	log.Info("aggregator process done", "finished", outcome.Finished, "failed", outcome.Failed)
	return werr
}

func writeOutcome(path string, o ProcessOutcome) error {
	if err := atomicfile.WriteJSON(path, o); err != nil {
		return fmt.Errorf("outcome: %w", err)
	}
	return nil
}

// readOutcome reads an outcome file; nil when there is none.
func readOutcome(path string) (*ProcessOutcome, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var o ProcessOutcome
	if err := json.Unmarshal(data, &o); err != nil {
		return nil, fmt.Errorf("outcome %s: %w", path, err)
	}
	if !o.Finished && o.Failed == "" {
		return nil, fmt.Errorf("outcome %s says neither finished nor failed", path)
	}
	return &o, nil
}

func processListener(spec *ProcessSpec) (net.Listener, error) {
	if spec.ListenFD > 0 {
		f := os.NewFile(uintptr(spec.ListenFD), "aggregator-listener")
		if f == nil {
			return nil, fmt.Errorf("listen_fd %d is not open", spec.ListenFD)
		}
		defer f.Close() // FileListener holds a duplicate
		lis, err := net.FileListener(f)
		if err != nil {
			return nil, fmt.Errorf("listen_fd %d: %w", spec.ListenFD, err)
		}
		return lis, nil
	}
	lis, err := net.Listen("tcp", spec.Listen)
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", spec.Listen, err)
	}
	return lis, nil
}

// reporter is an aggregator process's Sink: it queues what the aggregator
// does and sends it to the director over AggregatorChannel, opening the
// channel again whenever it breaks. Progress is coalesced (only a
// collaborator's latest matters) and the pause state is resent on every
// channel, as is serving; a round completion lost with a broken channel
// the director reads from the round files when the channel opens again.
type reporter struct {
	spec *ProcessSpec
	k    *pki.Keyring
	log  hclog.Logger

	mu      sync.Mutex
	changed chan struct{}            // closed and replaced when the queue grows
	queue   []*fxv1.AggregatorReport // events not yet sent
	served  bool
	paused  *fxv1.AggregatorPause // the latest pause state, nil before any
}

func newReporter(spec *ProcessSpec, k *pki.Keyring, log hclog.Logger) *reporter {
	return &reporter{spec: spec, k: k, log: log, changed: make(chan struct{})}
}

func (r *reporter) push(ev *fxv1.AggregatorReport) {
	r.mu.Lock()
	defer r.mu.Unlock()
	// A collaborator's newer progress replaces its queued one, and a newer
	// pause state the queued one.
	if p := ev.GetProgress(); p != nil {
		r.queue = slices.DeleteFunc(r.queue, func(q *fxv1.AggregatorReport) bool {
			return q.GetProgress().GetCollaborator() == p.GetCollaborator() && q.GetProgress() != nil
		})
	}
	if p := ev.GetPause(); p != nil {
		r.paused = p
		r.queue = slices.DeleteFunc(r.queue, func(q *fxv1.AggregatorReport) bool { return q.GetPause() != nil })
	}
	r.queue = append(r.queue, ev)
	close(r.changed)
	r.changed = make(chan struct{})
}

func (r *reporter) serving() {
	r.mu.Lock()
	r.served = true
	r.mu.Unlock()
	r.push(&fxv1.AggregatorReport{Event: &fxv1.AggregatorReport_Serving{Serving: &fxv1.AggregatorServing{}}})
}

// RoundCompleted implements aggregator.Sink.
func (r *reporter) RoundCompleted(summary aggregator.RoundSummary, best *aggregator.Best) {
	s, err := json.Marshal(summary)
	if err != nil {
		r.log.Error("cannot encode a round's summary; the director reads it from the round file", "round", summary.Round, "error", err)
		return
	}
	ev := &fxv1.AggregatorRoundCompleted{Summary: s}
	if best != nil {
		ev.Best, _ = json.Marshal(best)
	}
	r.push(&fxv1.AggregatorReport{Event: &fxv1.AggregatorReport_RoundCompleted{RoundCompleted: ev}})
}

// Progress implements aggregator.Sink.
func (r *reporter) Progress(p aggregator.Progress) {
	r.push(&fxv1.AggregatorReport{Event: &fxv1.AggregatorReport_Progress{Progress: &fxv1.AggregatorProgress{
		Collaborator: p.Collaborator, Round: int32(p.Round), Task: p.Task, LastRound: int32(p.LastRound),
	}}})
}

// Paused implements aggregator.Sink.
func (r *reporter) Paused(reason string) {
	r.push(&fxv1.AggregatorReport{Event: &fxv1.AggregatorReport_Pause{Pause: &fxv1.AggregatorPause{Reason: reason}}})
}

// Resumed implements aggregator.Sink.
func (r *reporter) Resumed() { r.Paused("") }

// flush waits until the queue is taken by a channel, at most timeout.
func (r *reporter) flush(timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		r.mu.Lock()
		empty := len(r.queue) == 0
		r.mu.Unlock()
		if empty {
			return
		}
		if time.Now().After(deadline) {
			r.log.Warn("the director did not take every report before the process ended; it reads the rounds from their files")
			return
		}
		<-tick.C
	}
}

// run keeps the channel to the director open until ctx ends (nil), the
// director refuses it (an error), or it cannot be opened for the spec's
// DirectorGrace (an error).
func (r *reporter) run(ctx context.Context, agg *aggregator.Aggregator) error {
	grace := r.spec.DirectorGrace
	if grace <= 0 {
		grace = DefaultDirectorGrace
	}
	retry := backoff.Config{Initial: 200 * time.Millisecond, Max: 5 * time.Second}
	conn, err := pki.NewClient(r.spec.Director, r.k, r.spec.ServerName, retry.DialOption())
	if err != nil {
		return fmt.Errorf("director %s: %w", r.spec.Director, err)
	}
	defer conn.Close()
	client := fxv1.NewDirectorClient(conn)
	b := backoff.New(retry)
	lastUp := time.Now()
	for {
		accepted, err := r.session(ctx, client, agg)
		if ctx.Err() != nil {
			return nil
		}
		if accepted {
			b.Reset()
			lastUp = time.Now()
		}
		switch status.Code(err) {
		case codes.PermissionDenied, codes.NotFound, codes.FailedPrecondition, codes.Unauthenticated, codes.Unimplemented:
			return fmt.Errorf("the director at %s refused this aggregator's channel: %w", r.spec.Director, err)
		}
		if time.Since(lastUp) > grace {
			return fmt.Errorf("the director at %s cannot be reached for %s: %w", r.spec.Director, grace, err)
		}
		r.log.Warn("the channel to the director broke; opening it again", "error", err)
		if !b.Wait(ctx) {
			return nil
		}
	}
}

// session is one channel: a first report naming the launch, then serving
// and the pause state if any, then the queue as it grows; commands (drops)
// go to agg. accepted says whether the director accepted the channel.
func (r *reporter) session(ctx context.Context, client fxv1.DirectorClient, agg *aggregator.Aggregator) (accepted bool, err error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := client.AggregatorChannel(ctx)
	if err != nil {
		return false, err
	}
	if err := stream.Send(&fxv1.AggregatorReport{ExperimentId: r.spec.ExperimentID, LaunchToken: r.spec.Token}); err != nil {
		return false, recvErr(stream, err)
	}
	if _, err := stream.Recv(); err != nil {
		return false, err
	}
	r.mu.Lock()
	var first []*fxv1.AggregatorReport
	if r.served {
		first = append(first, &fxv1.AggregatorReport{Event: &fxv1.AggregatorReport_Serving{Serving: &fxv1.AggregatorServing{}}})
	}
	if r.paused != nil {
		first = append(first, &fxv1.AggregatorReport{Event: &fxv1.AggregatorReport_Pause{Pause: r.paused}})
	}
	r.mu.Unlock()
	for _, ev := range first {
		if err := stream.Send(ev); err != nil {
			return true, recvErr(stream, err)
		}
	}
	recvDone := make(chan error, 1)
	go func() {
		for {
			cmd, err := stream.Recv()
			if err != nil {
				recvDone <- err
				cancel()
				return
			}
			if d := cmd.GetDrop(); d != nil {
				r.log.Info("the director drops a participant", "collaborator", d.GetCollaborator(), "reason", d.GetReason())
				agg.Drop(d.GetCollaborator(), d.GetReason())
			}
		}
	}()
	for {
		r.mu.Lock()
		queue, changed := r.queue, r.changed
		r.queue = nil
		r.mu.Unlock()
		for _, ev := range queue {
			if err := stream.Send(ev); err != nil {
				cancel()
				return true, <-recvDone
			}
		}
		if len(queue) > 0 {
			continue
		}
		select {
		case <-changed:
		case <-ctx.Done():
			_ = stream.CloseSend()
			cancel()
			return true, <-recvDone
		}
	}
}

// recvErr is the status a stream ended with, which a failed Send does not
// carry (it returns io.EOF).
func recvErr(stream grpc.BidiStreamingClient[fxv1.AggregatorReport, fxv1.AggregatorCommand], sendErr error) error {
	if _, err := stream.Recv(); err != nil {
		return err
	}
	return sendErr
}

// tokenEqual compares launch tokens in constant time.
func tokenEqual(a, b string) bool { return subtle.ConstantTimeCompare([]byte(a), []byte(b)) == 1 }
