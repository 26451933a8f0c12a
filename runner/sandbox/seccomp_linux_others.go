//go:build linux && !amd64 && !arm64

package sandbox

// auditArch 0: no seccomp filter was written for this architecture (some
// reach socket(2) through socketcall(2) as well, which the filter would
// have to cover).
const auditArch = 0
