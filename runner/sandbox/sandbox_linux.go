package sandbox

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"

	"github.com/landlock-lsm/go-landlock/landlock"
	ll "github.com/landlock-lsm/go-landlock/landlock/syscall"
	"golang.org/x/sys/unix"
)

// configs are go-landlock's presets by ABI version: each handles (denies
// unless a rule allows) everything its version can.
var configs = []landlock.Config{
	{}, landlock.V1, landlock.V2, landlock.V3, landlock.V4, landlock.V5,
	landlock.V6, landlock.V7, landlock.V8, landlock.V9, landlock.V10, landlock.V11,
}

// Check reports what this kernel's Landlock can enforce, or, wrapping
// ErrUnsupported, why it cannot sandbox at all.
func Check() (Support, error) {
	v, err := ll.LandlockGetABIVersion()
	switch {
	case errors.Is(err, unix.ENOSYS):
		return Support{}, fmt.Errorf("%w: the kernel has no Landlock (it needs Linux 5.13 or later built with CONFIG_SECURITY_LANDLOCK)", ErrUnsupported)
	case errors.Is(err, unix.EOPNOTSUPP):
		return Support{}, fmt.Errorf("%w: the kernel has Landlock but it is off; add landlock to the lsm= kernel parameter and reboot", ErrUnsupported)
	case err != nil:
		return Support{}, fmt.Errorf("%w: asking the kernel for Landlock: %v (a container's seccomp profile may block landlock_create_ruleset)", ErrUnsupported, err)
	case v < 1:
		return Support{}, fmt.Errorf("%w: the kernel reports Landlock ABI %d", ErrUnsupported, v)
	}
	if v >= abiScopes {
		// Signal scoping was broken before an erratum fix; without
		// it go-landlock treats the kernel as ABI 5, and so must we
		// or the rulesets it checks would not match.
		if errata, err := ll.LandlockGetErrata(); err != nil || errata&0x2 == 0 {
			v = abiScopes - 1
		}
	}
	return Support{ABI: min(v, len(configs)-1), NoNetwork: auditArch != 0}, nil
}

// config is what the sandbox restricts on this kernel: all that Landlock
// can, except the network when the policy allows it; and, when it does
// not, the seccomp filter that denies it.
func (p Policy) config(s Support) (landlock.Config, []unix.SockFilter, error) {
	cfg := configs[s.ABI]
	if p.AllowNetwork {
		cfg.HandledAccessNet = 0
		return cfg, nil, nil
	}
	filter, err := noNetworkFilter()
	return cfg, filter, err
}

const (
	// trampolineArg is argv[1] of a trampoline. A binary that forgot
	// to call Main fails on it as an unknown flag instead of running
	// the command's arguments as its own.
	trampolineArg = "-fx-sandbox-trampoline"
	// specEnv carries the trampoline's spec; it is removed before the
	// command starts.
	specEnv = "_FX_SANDBOX_SPEC"
	// selfExe is this binary, even if it was replaced or deleted since
	// it started.
	selfExe = "/proc/self/exe"
)

// spec is what the trampoline needs to know.
type spec struct {
	Program string
	Policy  Policy
	// Files is how many descriptors the command gets: its standard
	// files and ExtraFiles. Any other the trampoline inherited (one the
	// envoy itself inherited without close-on-exec, from whatever
	// started it) is closed, since Landlock does not restrict what is
	// already open.
	Files int
	// ParentDeathSignal and Parent carry SysProcAttr.Pdeathsig across
	// the trampoline: the kernel keeps it per thread and gives a new
	// thread none, and the trampoline's Go runtime may execve from a
	// thread other than the one the setting was made on. So the
	// trampoline sets it again on the thread that execve's, and exits
	// if Parent (the process that started it) is already gone.
	ParentDeathSignal syscall.Signal `json:",omitempty"`
	Parent            int            `json:",omitempty"`
}

