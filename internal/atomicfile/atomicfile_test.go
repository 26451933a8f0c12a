package atomicfile

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
)

func TestWriteReplacesAtomically(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "sub", "state.json")
	for _, v := range []map[string]int{{"a": 1}, {"a": 2}} {
		if err := WriteJSON(path, v); err != nil {
			t.Fatal(err)
		}
	}
	data, err := os.ReadFile(path)
	if err != nil || string(data) != "{\n  \"a\": 2\n}\n" {
		t.Fatalf("contents %q, %v", data, err)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v, want 0600", fi.Mode().Perm())
	}
	entries, _ := os.ReadDir(filepath.Dir(path))
	if len(entries) != 1 {
		t.Fatalf("%d files in the directory, want only the target (no temporaries left)", len(entries))
	}
	if err := WriteFile(filepath.Join(dir, "missing-parent-is-a-file", "x"), nil); err != nil {
		t.Fatalf("nested directories are created: %v", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "blocker"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := WriteFile(filepath.Join(dir, "blocker", "x"), nil); err == nil {
		t.Fatal("writing under a regular file succeeded")
	}
}

func TestStreamKeepsTheOldFileOnError(t *testing.T) {
	path := filepath.Join(t.TempDir(), "model")
	if err := Stream(path, func(w io.Writer) error { _, err := w.Write([]byte("old")); return err }); err != nil {
		t.Fatal(err)
	}
	boom := errors.New("boom")
	if err := Stream(path, func(w io.Writer) error { w.Write([]byte("partial")); return boom }); !errors.Is(err, boom) {
		t.Fatalf("Stream = %v, want boom", err)
	}
	data, err := os.ReadFile(path)
	if err != nil || string(data) != "old" {
		t.Fatalf("contents %q, %v: a failed Stream must leave the old file", data, err)
	}
	if entries, _ := os.ReadDir(filepath.Dir(path)); len(entries) != 1 {
		t.Fatalf("%d files in the directory, want only the target", len(entries))
	}
}
