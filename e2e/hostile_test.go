package e2e

import (
	"archive/zip"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
	"github.com/fx-fl/fx/runner"
)

// makeZip builds a zip archive of the given entries, in order.
func makeZip(t *testing.T, entries ...[2]string) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	for _, e := range entries {
		w, err := zw.Create(e[0])
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.Write([]byte(e[1])); err != nil {
			t.Fatal(err)
		}
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// rawSubmit uploads archive bytes with SubmitExperiment directly, as a
// client that skips the CLI's own checks would: header (with size, digest
// and plan as given), then 64 KiB chunks.
func rawSubmit(conn *grpc.ClientConn, size int64, plan string, archive []byte) error {
	return rawSubmitNamed(conn, "", size, plan, archive)
}

func rawSubmitNamed(conn *grpc.ClientConn, name string, size int64, plan string, archive []byte) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	stream, err := fxv1.NewDirectorClient(conn).SubmitExperiment(ctx)
	if err != nil {
		return err
	}
	sum := sha256.Sum256(archive)
	if err := stream.Send(&fxv1.SubmitExperimentRequest{Part: &fxv1.SubmitExperimentRequest_Header{Header: &fxv1.SubmitHeader{
		Name: name, Size: size, Sha256: hex.EncodeToString(sum[:]), PlanYaml: plan,
	}}}); err != nil {
		_, err = stream.CloseAndRecv()
		return err
	}
	for off := 0; off < len(archive); off += 64 << 10 {
		chunk := archive[off:min(off+64<<10, len(archive))]
		if err := stream.Send(&fxv1.SubmitExperimentRequest{Part: &fxv1.SubmitExperimentRequest_Chunk{Chunk: chunk}}); err != nil {
			break // the director answered early; CloseAndRecv says how
		}
	}
	_, err = stream.CloseAndRecv()
	return err
}

// wantRefusal checks err is a gRPC status with code and a message holding
// every one of parts.
func wantRefusal(t *testing.T, what string, err error, code codes.Code, parts ...string) {
	t.Helper()
	if status.Code(err) != code {
		t.Errorf("%s: %v, want %s", what, err, code)
		return
	}
	for _, p := range parts {
		if !strings.Contains(status.Convert(err).Message(), p) {
			t.Errorf("%s: message %q does not name %q", what, status.Convert(err).Message(), p)
		}
	}
	t.Logf("%s: refused: %s", what, status.Convert(err).Message())
}

