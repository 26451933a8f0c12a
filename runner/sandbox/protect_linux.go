package sandbox

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// ProtectSelf hardens the calling process (the envoy) against other
// processes of its own user, sandboxed or not: it makes the process
// non-dumpable, so that its /proc entries that give away its state
// (environ, fd, mem, maps, cwd, root, exe) become root's and ptrace by
// its user is refused, and it leaves no core dump holding its key. A
// sandboxed command is already kept out of /proc/<envoy pid> and from
// ptrace by Landlock; this covers a site that opted out of the sandbox
// and other programs of the envoy's user. It does not stop root (or a
// process with CAP_SYS_PTRACE). /proc/<pid>/cmdline stays world-readable
// whatever this does; keep secrets out of the envoy's arguments.
//
// The setting lasts until the process changes its user ids or execve's;
// commands the envoy starts are dumpable again.
func ProtectSelf() error {
	if err := unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0); err != nil {
		return fmt.Errorf("sandbox: prctl(PR_SET_DUMPABLE, 0): %w", err)
	}
	return nil
}
