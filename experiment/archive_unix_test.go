//go:build unix

package experiment

import (
	"bytes"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

func TestPackRefusesSpecialFiles(t *testing.T) {
	dir := t.TempDir()
	writeTree(t, dir, tree{"plan.yaml": validPlan})
	if err := syscall.Mkfifo(filepath.Join(dir, "pipe"), 0o600); err != nil {
		t.Skipf("cannot make a FIFO here: %v", err)
	}
	var buf bytes.Buffer
	err := Pack(dir, &buf)
	if err == nil || !strings.Contains(err.Error(), filepath.Join(dir, "pipe")+" is a named pipe (FIFO)") {
		t.Fatalf("got %v", err)
	}
}