// TestHostileInput: unsafe, oversized and malformed experiments and a
// malformed model update are refused with a message naming the problem, and
// leave nothing behind in the director's data_dir.
func TestHostileInput(t *testing.T) {
	f := newFed(t, []string{"alice"}, []string{"site-1", "site-2"})
	const limit = 256 << 10
	f.startDirector(directorOptions{maxArchiveBytes: limit, fixedAggPort: true})
	f.startEnvoy("site-1", slowShard(1, 2))
	f.startEnvoy("site-2", slowShard(2, 2))
	alice := f.researcher("alice")
	f.waitEnvoysOnline(alice, "site-1", "site-2")
	conn := rawConn(t, f.files("researcher", "alice"), f.addr)
	goodPlan := syntheticPlan("hostile", 1, "", "")
	before := listTree(t, f.dataDir)

	t.Run("zip slip", func(t *testing.T) {
		f := f.sub(t)
		archive := makeZip(t, [2]string{"plan.yaml", goodPlan}, [2]string{"../evil", "pwned"})
		file := filepath.Join(t.TempDir(), "evil.zip")
		if err := os.WriteFile(file, archive, 0o600); err != nil {
			t.Fatal(err)
		}
		// The CLI refuses it before connecting...
		if r := f.exp("alice", "submit", file); r.err == nil || !strings.Contains(r.stderr, "../evil") {
			t.Errorf("fx experiment submit evil.zip: %v %q, want a refusal naming ../evil", r.err, r.stderr)
		}
		// ...and the director refuses it from a client that does not.
		err := rawSubmit(conn, int64(len(archive)), goodPlan, archive)
		wantRefusal(t, "zip slip", err, codes.InvalidArgument, "../evil")
		for _, p := range []string{filepath.Join(f.dataDir, "..", "evil"), filepath.Join(f.dataDir, "evil"), filepath.Join(f.dataDir, "tmp", "..", "..", "evil")} {
			if _, err := os.Stat(p); err == nil {
				t.Errorf("%s was written", p)
			}
		}
	})

	t.Run("over the size limit", func(t *testing.T) {
		f := f.sub(t)
		dir := writePlan(t, goodPlan)
		blob := make([]byte, limit+(64<<10)) // random: it does not compress
		if _, err := rand.Read(blob); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "weights.bin"), blob, 0o600); err != nil {
			t.Fatal(err)
		}
		r := f.exp("alice", "submit", dir)
		if r.err == nil || !strings.Contains(r.stderr, "ResourceExhausted") || !strings.Contains(r.stderr, fmt.Sprint(limit)) {
			t.Errorf("fx experiment submit of a %d-byte experiment: %v %q, want ResourceExhausted naming the limit %d", len(blob), r.err, r.stderr, limit)
		} else {
			t.Logf("CLI: %s", strings.TrimSpace(r.stderr))
		}
		// A header that understates the size does not get around it.
		archive := makeZip(t, [2]string{"plan.yaml", goodPlan}, [2]string{"weights.bin", string(blob)})
		err := rawSubmit(conn, 1000, goodPlan, archive)
		if c := status.Code(err); c != codes.ResourceExhausted && c != codes.InvalidArgument {
			t.Errorf("an archive larger than its header says: %v, want ResourceExhausted or InvalidArgument", err)
		} else {
			t.Logf("understated size: refused: %s", status.Convert(err).Message())
		}
	})

	t.Run("plan with unknown keys", func(t *testing.T) {
		f := f.sub(t)
		plan := strings.Replace(goodPlan, "rounds: 1\n", "rounds: 1\nepochz: 3\n", 1)
		plan = strings.Replace(plan, "deadline: 2m", "deadlin: 2m", 1)
		dir := writePlan(t, plan)
		if r := f.exp("alice", "submit", dir); r.err == nil || !strings.Contains(r.stderr, "epochz") {
			t.Errorf("fx experiment submit with unknown keys: %v %q, want a refusal naming epochz", r.err, r.stderr)
		}
		archive := makeZip(t, [2]string{"plan.yaml", plan})
		err := rawSubmit(conn, int64(len(archive)), plan, archive)
		wantRefusal(t, "unknown plan keys", err, codes.InvalidArgument, "epochz", "deadlin")
	})

	t.Run("a name with path characters", func(t *testing.T) {
		f := f.sub(t)
		if r := f.exp("alice", "submit", writePlan(t, goodPlan), "--name", "../../etc"); r.err == nil || !strings.Contains(r.stderr, "../../etc") {
			t.Errorf("fx experiment submit --name ../../etc: %v %q, want a refusal naming it", r.err, r.stderr)
		} else {
			t.Logf("CLI: %s", strings.TrimSpace(r.stderr))
		}
		archive := makeZip(t, [2]string{"plan.yaml", goodPlan})
		err := rawSubmitNamed(conn, "../../etc", int64(len(archive)), goodPlan, archive)
		wantRefusal(t, "name with path characters", err, codes.InvalidArgument, "../../etc")
	})

	t.Run("nothing left behind", func(t *testing.T) {
		f := f.sub(t)
		if after := listTree(t, f.dataDir); !slices.Equal(before, after) {
			t.Errorf("the director's data_dir changed:\nbefore %v\nafter  %v", before, after)
		}
		if list, err := alice.List(context.Background()); err != nil || len(list) != 0 {
			t.Errorf("experiments after the refusals: %v (%v), want none", list, err)
		}
	})

	t.Run("a model update of the wrong shape", func(t *testing.T) {
		f := f.sub(t)
		e := f.submit("alice", writePlan(t, syntheticPlan("shapes", 2, slowHyper, "")))
		f.waitState(alice, "shapes", time.Minute, fxv1.ExperimentState_RUNNING)
		// The director's certificate does not name its aggregators'
		// addresses to researchers; this director runs them on one
		// configured port. site-1 is a participant, so only the shape
		// is wrong.
		agg := fxv1.NewAggregatorClient(rawConn(t, f.files("envoy", "site-1"), fmt.Sprintf("127.0.0.1:%d", f.aggPort)))
		var err error
		f.waitFor(time.Minute, "the aggregator to judge the upload", func() (bool, error) {
			cur, gerr := getExp(alice, "shapes")
			if gerr != nil {
				return false, gerr
			}
			err = uploadWrongShape(agg, e.GetId(), "site-1", cur.GetRound())
			switch status.Code(err) {
			case codes.FailedPrecondition, codes.AlreadyExists, codes.Unavailable:
				return false, err // the round moved on, or site-1 was faster: again
			}
			return true, nil
		})
		wantRefusal(t, "wrong shape", err, codes.InvalidArgument, "fc0.weight", "F32[3 3]", "want F32[128 64]")
		// The round goes on: site-1's own update still counts.
		f.waitState(alice, "shapes", 2*time.Minute, fxv1.ExperimentState_FINISHED)
		evs := f.watchEvents("alice", "shapes")
		for r := 1; r <= 2; r++ {
			if got := reporters(evs, r, runner.TaskTrain); !slices.Equal(got, []string{"site-1", "site-2"}) {
				t.Errorf("round %d: train reported by %v, want both sites", r, got)
			}
		}
		if left := listTree(t, filepath.Join(f.dataDir, "tmp")); len(left) > 0 {
			t.Errorf("left in the director's tmp: %v", left)
		}
	})
}

