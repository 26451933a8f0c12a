package director

import (
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// participantStates maps each participant of an experiment to its state.
func participantStates(e *fxv1.Experiment) map[string]fxv1.ParticipantState {
	out := map[string]fxv1.ParticipantState{}
	for _, p := range e.GetParticipants() {
		out[p.GetEnvoy()] = p.GetState()
	}
	return out
}

func participantReason(e *fxv1.Experiment, envoy string) string {
	for _, p := range e.GetParticipants() {
		if p.GetEnvoy() == envoy {
			return p.GetReason()
		}
	}
	return ""
}

// TestMoreThanMinTakePart: an experiment starts with every invited envoy
// that accepts, not with the first participants.min: it waits for the
// others to answer, up to participants.max acceptances or
// participants.gather_timeout after the min-th, and an envoy left out is
// told why.
func TestMoreThanMinTakePart(t *testing.T) {
	const (
		bare = "name: many\nrounds: 2\nparticipants: {min: 2, tags: [fashion]}\nrunner: {kind: builtin, model: softmax}\n"
		max2 = "name: many\nrounds: 2\nparticipants: {min: 2, max: 2, tags: [fashion]}\nrunner: {kind: builtin, model: softmax}\n"
		now  = "name: many\nrounds: 2\nparticipants: {min: 2, gather_timeout: 0s, tags: [fashion]}\nrunner: {kind: builtin, model: softmax}\n"
	)
	tests := []struct {
		name    string
		plan    string
		answers []string // envoy=accept|decline, in order
		advance time.Duration
		want    []string // the envoys that take part
		leftOut string   // what the envoy left out (c) is told
	}{
		{"every invited envoy answers", bare, []string{"a=accept", "b=accept", "c=accept"}, 0, []string{"a", "b", "c"}, ""},
		{"the last answer is a decline", bare, []string{"a=accept", "b=accept", "c=decline"}, 0, []string{"a", "b"}, ""},
		{"one does not answer within gather_timeout", bare, []string{"a=accept", "b=accept"}, time.Minute, []string{"a", "b"}, "participants.gather_timeout (1m)"},
		{"participants.max reached", max2, []string{"a=accept", "b=accept"}, 0, []string{"a", "b"}, "participants.max (2)"},
		{"gather_timeout 0 starts at min", now, []string{"a=accept", "b=accept"}, 0, []string{"a", "b"}, "started without this envoy"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := newFed(t, nil)
			for _, n := range []string{"a", "b", "c"} {
				f.register(n, "fashion")
			}
			wc := f.watch("c")
			e := f.submitPlan("alice", tc.plan)
			f.waitState(e.Id, fxv1.ExperimentState_OFFERED)
			for i, a := range tc.answers {
				envoy, verdict, _ := strings.Cut(a, "=")
				_, err := f.answer(envoy, e.Id, verdict == "accept")
				must(t, err)
				last := i == len(tc.answers)-1
				if got := f.get("", e.Id).GetState(); !last && got != fxv1.ExperimentState_OFFERED {
					t.Fatalf("after %s: %s, want the offer still open for the others", a, got)
				}
			}
			if tc.advance > 0 {
				if got := f.get("", e.Id).GetState(); got != fxv1.ExperimentState_OFFERED {
					t.Fatalf("before gather_timeout: %s, want the offer still open for c", got)
				}
				f.clock.Advance(tc.advance - time.Second)
				if got := f.get("", e.Id).GetState(); got != fxv1.ExperimentState_OFFERED {
					t.Fatalf("a second before gather_timeout: %s, want the offer still open for c", got)
				}
				f.clock.Advance(time.Second)
				// Still online after the minute that passed.
				must(t, f.heartbeat("a"))
				must(t, f.heartbeat("b"))
			}
			got := f.waitState(e.Id, fxv1.ExperimentState_RUNNING)
			agg := f.launcher.agg(t, e.Id, 1)
			if !slices.Equal(agg.spec.Participants, tc.want) {
				t.Errorf("the aggregator's participants are %v, want %v", agg.spec.Participants, tc.want)
			}
			for _, n := range tc.want {
				if s := participantStates(got)[n]; s != fxv1.ParticipantState_TRAINING {
					t.Errorf("%s is %s, want TRAINING", n, s)
				}
			}
			if tc.leftOut != "" {
				if r := participantReason(got, "c"); !strings.Contains(r, "started without this envoy") || !strings.Contains(r, tc.leftOut) {
					t.Errorf("c's reason %q, want it to say it was left out and why (%q)", r, tc.leftOut)
				}
				if s := wc.next(t, e.Id, "stop").GetStop(); !strings.Contains(s.GetReason(), tc.leftOut) {
					t.Errorf("stop for c: %q, want it to say why (%q)", s.GetReason(), tc.leftOut)
				}
			}
		})
	}
}

