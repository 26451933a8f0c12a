//go:build !linux

package director

import "syscall"

// childProcAttr: without Linux's parent-death signal an aggregator process
// whose director died exits once it has not reached the director for its
// spec's DirectorGrace.
func childProcAttr() *syscall.SysProcAttr { return nil }