// uploadWrongShape sends a train result whose first tensor has a shape
// the model does not have.
func uploadWrongShape(agg fxv1.AggregatorClient, id, collaborator string, round int32) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream, err := agg.UploadResult(ctx)
	if err != nil {
		return err
	}
	msgs := []*fxv1.UploadResultRequest{
		{Part: &fxv1.UploadResultRequest_Header{Header: &fxv1.ResultHeader{
			ExperimentId: id, Collaborator: collaborator, Round: round, Task: runner.TaskTrain,
			SampleCount: 10, Metrics: map[string]float64{"loss": 1},
		}}},
		{Part: &fxv1.UploadResultRequest_Frame{Frame: &fxv1.TensorFrame{Frame: &fxv1.TensorFrame_Header{Header: &fxv1.TensorHeader{
			Name: "fc0.weight", Dtype: fxv1.DType_DTYPE_F32, Shape: []int64{3, 3},
		}}}}},
		{Part: &fxv1.UploadResultRequest_Frame{Frame: &fxv1.TensorFrame{Frame: &fxv1.TensorFrame_Data{Data: make([]byte, 36)}}}},
	}
	for _, m := range msgs {
		if err := stream.Send(m); err != nil {
			break
		}
	}
	_, err = stream.CloseAndRecv()
	return err
}

// TestDirectorKilledMidUpload: the director dies while an archive is
// arriving. The researcher's upload fails; the restarted director holds no
// partial file and no record of it.
func TestDirectorKilledMidUpload(t *testing.T) {
	f := newFed(t, []string{"alice"}, nil)
	f.startDirector(directorOptions{})
	alice := f.researcher("alice")
	conn := rawConn(t, f.files("researcher", "alice"), f.addr)
	before := listTree(t, f.dataDir)

	plan := syntheticPlan("interrupted", 1, "", "")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	stream, err := fxv1.NewDirectorClient(conn).SubmitExperiment(ctx)
	if err != nil {
		t.Fatal(err)
	}
	const size = 8 << 20
	if err := stream.Send(&fxv1.SubmitExperimentRequest{Part: &fxv1.SubmitExperimentRequest_Header{Header: &fxv1.SubmitHeader{
		Size: size, Sha256: strings.Repeat("ab", 32), PlanYaml: plan,
	}}}); err != nil {
		t.Fatal(err)
	}
	chunk := make([]byte, 1<<20)
	for range 4 {
		if err := stream.Send(&fxv1.SubmitExperimentRequest{Part: &fxv1.SubmitExperimentRequest_Chunk{Chunk: chunk}}); err != nil {
			t.Fatal(err)
		}
	}
	tmp := filepath.Join(f.dataDir, "tmp")
	f.waitFor(30*time.Second, "the upload to reach the director's disk", func() (bool, error) {
		ents, err := os.ReadDir(tmp)
		if err != nil {
			return false, err
		}
		for _, e := range ents {
			if fi, err := e.Info(); err == nil && fi.Size() > 0 {
				return true, nil
			}
		}
		return false, fmt.Errorf("%s holds %d entries, none with data yet", tmp, len(ents))
	})
	f.director.kill(t)
	if _, err := stream.CloseAndRecv(); err == nil {
		t.Error("the upload succeeded although the director died during it")
	}
	f.restartDirector()
	if after := listTree(t, f.dataDir); !slices.Equal(before, after) {
		t.Errorf("the director's data_dir after the restart:\nbefore %v\nafter  %v", before, after)
	}
	if list, err := alice.List(context.Background()); err != nil || len(list) != 0 {
		t.Errorf("experiments after the interrupted upload: %v (%v), want none", list, err)
	}
}
