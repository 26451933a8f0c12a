package experiment

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// Review lists what Inspect lists, with every file's sha256, and unpacks
// into dest as Unpack does, with Unpack's safety: an unsafe archive leaves
// nothing behind.
func TestReviewHashesEveryFile(t *testing.T) {
	files := sampleTree()
	src := t.TempDir()
	writeTree(t, src, files)
	path := packToFile(t, src)

	want := wantFiles(files)
	for i, f := range want {
		body := files[f.Path]
		if f.Executable {
			body = files["*"+f.Path]
		}
		sum := sha256.Sum256([]byte(body))
		want[i].SHA256 = hex.EncodeToString(sum[:])
	}
	m, err := Review(path, "", Limits{})
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(m.Files, want) {
		t.Fatalf("files\n got %+v\nwant %+v", m.Files, want)
	}
	if string(m.Plan) != validPlan {
		t.Fatalf("plan %q", m.Plan)
	}
	dest := filepath.Join(t.TempDir(), "code")
	um, err := Review(path, dest, Limits{})
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(um, m) {
		t.Fatalf("Review into a directory listed\n%+v\nwithout one\n%+v", um, m)
	}
	checkUnpacked(t, dest, files)

	unsafe := writeFile(t, tarGz(t, file("plan.yaml", validPlan), file("../escape.py", "import os")))
	out := filepath.Join(t.TempDir(), "code")
	if _, err := Review(unsafe, out, Limits{}); !errors.Is(err, ErrInvalidArchive) || !strings.Contains(err.Error(), "..") {
		t.Fatalf("Review of an archive with a .. path: %v, want ErrInvalidArchive", err)
	}
	if _, err := os.Stat(out); !os.IsNotExist(err) {
		t.Fatalf("the refused archive left %s behind: %v", out, err)
	}
	if m, err := Inspect(path, Limits{}); err != nil || m.Files[0].SHA256 != "" {
		t.Fatalf("Inspect hashes files (it need not, and the director inspects every upload): %v", err)
	}
}
