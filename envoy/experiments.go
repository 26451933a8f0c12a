package envoy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/fx-fl/fx/collaborator"
	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/internal/backoff"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner/exec"
)

// phase is where one experiment is at this envoy.
type phase string

const (
	// phaseReviewing: downloading, verifying, unpacking, applying the policy.
	phaseReviewing phase = "reviewing"
	// phasePending: waiting for the data owner (manual policy).
	phasePending  phase = "pending"
	phaseAccepted phase = "accepted"
	phaseRejected phase = "rejected"
	// phaseRunning: its collaborator runs.
	phaseRunning phase = "running"
	// phaseFinished: the collaborator ended normally; waiting for Stop.
	phaseFinished phase = "finished"
	// phaseFailed: the collaborator failed and the failure was reported.
	phaseFailed phase = "failed"
)

// exp is the envoy's in-memory state of one experiment. Fields are guarded
// by Envoy.mu.
type exp struct {
	rec   record
	phase phase
	// plan is the plan of the verified archive, once unpacked.
	plan *experiment.Plan
	// cancel and done belong to the goroutine working on the experiment
	// (intake or collaborator); done is closed when it returns.
	cancel context.CancelFunc
	done   chan struct{}
	// decide carries the data owner's decision to a pending intake.
	decide chan decision
	// start is the Start the collaborator runs under, and link its
	// connection to the aggregator, which follows the aggregator when a
	// later Start moves it.
	start *fxv1.Start
	link  *aggregatorLink
	// answering is set while a goroutine sends a recorded decision again.
	answering bool
}

type decision struct {
	accept bool
	reason string
}

// handle dispatches one assignment. It never blocks on the network: the
// work each assignment asks for runs in its own goroutine, so a slow
// download or a pending review holds up nothing else.
func (e *Envoy) handle(a *fxv1.Assignment) {
	id := a.GetExperimentId()
	if err := experiment.ValidateName("experiment id", id); err != nil {
		e.log.Warn("ignoring an assignment with an unusable experiment id", "error", err)
		return
	}
	switch k := a.GetKind().(type) {
	case *fxv1.Assignment_Offer:
		e.onOffer(id, k.Offer)
	case *fxv1.Assignment_Start:
		e.onStart(id, k.Start)
	case *fxv1.Assignment_Stop:
		e.onStop(id, k.Stop)
	default:
		e.log.Warn("ignoring an assignment of an unknown kind (is the director newer than this envoy?)", "experiment", id)
	}
}

// spawn runs f for x in a goroutine that Stop can cancel and Run waits for.
// The previous goroutine of x, if any, is cancelled and finishes before f
// starts, so two never work on one experiment at once. Called with e.mu held.
func (e *Envoy) spawn(x *exp, f func(ctx context.Context, done chan struct{})) {
	prevDone := x.done
	if x.cancel != nil {
		x.cancel()
	}
	ctx, cancel := context.WithCancel(e.runCtx)
	done := make(chan struct{})
	x.cancel, x.done = cancel, done
	e.wg.Add(1)
	go func() {
		defer e.wg.Done()
		defer close(done)
		defer cancel()
		if prevDone != nil {
			<-prevDone
		}
		f(ctx, done)
	}()
}

// current reports whether the goroutine that owns done still owns x; a
// goroutine that was replaced must not change x's state.
func current(x *exp, done chan struct{}) bool { return x.done == done }

func (e *Envoy) onOffer(id string, o *fxv1.Offer) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if x, ok := e.exps[id]; ok {
		// A replayed offer: answer again if the answer may not have
		// arrived; otherwise the review in progress goes on.
		if x.rec.Decision != "" && !x.answering && (x.phase == phaseAccepted || x.phase == phaseRejected) {
			x.answering = true
			d := decision{accept: x.rec.Decision == decisionAccept, reason: x.rec.Reason}
			e.wg.Add(1)
			go func() {
				defer e.wg.Done()
				delivered := e.answer(e.runCtx, id, d)
				e.mu.Lock()
				x.answering = false
				e.mu.Unlock()
				if delivered && !d.accept {
					e.dropRejected(x)
				}
			}()
		}
		return
	}
	rec := record{
		ID:            id,
		Name:          o.GetName(),
		Owner:         o.GetOwner(),
		ArchiveSize:   o.GetArchiveSize(),
		ArchiveSHA256: o.GetArchiveSha256(),
		PlanYAML:      o.GetPlanYaml(),
		OfferedAt:     time.Now().UTC(),
	}
	if o.GetAnswerBy() != nil {
		rec.AnswerBy = o.GetAnswerBy().AsTime()
	}
	x := &exp{rec: rec, phase: phaseReviewing, decide: make(chan decision, 1)}
	e.exps[id] = x
	e.log.Info("experiment offered", "experiment", id, "name", rec.Name, "owner", rec.Owner, "archive_bytes", rec.ArchiveSize)
	e.spawn(x, func(ctx context.Context, done chan struct{}) { e.intake(ctx, x, done) })
}

