package director

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/fx-fl/fx/director/store"
	"github.com/fx-fl/fx/pki"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

func TestRegistration(t *testing.T) {
	f := newFed(t, nil)
	ctx := ctxT(t)

	// Heartbeat before registering: the envoy is told to register.
	if err := f.heartbeat("site-1"); code(err) != codes.FailedPrecondition {
		t.Fatalf("heartbeat before register: %v, want FailedPrecondition", err)
	}
	resp, err := f.envoy("site-1").RegisterEnvoy(ctx, &fxv1.RegisterEnvoyRequest{
		EnvoyName: "site-1", MaxExperiments: 2, Version: "v1",
		Shard: &fxv1.DatasetShard{Tags: []string{"fashion", "train"}, SampleShape: []int64{28, 28}, TrainSamples: 60, Classes: 10},
	})
	if err != nil {
		t.Fatal(err)
	}
	if resp.GetHeartbeatPeriod().AsDuration() != 5*time.Second || resp.GetOfflineAfter().AsDuration() != 15*time.Second {
		t.Errorf("RegisterEnvoy = %v", resp)
	}
	f.register("site-2", "cifar")

	online := func(name string) bool {
		envs, err := f.admin().ListEnvoys(ctx, &fxv1.ListEnvoysRequest{})
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range envs.GetEnvoys() {
			if e.GetName() == name {
				return e.GetOnline()
			}
		}
		t.Fatalf("envoy %s not listed", name)
		return false
	}
	if !online("site-1") || !online("site-2") {
		t.Fatal("registered envoys are not online")
	}

	// Heartbeats keep site-1 online; site-2 goes quiet past the grace period.
	f.clock.Advance(10 * time.Second)
	must(t, f.heartbeat("site-1"))
	f.clock.Advance(10 * time.Second)
	if !online("site-1") || online("site-2") {
		t.Fatalf("after 20s: site-1 online=%v (want true), site-2 online=%v (want false)", online("site-1"), online("site-2"))
	}
	onlineOnly, err := f.researcher("alice").ListEnvoys(ctx, &fxv1.ListEnvoysRequest{OnlineOnly: true})
	must(t, err)
	if n := len(onlineOnly.GetEnvoys()); n != 1 {
		t.Errorf("online envoys: %d, want 1", n)
	}
	// site-2 comes back.
	must(t, f.heartbeat("site-2"))
	if !online("site-2") {
		t.Error("site-2 is not online after heartbeating again")
	}
	tagged, err := f.researcher("alice").ListEnvoys(ctx, &fxv1.ListEnvoysRequest{Tags: []string{"fashion"}})
	must(t, err)
	if len(tagged.GetEnvoys()) != 1 || tagged.GetEnvoys()[0].GetName() != "site-1" || tagged.GetEnvoys()[0].GetMaxExperiments() != 2 {
		t.Errorf("ListEnvoys(tags=fashion) = %v", tagged.GetEnvoys())
	}
}

func TestRegisterErrors(t *testing.T) {
	f := newFed(t, nil)
	good := func() *fxv1.DatasetShard {
		return &fxv1.DatasetShard{SampleShape: []int64{4}, TrainSamples: 1}
	}
	tests := []struct {
		name string
		req  *fxv1.RegisterEnvoyRequest
		want codes.Code
	}{
		{"another envoy's name", &fxv1.RegisterEnvoyRequest{EnvoyName: "other", Shard: good()}, codes.PermissionDenied},
		{"no shard", &fxv1.RegisterEnvoyRequest{EnvoyName: "e1"}, codes.InvalidArgument},
		{"no sample shape", &fxv1.RegisterEnvoyRequest{EnvoyName: "e1", Shard: &fxv1.DatasetShard{TrainSamples: 1}}, codes.InvalidArgument},
		{"negative dimension", &fxv1.RegisterEnvoyRequest{EnvoyName: "e1", Shard: &fxv1.DatasetShard{SampleShape: []int64{-1}, TrainSamples: 1}}, codes.InvalidArgument},
		{"no samples", &fxv1.RegisterEnvoyRequest{EnvoyName: "e1", Shard: &fxv1.DatasetShard{SampleShape: []int64{4}}}, codes.InvalidArgument},
		{"ok", &fxv1.RegisterEnvoyRequest{EnvoyName: "e1", Shard: good()}, codes.OK},
		{"ok again (idempotent)", &fxv1.RegisterEnvoyRequest{EnvoyName: "e1", Shard: good()}, codes.OK},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := f.envoy("e1").RegisterEnvoy(ctxT(t), tt.req)
			if code(err) != tt.want {
				t.Fatalf("RegisterEnvoy = %v, want %v", err, tt.want)
			}
		})
	}
	if _, err := f.envoy("e1").Heartbeat(ctxT(t), &fxv1.HeartbeatRequest{EnvoyName: "e2"}); code(err) != codes.PermissionDenied {
		t.Errorf("heartbeat naming another envoy: %v", err)
	}
}