// Apply rewrites cmd, not yet started, so that it runs under p: cmd.Path
// becomes this binary, started as a trampoline that restricts itself and
// then execve's the original program with the original Args, Env, Dir,
// standard files, ExtraFiles and SysProcAttr (which apply to the
// trampoline and so to the command that replaces it; Pdeathsig is set
// again just before execve, see spec). The program is
// resolved now, so the command does not depend on PATH.
//
// Apply checks the policy here, so that a missing path or a kernel that
// cannot enforce it is an error before anything starts. Should the
// trampoline still fail (a path removed in between), the command exits
// with ExitSetupFailed, having said why on stderr, and never runs.
//
// Besides its standard files and ExtraFiles the command holds one more
// descriptor, numbered 100 or above: its own /proc/<pid> directory, held
// open so that Landlock's rule for /proc/self keeps working (see
// pinProcSelf). It starts with no capabilities, even from root.
//
// The binary must call Main at the start of main (tests: of TestMain).
//
// For an exec runner the policy is: ReadOnly the experiment's directory,
// the dataset's paths, and an interpreter or virtual environment that
// lives outside /usr and /opt; ReadWrite the task or runner directory;
// Hidden the envoy's key, certificate and configuration files and its
// work directory (and anything else of the envoy's, such as a CRL or a
// state directory); AllowNetwork only if the site says so. Point TMPDIR
// and HOME at the ReadWrite directory, since /tmp and the envoy's home
// are out of reach.
func (p Policy) Apply(cmd *exec.Cmd) error {
	if cmd.Err != nil {
		return cmd.Err
	}
	if cmd.Process != nil {
		return errors.New("sandbox: the command has already started")
	}
	if cmd.Path == selfExe && len(cmd.Args) > 1 && cmd.Args[1] == trampolineArg {
		return errors.New("sandbox: the command is already sandboxed")
	}
	s, err := Check()
	if err != nil {
		return err
	}
	if _, _, err := p.config(s); err != nil {
		return err
	}
	if _, err := p.rules(); err != nil {
		return err
	}
	prog := cmd.Path
	if !filepath.IsAbs(prog) {
		// As exec.Cmd would, relative to Dir.
		base := cmd.Dir
		if base == "" || !filepath.IsAbs(base) {
			wd, err := os.Getwd()
			if err != nil {
				return fmt.Errorf("sandbox: resolving %s: %w", prog, err)
			}
			base = filepath.Join(wd, base)
		}
		prog = filepath.Join(base, prog)
	}
	sp := spec{Program: prog, Policy: p, Files: 3 + len(cmd.ExtraFiles)}
	if a := cmd.SysProcAttr; a != nil && a.Pdeathsig != 0 {
		sp.ParentDeathSignal, sp.Parent = a.Pdeathsig, os.Getpid()
	}
	b, err := json.Marshal(sp)
	if err != nil {
		return fmt.Errorf("sandbox: %w", err)
	}
	args := cmd.Args
	if len(args) == 0 {
		args = []string{cmd.Path}
	}
	env := withoutSpec(cmd.Environ())
	cmd.Path = selfExe
	cmd.Args = append([]string{args[0], trampolineArg}, args[1:]...)
	cmd.Env = append(env, specEnv+"="+string(b))
	return nil
}

// withoutSpec drops specEnv from an environment.
func withoutSpec(env []string) []string {
	out := make([]string, 0, len(env)+1)
	for _, kv := range env {
		if !strings.HasPrefix(kv, specEnv+"=") {
			out = append(out, kv)
		}
	}
	return out
}

// Main turns this process into the command Apply prepared, if it was
// started as a trampoline: it restricts itself to the policy and execve's
// the command, never returning. Otherwise it returns at once. Call it
// first in main, before anything opens files or reads flags; in tests,
// first in TestMain.
func Main() {
	if len(os.Args) < 2 || os.Args[1] != trampolineArg {
		return
	}
	err := trampoline()
	fmt.Fprintf(os.Stderr, "%v; the command did not run\n", err)
	os.Exit(ExitSetupFailed)
}