func (e *Envoy) onStart(id string, s *fxv1.Start) {
	e.mu.Lock()
	defer e.mu.Unlock()
	x, ok := e.exps[id]
	if !ok {
		e.reportAsync(id, s.GetRound(), "this envoy has no record of accepting the experiment (its work directory was lost or it never accepted)")
		return
	}
	switch x.phase {
	case phaseRunning:
		if canFollow(x.start, s) {
			if x.start.GetAggregatorAddress() != s.GetAggregatorAddress() {
				// A restarted director serves the experiment elsewhere.
				e.log.Info("the aggregator moved; the collaborator follows it", "experiment", id, "address", s.GetAggregatorAddress())
				x.start = s
				x.link.move(s.GetAggregatorAddress())
			}
			return
		}
		e.log.Info("the aggregator's certificate name changed; restarting the collaborator", "experiment", id, "address", s.GetAggregatorAddress(), "server_name", s.GetAggregatorServerName())
	case phaseAccepted:
		if n := e.countRunning(); n >= e.cfg.MaxExperiments {
			x.phase = phaseFailed
			e.reportAsync(id, s.GetRound(), fmt.Sprintf("the envoy already runs its maximum of %d experiments (max_experiments)", e.cfg.MaxExperiments))
			return
		}
	case phaseFinished, phaseFailed:
		return // it ran here already; a replay changes nothing
	case phaseRejected:
		e.reportAsync(id, s.GetRound(), "the data owner rejected this experiment: "+x.rec.Reason)
		return
	default:
		e.reportAsync(id, s.GetRound(), "the experiment started before this envoy finished reviewing it")
		return
	}
	x.phase = phaseRunning
	x.start = s
	link := newAggregatorLink(s.GetAggregatorAddress())
	x.link = link
	e.spawn(x, func(ctx context.Context, done chan struct{}) { e.collaborate(ctx, x, s, link, done) })
}

func (e *Envoy) onStop(id string, s *fxv1.Stop) {
	e.mu.Lock()
	x, ok := e.exps[id]
	delete(e.exps, id)
	e.mu.Unlock()
	if ok {
		e.log.Info("experiment stopped", "experiment", id, "state", s.GetState().String(), "reason", s.GetReason())
	}
	e.wg.Add(1)
	go func() {
		defer e.wg.Done()
		if ok {
			e.mu.Lock()
			cancel, done := x.cancel, x.done
			e.mu.Unlock()
			if cancel != nil {
				cancel()
				<-done
			}
		}
		e.removeDir(id)
	}()
}

// canFollow reports whether a running collaborator can follow its
// aggregator from one Start to the next by moving its connection: the
// certificate it checks must stay the same, and without a server name
// that is the dial target's host.
func canFollow(from, to *fxv1.Start) bool {
	if from.GetAggregatorServerName() != to.GetAggregatorServerName() {
		return false
	}
	if from.GetAggregatorServerName() != "" {
		return true
	}
	h1, _, err1 := net.SplitHostPort(from.GetAggregatorAddress())
	h2, _, err2 := net.SplitHostPort(to.GetAggregatorAddress())
	return err1 == nil && err2 == nil && h1 == h2
}

// countRunning is the number of collaborators running. Called with e.mu held.
func (e *Envoy) countRunning() int {
	n := 0
	for _, x := range e.exps {
		if x.phase == phaseRunning {
			n++
		}
	}
	return n
}