func TestSearchDatasets(t *testing.T) {
	f := newFed(t, nil)
	ctx := ctxT(t)
	reg := func(name string, tags []string, sample, target []int64) {
		_, err := f.envoy(name).RegisterEnvoy(ctx, &fxv1.RegisterEnvoyRequest{EnvoyName: name,
			Shard: &fxv1.DatasetShard{Tags: tags, SampleShape: sample, TargetShape: target, TrainSamples: 5}})
		must(t, err)
	}
	reg("a", []string{"mnist", "hospital"}, []int64{28, 28}, nil)
	reg("b", []string{"mnist"}, []int64{28, 28}, []int64{1})
	reg("c", []string{"cifar"}, []int64{32, 32, 3}, nil)
	f.clock.Advance(20 * time.Second) // all offline
	must(t, f.heartbeat("a"))
	must(t, f.heartbeat("c"))

	tests := []struct {
		name string
		req  *fxv1.SearchDatasetsRequest
		want []string
		code codes.Code
	}{
		{"all online", &fxv1.SearchDatasetsRequest{}, []string{"a", "c"}, codes.OK},
		{"with offline", &fxv1.SearchDatasetsRequest{IncludeOffline: true}, []string{"a", "b", "c"}, codes.OK},
		{"tag", &fxv1.SearchDatasetsRequest{Tags: []string{"mnist"}, IncludeOffline: true}, []string{"a", "b"}, codes.OK},
		{"two tags", &fxv1.SearchDatasetsRequest{Tags: []string{"mnist", "hospital"}, IncludeOffline: true}, []string{"a"}, codes.OK},
		{"sample shape", &fxv1.SearchDatasetsRequest{SampleShape: []int64{32, 32, 3}}, []string{"c"}, codes.OK},
		{"target shape", &fxv1.SearchDatasetsRequest{TargetShape: []int64{1}, IncludeOffline: true}, []string{"b"}, codes.OK},
		{"no match", &fxv1.SearchDatasetsRequest{Tags: []string{"x"}}, nil, codes.OK},
		{"negative", &fxv1.SearchDatasetsRequest{SampleShape: []int64{-2}}, nil, codes.InvalidArgument},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp, err := f.researcher("r").SearchDatasets(ctx, tt.req)
			if code(err) != tt.code {
				t.Fatalf("SearchDatasets = %v, want %v", err, tt.code)
			}
			var got []string
			for _, m := range resp.GetMatches() {
				got = append(got, m.GetEnvoy())
			}
			if len(got) != len(tt.want) {
				t.Fatalf("matches %v, want %v", got, tt.want)
			}
			for i := range got {
				if got[i] != tt.want[i] {
					t.Fatalf("matches %v, want %v", got, tt.want)
				}
			}
		})
	}
}

// countingStore counts the writes a director asks the store for.
type countingStore struct {
	store.Store
	mu      sync.Mutex
	updates int
}

func (c *countingStore) Update(fn func(store.Tx) error) error {
	c.mu.Lock()
	c.updates++
	c.mu.Unlock()
	return c.Store.Update(fn)
}

func (c *countingStore) Batch(fn func(store.Tx) error) error {
	c.mu.Lock()
	c.updates++
	c.mu.Unlock()
	return c.Store.Batch(fn)
}

func (c *countingStore) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.updates
}

