package director

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	"github.com/fx-fl/fx/director/store"
	"github.com/fx-fl/fx/experiment"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// nearly4MiB is a string that fits in one gRPC message on its own, but
// not twice.
var nearly4MiB = strings.Repeat("x", 4<<20-8<<10)

// A ~4 MiB failure reason used to be kept whole, twice in the experiment's
// record (the participant's reason and the experiment's), so that
// ListExperiments failed for its owner and every admin, and the other
// participant lost its assignment stream on every reconnect. Now such a
// report is refused, naming the limit, and a reason at the limit leaves
// every listing and stream working.
func TestOversizedFailureReason(t *testing.T) {
	f := newFed(t, nil)
	e, _ := f.running("alice")
	ctx := ctxT(t)
	_, err := f.envoy("a").ReportFailure(ctx, &fxv1.ReportFailureRequest{ExperimentId: e.Id, EnvoyName: "a", Round: 1, Reason: nearly4MiB})
	if code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "reason: must be at most 4096 bytes") {
		t.Fatalf("a ~4 MiB reason: %v, want INVALID_ARGUMENT naming reason and its limit", err)
	}
	if got := f.get("", e.Id).GetState(); got != fxv1.ExperimentState_RUNNING {
		t.Fatalf("the refused report changed the experiment: %s", got)
	}

	longest := strings.Repeat("y", fxv1.MaxReasonBytes())
	if _, err := f.envoy("a").ReportFailure(ctx, &fxv1.ReportFailureRequest{ExperimentId: e.Id, EnvoyName: "a", Round: 1, Reason: longest}); err != nil {
		t.Fatalf("a reason at the limit: %v", err)
	}
	failed := f.waitState(e.Id, fxv1.ExperimentState_FAILED)
	checkReasons(t, failed)
	for _, c := range []fxv1.DirectorClient{f.researcher("alice"), f.admin()} {
		list, err := c.ListExperiments(ctx, &fxv1.ListExperimentsRequest{})
		if err != nil || len(list.GetExperiments()) != 1 {
			t.Fatalf("ListExperiments after the failure: %d experiments, %v", len(list.GetExperiments()), err)
		}
	}
	// The other participant, which still runs the experiment, reconnects:
	// the replay carries the stop.
	must(t, f.heartbeat("b", e.Id))
	stop := f.watch("b").next(t, e.Id, "stop").GetStop()
	if n := len(stop.GetReason()); n > fxv1.MaxReasonBytes() {
		t.Fatalf("the stop's reason is %d bytes", n)
	}
}

// checkReasons fails unless every reason in e fits the protocol's bound.
func checkReasons(t *testing.T, e *fxv1.Experiment) {
	t.Helper()
	if n := len(e.GetReason()); n > fxv1.MaxReasonBytes() || n == 0 {
		t.Errorf("the experiment's reason is %d bytes, want 1 to %d", n, fxv1.MaxReasonBytes())
	}
	for _, p := range e.GetParticipants() {
		if n := len(p.GetReason()); n > fxv1.MaxReasonBytes() {
			t.Errorf("participant %s's reason is %d bytes, want at most %d", p.GetEnvoy(), n, fxv1.MaxReasonBytes())
		}
	}
}

