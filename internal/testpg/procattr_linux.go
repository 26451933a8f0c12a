package testpg

import "syscall"

// procAttr runs a process with cred (nil: as this process), and stops it
// if the test binary (or program) dies without its cleanup (a panic, a
// timeout), so no server outlives its owner.
func procAttr(cred *syscall.Credential) *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Credential: cred, Pdeathsig: syscall.SIGQUIT}
}