// A re-registration that changes nothing commits nothing, a changed one
// does, and a caller that gave up changes nothing.
func TestReRegistrationWritesOnlyChanges(t *testing.T) {
	counting := &countingStore{Store: store.NewMem()}
	f := newFed(t, func(c *Config) { c.Store = counting })
	req := func(version string) *fxv1.RegisterEnvoyRequest {
		return &fxv1.RegisterEnvoyRequest{EnvoyName: "site-1", MaxExperiments: 1, Version: version,
			Shard: &fxv1.DatasetShard{Tags: []string{"a", "b"}, SampleShape: []int64{4}, TrainSamples: 10}}
	}
	before := counting.count()
	must(t, f.d.registerEnvoy(t.Context(), req("v1")))
	if got := counting.count() - before; got != 1 {
		t.Fatalf("first registration: %d commits, want 1", got)
	}
	for range 3 {
		must(t, f.d.registerEnvoy(t.Context(), req("v1")))
	}
	if got := counting.count() - before; got != 1 {
		t.Fatalf("identical re-registrations committed %d times in all, want 1", got)
	}
	must(t, f.d.registerEnvoy(t.Context(), req("v2")))
	if got := counting.count() - before; got != 2 {
		t.Fatalf("a changed registration: %d commits in all, want 2", got)
	}
	done, cancel := context.WithCancel(t.Context())
	cancel()
	if err := f.d.registerEnvoy(done, req("v3")); !errors.Is(err, context.Canceled) {
		t.Fatalf("abandoned registration: %v, want context.Canceled", err)
	}
	if got := counting.count() - before; got != 2 {
		t.Fatalf("an abandoned registration was committed (%d commits)", got)
	}
}

// stallingStore, once armed, holds every write until released, as a slow
// disk would.
type stallingStore struct {
	store.Store
	armed   atomic.Bool
	entered chan struct{}
	release chan struct{}
}

func (s *stallingStore) stall() {
	if s.armed.Load() {
		s.entered <- struct{}{}
		<-s.release
	}
}

func (s *stallingStore) Update(fn func(store.Tx) error) error {
	s.stall()
	return s.Store.Update(fn)
}

func (s *stallingStore) Batch(fn func(store.Tx) error) error {
	s.stall()
	return s.Store.Batch(fn)
}

// TestRegistrationCommitsDoNotHoldUpTheDirector: while a new envoy's
// record is being committed, other envoys' heartbeats and researchers'
// listings are answered; the new envoy appears once its commit is done.
func TestRegistrationCommitsDoNotHoldUpTheDirector(t *testing.T) {
	stalling := &stallingStore{Store: store.NewMem(), entered: make(chan struct{}), release: make(chan struct{})}
	f := newFed(t, func(c *Config) { c.Store = stalling })
	req := func(name string) *fxv1.RegisterEnvoyRequest {
		return &fxv1.RegisterEnvoyRequest{EnvoyName: name, Shard: &fxv1.DatasetShard{SampleShape: []int64{4}, TrainSamples: 10}}
	}
	must(t, f.d.registerEnvoy(t.Context(), req("old")))
	stalling.armed.Store(true)

	registered := make(chan error, 1)
	go func() { registered <- f.d.registerEnvoy(t.Context(), req("new")) }()
	<-stalling.entered // the new envoy's commit is under way, and stalled
	answered := make(chan error, 1)
	go func() {
		err := f.d.heartbeat(&fxv1.HeartbeatRequest{EnvoyName: "old"})
		if err == nil {
			var list *fxv1.ListEnvoysResponse
			list, err = f.d.listEnvoys(&fxv1.ListEnvoysRequest{}, pki.Identity{Role: pki.RoleAdmin})
			if err == nil && len(list.GetEnvoys()) != 1 {
				err = errors.New("the envoy whose record is not committed yet is listed")
			}
		}
		answered <- err
	}()
	var err error
	timedOut := false
	select {
	case err = <-answered:
	case <-time.After(10 * time.Second):
		timedOut = true
	}
	close(stalling.release) // and the director can stop even if this failed
	stalling.armed.Store(false)
	must(t, <-registered)
	if timedOut {
		t.Fatal("a heartbeat waited for another envoy's registration to commit")
	}
	must(t, err)
	list, err := f.d.listEnvoys(&fxv1.ListEnvoysRequest{}, pki.Identity{Role: pki.RoleAdmin})
	must(t, err)
	if n := len(list.GetEnvoys()); n != 2 {
		t.Fatalf("%d envoys listed after the commit, want 2", n)
	}
}

