package director

import (
	"context"
	"errors"
	"os"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/mock/gomock"
	"google.golang.org/grpc/codes"

	"github.com/fx-fl/fx/aggregator"
	"github.com/fx-fl/fx/director/store"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// These tests check interactions that a real store or aggregator would
// hide: what the director does when a write is refused, and how it drives
// its launcher and aggregators. The store and launcher are mocks generated
// by mockgen (mock_store_test.go, mock_launcher_test.go; see the
// go:generate lines in config.go and launcher.go); everything else is the
// real director on loopback with real certificates.

// refusingStore is a mock store that passes every call to a memory store
// until refuse is set; from then on every write fails as a full disk
// would, and reads still work.
func refusingStore(t *testing.T, ctrl *gomock.Controller) (*MockStore, *atomic.Bool) {
	mem := store.NewMem()
	var refuse atomic.Bool
	s := NewMockStore(ctrl)
	write := func(real func(func(store.Tx) error) error) func(func(store.Tx) error) error {
		return func(fn func(store.Tx) error) error {
			if refuse.Load() {
				return errDiskFull
			}
			return real(fn)
		}
	}
	s.EXPECT().View(gomock.Any()).DoAndReturn(mem.View).AnyTimes()
	s.EXPECT().Update(gomock.Any()).DoAndReturn(write(mem.Update)).AnyTimes()
	s.EXPECT().Batch(gomock.Any()).DoAndReturn(write(mem.Batch)).AnyTimes()
	s.EXPECT().Close().DoAndReturn(mem.Close).AnyTimes()
	return s, &refuse
}

var errDiskFull = errors.New("write store.db: no space left on device")

// idleLauncher is a mock launcher that must not be asked to launch: no
// test here gets an experiment to run.
func idleLauncher(ctrl *gomock.Controller) *MockLauncher {
	l := NewMockLauncher(ctrl)
	l.EXPECT().History(gomock.Any()).Return(nil, nil, nil).AnyTimes()
	return l
}

// TestAWriteTheStoreRefusesChangesNothing: whatever the director was asked
// to do, if the store refuses the write the caller gets an error that says
// the store failed, and the director's answers afterwards are those of
// before: memory never holds a state the store does not, and an
// experiment whose approval was not stored is not scheduled.
func TestAWriteTheStoreRefusesChangesNothing(t *testing.T) {
	ref := func(id string) *fxv1.ExperimentRef { return &fxv1.ExperimentRef{Id: id} }
	for _, tc := range []struct {
		name string
		// setup runs before the store refuses; it returns the id of the
		// experiment the step acts on, if any.
		setup func(f *fed) string
		step  func(f *fed, id string) error
		// check says what the director must answer afterwards.
		check func(t *testing.T, f *fed, id string)
	}{
		{
			name:  "submit",
			setup: func(*fed) string { return "" },
			step: func(f *fed, _ string) error {
				_, err := submit(ctxT(f.t), f.researcher("alice"), upload{plan: planTwo, data: archive(f.t, planTwo, nil)})
				return err
			},
			check: func(t *testing.T, f *fed, _ string) {
				list, err := f.admin().ListExperiments(ctxT(t), &fxv1.ListExperimentsRequest{})
				must(t, err)
				if n := len(list.GetExperiments()); n != 0 {
					t.Errorf("%d experiments listed after a submission that was not stored", n)
				}
				if left := dirEntries(t, f.d.experimentDir("")); len(left) != 0 {
					t.Errorf("files left of a submission that was not stored: %v", left)
				}
			},
		},
		{
			name:  "register an envoy",
			setup: func(*fed) string { return "" },
			step: func(f *fed, _ string) error {
				_, err := f.envoy("site-1").RegisterEnvoy(ctxT(f.t), &fxv1.RegisterEnvoyRequest{EnvoyName: "site-1",
					Shard: &fxv1.DatasetShard{Tags: []string{"fashion"}, SampleShape: []int64{4}, TrainSamples: 10}})
				return err
			},
			check: func(t *testing.T, f *fed, _ string) {
				list, err := f.admin().ListEnvoys(ctxT(t), &fxv1.ListEnvoysRequest{})
				must(t, err)
				if n := len(list.GetEnvoys()); n != 0 {
					t.Errorf("%d envoys listed after a registration that was not stored", n)
				}
			},
		},
		{
			name:  "approve",
			setup: func(f *fed) string { return f.submitPlan("alice", planTwo).GetId() },
			step: func(f *fed, id string) error {
				_, err := f.admin().ApproveExperiment(ctxT(f.t), &fxv1.ReviewExperimentRequest{Experiment: ref(id)})
				return err
			},
			check: func(t *testing.T, f *fed, id string) {
				if got := f.get("", id).GetState(); got != fxv1.ExperimentState_PENDING {
					t.Errorf("experiment %s after an approval that was not stored, want PENDING", got)
				}
			},
		},
		{
			name:  "cancel",
			setup: func(f *fed) string { return f.submitPlan("alice", planTwo).GetId() },
			step: func(f *fed, id string) error {
				_, err := f.researcher("alice").CancelExperiment(ctxT(f.t), &fxv1.CancelExperimentRequest{Experiment: ref(id)})
				return err
			},
			check: func(t *testing.T, f *fed, id string) {
				if got := f.get("", id).GetState(); got != fxv1.ExperimentState_PENDING {
					t.Errorf("experiment %s after a cancellation that was not stored, want PENDING", got)
				}
			},
		},
		{
			name: "remove",
			setup: func(f *fed) string {
				id := f.submitPlan("alice", planTwo).GetId()
				_, err := f.researcher("alice").CancelExperiment(ctxT(f.t), &fxv1.CancelExperimentRequest{Experiment: ref(id)})
				must(f.t, err)
				return id
			},
			step: func(f *fed, id string) error {
				_, err := f.researcher("alice").RemoveExperiment(ctxT(f.t), &fxv1.RemoveExperimentRequest{Experiment: ref(id)})
				return err
			},
			check: func(t *testing.T, f *fed, id string) {
				if got := f.get("", id).GetState(); got != fxv1.ExperimentState_CANCELLED {
					t.Errorf("experiment %s after a removal that was not stored, want it CANCELLED and listed", got)
				}
				if _, err := os.Stat(f.d.experimentDir(id)); err != nil {
					t.Errorf("the files of an experiment whose removal was not stored are gone: %v", err)
				}
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctrl := gomock.NewController(t)
			st, refuse := refusingStore(t, ctrl)
			f := newFed(t, func(c *Config) {
				c.Store, c.Launcher, c.ReviewPolicy = st, idleLauncher(ctrl), ReviewManual
			})
			id := tc.setup(f)
			refuse.Store(true)
			err := tc.step(f, id)
			if code(err) != codes.Internal && code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "no space left on device") {
				t.Fatalf("%s with the store refusing: %v, want an error that quotes the store's", tc.name, err)
			}
			tc.check(t, f, id)
			// The director works on once the store does.
			refuse.Store(false)
			if err := tc.step(f, id); err != nil {
				t.Fatalf("%s once the store takes writes again: %v", tc.name, err)
			}
		})
	}
}

