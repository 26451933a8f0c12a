//go:build !linux

package exec

import "syscall"

// procAttr starts the command in its own process group, so a timeout or a
// cancellation can signal everything it started. Only Linux can also have
// it killed when the envoy dies.
func procAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true}
}