// lateReturningStore commits each Batch at once but returns later the
// earlier it was called, so that, unordered, the first registration to
// commit would be the last applied in memory.
type lateReturningStore struct {
	store.Store
	calls atomic.Int32
}

func (s *lateReturningStore) Batch(fn func(store.Tx) error) error {
	err := s.Store.Batch(fn)
	n := s.calls.Add(1)
	time.Sleep(time.Duration(max(0, 32-n)) * 2 * time.Millisecond)
	return err
}

// TestConcurrentRegistrationsOfOneEnvoyAgreeWithTheStore: whichever of
// many concurrent registrations of one envoy lands last, memory and the
// store hold the same one.
func TestConcurrentRegistrationsOfOneEnvoyAgreeWithTheStore(t *testing.T) {
	mem := store.NewMem()
	f := newFed(t, func(c *Config) { c.Store = &lateReturningStore{Store: mem} })
	var wg sync.WaitGroup
	for i := range 32 {
		wg.Go(func() {
			must(t, f.d.registerEnvoy(t.Context(), &fxv1.RegisterEnvoyRequest{EnvoyName: "site-1", Version: fmt.Sprintf("v%d", i),
				Shard: &fxv1.DatasetShard{SampleShape: []int64{4}, TrainSamples: 10}}))
		})
	}
	wg.Wait()
	var stored *store.Envoy
	must(t, mem.View(func(tx store.Tx) error {
		var err error
		stored, err = tx.Envoy("site-1")
		return err
	}))
	f.d.mu.Lock()
	inMemory := f.d.envoys["site-1"].rec.Version
	f.d.mu.Unlock()
	if stored.Version != inMemory {
		t.Fatalf("the store holds version %s, the director's memory %s", stored.Version, inMemory)
	}
}

// An envoy hears about an experiment only if it was offered it: naming any
// other id in a heartbeat, or in AnswerOffer, ReportFailure and
// DownloadArchive, gets exactly what an id the director does not know gets,
// so neither a state, a reason nor an id's existence leaks.
func TestEnvoysCannotProbeOtherExperiments(t *testing.T) {
	f := newFed(t, nil)
	ctx := ctxT(t)
	ended, _ := f.running("alice")
	_, err := f.researcher("alice").CancelExperiment(ctx, &fxv1.CancelExperimentRequest{Experiment: &fxv1.ExperimentRef{Id: ended.Id}, Reason: "secret reason"})
	must(t, err)
	f.waitState(ended.Id, fxv1.ExperimentState_CANCELLED)
	live := f.submitPlan("alice", strings.Replace(planTwo, "name: fashion", "name: live", 1)) // offered to a and b
	f.waitState(live.Id, fxv1.ExperimentState_OFFERED)
	f.register("outsider", "other")
	const unknown = "exp-unknown"

	// same reports whether two answers differ only in the id they echo.
	same := func(what string, answers map[string]string) {
		t.Helper()
		var first string
		for id, a := range answers {
			a = strings.ReplaceAll(a, id, "ID")
			if first == "" {
				first = a
			} else if a != first {
				t.Errorf("%s: an envoy can tell experiments apart: %q vs %q", what, first, a)
			}
			if strings.Contains(a, "secret") {
				t.Errorf("%s: another experiment's reason leaked: %q", what, a)
			}
		}
	}

	w := f.watch("outsider")
	must(t, f.heartbeat("outsider", ended.Id, live.Id, unknown))
	stops := map[string]string{}
	for _, id := range []string{ended.Id, live.Id, unknown} {
		s := w.next(t, id, "stop").GetStop()
		stops[id] = s.GetState().String() + ": " + s.GetReason()
	}
	same("heartbeat", stops)
	if s := stops[unknown]; !strings.HasPrefix(s, fxv1.ExperimentState_EXPERIMENT_STATE_UNSPECIFIED.String()) {
		t.Errorf("stop for an unknown id: %s", s)
	}

	for rpc, call := range map[string]func(id string) error{
		"AnswerOffer": func(id string) error {
			_, err := f.envoy("outsider").AnswerOffer(ctx, &fxv1.AnswerOfferRequest{ExperimentId: id, EnvoyName: "outsider", Accept: true})
			return err
		},
		"ReportFailure": func(id string) error {
			_, err := f.envoy("outsider").ReportFailure(ctx, &fxv1.ReportFailureRequest{ExperimentId: id, EnvoyName: "outsider", Reason: "x"})
			return err
		},
		"DownloadArchive": func(id string) error {
			stream, err := f.envoy("outsider").DownloadArchive(ctx, &fxv1.DownloadArchiveRequest{ExperimentId: id})
			if err == nil {
				_, err = stream.Recv()
			}
			return err
		},
	} {
		answers := map[string]string{}
		for _, id := range []string{ended.Id, live.Id, unknown} {
			err := call(id)
			answers[id] = status.Convert(err).Code().String() + ": " + status.Convert(err).Message()
		}
		same(rpc, answers)
	}

	// A participant still hears how its experiment ended.
	wa := f.watch("a")
	must(t, f.heartbeat("a", ended.Id))
	if s := wa.next(t, ended.Id, "stop").GetStop(); s.GetState() != fxv1.ExperimentState_CANCELLED || s.GetReason() != "secret reason" {
		t.Errorf("stop for a participant: %v, want CANCELLED with its reason", s)
	}
}

