// Package disk answers the two questions fx asks before and after writing
// large files: how much room is left, and whether a failed write failed
// for want of a resource (space, quota, a working disk) rather than
// because of what was written. Resource errors pause work until the
// operator fixes the cause; other errors fail it.
package disk

import (
	"errors"
	"syscall"
)

// IsResourceError reports whether err comes from the system running out
// of something, or a disk failing, rather than from the data: no space,
// over quota, a read-only or failing file system, too many open files.
func IsResourceError(err error) bool {
	for _, e := range []error{syscall.ENOSPC, syscall.EDQUOT, syscall.EROFS, syscall.EIO, syscall.EMFILE, syscall.ENFILE} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}
