//go:build unix

package privacy

import (
	"os"
	"syscall"
)

// lockFile takes an exclusive advisory lock on f, waiting for it, so that
// two processes sharing a work directory cannot interleave their charges.
func lockFile(f *os.File) error { return syscall.Flock(int(f.Fd()), syscall.LOCK_EX) }

func unlockFile(f *os.File) error { return syscall.Flock(int(f.Fd()), syscall.LOCK_UN) }
