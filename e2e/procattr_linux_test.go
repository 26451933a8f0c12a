package e2e

import "syscall"

// procAttr puts each party in its own process group, and has Linux kill it
// if the test binary dies first (a panic, a -timeout), so no party outlives
// the test run.
func procAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}