// TestTheLauncherStartsOneAggregatorAndTheDirectorDropsAFailedParticipant:
// once enough envoys accept, the director launches exactly one aggregator
// with the experiment's participants and directory, starts the envoys with
// its address, and passes an envoy's reported failure to it as a Drop of
// that participant alone; when Run returns nil the experiment is FINISHED.
func TestTheLauncherStartsOneAggregatorAndTheDirectorDropsAFailedParticipant(t *testing.T) {
	ctrl := gomock.NewController(t)
	launcher := NewMockLauncher(ctrl)
	agg := NewMockAggregator(ctrl)
	f := newFed(t, func(c *Config) { c.Launcher = launcher })
	for _, n := range []string{"a", "b", "c"} {
		f.register(n, "fashion")
	}
	e := f.submitPlan("alice", `name: trio
rounds: 3
participants: {min: 2, max: 3, tags: [fashion]}
runner: {kind: builtin, model: mlp}
`)
	f.waitState(e.Id, fxv1.ExperimentState_OFFERED)

	finish := make(chan struct{})
	dropped := make(chan string, 1)
	launcher.EXPECT().History(gomock.Any()).Return([]aggregator.RoundSummary(nil), nil, nil).AnyTimes()
	launcher.EXPECT().Launch(gomock.Cond(func(spec LaunchSpec) bool {
		return spec.ExperimentID == e.Id && slices.Equal(spec.Participants, []string{"a", "b", "c"}) &&
			spec.Dir != "" && strings.HasPrefix(spec.Dir, f.d.experimentDir(e.Id)) && spec.Serving != nil
	})).DoAndReturn(func(spec LaunchSpec) (Aggregator, error) {
		agg.EXPECT().Run(gomock.Any()).DoAndReturn(func(ctx context.Context) error {
			spec.Serving()
			select {
			case <-finish:
				return nil
			case <-ctx.Done():
				return ctx.Err()
			}
		})
		return agg, nil
	}).Times(1)
	agg.EXPECT().Drop("c", gomock.Any()).Do(func(_, reason string) { dropped <- reason }).Times(1)

	watchers := map[string]*watcher{}
	for _, n := range []string{"a", "b", "c"} {
		watchers[n] = f.watch(n)
		_, err := f.answer(n, e.Id, true)
		must(t, err)
	}
	f.waitState(e.Id, fxv1.ExperimentState_RUNNING)
	for n, w := range watchers {
		if addr := w.next(t, e.Id, "start").GetStart().GetAggregatorAddress(); addr == "" {
			t.Errorf("envoy %s was started without the aggregator's address", n)
		}
	}
	_, err := f.envoy("c").ReportFailure(ctxT(t), &fxv1.ReportFailureRequest{ExperimentId: e.Id, EnvoyName: "c", Round: 1, Reason: "disk full"})
	must(t, err)
	select {
	case reason := <-dropped:
		if !strings.Contains(reason, "disk full") {
			t.Errorf("dropped with reason %q, want the envoy's", reason)
		}
	case <-time.After(waitTimeout):
		t.Fatal("the aggregator was not told to drop the envoy that failed")
	}
	if got := f.get("", e.Id).GetState(); got != fxv1.ExperimentState_RUNNING {
		t.Errorf("experiment %s after one of three participants failed, want RUNNING", got)
	}
	close(finish)
	f.waitState(e.Id, fxv1.ExperimentState_FINISHED)
}