// Records stored before the limits (a ~4 MiB reason, twice; a ~4 MiB
// envoy description) are clipped when the director loads them, so they
// cannot break a listing either.
func TestOldOversizedRecordsLoadClipped(t *testing.T) {
	f := newFed(t, nil)
	f.stop()
	st, err := store.OpenBolt(filepath.Join(f.dataDir, "director.db"))
	must(t, err)
	now := time.Now()
	shard, err := proto.Marshal(&fxv1.DatasetShard{Description: nearly4MiB, SampleShape: []int64{4}, TrainSamples: 10})
	must(t, err)
	must(t, st.Update(func(tx store.Tx) error {
		rec := &store.Experiment{ID: "old1", Name: "old", Owner: "alice", State: fxv1.ExperimentState_FAILED, Reason: nearly4MiB,
			PlanYAML: planTwo, CreatedAt: now, UpdatedAt: now, Rounds: 2}
		if err := tx.PutExperiment(rec); err != nil {
			return err
		}
		if err := tx.PutParticipant("old1", &store.Participant{Envoy: "a", State: fxv1.ParticipantState_DROPPED, Reason: nearly4MiB, UpdatedAt: now}); err != nil {
			return err
		}
		return tx.PutEnvoy(&store.Envoy{Name: "a", Shard: shard, RegisteredAt: now})
	}))
	must(t, st.Close())
	f.restart()

	ctx := ctxT(t)
	for _, c := range []fxv1.DirectorClient{f.researcher("alice"), f.admin()} {
		list, err := c.ListExperiments(ctx, &fxv1.ListExperimentsRequest{})
		if err != nil || len(list.GetExperiments()) != 1 {
			t.Fatalf("ListExperiments of an old oversized record: %d experiments, %v", len(list.GetExperiments()), err)
		}
		checkReasons(t, list.GetExperiments()[0])
	}
	envoys, err := f.admin().ListEnvoys(ctx, &fxv1.ListEnvoysRequest{})
	if err != nil || len(envoys.GetEnvoys()) != 1 {
		t.Fatalf("ListEnvoys of an old oversized record: %v", err)
	}
	if n := len(envoys.GetEnvoys()[0].GetShard().GetDescription()); n > fxv1.MaxDescriptionBytes() {
		t.Fatalf("the old description is listed with %d bytes", n)
	}
}

// A ~4 MiB envoy description used to be registered whole and break
// ListEnvoys for everyone.
func TestOversizedEnvoyDescription(t *testing.T) {
	f := newFed(t, nil)
	f.register("a", "fashion")
	ctx := ctxT(t)
	_, err := f.envoy("b").RegisterEnvoy(ctx, &fxv1.RegisterEnvoyRequest{EnvoyName: "b",
		Shard: &fxv1.DatasetShard{Description: nearly4MiB, SampleShape: []int64{4}, TrainSamples: 10}})
	if code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "shard.description: must be at most 1024 bytes") {
		t.Fatalf("a ~4 MiB description: %v, want INVALID_ARGUMENT naming the field and its limit", err)
	}
	list, err := f.admin().ListEnvoys(ctx, &fxv1.ListEnvoysRequest{})
	if err != nil || len(list.GetEnvoys()) != 1 {
		t.Fatalf("ListEnvoys: %v", err)
	}
}

