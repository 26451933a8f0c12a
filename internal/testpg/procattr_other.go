//go:build !linux

package testpg

import "syscall"

// procAttr runs a process with cred (nil: as this process).
func procAttr(cred *syscall.Credential) *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Credential: cred}
}