// Researchers choose sites by tags, shapes and counts; where a site keeps
// its data (the shard's description names its files) is for admins only,
// and so are other researchers' experiments among an envoy's.
func TestResearchersSeeNoDataPaths(t *testing.T) {
	f := newFed(t, nil)
	ctx := ctxT(t)
	e, _ := f.running("bob") // a and b take part in bob's experiment
	shard := &fxv1.DatasetShard{Description: "IDX images from /srv/hospital/scans", Tags: []string{"fashion"},
		SampleShape: []int64{28, 28}, TrainSamples: 100, ValidSamples: 10, Classes: 10}
	_, err := f.envoy("a").RegisterEnvoy(ctx, &fxv1.RegisterEnvoyRequest{EnvoyName: "a", Version: "test", Shard: shard})
	must(t, err)

	for _, tc := range []struct {
		who         string
		client      fxv1.DirectorClient
		description string
		experiments []string
	}{
		{"researcher", f.researcher("alice"), "", nil},
		{"owner", f.researcher("bob"), "", []string{e.Id}},
		{"admin", f.admin(), shard.Description, []string{e.Id}},
	} {
		list, err := tc.client.ListEnvoys(ctx, &fxv1.ListEnvoysRequest{})
		must(t, err)
		found, err := tc.client.SearchDatasets(ctx, &fxv1.SearchDatasetsRequest{Tags: []string{"fashion"}})
		must(t, err)
		var info *fxv1.EnvoyInfo
		for _, i := range list.GetEnvoys() {
			if i.GetName() == "a" {
				info = i
			}
		}
		var match *fxv1.DatasetMatch
		for _, m := range found.GetMatches() {
			if m.GetEnvoy() == "a" {
				match = m
			}
		}
		if info == nil || match == nil {
			t.Fatalf("%s: envoy a not listed (%v) or not found (%v)", tc.who, list, found)
		}
		for what, got := range map[string]*fxv1.DatasetShard{"ListEnvoys": info.GetShard(), "SearchDatasets": match.GetShard()} {
			want := proto.Clone(shard).(*fxv1.DatasetShard)
			want.Description = tc.description
			if !proto.Equal(got, want) {
				t.Errorf("%s's %s shows shard %v, want %v", tc.who, what, got, want)
			}
		}
		if !slices.Equal(info.GetExperiments(), tc.experiments) {
			t.Errorf("%s sees envoy a in experiments %v, want %v", tc.who, info.GetExperiments(), tc.experiments)
		}
	}
}