// Listings come in pages that a client walks with next_page_token: every
// item exactly once, in order, whatever the page size; and no page,
// however large the items, exceeds what one message may carry.
func TestListingsPaginate(t *testing.T) {
	f := newFed(t, nil)
	const envoys = 120
	var names []string
	for i := range envoys {
		name := fmt.Sprintf("site-%03d", i)
		names = append(names, name)
		// Straight to the director: a certificate and a connection per
		// envoy would only slow the test down.
		must(t, f.d.registerEnvoy(t.Context(), &fxv1.RegisterEnvoyRequest{EnvoyName: name,
			Shard: &fxv1.DatasetShard{Tags: []string{"fashion"}, SampleShape: []int64{4}, TrainSamples: 10}}))
	}
	for _, size := range []int32{0, 7, 1000} {
		var got []string
		pages := 0
		for token := ""; ; pages++ {
			resp, err := f.researcher("alice").ListEnvoys(ctxT(t), &fxv1.ListEnvoysRequest{PageSize: size, PageToken: token})
			must(t, err)
			if max := int(size); max > 0 && len(resp.GetEnvoys()) > max || max == 0 && len(resp.GetEnvoys()) > defaultPageSize {
				t.Fatalf("page of %d envoys for page_size %d", len(resp.GetEnvoys()), size)
			}
			for _, e := range resp.GetEnvoys() {
				got = append(got, e.GetName())
			}
			if token = resp.GetNextPageToken(); token == "" {
				break
			}
		}
		if !slices.Equal(got, names) {
			t.Fatalf("page_size %d: walked %d envoys in %d pages, want all %d in order", size, len(got), pages, envoys)
		}
		var matched []string
		for token := ""; ; {
			resp, err := f.researcher("alice").SearchDatasets(ctxT(t), &fxv1.SearchDatasetsRequest{Tags: []string{"fashion"}, PageSize: size, PageToken: token})
			must(t, err)
			for _, m := range resp.GetMatches() {
				matched = append(matched, m.GetEnvoy())
			}
			if token = resp.GetNextPageToken(); token == "" {
				break
			}
		}
		if !slices.Equal(matched, names) {
			t.Fatalf("SearchDatasets page_size %d: %d matches, want all %d in order", size, len(matched), envoys)
		}
	}

	// Seven experiments with plans of 700 KiB: 4.8 MiB in all, more than
	// one message; the pages stay under the limit.
	var ids []string
	for i := range 7 {
		plan := fmt.Sprintf("name: big-%d\nrounds: 1\nparticipants: {min: 1, tags: [nowhere]}\nrunner: {kind: builtin, model: mlp}\n# %s\n", i, strings.Repeat("p", 700<<10))
		e, err := submit(ctxT(t), f.researcher("alice"), upload{plan: plan, data: archive(t, plan, nil)})
		must(t, err)
		ids = append([]string{e.Id}, ids...) // newest first
	}
	for _, c := range []fxv1.DirectorClient{f.researcher("alice"), f.admin()} {
		var got []string
		pages := 0
		for token := ""; ; pages++ {
			resp, err := c.ListExperiments(ctxT(t), &fxv1.ListExperimentsRequest{PageToken: token})
			if err != nil {
				t.Fatalf("ListExperiments page %d: %v", pages, err)
			}
			if n := proto.Size(resp); n > maxPageBytes+1<<20 {
				t.Fatalf("a page of %d bytes", n)
			}
			for _, e := range resp.GetExperiments() {
				got = append(got, e.GetId())
			}
			if token = resp.GetNextPageToken(); token == "" {
				break
			}
		}
		if !slices.Equal(got, ids) || pages < 2 {
			t.Fatalf("walked %v in %d pages, want %v newest first over several pages", got, pages, ids)
		}
	}

	// A token is only good for the listing that handed it out.
	first, err := f.admin().ListEnvoys(ctxT(t), &fxv1.ListEnvoysRequest{PageSize: 1})
	must(t, err)
	for _, bad := range []string{first.GetNextPageToken(), "garbage"} {
		_, err := f.admin().ListExperiments(ctxT(t), &fxv1.ListExperimentsRequest{PageToken: bad})
		if code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "page_token") {
			t.Fatalf("ListExperiments with token %q: %v, want INVALID_ARGUMENT", bad, err)
		}
	}
}

