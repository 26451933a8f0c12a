package director

import (
	"errors"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

const planThreeMinTwo = `name: trio
rounds: 3
participants: {min: 2, max: 2, tags: [fashion]}
runner: {kind: builtin, model: mlp}
`

func TestReportFailure(t *testing.T) {
	f := newFed(t, nil)
	ctx := ctxT(t)
	for _, n := range []string{"a", "b", "c"} {
		f.register(n, "fashion")
	}
	e := f.submitPlan("alice", planThreeMinTwo)
	f.waitState(e.Id, fxv1.ExperimentState_OFFERED)
	for _, n := range []string{"a", "b"} {
		_, err := f.answer(n, e.Id, true)
		must(t, err)
	}
	f.waitState(e.Id, fxv1.ExperimentState_RUNNING)
	agg := f.launcher.agg(t, e.Id, 1)
	wc := f.watch("c")
	// c was invited but the experiment started without it: its offer is closed.
	if _, err := f.answer("c", e.Id, true); code(err) != codes.FailedPrecondition {
		t.Errorf("late acceptance: %v, want FailedPrecondition", err)
	}
	select {
	case a := <-wc.ch:
		t.Errorf("envoy c was replayed %v for an experiment that started without it", a)
	default:
	}

	report := func(envoy, reason string) error {
		_, err := f.envoy(envoy).ReportFailure(ctx, &fxv1.ReportFailureRequest{ExperimentId: e.Id, EnvoyName: envoy, Round: 1, Reason: reason})
		return err
	}
	tests := []struct {
		name, envoy, reason string
		want                codes.Code
	}{
		{"empty reason", "a", "", codes.InvalidArgument},
		{"not a participant", "c", "boom", codes.NotFound},
	}
	for _, tt := range tests {
		if err := report(tt.envoy, tt.reason); code(err) != tt.want {
			t.Errorf("%s: %v, want %v", tt.name, err, tt.want)
		}
	}
	if _, err := f.envoy("a").ReportFailure(ctx, &fxv1.ReportFailureRequest{ExperimentId: "nope", EnvoyName: "a", Reason: "x"}); code(err) != codes.NotFound {
		t.Errorf("unknown experiment: %v", err)
	}
	if _, err := f.envoy("a").ReportFailure(ctx, &fxv1.ReportFailureRequest{ExperimentId: e.Id, EnvoyName: "b", Reason: "x"}); code(err) != codes.PermissionDenied {
		t.Errorf("naming another envoy: %v", err)
	}

	// c still holds the archive from the offer: its heartbeat says so, and
	// the director tells it to let go.
	must(t, f.heartbeat("c", e.Id))
	if s := wc.next(t, e.Id, "stop").GetStop(); !strings.Contains(s.GetReason(), "started without this envoy") {
		t.Errorf("stop for c: %v", s)
	}

	// One of two participants fails: fewer than participants.min remain.
	wa := f.watch("a")
	wa.next(t, e.Id, "start")
	must(t, report("a", "out of memory"))
	if s := wa.next(t, e.Id, "stop").GetStop(); !strings.Contains(s.GetReason(), "out of memory") {
		t.Errorf("stop for a: %v", s)
	}
	got := f.waitState(e.Id, fxv1.ExperimentState_FAILED)
	if !strings.Contains(got.GetReason(), "only 1 participant remains") || !strings.Contains(got.GetReason(), "out of memory") {
		t.Errorf("reason %q", got.GetReason())
	}
	for _, p := range got.GetParticipants() {
		if p.GetEnvoy() == "a" && (p.GetState() != fxv1.ParticipantState_DROPPED || p.GetReason() != "round 1: out of memory") {
			t.Errorf("participant a: %v %q", p.GetState(), p.GetReason())
		}
	}
	<-agg.stopped
}

func TestAggregatorFailure(t *testing.T) {
	tests := []struct {
		name   string
		launch error
		run    error
		want   string
	}{
		{"round fails", nil, errors.New("round 1 failed: no reports before the deadline"), "round 1 failed"},
		{"launch fails", errors.New("no initial model"), nil, "cannot start the aggregator: no initial model"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFed(t, nil)
			if tt.launch != nil {
				f.launcher.launchFn = func(LaunchSpec) error { return tt.launch }
			}
			f.register("a", "fashion")
			f.register("b", "fashion")
			e := f.submitPlan("alice", planTwo)
			f.waitState(e.Id, fxv1.ExperimentState_OFFERED)
			for _, n := range []string{"a", "b"} {
				_, err := f.answer(n, e.Id, true)
				must(t, err)
			}
			if tt.run != nil {
				f.launcher.agg(t, e.Id, 1).result <- tt.run
			}
			got := f.waitState(e.Id, fxv1.ExperimentState_FAILED)
			if !strings.Contains(got.GetReason(), tt.want) {
				t.Errorf("reason %q, want it to contain %q", got.GetReason(), tt.want)
			}
		})
	}
}

