package main

import (
	"bytes"
	"strings"
	"testing"
)

// run executes the fx command tree with args and returns stdout and the error.
func run(t *testing.T, args ...string) (string, error) {
	t.Helper()
	cmd := newRootCommand()
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	cmd.SetArgs(args)
	err := cmd.Execute()
	return out.String(), err
}

func TestVersionAndHelp(t *testing.T) {
	out, err := run(t, "version")
	if err != nil || !strings.HasPrefix(out, "fx ") || !strings.Contains(out, "go1.") {
		t.Fatalf("fx version = %q, %v", out, err)
	}
	out, err = run(t, "--help")
	if err != nil || !strings.Contains(out, "--log-level") || !strings.Contains(out, "version") {
		t.Fatalf("fx --help = %q, %v", out, err)
	}
}

func TestBadLogLevel(t *testing.T) {
	_, err := run(t, "--log-level", "loud", "version")
	if err == nil || !strings.Contains(err.Error(), "--log-level") {
		t.Fatalf("error = %v, want it to name --log-level", err)
	}
}