// running lists, for heartbeats, the experiments whose collaborators run
// here, and also those this envoy accepted and holds files for but was not
// yet told to stop (not started yet, finished, failed). The director answers
// a listed experiment that has ended, or that it no longer knows, with a
// Stop, so listing them is how the files of an experiment that ended while
// the envoy was away get cleaned up.
func (e *Envoy) running() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	var ids []string
	for id, x := range e.exps {
		switch x.phase {
		case phaseAccepted, phaseRunning, phaseFinished, phaseFailed:
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)
	return ids
}

// collaborate runs the experiment's collaborator until it ends, and reports
// a failure to the director. A collaborator stopped by Stop or by the envoy
// shutting down is not a failure: after a restart the director's replayed
// Start brings it back.
func (e *Envoy) collaborate(ctx context.Context, x *exp, s *fxv1.Start, link *aggregatorLink, done chan struct{}) {
	e.mu.Lock()
	id, plan, rec := x.rec.ID, x.plan, x.rec
	e.mu.Unlock()
	log := e.log.With("experiment", id)
	err := e.runCollaborator(ctx, id, plan, e.collaboratorPrivacy(rec, plan), s, link)
	if ctx.Err() != nil {
		log.Debug("collaborator stopped")
		return
	}
	e.mu.Lock()
	if current(x, done) {
		if err == nil {
			x.phase = phaseFinished
		} else {
			x.phase = phaseFailed
		}
	}
	e.mu.Unlock()
	if err == nil {
		log.Info("collaborator finished")
		return
	}
	log.Error("collaborator failed", "error", err)
	// The director prefixes the round the failure happened in; a failure
	// outside any round (the runner could not be built) names none.
	var round int32
	var re *collaborator.RoundError
	if errors.As(err, &re) {
		round, err = int32(re.Round), re.Err
	}
	e.report(ctx, id, round, e.publicReason(err))
}

// runCollaborator builds the plan's runner on the site's data and runs a
// collaborator with it.
func (e *Envoy) runCollaborator(ctx context.Context, id string, plan *experiment.Plan, dp *collaborator.Privacy, s *fxv1.Start, link *aggregatorLink) error {
	output, stopSharing := e.shareOutput(ctx, id)
	defer stopSharing()
	r, err := e.newRunner(e.runnerInput(id, plan, output))
	if err != nil {
		return fmt.Errorf("building the task runner: %w", err)
	}
	defer func() {
		if err := closeRunner(r); err != nil {
			e.log.Warn("cannot clean up after the experiment's runner", "experiment", id, "error", err)
		}
	}()
	if s, ok := r.(starter); ok {
		s.Start(ctx) // start-up overlaps the wait for the first task
	}
	e.log.Info("starting the collaborator", "experiment", id, "aggregator", s.GetAggregatorAddress(), "round", s.GetRound())
	return e.runCollab(ctx, CollaboratorSpec{
		ExperimentID: id,
		Name:         e.name,
		Address:      s.GetAggregatorAddress(),
		ServerName:   s.GetAggregatorServerName(),
		Round:        s.GetRound(),
		DialOptions:  append(dialOptions(e.creds, e.cfg.Retry, s.GetAggregatorServerName()), grpc.WithContextDialer(link.dial)),
		Retry:        e.cfg.Retry,
		Runner:       r,
		Plan:         plan,
		Dir:          filepath.Join(e.expDir(id), filesDir),
		WorkDir:      filepath.Join(e.expDir(id), collaboratorDir),
		Logger:       e.log,
		Metrics:      e.metrics,
		Privacy:      dp,
	})
}

// runnerInput is what the experiment's runner is built from; output, if
// not nil, receives what an exec runner prints.
func (e *Envoy) runnerInput(id string, plan *experiment.Plan, output func(exec.OutputLine)) RunnerInput {
	dir, workDir := filepath.Join(e.expDir(id), filesDir), filepath.Join(e.expDir(id), runnerDir)
	return RunnerInput{
		Plan:       plan,
		Dir:        dir,
		WorkDir:    workDir,
		Contain:    e.contain(dir, workDir),
		SandboxErr: e.sandboxErr,
		Data:       e.data,
		DataConfig: e.cfg.Shard,
		Exec:       e.cfg.Exec,
		Logger:     e.log.Named("runner").With("experiment", id),
		Output:     output,
	}
}

