package director

import (
	"archive/zip"
	"bytes"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// zipWith builds a zip archive with the given entries (name → body).
func zipWith(t *testing.T, entries map[string]string) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	for name, body := range entries {
		w, err := zw.Create(name)
		must(t, err)
		_, err = w.Write([]byte(body))
		must(t, err)
	}
	must(t, zw.Close())
	return buf.Bytes()
}

// noise is n incompressible bytes.
func noise(n int) string {
	b := make([]byte, n)
	r := rand.NewChaCha8([32]byte{1})
	_, _ = r.Read(b)
	return string(b)
}

// dirEntries lists what is under dir, recursively.
func dirEntries(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	must(t, filepath.Walk(dir, func(p string, _ os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		if p != dir {
			out = append(out, strings.TrimPrefix(p, dir))
		}
		return nil
	}))
	return out
}

func TestSubmitRefused(t *testing.T) {
	f := newFed(t, func(c *Config) {
		c.ReviewPolicy = ReviewManual
		c.MaxArchiveBytes = 4 << 20
	})
	good := archive(t, planTwo, nil)
	otherPlan := strings.Replace(planTwo, "rounds: 2", "rounds: 3", 1)
	big := archive(t, planTwo, map[string]string{"blob": noise(5 << 20)})
	bad := `name: fashion
rounds: 2
runner: {kind: builtin, model: mlp}
colour: blue
`
	evaluation := strings.Replace(planTwo, "rounds: 2", "rounds: 1", 1) + "tasks: [aggregated_model_validation]\n"
	tests := []struct {
		name string
		up   upload
		want codes.Code
		msg  string
	}{
		{"no header", upload{plan: planTwo, data: good, noHead: true}, codes.InvalidArgument, "header"},
		{"unknown plan key", upload{plan: bad, data: archive(t, bad, nil)}, codes.InvalidArgument, "colour"},
		{"empty plan", upload{plan: "", data: good}, codes.InvalidArgument, "empty"},
		{"bad name", upload{name: "../etc", plan: planTwo, data: good}, codes.InvalidArgument, "experiment name"},
		{"size zero", upload{plan: planTwo, data: good, size: -1}, codes.InvalidArgument, "size"},
		{"declared too large", upload{plan: planTwo, data: good, size: 8 << 20}, codes.ResourceExhausted, "at most"},
		{"more bytes than declared", upload{plan: planTwo, data: good, size: int64(len(good) - 10)}, codes.InvalidArgument, "longer"},
		{"fewer bytes than declared", upload{plan: planTwo, data: good, size: int64(len(good) + 10)}, codes.InvalidArgument, "ended after"},
		{"bytes past the limit", upload{plan: planTwo, data: big, size: 4 << 20}, codes.ResourceExhausted, "limit"},
		{"bad digest text", upload{plan: planTwo, data: good, sha: "xyz"}, codes.InvalidArgument, "sha256"},
		{"digest mismatch", upload{plan: planTwo, data: good, sha: strings.Repeat("0", 64)}, codes.InvalidArgument, "sha256"},
		{"chunk too large", upload{plan: planTwo, data: archive(t, planTwo, map[string]string{"x": noise(3 << 19)}), chunk: 2 << 20}, codes.InvalidArgument, "chunk"},
		{"not an archive", upload{plan: planTwo, data: []byte("hello, world")}, codes.InvalidArgument, "archive"},
		{"path escapes", upload{plan: planTwo, data: zipWith(t, map[string]string{"plan.yaml": planTwo, "../evil": "x"})}, codes.InvalidArgument, ""},
		{"no plan in archive", upload{plan: planTwo, data: zipWith(t, map[string]string{"train.py": "x"})}, codes.InvalidArgument, ""},
		{"plan differs", upload{plan: otherPlan, data: good}, codes.InvalidArgument, "differs"},
		{"evaluation without its model", upload{plan: evaluation, data: archive(t, evaluation, nil)}, codes.InvalidArgument,
			"the archive has no model.safetensors at its root: an evaluation (tasks without train) scores the model you give it"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := submit(ctxT(t), f.researcher("alice"), tt.up)
			if code(err) != tt.want {
				t.Fatalf("submit = %v, want %v", err, tt.want)
			}
			if !strings.Contains(err.Error(), tt.msg) {
				t.Errorf("message %q does not mention %q", err, tt.msg)
			}
			// Nothing left behind: no upload, no experiment directory, no record.
			eventually(t, "upload cleaned up", func() bool { return len(dirEntries(t, filepath.Join(f.dataDir, "tmp"))) == 0 })
			if left := dirEntries(t, filepath.Join(f.dataDir, "experiments")); len(left) != 0 {
				t.Errorf("left in experiments/: %v", left)
			}
			resp, err := f.admin().ListExperiments(ctxT(t), &fxv1.ListExperimentsRequest{})
			must(t, err)
			if n := len(resp.GetExperiments()); n != 0 {
				t.Errorf("%d experiments recorded", n)
			}
		})
	}

	// A good one goes in; the same name again is refused.
	e, err := submit(ctxT(t), f.researcher("alice"), upload{plan: planTwo, data: good})
	must(t, err)
	if e.GetState() != fxv1.ExperimentState_PENDING || e.GetArchiveSha256() != sha(good) || len(e.GetId()) < 20 {
		t.Errorf("submitted %v", e)
	}
	if _, err := submit(ctxT(t), f.researcher("alice"), upload{plan: planTwo, data: good}); code(err) != codes.AlreadyExists {
		t.Errorf("same name again: %v, want AlreadyExists", err)
	}
	// An explicit name overrides the plan's.
	e2, err := submit(ctxT(t), f.researcher("alice"), upload{name: "fashion-2", plan: planTwo, data: good})
	must(t, err)
	if e2.GetName() != "fashion-2" {
		t.Errorf("name %q", e2.GetName())
	}
	stored, err := os.ReadFile(f.d.archivePath(e.GetId()))
	must(t, err)
	if !bytes.Equal(stored, good) {
		t.Error("stored archive differs from the upload")
	}
}

// TestUploadIdle: an upload that stops sending without closing is
// abandoned after the idle timeout and leaves nothing behind.
func TestUploadIdle(t *testing.T) {
	f := newFed(t, func(c *Config) { c.UploadIdleTimeout = 200 * time.Millisecond })
	data := archive(t, planTwo, nil)
	stream, err := f.researcher("alice").SubmitExperiment(ctxT(t))
	must(t, err)
	must(t, stream.Send(&fxv1.SubmitExperimentRequest{Part: &fxv1.SubmitExperimentRequest_Header{Header: &fxv1.SubmitHeader{
		Size: int64(len(data)), Sha256: sha(data), PlanYaml: planTwo}}}))
	must(t, stream.Send(&fxv1.SubmitExperimentRequest{Part: &fxv1.SubmitExperimentRequest_Chunk{Chunk: data[:10]}}))
	// Neither more data nor CloseSend: the director gives up.
	err = stream.RecvMsg(&fxv1.SubmitExperimentResponse{})
	if code(err) != codes.DeadlineExceeded || !strings.Contains(err.Error(), "abandoned") {
		t.Fatalf("stalled upload: %v, want DeadlineExceeded", err)
	}
	eventually(t, "upload cleaned up", func() bool { return len(dirEntries(t, filepath.Join(f.dataDir, "tmp"))) == 0 })
	// The name is free for the retry.
	f.submitPlan("alice", planTwo)
}
