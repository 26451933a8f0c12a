package director

import (
	"bytes"
	"io"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// TestLifecycleFinished walks the happy path under manual review: submit,
// approve, offer, download, accept, run, finish.
func TestLifecycleFinished(t *testing.T) {
	f := newFed(t, func(c *Config) { c.ReviewPolicy = ReviewManual })
	ctx := ctxT(t)
	f.register("a", "fashion")
	f.register("b", "fashion")
	f.register("c", "cifar") // not selected by the plan's tags
	wa, wb, wc := f.watch("a"), f.watch("b"), f.watch("c")

	data := archive(t, planTwo, map[string]string{"notes.txt": strings.Repeat("x", 3<<20)})
	e, err := submit(ctx, f.researcher("alice"), upload{plan: planTwo, data: data})
	must(t, err)
	if e.GetState() != fxv1.ExperimentState_PENDING || e.GetName() != "fashion" || e.GetOwner() != "alice" || e.GetRounds() != 2 {
		t.Fatalf("submitted: %v", e)
	}
	if _, err := f.researcher("alice").ApproveExperiment(ctx, &fxv1.ReviewExperimentRequest{Experiment: &fxv1.ExperimentRef{Id: e.Id}}); code(err) != codes.PermissionDenied {
		t.Fatalf("researcher approving: %v, want PermissionDenied", err)
	}
	// The admin names it by name and owner.
	got, err := f.admin().ApproveExperiment(ctx, &fxv1.ReviewExperimentRequest{Experiment: &fxv1.ExperimentRef{Name: "fashion", Owner: "alice"}})
	must(t, err)
	if got.GetState() != fxv1.ExperimentState_OFFERED {
		t.Fatalf("after approval: %v", got.GetState())
	}
	if _, err := f.admin().ApproveExperiment(ctx, &fxv1.ReviewExperimentRequest{Experiment: &fxv1.ExperimentRef{Id: e.Id}}); code(err) != codes.FailedPrecondition {
		t.Fatalf("approving twice: %v, want FailedPrecondition", err)
	}

	offer := wa.next(t, e.Id, "offer").GetOffer()
	wb.next(t, e.Id, "offer")
	if offer.GetArchiveSize() != int64(len(data)) || offer.GetArchiveSha256() != sha(data) || offer.GetPlanYaml() != planTwo || offer.GetOwner() != "alice" {
		t.Errorf("offer = %v", offer)
	}
	if !offer.GetAnswerBy().AsTime().Equal(f.clock.Now().Add(30 * time.Minute)) {
		t.Errorf("answer_by = %v", offer.GetAnswerBy().AsTime())
	}

	// Download in two goes: the second resumes from an offset.
	download := func(envoy string, offset int64) ([]byte, error) {
		stream, err := f.envoy(envoy).DownloadArchive(ctx, &fxv1.DownloadArchiveRequest{ExperimentId: e.Id, Offset: offset})
		if err != nil {
			return nil, err
		}
		var buf bytes.Buffer
		for {
			c, err := stream.Recv()
			if err == io.EOF {
				return buf.Bytes(), nil
			}
			if err != nil {
				return nil, err
			}
			if len(c.GetData()) > MaxChunk {
				t.Errorf("chunk of %d bytes", len(c.GetData()))
			}
			if c.GetOffset() != offset+int64(buf.Len()) {
				t.Errorf("chunk at %d, want %d", c.GetOffset(), offset+int64(buf.Len()))
			}
			buf.Write(c.GetData())
		}
	}
	half := int64(len(data) / 2)
	tail, err := download("a", half)
	must(t, err)
	if !bytes.Equal(tail, data[half:]) {
		t.Fatal("resumed download differs from the archive")
	}
	if _, err := download("c", 0); code(err) != codes.NotFound {
		t.Errorf("download by an envoy not offered: %v, want NotFound", err)
	}
	if _, err := download("a", int64(len(data))+1); code(err) != codes.OutOfRange {
		t.Errorf("download past the end: %v, want OutOfRange", err)
	}

	resp, err := f.answer("a", e.Id, true)
	must(t, err)
	if resp.GetState() != fxv1.ExperimentState_OFFERED {
		t.Errorf("after one acceptance: %v", resp.GetState())
	}
	if _, err := f.answer("a", e.Id, true); err != nil {
		t.Errorf("accepting twice: %v, want a no-op", err)
	}
	if _, err := f.answer("c", e.Id, true); code(err) != codes.NotFound {
		t.Errorf("answer by an envoy not offered: %v, want NotFound", err)
	}
	resp, err = f.answer("b", e.Id, true)
	must(t, err)
	if resp.GetState() != fxv1.ExperimentState_RUNNING {
		t.Fatalf("after two acceptances: %v", resp.GetState())
	}
	start := wa.next(t, e.Id, "start").GetStart()
	wb.next(t, e.Id, "start")
	if !strings.HasPrefix(start.GetAggregatorAddress(), "127.0.0.1:") || start.GetAggregatorServerName() != "director.test" || start.GetRound() != 1 {
		t.Errorf("start = %v", start)
	}

	agg := f.launcher.agg(t, e.Id, 1)
	if got := strings.Join(agg.spec.Participants, ","); got != "a,b" {
		t.Errorf("aggregator participants %s", got)
	}
	if agg.spec.Listener.Addr().String() != start.GetAggregatorAddress() {
		t.Errorf("aggregator listens on %s, envoys told %s", agg.spec.Listener.Addr(), start.GetAggregatorAddress())
	}
	agg.completeRound(t)
	running := f.get("", e.Id)
	if running.GetRound() != 2 || running.GetBest().GetRound() != 1 || running.GetLatestMetrics()["train/accuracy"] != 0.1 {
		t.Errorf("after round 1: round %d best %v latest %v", running.GetRound(), running.GetBest(), running.GetLatestMetrics())
	}
	envs, err := f.admin().ListEnvoys(ctx, &fxv1.ListEnvoysRequest{})
	must(t, err)
	if x := envs.GetEnvoys()[0].GetExperiments(); len(x) != 1 || x[0] != e.Id {
		t.Errorf("envoy a's experiments: %v", x)
	}
	agg.completeRound(t)
	agg.result <- nil
	done := f.waitState(e.Id, fxv1.ExperimentState_FINISHED)
	for _, p := range done.GetParticipants() {
		if p.GetState() != fxv1.ParticipantState_COMPLETED {
			t.Errorf("participant %s: %v", p.GetEnvoy(), p.GetState())
		}
	}
	if done.GetRound() != 2 {
		t.Errorf("finished at round %d", done.GetRound())
	}
	if s := wa.next(t, e.Id, "stop").GetStop(); s.GetState() != fxv1.ExperimentState_FINISHED {
		t.Errorf("stop = %v", s)
	}
	wb.next(t, e.Id, "stop")
	select {
	case a := <-wc.ch:
		t.Errorf("envoy c got %v", a)
	default:
	}
	if _, err := download("a", 0); code(err) != codes.FailedPrecondition {
		t.Errorf("download after the end: %v, want FailedPrecondition", err)
	}
}

// TestStartWaitsForTheAggregatorToServe: participants learn the
// aggregator's address only once it serves, not while it loads the model
// (their handshakes would hang unanswered until then); an envoy that
// reconnects meanwhile is not told either.
func TestStartWaitsForTheAggregatorToServe(t *testing.T) {
	f := newFed(t, nil)
	f.launcher.serveGate = make(chan struct{})
	f.register("a", "fashion")
	f.register("b", "fashion")
	wa := f.watch("a")
	e := f.submitPlan("alice", planTwo)
	f.waitState(e.Id, fxv1.ExperimentState_OFFERED)
	for _, env := range []string{"a", "b"} {
		_, err := f.answer(env, e.Id, true)
		must(t, err)
	}
	f.waitState(e.Id, fxv1.ExperimentState_RUNNING)
	agg := f.launcher.agg(t, e.Id, 1)
	wb := f.watch("b") // replays what b should know now
	// Absence can only be shown over a while: nothing the envoys are
	// sent in it may be a start.
	quiet := time.After(300 * time.Millisecond)
	for waiting := true; waiting; {
		var a *fxv1.Assignment
		select {
		case a = <-wa.ch:
		case a = <-wb.ch:
		case <-quiet:
			waiting = false
		}
		if a.GetStart() != nil {
			t.Fatalf("an envoy was told the aggregator's address before it served: %v", a)
		}
	}
	close(f.launcher.serveGate)
	for _, w := range []*watcher{wa, wb} {
		if s := w.next(t, e.Id, "start").GetStart(); s.GetAggregatorAddress() != agg.spec.Listener.Addr().String() {
			t.Errorf("start %v, want the aggregator's address %s", s, agg.spec.Listener.Addr())
		}
	}
}

func TestReject(t *testing.T) {
	f := newFed(t, func(c *Config) { c.ReviewPolicy = ReviewManual })
	ctx := ctxT(t)
	e := f.submitPlan("alice", planTwo)
	ref := &fxv1.ExperimentRef{Id: e.Id}
	if _, err := f.admin().RejectExperiment(ctx, &fxv1.ReviewExperimentRequest{Experiment: ref}); code(err) != codes.InvalidArgument {
		t.Fatalf("reject without reason: %v", err)
	}
	got, err := f.admin().RejectExperiment(ctx, &fxv1.ReviewExperimentRequest{Experiment: ref, Reason: "uses too much data"})
	must(t, err)
	if got.GetState() != fxv1.ExperimentState_REJECTED || got.GetReason() != "uses too much data" {
		t.Errorf("rejected: %v %q", got.GetState(), got.GetReason())
	}
	if _, err := f.admin().ApproveExperiment(ctx, &fxv1.ReviewExperimentRequest{Experiment: ref}); code(err) != codes.FailedPrecondition {
		t.Errorf("approve after reject: %v", err)
	}
	if _, err := f.admin().RejectExperiment(ctx, &fxv1.ReviewExperimentRequest{Experiment: ref, Reason: "again"}); code(err) != codes.FailedPrecondition {
		t.Errorf("reject twice: %v", err)
	}
}

func TestAcceptTimeoutAndDecline(t *testing.T) {
	f := newFed(t, nil)
	f.register("a", "fashion")
	f.register("b", "fashion")
	e := f.submitPlan("alice", planTwo)
	f.waitState(e.Id, fxv1.ExperimentState_OFFERED)
	_, err := f.answer("a", e.Id, false)
	must(t, err)
	if _, err := f.answer("a", e.Id, false); err != nil {
		t.Errorf("declining twice: %v, want a no-op", err)
	}
	if _, err := f.answer("a", e.Id, true); code(err) != codes.FailedPrecondition {
		t.Errorf("accepting after declining: %v, want FailedPrecondition", err)
	}
	_, err = f.answer("b", e.Id, true)
	must(t, err)

	f.clock.Advance(29 * time.Minute)
	if got := f.get("", e.Id); got.GetState() != fxv1.ExperimentState_OFFERED {
		t.Fatalf("before the deadline: %v", got.GetState())
	}
	f.clock.Advance(2 * time.Minute)
	got := f.waitState(e.Id, fxv1.ExperimentState_FAILED)
	if !strings.Contains(got.GetReason(), "accept_timeout") || !strings.Contains(got.GetReason(), "only 1 of the 2") {
		t.Errorf("reason %q", got.GetReason())
	}
	for _, p := range got.GetParticipants() {
		want := map[string]fxv1.ParticipantState{"a": fxv1.ParticipantState_DECLINED, "b": fxv1.ParticipantState_ACCEPTED}[p.GetEnvoy()]
		if p.GetState() != want {
			t.Errorf("participant %s: %v, want %v", p.GetEnvoy(), p.GetState(), want)
		}
	}
	if p := got.GetParticipants()[0]; p.GetReason() != "no thanks" {
		t.Errorf("decline reason %q", p.GetReason())
	}
	if _, err := f.answer("b", e.Id, false); code(err) != codes.FailedPrecondition {
		t.Errorf("answer after the end: %v", err)
	}
}

// TestDeclinesBelowMinFailTheOfferAtOnce: when the envoys a plan names can
// no longer reach participants.min, the offer fails on the decline that
// decided it, not at accept_timeout.
func TestDeclinesBelowMinFailTheOfferAtOnce(t *testing.T) {
	f := newFed(t, nil)
	for _, name := range []string{"a", "b", "c"} {
		f.register(name, "fashion")
	}
	e := f.submitPlan("alice", `name: named
rounds: 1
participants: {min: 2, envoys: [a, b, c]}
runner: {kind: builtin, model: softmax}
`)
	f.waitState(e.Id, fxv1.ExperimentState_OFFERED)
	_, err := f.answer("a", e.Id, false)
	must(t, err)
	if got := f.get("", e.Id); got.GetState() != fxv1.ExperimentState_OFFERED {
		t.Fatalf("after one of three declined (two can still accept): %v %q", got.GetState(), got.GetReason())
	}
	_, err = f.answer("b", e.Id, false)
	must(t, err)
	got := f.waitState(e.Id, fxv1.ExperimentState_FAILED)
	if want := "2 of the 3 envoys the plan names declined, so at most 1 can accept and participants.min is 2 (a: no thanks; b: no thanks)"; got.GetReason() != want {
		t.Errorf("reason %q, want %q", got.GetReason(), want)
	}
	if _, err := f.answer("c", e.Id, true); code(err) != codes.FailedPrecondition {
		t.Errorf("accepting the failed offer: %v, want FailedPrecondition", err)
	}
}

// TestEveryInvitedEnvoyDecliningFailsAtOnce: an offer by tags fails on the
// last decline of the envoys it was made to, with each one's reason, not
// at accept_timeout; while one has not answered it stays open.
func TestEveryInvitedEnvoyDecliningFailsAtOnce(t *testing.T) {
	f := newFed(t, nil)
	f.register("a", "fashion")
	f.register("b", "fashion")
	e := f.submitPlan("alice", planTwo)
	f.waitState(e.Id, fxv1.ExperimentState_OFFERED)
	_, err := f.answer("a", e.Id, false)
	must(t, err)
	if got := f.get("", e.Id); got.GetState() != fxv1.ExperimentState_OFFERED {
		t.Fatalf("after one of two declined: %v %q", got.GetState(), got.GetReason())
	}
	_, err = f.answer("b", e.Id, false)
	must(t, err)
	got := f.waitState(e.Id, fxv1.ExperimentState_FAILED)
	if want := "every envoy the experiment was offered to declined (a: no thanks; b: no thanks)"; got.GetReason() != want {
		t.Errorf("reason %q, want %q", got.GetReason(), want)
	}
}

func TestCancel(t *testing.T) {
	f := newFed(t, nil)
	ctx := ctxT(t)
	wa := f.watch("a0") // an unregistered envoy cannot watch
	if err := <-wa.errc; code(err) != codes.FailedPrecondition {
		t.Fatalf("watch before registering: %v", err)
	}
	e, agg := f.running("alice")
	w := f.watch("a")
	w.next(t, e.Id, "start") // replayed on the new stream
	got, err := f.researcher("alice").CancelExperiment(ctx, &fxv1.CancelExperimentRequest{Experiment: &fxv1.ExperimentRef{Id: e.Id}})
	must(t, err)
	if got.GetState() != fxv1.ExperimentState_CANCELLED || got.GetReason() != "cancelled by alice" {
		t.Errorf("cancelled: %v %q", got.GetState(), got.GetReason())
	}
	if s := w.next(t, e.Id, "stop").GetStop(); s.GetState() != fxv1.ExperimentState_CANCELLED {
		t.Errorf("stop %v", s)
	}
	select {
	case <-agg.stopped:
	case <-time.After(waitTimeout):
		t.Fatal("the aggregator was not stopped")
	}
	if _, err := f.researcher("alice").CancelExperiment(ctx, &fxv1.CancelExperimentRequest{Experiment: &fxv1.ExperimentRef{Id: e.Id}}); code(err) != codes.FailedPrecondition {
		t.Errorf("cancel twice: %v", err)
	}
}

// TestDisconnected: a training participant whose envoy stops heartbeating
// shows as DISCONNECTED, and as TRAINING again once it is back.
func TestDisconnected(t *testing.T) {
	f := newFed(t, nil)
	e, _ := f.running("alice")
	state := func(envoy string) fxv1.ParticipantState {
		for _, p := range f.get("", e.Id).GetParticipants() {
			if p.GetEnvoy() == envoy {
				return p.GetState()
			}
		}
		t.Fatalf("no participant %s", envoy)
		return 0
	}
	f.clock.Advance(10 * time.Second)
	must(t, f.heartbeat("b"))
	f.clock.Advance(10 * time.Second)
	if a, b := state("a"), state("b"); a != fxv1.ParticipantState_DISCONNECTED || b != fxv1.ParticipantState_TRAINING {
		t.Fatalf("a %v (want DISCONNECTED), b %v (want TRAINING)", a, b)
	}
	must(t, f.heartbeat("a"))
	if a := state("a"); a != fxv1.ParticipantState_TRAINING {
		t.Errorf("a after heartbeating again: %v", a)
	}
}
