package sandbox_test

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/fx-fl/fx/runner/sandbox"
)

// protectMain stands in for an envoy: it calls ProtectSelf if PROTECT is
// set, says "ready", and waits for a line on stdin.
func protectMain() int {
	if os.Getenv("PROTECT") != "" {
		if err := sandbox.ProtectSelf(); err != nil {
			fmt.Println(err)
			return 1
		}
	}
	fmt.Println("ready")
	_, _ = bufio.NewReader(os.Stdin).ReadString('\n')
	return 0
}

// TestProtectSelf shows what ProtectSelf adds where there is no sandbox
// (a site that opted out, or another program of the envoy's user): an
// unconfined process of the same user reads an envoy's environment and
// finds its working directory, unless the envoy called ProtectSelf. As
// root, both run as nobody, since root passes these checks anyway.
func TestProtectSelf(t *testing.T) {
	// A copy of the test binary that nobody can run.
	dir, err := os.MkdirTemp("", "fx-sandbox-protect")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	exe := filepath.Join(dir, "sandbox.test")
	copyFile(t, testBinary(t), exe)
	var cred *syscall.Credential
	if os.Geteuid() == 0 {
		cred = &syscall.Credential{Uid: 65534, Gid: 65534}
	}

	for _, protect := range []bool{false, true} {
		envoy := exec.Command(exe)
		envoy.Dir = dir
		envoy.Env = []string{probeEnv + "=protect", "SECRET=hunter2"}
		if protect {
			envoy.Env = append(envoy.Env, "PROTECT=1")
		}
		envoy.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
		stdin, _ := envoy.StdinPipe()
		stdout, _ := envoy.StdoutPipe()
		if err := envoy.Start(); err != nil {
			t.Fatal(err)
		}
		line, _ := bufio.NewReader(stdout).ReadString('\n')
		if line != "ready\n" {
			t.Fatalf("envoy stand-in: %q", line)
		}
		pid := strconv.Itoa(envoy.Process.Pid)
		probes := []string{"read:/proc/" + pid + "/environ", "readlink:/proc/" + pid + "/cwd", "read:/proc/" + pid + "/maps"}
		prober := exec.Command(exe, probes...)
		prober.Env = []string{probeEnv + "=probe"}
		prober.Dir = dir
		prober.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
		out, err := prober.Output()
		_, _ = io.WriteString(stdin, "\n")
		_ = envoy.Wait()
		if err != nil {
			t.Fatalf("prober: %v", err)
		}
		for _, pr := range probes {
			ok := strings.Contains(string(out), fmt.Sprintf(`{"Probe":%q,"Err":""}`, pr))
			if protect && ok {
				t.Errorf("after ProtectSelf, another process of the envoy's user could %s", pr)
			}
			if !protect && !ok {
				t.Errorf("without ProtectSelf, %s failed, so the test shows nothing: %s", pr, out)
			}
		}
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o755); err != nil {
		t.Fatal(err)
	}
}