func TestMaxConcurrent(t *testing.T) {
	f := newFed(t, func(c *Config) { c.MaxConcurrent = 1 })
	e1, agg := f.running("alice")
	plan2 := strings.Replace(planTwo, "name: fashion", "name: second", 1)
	e2 := f.submitPlan("alice", plan2)
	if e2.GetState() != fxv1.ExperimentState_QUEUED {
		t.Fatalf("second experiment: %v, want QUEUED while the first runs", e2.GetState())
	}
	agg.result <- nil
	f.waitState(e1.Id, fxv1.ExperimentState_FINISHED)
	f.waitState(e2.Id, fxv1.ExperimentState_OFFERED)
}

func TestAssignmentReplay(t *testing.T) {
	f := newFed(t, nil)
	f.register("a", "fashion")
	f.register("b", "fashion")
	e := f.submitPlan("alice", planTwo)
	f.waitState(e.Id, fxv1.ExperimentState_OFFERED)

	// A stream opened after the offer replays it; so does a reconnect.
	w := f.watch("a")
	w.next(t, e.Id, "offer")
	w.cancel()
	w = f.watch("a")
	w.next(t, e.Id, "offer")
	_, err := f.answer("a", e.Id, true)
	must(t, err)
	w.cancel()
	w = f.watch("a")
	w.next(t, e.Id, "offer") // accepted but not started: the offer is still open
	_, err = f.answer("b", e.Id, true)
	must(t, err)
	w.next(t, e.Id, "start")
	agg := f.launcher.agg(t, e.Id, 1)
	agg.completeRound(t)
	w.cancel()
	w = f.watch("a")
	if s := w.next(t, e.Id, "start").GetStart(); s.GetRound() != 2 {
		t.Errorf("replayed start round %d, want 2", s.GetRound())
	}

	// The experiment ends while a's stream is down; a's next heartbeat,
	// still listing it, brings a Stop on the new stream.
	w.cancel()
	agg.result <- nil
	f.waitState(e.Id, fxv1.ExperimentState_FINISHED)
	w = f.watch("a")
	must(t, f.heartbeat("a", e.Id, "unknown-experiment"))
	if s := w.next(t, e.Id, "stop").GetStop(); s.GetState() != fxv1.ExperimentState_FINISHED {
		t.Errorf("stop %v", s)
	}
	if s := w.next(t, "unknown-experiment", "stop").GetStop(); s.GetState() != fxv1.ExperimentState_EXPERIMENT_STATE_UNSPECIFIED {
		t.Errorf("stop of an unknown experiment %v", s)
	}
	// A reconnect replays stops for what the envoy last said it runs.
	w.cancel()
	w = f.watch("a")
	w.next(t, e.Id, "stop")
}

func TestOfferSelection(t *testing.T) {
	f := newFed(t, nil)
	f.register("a", "fashion")
	f.register("b", "fashion")
	f.register("named", "other")
	f.clock.Advance(20e9) // everyone offline
	must(t, f.heartbeat("a"))

	// By tags: only online envoys; b is invited when it comes back.
	e := f.submitPlan("alice", planTwo)
	got := f.waitState(e.Id, fxv1.ExperimentState_OFFERED)
	if n := len(got.GetParticipants()); n != 1 {
		t.Fatalf("participants %v, want a only", got.GetParticipants())
	}
	must(t, f.heartbeat("b"))
	if n := len(f.get("", e.Id).GetParticipants()); n != 2 {
		t.Errorf("after b came back: %d participants, want 2", n)
	}
	// A new envoy that matches is invited as it registers.
	f.register("late", "fashion")
	if n := len(f.get("", e.Id).GetParticipants()); n != 3 {
		t.Errorf("after a matching envoy registered: %d participants, want 3", n)
	}

	// By name: offline envoys are invited too; tags still apply.
	named := `name: named
rounds: 1
participants: {min: 1, envoys: [named, a]}
runner: {kind: builtin, model: softmax}
`
	e2 := f.submitPlan("alice", named)
	got = f.waitState(e2.Id, fxv1.ExperimentState_OFFERED)
	var names []string
	for _, p := range got.GetParticipants() {
		names = append(names, p.GetEnvoy())
	}
	if strings.Join(names, ",") != "a,named" {
		t.Errorf("named participants %v", names)
	}
}
