package exec

import (
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// procAttr starts the command in its own process group, so a timeout or a
// cancellation can signal everything it started, and has the kernel kill it
// (SIGKILL) if the process that started it dies: an envoy killed mid-task
// must not leave the experiment's code running unsupervised, with no timeout
// enforced, beside the copy the restarted envoy starts. (The signal reaches
// the command's main process; what it started in turn is its business, as
// when its main process exits.)
func procAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}

// pending is how many bytes wait unread in a pipe (0 if unknown). It goes
// through SyscallConn, which leaves the pipe non-blocking (Fd would not).
func pending(f *os.File) int {
	rc, err := f.SyscallConn()
	if err != nil {
		return 0
	}
	n := 0
	_ = rc.Control(func(fd uintptr) {
		n, _ = unix.IoctlGetInt(int(fd), unix.TIOCINQ)
	})
	return n
}
