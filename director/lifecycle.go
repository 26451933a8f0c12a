package director

import (
	"context"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"github.com/fx-fl/fx/internal/tracing"

	"github.com/fx-fl/fx/aggregator"
	"github.com/fx-fl/fx/director/store"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// saveLocked writes an experiment record and participant changes in one
// transaction, and only then applies them in memory, so memory never holds
// a state the store does not. Reasons are clipped to the protocol's bound
// here, whoever wrote them, so no record can outgrow a listing.
func (d *Director) saveLocked(e *expState, rec store.Experiment, parts ...*store.Participant) error {
	now := d.clock.Now()
	rec.UpdatedAt = now
	rec.Reason = clipReason(rec.Reason)
	for _, p := range parts {
		p.UpdatedAt = now
		p.Reason = clipReason(p.Reason)
	}
	err := d.store.Update(func(tx store.Tx) error {
		if err := tx.PutExperiment(&rec); err != nil {
			return err
		}
		for _, p := range parts {
			if err := tx.PutParticipant(rec.ID, p); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("store: %w", err)
	}
	e.rec = rec
	for _, p := range parts {
		e.parts[p.Envoy] = p
	}
	return nil
}

// clipReason bounds a reason the director keeps: an envoy's reason fits the
// bound, but the director quotes it in reasons of its own ("only 1
// participant remains after envoy site-2 failed (...)").
func clipReason(s string) string { return fxv1.Clip(s, fxv1.MaxReasonBytes()) }

// participant returns a copy of a participant record for modification.
func participantCopy(p *store.Participant) *store.Participant {
	c := *p
	return &c
}

// approveLocked queues a PENDING experiment.
func (d *Director) approveLocked(e *expState) error {
	if e.rec.State != fxv1.ExperimentState_PENDING {
		return fmt.Errorf("experiment %s is %s, not PENDING: only a pending experiment can be approved: %w", e.rec.Name, e.rec.State, ErrFailedPrecondition)
	}
	rec := e.rec
	rec.State = fxv1.ExperimentState_QUEUED
	rec.ApprovedAt = d.clock.Now()
	if err := d.saveLocked(e, rec); err != nil {
		return err
	}
	d.log.Info("experiment queued", "experiment", e.rec.ID, "name", e.rec.Name, "owner", e.rec.Owner)
	d.scheduleLocked()
	return nil
}

// scheduleLocked offers queued experiments, oldest approval first, while
// fewer than MaxConcurrent are offered or running. Before Run it does
// nothing: Run schedules once it can launch aggregators.
func (d *Director) scheduleLocked() {
	if d.runCtx == nil || d.stopped {
		return
	}
	active := 0
	var queued []*expState
	for _, e := range d.sortedExps() {
		switch e.rec.State {
		case fxv1.ExperimentState_OFFERED, fxv1.ExperimentState_RUNNING, fxv1.ExperimentState_PAUSED:
			active++
		case fxv1.ExperimentState_QUEUED:
			queued = append(queued, e)
		}
	}
	slices.SortStableFunc(queued, func(a, b *expState) int { return a.rec.ApprovedAt.Compare(b.rec.ApprovedAt) })
	for _, e := range queued {
		if active >= d.cfg.MaxConcurrent {
			return
		}
		if err := d.offerLocked(e); err != nil {
			d.log.Error("cannot offer experiment", "experiment", e.rec.ID, "error", err)
			continue
		}
		active++
	}
}

// offerLocked moves a QUEUED experiment to OFFERED and invites the envoys
// its plan selects.
func (d *Director) offerLocked(e *expState) error {
	rec := e.rec
	rec.State = fxv1.ExperimentState_OFFERED
	rec.AnswerBy = d.clock.Now().Add(e.plan.Participants.AcceptTimeout.Std())
	invited := d.invitableLocked(e)
	if err := d.saveLocked(e, rec, invited...); err != nil {
		return err
	}
	d.log.Info("experiment offered", "experiment", e.rec.ID, "envoys", len(invited), "answer_by", rec.AnswerBy)
	e.offer.End()
	_, e.offer = tracing.Start(trace.ContextWithSpan(context.Background(), e.span), "offer", attribute.Int("envoys", len(invited)))
	for _, p := range invited {
		d.sendLocked(p.Envoy, d.offerAssignment(e))
	}
	return nil
}

// inviteLocked adds envoys that now qualify (registered, came online, or
// were freed by another experiment's end) to an OFFERED experiment.
func (d *Director) inviteLocked(e *expState) {
	if e.rec.State != fxv1.ExperimentState_OFFERED {
		return
	}
	invited := d.invitableLocked(e)
	if len(invited) == 0 {
		return
	}
	if err := d.saveLocked(e, e.rec, invited...); err != nil {
		d.log.Error("cannot invite envoys", "experiment", e.rec.ID, "error", err)
		return
	}
	for _, p := range invited {
		d.sendLocked(p.Envoy, d.offerAssignment(e))
	}
}

func (d *Director) inviteAllLocked() {
	for _, e := range d.sortedExps() {
		d.inviteLocked(e)
	}
}

// invitableLocked returns new INVITED participants for the envoys the plan
// selects that are not yet part of the experiment. A plan that names envoys
// reaches them even while they are offline (they get the offer when they
// reconnect); one that selects by tags and shapes reaches online envoys
// only, and more as they come online. An envoy already busy with its
// max_experiments waits until one of them ends.
func (d *Director) invitableLocked(e *expState) []*store.Participant {
	now := d.clock.Now()
	sel := e.plan.Participants
	var out []*store.Participant
	for _, env := range d.sortedEnvoys() {
		name := env.rec.Name
		if _, ok := e.parts[name]; ok {
			continue
		}
		if len(sel.Envoys) > 0 {
			if !slices.Contains(sel.Envoys, name) {
				continue
			}
		} else if !d.onlineLocked(env, now) {
			continue
		}
		if !shardMatches(env.shard, sel.Tags, sel.SampleShape, sel.TargetShape) {
			continue
		}
		if max := env.rec.MaxExperiments; max > 0 && d.loadLocked(name) >= int(max) {
			continue
		}
		out = append(out, &store.Participant{Envoy: name, State: fxv1.ParticipantState_INVITED})
	}
	return out
}

func shardMatches(s *fxv1.DatasetShard, tags []string, sample, target []int64) bool {
	for _, t := range tags {
		if !slices.Contains(s.GetTags(), t) {
			return false
		}
	}
	if len(sample) > 0 && !slices.Equal(sample, s.GetSampleShape()) {
		return false
	}
	if len(target) > 0 && !slices.Equal(target, s.GetTargetShape()) {
		return false
	}
	return true
}

// loadLocked counts the live experiments an envoy has accepted, and the
// offers it has not answered yet: an outstanding offer holds a place, or an
// envoy with one place left could be offered two experiments at once,
// accept both, and then have to refuse to start one of them (which fails
// an experiment that needs it).
func (d *Director) loadLocked(envoy string) int {
	n := 0
	for _, e := range d.exps {
		if e.rec.Ended() {
			continue
		}
		p, ok := e.parts[envoy]
		switch {
		case !ok:
		case p.State == fxv1.ParticipantState_ACCEPTED || p.State == fxv1.ParticipantState_TRAINING:
			n++
		case p.State == fxv1.ParticipantState_INVITED && e.rec.State == fxv1.ExperimentState_OFFERED:
			n++
		}
	}
	return n
}

// answerLocked records an envoy's answer to an offer and starts the
// experiment when it is ready to (see readyToStart).
func (d *Director) answerLocked(e *expState, envoy string, accept bool, reason string) error {
	p, ok := e.parts[envoy]
	if !ok {
		return fmt.Errorf("experiment %q was not offered to envoy %s: %w", e.rec.ID, envoy, ErrNotFound)
	}
	want := fxv1.ParticipantState_DECLINED
	if accept {
		want = fxv1.ParticipantState_ACCEPTED
	}
	if p.State == want || (accept && p.State == fxv1.ParticipantState_TRAINING) {
		return nil // the same answer again
	}
	if e.rec.State != fxv1.ExperimentState_OFFERED {
		why := "it has ended (" + e.rec.State.String() + ")"
		if store.Running(e.rec.State) {
			why = "the experiment started without this envoy"
		}
		return fmt.Errorf("the offer of experiment %s is closed: %s: %w", e.rec.ID, why, ErrFailedPrecondition)
	}
	if p.State != fxv1.ParticipantState_INVITED {
		return fmt.Errorf("envoy %s already answered the offer of experiment %s the other way (%s): %w", envoy, e.rec.ID, p.State, ErrFailedPrecondition)
	}
	np := participantCopy(p)
	np.State = want
	np.Reason = ""
	if !accept {
		np.Reason = reason
		if np.Reason == "" {
			np.Reason = "declined by the data owner"
		}
	}
	if err := d.saveLocked(e, e.rec, np); err != nil {
		return err
	}
	d.log.Info("offer answered", "experiment", e.rec.ID, "envoy", envoy, "accept", accept, "reason", np.Reason)
	if !accept {
		if why := cannotStart(e); why != "" {
			// Waiting out accept_timeout could change nothing.
			if err := d.endLocked(e, fxv1.ExperimentState_FAILED, why); err != nil {
				d.log.Error("cannot fail an offer too many envoys declined", "experiment", e.rec.ID, "error", err)
			}
			return nil
		}
	}
	if started, err := d.startIfReadyLocked(e, d.clock.Now()); started || err != nil {
		return err
	}
	if !accept {
		d.inviteAllLocked() // the offer no longer holds a place at the envoy
	}
	return nil
}

// readyToStart says whether an OFFERED experiment starts now, and why the
// envoys that have not answered are left out. It starts once
// participants.min envoys have accepted, with every envoy that has accepted
// by then: at once when participants.max have, or when no invited envoy is
// left to answer; else when participants.gather_timeout has passed since
// the min-th acceptance, or the offer's answer time has come. Until then
// the offer stays open, so that every site that wants to take part does,
// and the experiment can go on without one that fails.
func readyToStart(e *expState, now time.Time) (ready bool, leftOut string) {
	sel := e.plan.Participants
	var accepted []time.Time
	for _, p := range e.parts {
		if p.State == fxv1.ParticipantState_ACCEPTED {
			accepted = append(accepted, p.UpdatedAt) // when it accepted: nothing else saves an accepted participant
		}
	}
	n := len(accepted)
	switch {
	case n < sel.Min:
		return false, ""
	case sel.Max > 0 && n >= sel.Max:
		return true, fmt.Sprintf("it started with participants.max (%d) envoys", sel.Max)
	case e.countParts(fxv1.ParticipantState_INVITED) == 0:
		return true, ""
	}
	slices.SortFunc(accepted, time.Time.Compare)
	gatherBy := accepted[sel.Min-1].Add(sel.GatherTimeout.Std())
	switch {
	case !now.Before(gatherBy):
		return true, fmt.Sprintf("it started with the %d envoys that had accepted within participants.gather_timeout (%s) of the participants.min-th (%d) acceptance",
			n, sel.GatherTimeout, sel.Min)
	case !now.Before(e.rec.AnswerBy):
		return true, fmt.Sprintf("it started with the %d envoys that had accepted within participants.accept_timeout (%s)", n, sel.AcceptTimeout)
	}
	return false, ""
}

// startIfReadyLocked starts an OFFERED experiment that is ready to start.
func (d *Director) startIfReadyLocked(e *expState, now time.Time) (bool, error) {
	ready, leftOut := readyToStart(e, now)
	if !ready {
		return false, nil
	}
	return true, d.startLocked(e, leftOut)
}

// sweepOffersLocked starts the offers that are ready to start (their
// gathering is over) and fails those whose answer time has passed without
// participants.min acceptances.
func (d *Director) sweepOffersLocked(now time.Time) {
	for _, e := range d.sortedExps() {
		if e.rec.State != fxv1.ExperimentState_OFFERED {
			continue
		}
		if started, err := d.startIfReadyLocked(e, now); started {
			if err != nil {
				d.log.Error("cannot start an experiment", "experiment", e.rec.ID, "error", err)
			}
			continue
		}
		if now.Before(e.rec.AnswerBy) {
			continue
		}
		accepted := e.countParts(fxv1.ParticipantState_ACCEPTED)
		reason := fmt.Sprintf("only %d of the %d envoys needed (participants.min) accepted within participants.accept_timeout (%s)",
			accepted, e.plan.Participants.Min, e.plan.Participants.AcceptTimeout)
		if err := d.endLocked(e, fxv1.ExperimentState_FAILED, reason); err != nil {
			d.log.Error("cannot fail an expired offer", "experiment", e.rec.ID, "error", err)
		}
	}
}

// cannotStart explains why an offer can no longer gather participants.min
// acceptances, or returns "" while it still can: the envoys a plan names
// declined too many to reach it; or, for an offer by tags and shapes, every
// envoy it was made to declined (matching envoys might yet come online, but
// a researcher whose every site said no should hear why now, not after
// accept_timeout). The reason quotes each site's.
func cannotStart(e *expState) string {
	declined := e.partNames(fxv1.ParticipantState_DECLINED)
	var reasons []string
	for _, name := range declined {
		reasons = append(reasons, fmt.Sprintf("%s: %s", name, e.parts[name].Reason))
	}
	named := len(slices.Compact(slices.Sorted(slices.Values(e.plan.Participants.Envoys))))
	switch {
	case named > 0 && named-len(declined) < e.plan.Participants.Min:
		return fmt.Sprintf("%d of the %d envoys the plan names declined, so at most %d can accept and participants.min is %d (%s)",
			len(declined), named, named-len(declined), e.plan.Participants.Min, strings.Join(reasons, "; "))
	case named == 0 && len(declined) > 0 && len(declined) == len(e.parts):
		return fmt.Sprintf("every envoy the experiment was offered to declined (%s)", strings.Join(reasons, "; "))
	}
	return ""
}

// startLocked makes an OFFERED experiment RUNNING: accepted envoys become
// TRAINING with the sample counts they registered recorded (they bound what
// their results may claim in this experiment), the offer closes for the
// rest (they are told to drop it, and leftOut, if set, says why), and the
// aggregator is launched.
func (d *Director) startLocked(e *expState, leftOut string) error {
	closedWhy := "offer closed: the experiment started without this envoy"
	if leftOut != "" {
		closedWhy += ": " + leftOut
	}
	rec := e.rec
	rec.State = fxv1.ExperimentState_RUNNING
	var changed []*store.Participant
	var closed []string
	for _, name := range e.partNames(fxv1.ParticipantState_ACCEPTED, fxv1.ParticipantState_INVITED) {
		np := participantCopy(e.parts[name])
		if np.State == fxv1.ParticipantState_ACCEPTED {
			np.State = fxv1.ParticipantState_TRAINING
			np.Registered = d.registeredLocked(name)
		} else {
			np.Reason = closedWhy
			closed = append(closed, name)
		}
		changed = append(changed, np)
	}
	if err := d.saveLocked(e, rec, changed...); err != nil {
		return err
	}
	d.log.Info("experiment running", "experiment", e.rec.ID, "participants", e.partNames(fxv1.ParticipantState_TRAINING))
	e.offer.End()
	for _, name := range closed {
		d.sendLocked(name, stopAssignment(e.rec.ID, rec.State, closedWhy))
	}
	d.launchLocked(e)
	if len(closed) > 0 {
		d.inviteAllLocked() // the closed offers no longer hold places
	}
	return nil
}

// launchLocked starts the aggregator of a RUNNING experiment: it binds the
// listener now, so the Start assignments can carry the address at once,
// and builds and runs the aggregator in a goroutine.
func (d *Director) launchLocked(e *expState) {
	if d.runCtx == nil || d.stopped || e.run != nil {
		return
	}
	lis, err := d.listenAggregator()
	if err != nil {
		d.failLocked(e, "cannot listen for the aggregator: "+err.Error())
		return
	}
	port := lis.Addr().(*net.TCPAddr).Port
	ctx, cancel := context.WithCancel(d.runCtx)
	rs := &runState{cancel: cancel, address: net.JoinHostPort(d.advertiseHost(), strconv.Itoa(port)), done: make(chan struct{})}
	e.run = rs
	participants := e.partNames(fxv1.ParticipantState_TRAINING)
	shards := map[string]*fxv1.DatasetShard{}
	registered := map[string]aggregator.SampleCounts{}
	for _, name := range participants {
		if env := d.envoys[name]; env != nil {
			shards[name] = env.shard
		}
		reg := e.parts[name].Registered
		if reg == nil { // a record from before fx kept the counts
			reg = d.registeredLocked(name)
		}
		registered[name] = aggregator.SampleCounts{Train: reg.Train, Valid: reg.Valid}
	}
	spec := LaunchSpec{
		ExperimentID:  e.rec.ID,
		Plan:          e.plan,
		Participants:  participants,
		Registered:    registered,
		Shards:        shards,
		ArchivePath:   d.archivePath(e.rec.ID),
		Limits:        d.cfg.ArchiveLimits,
		Dir:           d.aggregatorDir(e.rec.ID),
		Listener:      lis,
		ServerOptions: d.cfg.AggregatorServerOptions,
		Sink:          &sink{d: d, id: e.rec.ID},
		Logger:        d.cfg.Logger.Named("experiment-" + e.rec.ID),
		DiskReserve:   d.cfg.DiskReserve,
		PauseRetry:    d.cfg.PauseRetry,
		Serving:       func() { d.aggregatorServing(e.rec.ID, rs) },
		Metrics:       d.metrics,
		Trace:         e.span.SpanContext(),
		ServerName:    d.cfg.ServerName,
	}
	d.addrMu.Lock()
	if d.addr != nil {
		spec.DirectorAddress = localAddress(d.addr)
	}
	d.addrMu.Unlock()
	d.log.Info("aggregator starting", "experiment", e.rec.ID, "address", rs.address)
	d.runs.Add(1)
	go d.runAggregator(ctx, e.rec.ID, rs, spec)
}

func (d *Director) runAggregator(ctx context.Context, id string, rs *runState, spec LaunchSpec) {
	defer d.runs.Done()
	defer close(rs.done)
	agg, err := d.cfg.Launcher.Launch(spec)
	if err != nil {
		_ = spec.Listener.Close()
		d.aggregatorDone(id, rs, fmt.Errorf("cannot start the aggregator: %w", err))
		return
	}
	d.mu.Lock()
	rs.agg = agg
	drops := rs.drops
	rs.drops = nil
	d.mu.Unlock()
	for _, dr := range drops {
		agg.Drop(dr[0], dr[1])
	}
	err = agg.Run(ctx)
	if err != nil && ctx.Err() != nil {
		err = ctx.Err()
	}
	d.aggregatorDone(id, rs, err)
}

// aggregatorServing tells the participants where the aggregator is, now
// that it serves. Told earlier, their first calls would wait in TLS
// handshakes that nothing answers while the aggregator loads the model,
// and a big enough model outlasts any handshake timeout.
func (d *Director) aggregatorServing(id string, rs *runState) {
	d.mu.Lock()
	defer d.mu.Unlock()
	e := d.exps[id]
	if e == nil || e.run != rs {
		return
	}
	rs.serving = true
	// A launcher that decides where its aggregators are reached (a
	// Kubernetes Service) says so now.
	if a, ok := rs.agg.(interface{ Address() string }); ok {
		if addr := a.Address(); addr != "" {
			rs.address = addr
		}
	}
	participants := e.partNames(fxv1.ParticipantState_TRAINING)
	d.log.Info("aggregator serving", "experiment", id, "address", rs.address, "participants", participants)
	for _, name := range participants {
		d.sendLocked(name, d.startAssignment(e))
	}
}

// aggregatorDone records how an aggregator ended, unless the director
// stopped it itself (cancel, failure, shutdown), in which case the state is
// already what it should be.
func (d *Director) aggregatorDone(id string, rs *runState, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	e := d.exps[id]
	if e == nil || e.run != rs {
		return
	}
	e.run = nil
	e.lastRun = rs
	if d.stopped {
		return // shutting down: the experiment resumes at the next start
	}
	if err == nil {
		_ = d.endLocked(e, fxv1.ExperimentState_FINISHED, droppedSummary(e))
		return
	}
	d.failLocked(e, err.Error())
}

func (d *Director) failLocked(e *expState, reason string) {
	if err := d.endLocked(e, fxv1.ExperimentState_FAILED, reason); err != nil {
		d.log.Error("cannot record experiment failure", "experiment", e.rec.ID, "reason", reason, "error", err)
	}
}

// endLocked puts an experiment in a final state: its aggregator is stopped,
// its envoys are told to stop, watchers of its metrics are released, and
// its slot goes to the queue.
func (d *Director) endLocked(e *expState, state fxv1.ExperimentState, reason string) error {
	if e.rec.Ended() {
		return fmt.Errorf("experiment %s has already ended (%s): %w", e.rec.Name, e.rec.State, ErrFailedPrecondition)
	}
	rec := e.rec
	rec.State = state
	rec.Reason = reason
	// Whatever the end, the envoys still taking part took part until it:
	// none is shown TRAINING (or, offline, DISCONNECTED) in an ended
	// experiment.
	var changed []*store.Participant
	for _, name := range e.partNames(fxv1.ParticipantState_TRAINING) {
		np := participantCopy(e.parts[name])
		np.State = fxv1.ParticipantState_COMPLETED
		changed = append(changed, np)
	}
	if err := d.saveLocked(e, rec, changed...); err != nil {
		return err
	}
	if e.run != nil {
		e.run.cancel()
		e.lastRun = e.run
		e.run = nil
	}
	d.log.Info("experiment ended", "experiment", e.rec.ID, "state", state, "reason", reason)
	e.offer.End()
	e.span.SetAttributes(attribute.String("state", state.String()), attribute.String("reason", reason))
	e.span.End()
	for name, p := range e.parts {
		if p.State != fxv1.ParticipantState_DECLINED {
			d.sendLocked(name, stopAssignment(e.rec.ID, state, e.rec.Reason))
		}
	}
	e.metrics.notify()
	d.scheduleLocked()
	d.inviteAllLocked()
	return nil
}

// reportFailureLocked drops a participant; it returns the aggregator to
// tell, which the caller must call outside the lock.
func (d *Director) reportFailureLocked(e *expState, envoy string, round int32, reason string) (Aggregator, error) {
	p, ok := e.parts[envoy]
	if !ok || (p.State != fxv1.ParticipantState_TRAINING && p.State != fxv1.ParticipantState_ACCEPTED && p.State != fxv1.ParticipantState_DROPPED) {
		return nil, fmt.Errorf("envoy %s does not take part in experiment %q: %w", envoy, e.rec.ID, ErrNotFound)
	}
	if p.State == fxv1.ParticipantState_DROPPED || e.rec.Ended() {
		return nil, nil
	}
	np := participantCopy(p)
	np.State = fxv1.ParticipantState_DROPPED
	np.Reason = reason
	if round > 0 {
		np.Reason = fmt.Sprintf("round %d: %s", round, reason)
	}
	if err := d.saveLocked(e, e.rec, np); err != nil {
		return nil, err
	}
	d.log.Warn("participant dropped", "experiment", e.rec.ID, "envoy", envoy, "reason", np.Reason)
	d.sendLocked(envoy, stopAssignment(e.rec.ID, e.rec.State, "this envoy was dropped from the experiment: "+np.Reason))
	if !store.Running(e.rec.State) {
		return nil, nil
	}
	remaining := e.countParts(fxv1.ParticipantState_TRAINING)
	if remaining < e.plan.Participants.Min {
		d.failLocked(e, fmt.Sprintf("%s after envoy %s failed (%s); participants.min is %d", remain(remaining), envoy, np.Reason, e.plan.Participants.Min))
		return nil, nil
	}
	d.log.Info("the experiment goes on without the dropped envoy", "experiment", e.rec.ID, "envoy", envoy, "participants", remaining)
	if e.run == nil {
		return nil, nil
	}
	if e.run.agg == nil {
		e.run.drops = append(e.run.drops, [2]string{envoy, np.Reason})
		return nil, nil
	}
	return e.run.agg, nil
}

// registeredLocked is what an envoy has registered now: the sample counts
// of its shard (none if the director does not know it).
func (d *Director) registeredLocked(envoy string) *store.Samples {
	env := d.envoys[envoy]
	if env == nil {
		return &store.Samples{}
	}
	return &store.Samples{Train: env.shard.GetTrainSamples(), Valid: env.shard.GetValidSamples()}
}

// listenAggregator binds an aggregator's listener: an ephemeral port, or
// the first free one in the configured range.
func (d *Director) listenAggregator() (net.Listener, error) {
	host := d.cfg.AggregatorHost
	if d.cfg.AggregatorPortMin == 0 {
		return net.Listen("tcp", net.JoinHostPort(host, "0"))
	}
	var last error
	for port := d.cfg.AggregatorPortMin; port <= d.cfg.AggregatorPortMax; port++ {
		lis, err := net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(port)))
		if err == nil {
			return lis, nil
		}
		last = err
	}
	return nil, fmt.Errorf("no free port in aggregator ports %d-%d (last: %v)", d.cfg.AggregatorPortMin, d.cfg.AggregatorPortMax, last)
}

func (d *Director) advertiseHost() string {
	if d.cfg.AdvertiseHost != "" {
		return d.cfg.AdvertiseHost
	}
	if h := d.cfg.AggregatorHost; h != "" && h != "0.0.0.0" && h != "::" {
		return h
	}
	return "localhost"
}

// sink receives one experiment's aggregator events.
type sink struct {
	d  *Director
	id string
}

// RoundCompleted folds the round into the metric log and records the log's
// position; the round's files are already durable, so the log can always be
// rebuilt to include it.
func (s *sink) RoundCompleted(summary aggregator.RoundSummary, best *aggregator.Best) {
	d := s.d
	d.mu.Lock()
	defer d.mu.Unlock()
	e := d.exps[s.id]
	if e == nil {
		return
	}
	e.metrics.add(summary, roundTime(d.aggregatorDir(s.id), summary.Round), e.plan)
	if best != nil {
		b := *best
		e.metrics.best = &b
	}
	d.recordMetricPosition(s.id, e.metrics)
	d.log.Info("round completed", "experiment", s.id, "round", summary.Round, "reported", len(summary.Reported), "missing", len(summary.Missing))
}

// Progress keeps the live view of a collaborator.
func (s *sink) Progress(p aggregator.Progress) {
	d := s.d
	d.mu.Lock()
	defer d.mu.Unlock()
	if e := d.exps[s.id]; e != nil {
		e.progress[p.Collaborator] = p
	}
}

// remain says how many participants remain, in words.
func remain(n int) string {
	if n == 1 {
		return "only 1 participant remains"
	}
	return fmt.Sprintf("only %d participants remain", n)
}

// droppedSummary says which participants a finished experiment went on
// without and why, or "" when none dropped out: the record's participants
// say it too, one by one.
func droppedSummary(e *expState) string {
	var out []string
	for _, name := range e.partNames(fxv1.ParticipantState_DROPPED) {
		out = append(out, fmt.Sprintf("%s (%s)", name, e.parts[name].Reason))
	}
	if len(out) == 0 {
		return ""
	}
	return "finished without the envoys that dropped out: " + strings.Join(out, "; ")
}