// reportAsync reports a failure without holding up the caller.
func (e *Envoy) reportAsync(id string, round int32, reason string) {
	e.log.Error("cannot take part in the experiment", "experiment", id, "reason", reason)
	e.wg.Add(1)
	go func() {
		defer e.wg.Done()
		e.report(e.runCtx, id, round, reason)
	}()
}

// report tells the director a collaborator failed, retrying transient
// errors until the director answers or the envoy stops.
func (e *Envoy) report(ctx context.Context, id string, round int32, reason string) {
	e.retry(ctx, "reporting a failure", id, func(ctx context.Context) error {
		_, err := e.client.ReportFailure(ctx, &fxv1.ReportFailureRequest{ExperimentId: id, EnvoyName: e.name, Round: round, Reason: fxv1.Clip(reason, fxv1.MaxReasonBytes())})
		return err
	})
}

// answer sends the data owner's decision, retrying transient errors. It
// reports whether the director has the answer or refused it for good (the
// offer closed), that is whether nothing is left to send.
func (e *Envoy) answer(ctx context.Context, id string, d decision) bool {
	return e.retry(ctx, "answering the offer", id, func(ctx context.Context) error {
		resp, err := e.client.AnswerOffer(ctx, &fxv1.AnswerOfferRequest{ExperimentId: id, EnvoyName: e.name, Accept: d.accept, Reason: fxv1.Clip(d.reason, fxv1.MaxReasonBytes())})
		if err == nil {
			e.log.Info("offer answered", "experiment", id, "accept", d.accept, "reason", d.reason, "state", resp.GetState().String())
		}
		return err
	})
}

// retry calls f, each call bounded by the RPC timeout, until it succeeds,
// fails for good, or ctx ends; it reports false only in the last case.
// Failing for good is an answer the director would repeat (the offer is
// closed, the envoy takes no part): it is logged and not retried.
func (e *Envoy) retry(ctx context.Context, what, id string, f func(context.Context) error) bool {
	b := backoff.New(e.cfg.Retry.schedule())
	for {
		rctx, cancel := e.rpcContext(ctx)
		err := f(rctx)
		cancel()
		if err == nil {
			return true
		}
		if ctx.Err() != nil {
			return false
		}
		if permanent(err) {
			e.log.Warn(what+": the director refused", "experiment", id, "error", err)
			return true
		}
		e.log.Debug(what+": retrying", "experiment", id, "error", err)
		if !b.Wait(ctx) {
			return false
		}
	}
}

// dropRejected forgets a rejected offer once the director has the answer:
// the director does not offer a declined experiment again, so its record
// has no further use. Until then the record stays, so that an envoy
// restarted before the answer arrived sends the same one.
func (e *Envoy) dropRejected(x *exp) {
	e.mu.Lock()
	cur, ok := e.exps[x.rec.ID]
	drop := ok && cur == x && x.phase == phaseRejected && !x.answering
	if drop {
		delete(e.exps, x.rec.ID)
	}
	e.mu.Unlock()
	if drop {
		e.removeDir(x.rec.ID)
	}
}

// permanent reports whether an RPC error would come back on a retry.
func permanent(err error) bool {
	switch status.Code(err) {
	case codes.NotFound, codes.FailedPrecondition, codes.InvalidArgument, codes.PermissionDenied, codes.OutOfRange, codes.AlreadyExists:
		return true
	}
	return false
}

// unpackedPlan reads the plan of an experiment's unpacked archive.
func (e *Envoy) unpackedPlan(id string) (*experiment.Plan, error) {
	data, err := os.ReadFile(filepath.Join(e.expDir(id), filesDir, experiment.PlanFile))
	if err != nil {
		return nil, err
	}
	return experiment.ParsePlanAnyAlgorithm(data)
}

// publicReason is what the site says off-site about a failure: fx's own
// words, and what the runner printed only where the site shares its
// runners' output (exec.share_logs), since that output may quote the
// site's data.
func (e *Envoy) publicReason(err error) string {
	msg := err.Error()
	if e.cfg.Exec.ShareLogs {
		return msg
	}
	var te *exec.TaskError
	if errors.As(err, &te) {
		msg = strings.Replace(msg, te.Error(), te.Summary()+" (what the runner printed stays at the site, whose exec.share_logs is off)", 1)
	}
	return msg
}