// A researcher has at most MaxUploadsPerResearcher uploads in progress;
// another researcher is not held up by it, and once one upload ends the
// researcher may start another.
func TestUploadCapPerResearcher(t *testing.T) {
	f := newFed(t, func(c *Config) { c.MaxUploadsPerResearcher = 2 })
	ctx := ctxT(t)
	type open struct {
		plan string
		data []byte
		s    fxv1.Director_SubmitExperimentClient
	}
	start := func(name string) open {
		plan := strings.Replace(planTwo, "name: fashion", "name: "+name, 1)
		data := archive(t, plan, nil)
		s, err := f.researcher("alice").SubmitExperiment(ctx)
		must(t, err)
		err = s.Send(&fxv1.SubmitExperimentRequest{Part: &fxv1.SubmitExperimentRequest_Header{Header: &fxv1.SubmitHeader{
			Size: int64(len(data)), Sha256: sha(data), PlanYaml: plan}}})
		// io.EOF: the director has already ended the stream (refused
		// it); CloseAndRecv returns its status.
		if err != nil && !errors.Is(err, io.EOF) {
			t.Fatal(err)
		}
		return open{plan, data, s}
	}
	uploading := func(n int) {
		eventually(t, fmt.Sprintf("%d uploads of alice in progress", n), func() bool {
			f.d.mu.Lock()
			defer f.d.mu.Unlock()
			return f.d.uploads["alice"] == n
		})
	}
	first, second := start("one"), start("two")
	uploading(2)

	third := start("three")
	_, err := third.s.CloseAndRecv()
	if code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "max_uploads_per_researcher") {
		t.Fatalf("a third upload at once: %v, want RESOURCE_EXHAUSTED naming max_uploads_per_researcher", err)
	}
	if _, err := submit(ctx, f.researcher("bob"), upload{plan: planTwo, data: archive(t, planTwo, nil)}); err != nil {
		t.Fatalf("another researcher's upload: %v", err)
	}

	must(t, first.s.Send(&fxv1.SubmitExperimentRequest{Part: &fxv1.SubmitExperimentRequest_Chunk{Chunk: first.data}}))
	if _, err := first.s.CloseAndRecv(); err != nil {
		t.Fatalf("finishing the first upload: %v", err)
	}
	uploading(1)
	plan := strings.Replace(planTwo, "name: fashion", "name: three", 1)
	if _, err := submit(ctx, f.researcher("alice"), upload{plan: plan, data: archive(t, plan, nil)}); err != nil {
		t.Fatalf("an upload after one ended: %v", err)
	}
	must(t, second.s.CloseSend())
	_, _ = second.s.CloseAndRecv()
	uploading(0)
}

// Admins download any experiment's archive, to read its code before
// approving it; envoys only what they were offered; researchers nothing.
func TestAdminDownloadsArchive(t *testing.T) {
	f := newFed(t, func(c *Config) { c.ReviewPolicy = ReviewManual })
	ctx := ctxT(t)
	data := archive(t, planTwo, map[string]string{"train.py": "print('hello')\n"})
	e, err := submit(ctx, f.researcher("alice"), upload{plan: planTwo, data: data})
	must(t, err)

	got, err := downloadArchive(ctx, f.admin(), e.Id, 0)
	if err != nil || string(got) != string(data) {
		t.Fatalf("admin download of a PENDING experiment: %d of %d bytes, %v", len(got), len(data), err)
	}
	tail, err := downloadArchive(ctx, f.admin(), e.Id, int64(len(data)-10))
	if err != nil || string(tail) != string(data[len(data)-10:]) {
		t.Fatalf("admin download from an offset: %v", err)
	}
	if _, err := downloadArchive(ctx, f.admin(), "nope", 0); code(err) != codes.NotFound {
		t.Fatalf("admin download of an unknown id: %v, want NOT_FOUND", err)
	}
	f.register("a", "fashion")
	if _, err := downloadArchive(ctx, f.envoy("a"), e.Id, 0); code(err) != codes.NotFound {
		t.Fatalf("envoy download of an experiment not offered to it: %v, want NOT_FOUND", err)
	}
	if _, err := downloadArchive(ctx, f.researcher("alice"), e.Id, 0); code(err) != codes.PermissionDenied {
		t.Fatalf("researcher download: %v, want PERMISSION_DENIED", err)
	}
	if m, err := experiment.Inspect(writeTemp(t, got), experiment.DefaultLimits()); err != nil || len(m.Files) != 2 {
		t.Fatalf("the downloaded archive: %v, %v", m, err)
	}
}

func downloadArchive(ctx context.Context, c fxv1.DirectorClient, id string, offset int64) ([]byte, error) {
	s, err := c.DownloadArchive(ctx, &fxv1.DownloadArchiveRequest{ExperimentId: id, Offset: offset})
	if err != nil {
		return nil, err
	}
	var out []byte
	for {
		chunk, err := s.Recv()
		if err == io.EOF {
			return out, nil
		}
		if err != nil {
			return nil, err
		}
		out = append(out, chunk.GetData()...)
	}
}

func writeTemp(t *testing.T, data []byte) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "archive")
	must(t, os.WriteFile(path, data, 0o600))
	return path
}
