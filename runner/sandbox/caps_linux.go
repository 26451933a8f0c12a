package sandbox

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// dropCapabilities leaves the calling thread, and what it execve's, with no
// capabilities. Landlock's rules hold for root, but a root command would
// keep the capabilities for what Landlock does not cover: loading BPF or
// perf programs that read any process's memory (the envoy's key), raw I/O
// ports, kernel modules, reboot. An envoy that runs as root thus starts
// commands that are root only by uid: they read and write files through
// ordinary permissions, never past them.
//
// The bounding set goes first (that needs CAP_SETPCAP), since execve as
// root would otherwise grant it afresh; then the inheritable and ambient
// sets; no_new_privs already keeps file capabilities and set-user-ID
// programs from granting any.
func dropCapabilities() error {
	for c := 0; ; c++ {
		err := unix.Prctl(unix.PR_CAPBSET_DROP, uintptr(c), 0, 0, 0)
		if errors.Is(err, unix.EINVAL) {
			break // past the kernel's last capability
		}
		if errors.Is(err, unix.EPERM) && os.Geteuid() != 0 {
			break // nothing to drop: execve grants a non-root user none
		}
		if err != nil {
			return fmt.Errorf("sandbox: dropping capability %d from the bounding set: %w", c, err)
		}
	}
	if err := unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0); err != nil && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("sandbox: clearing ambient capabilities: %w", err)
	}
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capset(&hdr, &data[0]); err != nil {
		return fmt.Errorf("sandbox: dropping capabilities: %w", err)
	}
	return nil
}
