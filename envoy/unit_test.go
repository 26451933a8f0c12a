package envoy

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/fx-fl/fx/dataset"
)

func TestReadAllowlist(t *testing.T) {
	digest := strings.Repeat("ab", 32)
	tests := []struct {
		name    string
		body    string
		want    []string
		wantErr string
	}{
		{"sha256sum output and comments", "# approved 2026-11\n" + digest + "  study.tar.gz\n\n" + strings.ToUpper(digest[:10]) + digest[10:] + "\n", []string{digest}, ""},
		{"empty", "", nil, ""},
		{"short digest", "abc\n", nil, `line 1: "abc" is not a sha256`},
		{"not hex", strings.Repeat("zz", 32) + "\n", nil, "not a sha256"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "allow")
			if err := os.WriteFile(p, []byte(tc.body), 0o600); err != nil {
				t.Fatal(err)
			}
			got, err := ReadAllowlist(p)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != len(tc.want) {
				t.Errorf("got %v, want %v", got, tc.want)
			}
			for _, w := range tc.want {
				if !got[w] {
					t.Errorf("%s missing from %v", w, got)
				}
			}
		})
	}
	if _, err := ReadAllowlist(filepath.Join(t.TempDir(), "none")); err == nil {
		t.Error("a missing allow-list was read")
	}
}

func TestAdminSocketDirectoryMustBePrivate(t *testing.T) {
	dir := t.TempDir()
	open := filepath.Join(dir, "shared")
	if err := os.Mkdir(open, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(open, 0o755); err != nil {
		t.Fatal(err)
	}
	e := &Envoy{cfg: Config{WorkDir: dir, AdminSocket: filepath.Join(open, "envoy.sock")}}
	_, err := e.listenAdmin()
	if err == nil || !strings.Contains(err.Error(), "chmod 700") {
		t.Fatalf("listenAdmin in a 0755 directory: %v, want a refusal naming the fix", err)
	}
	notSocket := filepath.Join(dir, "private")
	os.Mkdir(notSocket, 0o700)
	os.WriteFile(filepath.Join(notSocket, "envoy.sock"), nil, 0o600)
	e.cfg.AdminSocket = filepath.Join(notSocket, "envoy.sock")
	if _, err := e.listenAdmin(); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("listenAdmin over a regular file: %v", err)
	}
}

func TestDataSettingsForExecRunners(t *testing.T) {
	d := &dataset.Dataset{SampleShape: []int64{28, 28}, Classes: 10}
	got, err := dataSettings(dataset.Config{Kind: dataset.KindIDX, Path: "data/fmnist", Shard: "2/4", Seed: 7}, d)
	if err != nil {
		t.Fatal(err)
	}
	abs, _ := filepath.Abs("data/fmnist")
	want := map[string]any{"kind": "idx", "path": abs, "shard": "2/4", "seed": int64(7), "sample_shape": []int64{28, 28}, "classes": 10}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("dataSettings = %v, want %v", got, want)
	}
}
