package disk

import (
	"fmt"
	"io/fs"
	"os"
	"runtime"
	"syscall"
	"testing"
)

func TestIsResourceError(t *testing.T) {
	for err, want := range map[error]bool{
		&fs.PathError{Op: "write", Path: "x", Err: syscall.ENOSPC}: true,
		fmt.Errorf("round 3: %w", syscall.EDQUOT):                  true,
		fmt.Errorf("read: %w", syscall.EIO):                        true,
		os.ErrNotExist:                                             false,
		fmt.Errorf("checksum mismatch"):                            false,
	} {
		if got := IsResourceError(err); got != want {
			t.Errorf("IsResourceError(%v) = %v, want %v", err, got, want)
		}
	}
}

func TestFree(t *testing.T) {
	n, ok := Free(t.TempDir())
	if runtime.GOOS == "windows" {
		return
	}
	if !ok || n <= 0 {
		t.Fatalf("Free = %d, %v; want the free bytes of the temporary directory's file system", n, ok)
	}
	if _, ok := Free("/no/such/dir"); ok {
		t.Error("Free of a missing directory reports ok")
	}
}