// TestFailedSiteIsDropped: with more participants than participants.min,
// a site whose collaborator fails is dropped with the round and reason it
// reported, the aggregator is told to stop waiting for it, and the
// experiment goes on and finishes without it, saying so in its record. A
// second failure leaves fewer than participants.min and fails it.
func TestFailedSiteIsDropped(t *testing.T) {
	for _, second := range []bool{false, true} {
		t.Run(map[bool]string{false: "one fails", true: "two fail"}[second], func(t *testing.T) { testFailedSite(t, second) })
	}
}

func testFailedSite(t *testing.T, second bool) {
	{
		f := newFed(t, nil)
		for _, n := range []string{"a", "b", "c"} {
			f.register(n, "fashion")
		}
		e := f.submitPlan("alice", "name: trio\nrounds: 3\nparticipants: {min: 2, tags: [fashion]}\nrunner: {kind: builtin, model: softmax}\n")
		f.waitState(e.Id, fxv1.ExperimentState_OFFERED)
		for _, n := range []string{"a", "b", "c"} {
			_, err := f.answer(n, e.Id, true)
			must(t, err)
		}
		f.waitState(e.Id, fxv1.ExperimentState_RUNNING)
		agg := f.launcher.agg(t, e.Id, 1)
		agg.completeRound(t)

		report := func(envoy string, round int32, reason string) {
			t.Helper()
			_, err := f.envoy(envoy).ReportFailure(ctxT(t), &fxv1.ReportFailureRequest{ExperimentId: e.Id, EnvoyName: envoy, Round: round, Reason: reason})
			must(t, err)
		}
		report("c", 2, "task train: the command was killed by signal 9 (killed)")
		got := f.get("", e.Id)
		if got.GetState() != fxv1.ExperimentState_RUNNING {
			t.Fatalf("after c failed: %s (%s), want RUNNING: a and b satisfy participants.min", got.GetState(), got.GetReason())
		}
		wantC := "round 2: task train: the command was killed by signal 9 (killed)"
		if s, r := participantStates(got)["c"], participantReason(got, "c"); s != fxv1.ParticipantState_DROPPED || r != wantC {
			t.Errorf("c: %s %q, want DROPPED %q", s, r, wantC)
		}
		eventually(t, "the aggregator told to drop c", func() bool {
			d := agg.dropped()
			return len(d) == 1 && strings.HasPrefix(d[0], "c: ")
		})

		if second {
			report("b", 2, "task train: out of memory")
			got := f.waitState(e.Id, fxv1.ExperimentState_FAILED)
			if want := "only 1 participant remains after envoy b failed (round 2: task train: out of memory); participants.min is 2"; got.GetReason() != want {
				t.Errorf("reason %q, want %q", got.GetReason(), want)
			}
			return
		}
		agg.completeRound(t)
		agg.completeRound(t)
		agg.result <- nil
		got = f.waitState(e.Id, fxv1.ExperimentState_FINISHED)
		want := map[string]fxv1.ParticipantState{"a": fxv1.ParticipantState_COMPLETED, "b": fxv1.ParticipantState_COMPLETED, "c": fxv1.ParticipantState_DROPPED}
		if s := participantStates(got); !maps.Equal(s, want) {
			t.Errorf("participants at the end: %v, want %v", s, want)
		}
		if r := got.GetReason(); !strings.Contains(r, "c ("+wantC+")") {
			t.Errorf("the finished experiment's reason %q does not say that c dropped out and why", r)
		}
	}
}