// trampoline restricts this process and execve's the command; it returns
// only on failure.
func trampoline() error {
	raw, ok := os.LookupEnv(specEnv)
	if !ok {
		return errors.New("sandbox: started as a trampoline without a policy")
	}
	var sp spec
	if err := json.Unmarshal([]byte(raw), &sp); err != nil {
		return fmt.Errorf("sandbox: reading the policy: %w", err)
	}
	argv := append([]string{os.Args[0]}, os.Args[2:]...)
	env := withoutSpec(os.Environ())

	s, err := Check()
	if err != nil {
		return err
	}
	cfg, filter, err := sp.Policy.config(s)
	if err != nil {
		return err
	}
	if err := unix.CloseRange(uint(sp.Files), ^uint(0), unix.CLOSE_RANGE_CLOEXEC); err != nil {
		return fmt.Errorf("sandbox: closing inherited descriptors: %w", err)
	}
	if err := pinProcSelf(max(pinnedFD, sp.Files)); err != nil {
		return err
	}
	rules, err := sp.Policy.rules()
	if err != nil {
		return err
	}
	fd, flags, err := cfg.NewRulesetFD(landlockRules(rules, s.ABI)...)
	if err != nil {
		return fmt.Errorf("sandbox: building the Landlock ruleset: %w", err)
	}
	if fd < 0 {
		return fmt.Errorf("sandbox: go-landlock found nothing to enforce with %v", cfg)
	}
	// Landlock restricts a thread and what it execve's. The other
	// threads of this Go process die at execve, so restricting this
	// one, pinned until then, restricts the command; nothing untrusted
	// runs here before that.
	runtime.LockOSThread()
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("sandbox: prctl(PR_SET_NO_NEW_PRIVS): %w", err)
	}
	if err := ll.LandlockRestrictSelf(fd, flags); err != nil {
		return fmt.Errorf("sandbox: landlock_restrict_self: %w", err)
	}
	_ = unix.Close(fd)
	if err := dropCapabilities(); err != nil {
		return err
	}
	if sp.ParentDeathSignal != 0 {
		if err := unix.Prctl(unix.PR_SET_PDEATHSIG, uintptr(sp.ParentDeathSignal), 0, 0, 0); err != nil {
			return fmt.Errorf("sandbox: prctl(PR_SET_PDEATHSIG): %w", err)
		}
		if os.Getppid() != sp.Parent {
			return errors.New("sandbox: the process that started the command has exited")
		}
	}
	if filter != nil {
		if err := installFilter(filter); err != nil {
			return err
		}
	}
	err = syscall.Exec(sp.Program, argv, env)
	if errors.Is(err, unix.EACCES) {
		return fmt.Errorf("sandbox: starting %s: %w (the program, and the interpreter of a script, must lie in a system directory or the policy's ReadOnly paths)", sp.Program, err)
	}
	return fmt.Errorf("sandbox: starting %s: %w", sp.Program, err)
}

// pinnedFD is the lowest descriptor number pinProcSelf uses, well above
// those a command expects (standard files and a few ExtraFiles).
const pinnedFD = 100

// pinProcSelf opens this process's /proc/<pid> directory and leaves it
// open across execve. Landlock's rule that lets the command read its own
// /proc/self is tied to that directory's inode, and procfs makes a new
// inode when the directory's dentry is evicted from the cache (memory
// pressure, drop_caches): without a reference keeping it, a long-running
// command would lose /proc/self at some point.
func pinProcSelf(lowest int) error {
	fd, err := unix.Open("/proc/self", unix.O_PATH|unix.O_DIRECTORY, 0)
	if err != nil {
		return fmt.Errorf("sandbox: opening /proc/self: %w", err)
	}
	defer unix.Close(fd)
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD, lowest); err != nil {
		return fmt.Errorf("sandbox: keeping /proc/self open: %w", err)
	}
	return nil
}
