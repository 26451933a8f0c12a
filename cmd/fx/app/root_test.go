package app

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/fx-fl/fx/experiment"
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

func TestMistypedCommandIsAnError(t *testing.T) {
	for _, args := range [][]string{{"exp", "lst"}, {"experiment", "sumbit"}, {"pki", "nope"}, {"direktor"}} {
		out, err := run(t, args...)
		if err == nil {
			t.Errorf("fx %v succeeded (printed %q), want an error", args, out)
			continue
		}
		if exitCode(err) != exitUsage || !strings.Contains(err.Error(), "unknown command") {
			t.Errorf("fx %v: %v (exit %d), want an unknown command, exit %d", args, err, exitCode(err), exitUsage)
		}
	}
	_, err := run(t, "exp", "lst")
	if err == nil || !strings.Contains(err.Error(), "did you mean list?") {
		t.Errorf("fx exp lst: %v, want a suggestion of list", err)
	}
	// The group alone still shows its commands.
	if out, err := run(t, "experiment"); err != nil || !strings.Contains(out, "submit") {
		t.Errorf("fx experiment = %q, %v", out, err)
	}
}

func TestUsageErrorsAndAliases(t *testing.T) {
	for _, args := range [][]string{{"experiment", "status"}, {"experiment", "list", "--no-such-flag"}, {"version", "extra"}} {
		if _, err := run(t, args...); exitCode(err) != exitUsage {
			t.Errorf("fx %v: %v (exit %d), want exit %d", args, err, exitCode(err), exitUsage)
		}
	}
	for _, args := range [][]string{{"experiment", "ls", "--help"}, {"experiment", "rm", "--help"}, {"envoys", "ls", "--help"}} {
		if out, err := run(t, args...); err != nil || !strings.Contains(out, "Usage:") {
			t.Errorf("fx %v = %q, %v", args, out, err)
		}
	}
	if out, err := run(t, "--version"); err != nil || !strings.HasPrefix(out, "fx ") {
		t.Errorf("fx --version = %q, %v", out, err)
	}
	if out, _ := run(t, "--help"); !strings.Contains(out, "Exit status") {
		t.Errorf("fx --help does not document the exit statuses:\n%s", out)
	}
}

func TestExitCodes(t *testing.T) {
	tests := []struct {
		err  error
		want int
	}{
		{errors.New("the experiment failed"), exitFailed},
		{usageError{errors.New("accepts 1 arg")}, exitUsage},
		{fmt.Errorf("getting x: %w", &experiment.StatusError{Op: "get", Status: status.New(codes.NotFound, "no x")}), exitNotFound},
		{&experiment.StatusError{Op: "get", Status: status.New(codes.Unavailable, "down")}, exitUnreachable},
		{fmt.Errorf("dial: %w", experiment.ErrUnreachable), exitUnreachable},
		{&experiment.StatusError{Op: "get", Status: status.New(codes.PermissionDenied, "no")}, exitDenied},
		{&experiment.StatusError{Op: "get", Status: status.New(codes.Unauthenticated, "revoked")}, exitDenied},
		{fmt.Errorf("%w: envoy certificate", experiment.ErrWrongRole), exitDenied},
		{interrupted(context.Canceled, "x"), exitInterrupted},
	}
	for _, tc := range tests {
		if got := exitCode(tc.err); got != tc.want {
			t.Errorf("exitCode(%v) = %d, want %d", tc.err, got, tc.want)
		}
	}
	if msg := interrupted(context.Canceled, "fashion").Error(); !strings.Contains(msg, "goes on") || !strings.Contains(msg, "fx experiment watch fashion") {
		t.Errorf("interrupted: %s", msg)
	}
}

func TestCompletion(t *testing.T) {
	out, err := run(t, "__complete", "experiment", "list", "--output", "")
	if err != nil || !strings.Contains(out, "json") || !strings.Contains(out, "yaml") {
		t.Errorf("completing --output: %q, %v", out, err)
	}
	out, err = run(t, "__complete", "experiment", "list", "--state", "FIN")
	if err != nil || !strings.Contains(out, "FINISHED") || strings.Contains(out, "RUNNING") {
		t.Errorf("completing --state FIN: %q, %v", out, err)
	}
	if out, err := run(t, "completion", "bash"); err != nil || !strings.Contains(out, "bash completion") {
		t.Errorf("fx completion bash: %v", err)
	}
}
