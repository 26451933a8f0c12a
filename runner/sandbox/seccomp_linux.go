package sandbox

import (
	"fmt"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Landlock's network rules cover classic TCP only: a socket opened with
// IPPROTO_MPTCP (Go's net.Listen does so by default) binds and connects
// freely, to any host, as does UDP before ABI 10. So "no network" is a
// seccomp filter on socket(2): a command may create unix sockets (for
// Python's multiprocessing) and nothing else. io_uring is refused too,
// since it can create sockets without socket(2). The filter is installed
// on the trampoline's thread and so holds for the command and everything
// it starts.

// noNetworkFilter returns the filter for this architecture, or an error
// on one it was not written for.
func noNetworkFilter() ([]unix.SockFilter, error) {
	if auditArch == 0 {
		return nil, fmt.Errorf("sandbox: denying the network needs a seccomp filter written for %s, and there is none: allow the command the network, or run the envoy on amd64 or arm64", runtime.GOARCH)
	}
	const (
		ld   = unix.BPF_LD | unix.BPF_W | unix.BPF_ABS
		jeq  = unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K
		jge  = unix.BPF_JMP | unix.BPF_JGE | unix.BPF_K
		ret  = unix.BPF_RET | unix.BPF_K
		nr   = 0  // offsetof(struct seccomp_data, nr)
		arch = 4  // offsetof(struct seccomp_data, arch)
		arg0 = 16 // offsetof(struct seccomp_data, args[0]), low half on little-endian machines
	)
	allow := uint32(unix.SECCOMP_RET_ALLOW)
	deny := uint32(unix.SECCOMP_RET_ERRNO | uint32(unix.EACCES))
	kill := uint32(unix.SECCOMP_RET_KILL_PROCESS)
	return []unix.SockFilter{
		// A syscall of another ABI (i386's socketcall on amd64) is
		// one this filter cannot read: a 32-bit program is killed
		// at its first syscall.
		{Code: ld, K: arch},
		{Code: jeq, K: auditArch, Jt: 1},
		{Code: ret, K: kill},
		{Code: ld, K: nr},
		// So is an x32 one (amd64 numbers with this bit set).
		{Code: jge, K: 0x40000000, Jf: 1},
		{Code: ret, K: kill},
		{Code: jeq, K: unix.SYS_IO_URING_SETUP, Jf: 1},
		{Code: ret, K: deny},
		{Code: jeq, K: unix.SYS_SOCKET, Jt: 1},
		{Code: ret, K: allow},
		{Code: ld, K: arg0},
		{Code: jeq, K: unix.AF_UNIX, Jf: 1},
		{Code: ret, K: allow},
		{Code: ret, K: deny},
	}, nil
}

// installFilter installs a seccomp filter on the calling thread, which
// must have no_new_privs set.
func installFilter(filter []unix.SockFilter) error {
	prog := unix.SockFprog{Len: uint16(len(filter)), Filter: &filter[0]}
	_, _, errno := unix.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, 0, uintptr(unsafe.Pointer(&prog)))
	runtime.KeepAlive(filter)
	if errno != 0 {
		return fmt.Errorf("sandbox: installing the seccomp filter that denies the network: %w", errno)
	}
	return nil
}
