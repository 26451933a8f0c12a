// Package sandbox starts a site's untrusted command (an exec runner) so
// that it can touch only what its Policy names: it cannot read the envoy's
// key, certificate, configuration or work directory, other experiments'
// files or /proc of other processes, cannot write outside its own scratch
// directory, cannot signal or ptrace the envoy, and has no network unless
// the site allows it.
//
// On Linux this is Landlock for files, TCP, signals and abstract unix
// sockets, a seccomp filter that refuses every socket but a unix one (for
// the network Landlock does not cover: UDP, MPTCP, raw sockets), and no
// capabilities, so that a command started by root is root by uid only.
// Landlock applies to the process that asks for it and what that process
// starts, so Apply does not run the command directly: it rewrites the
// exec.Cmd to start this very binary (/proc/self/exe) as a trampoline,
// which locks itself down and then execve's the real command in place,
// with the same pid, arguments, environment, directory and file
// descriptors. For that to work the binary must call Main first thing in
// main (and a test binary in TestMain).
//
// Other systems have no sandbox: Check and Apply return ErrUnsupported.
package sandbox

import (
	"errors"
	"fmt"
)

// Policy says what a sandboxed command may touch. Paths are absolute.
// Beyond the Policy the command may read and execute the system's
// programs and libraries (/usr, /bin, /sbin, /lib*, /etc, /opt), use
// /dev/null, /dev/zero, /dev/full, /dev/random and /dev/urandom, read and
// write /dev/shm (PyTorch's data loaders and Python's multiprocessing
// locks live there), read its own /proc/self and the few global /proc and
// /sys files that runtimes read to size themselves (CPUs, memory). The
// processes the command starts in turn cannot read their own /proc/self:
// Landlock's rule is on the command's /proc/<pid>, and all of /proc would
// show the envoy's command line.
//
// Hidden is applied to those system directories as well, so an envoy
// whose key or configuration sits under /etc or /opt stays protected.
type Policy struct {
	// ReadOnly holds files and directories the command may read and
	// execute, recursively: the experiment's directory, the data the
	// site declares, an interpreter installed outside /usr or /opt.
	ReadOnly []string
	// ReadWrite holds directories (or files) the command may also
	// create, change and remove things in: its task or scratch
	// directory.
	ReadWrite []string
	// Hidden holds paths that stay unreadable even where they lie
	// inside a ReadOnly, ReadWrite or system directory: the envoy's
	// key, certificate and configuration, and its work directory. A
	// directory that contains a hidden path is not allowed whole;
	// instead each of its other entries is (recursively), so only the
	// hidden path and the directory's own listing are lost. A ReadOnly
	// or ReadWrite path inside a hidden one is still allowed: that is
	// how a command reads its own experiment inside the envoy's work
	// directory while other experiments there stay out of reach.
	//
	// Hidden hides names in the file hierarchy, not files: a hard link
	// or a bind mount of a hidden file elsewhere in an allowed
	// directory is readable there.
	Hidden []string
	// AllowNetwork lets the command use the network. When false (the
	// default) it can create unix sockets only: a seccomp filter
	// refuses every other socket(2) (TCP, UDP, MPTCP, raw, netlink) and
	// io_uring, on any kernel, and Landlock (ABI 4+) denies TCP bind
	// and connect as well. The filter exists for amd64 and arm64;
	// elsewhere Apply refuses a policy without the network rather than
	// start a command with more access than the policy says.
	AllowNetwork bool
}

// Support is what the running kernel's Landlock can enforce. Check
// returns it; the envoy can log it at start.
type Support struct {
	// ABI is the Landlock ABI version this package enforces: the
	// kernel's, capped at the newest that go-landlock knows, 0 when
	// there is no Landlock.
	ABI int
	// NoNetwork reports whether a policy without the network can be
	// enforced here (a seccomp filter exists for this architecture).
	NoNetwork bool
}

// The Landlock ABI versions that brought each restriction.
const (
	abiTruncate    = 3  // truncate(2) needs write access (Linux 6.2)
	abiTCP         = 4  // TCP bind and connect (Linux 6.7)
	abiScopes      = 6  // signals and abstract unix sockets stay inside the sandbox (Linux 6.12)
	abiUnixSockets = 9  // connect and sendmsg on pathname unix sockets
	abiUDP         = 10 // UDP bind, connect and send
)

// TCP reports whether Landlock denies TCP bind and connect (the seccomp
// filter of NoNetwork denies them on any kernel).
func (s Support) TCP() bool { return s.ABI >= abiTCP }

// Scoped reports whether the command is kept from signalling processes
// outside its sandbox (the envoy) and from connecting to abstract unix
// sockets they listen on.
func (s Support) Scoped() bool { return s.ABI >= abiScopes }

// UnixSockets reports whether connecting to pathname unix sockets
// outside the sandbox (a D-Bus or Docker socket) is denied.
func (s Support) UnixSockets() bool { return s.ABI >= abiUnixSockets }

// UDP reports whether UDP is denied along with TCP.
func (s Support) UDP() bool { return s.ABI >= abiUDP }

// String says what is and is not enforced, for a log line.
func (s Support) String() string {
	if s.ABI == 0 {
		return "no Landlock"
	}
	has, lacks := []string{"files"}, []string{}
	add := func(ok bool, what string) {
		if ok {
			has = append(has, what)
		} else {
			lacks = append(lacks, what)
		}
	}
	add(s.ABI >= abiTruncate, "truncate")
	add(s.TCP(), "TCP")
	add(s.Scoped(), "signals and abstract unix sockets")
	add(s.UnixSockets(), "pathname unix sockets")
	add(s.UDP(), "UDP")
	out := fmt.Sprintf("Landlock ABI %d enforces %s", s.ABI, join(has))
	if len(lacks) > 0 {
		out += "; not " + join(lacks)
	}
	if s.NoNetwork {
		return out + "; a seccomp filter denies all but unix sockets"
	}
	return out + "; no seccomp filter for this architecture, so commands need the network allowed"
}

func join(words []string) string {
	switch len(words) {
	case 0:
		return ""
	case 1:
		return words[0]
	}
	out := words[0]
	for _, w := range words[1 : len(words)-1] {
		out += ", " + w
	}
	return out + " and " + words[len(words)-1]
}

// ErrUnsupported is returned by Check and Apply where this system cannot
// sandbox a command: not Linux, or a kernel without Landlock.
var ErrUnsupported = errors.New("sandbox: this system cannot sandbox a command")

// ExitSetupFailed is the exit status of a sandboxed command whose sandbox
// could not be set up (the trampoline then says why on stderr and never
// runs the command). It is 126, the shell's "found but cannot execute".
const ExitSetupFailed = 126
