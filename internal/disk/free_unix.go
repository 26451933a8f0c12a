//go:build unix

package disk

import "syscall"

// Free returns the bytes an unprivileged process may still write on the
// file system that holds path; ok is false where that cannot be known.
func Free(path string) (bytes int64, ok bool) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(path, &st); err != nil {
		return 0, false
	}
	return int64(st.Bavail) * int64(st.Bsize), true
}
