//go:build !unix

package pki

import (
	"os"
	"sync"
)

// fileID is not available here; size and modification time must do.
func fileID(os.FileInfo) uint64 { return 0 }

var dirLock sync.Mutex

// lockDir serialises revocations within this process; systems without
// flock get no protection against two processes revoking at once.
func lockDir(string) (unlock func(), err error) {
	dirLock.Lock()
	return dirLock.Unlock, nil
}
