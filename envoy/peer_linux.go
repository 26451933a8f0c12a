package envoy

import (
	"fmt"
	"net"
	"os"
	"syscall"
)

// checkPeer refuses an admin connection from a process of another user
// than the envoy's (root excepted). The socket's file modes already keep
// others out; this holds even if someone loosens them.
func checkPeer(c net.Conn) error {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return nil
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return fmt.Errorf("reading the caller's credentials: %w", err)
	}
	var cred *syscall.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED)
	}); err != nil {
		return fmt.Errorf("reading the caller's credentials: %w", err)
	}
	if credErr != nil {
		return fmt.Errorf("reading the caller's credentials: %w", credErr)
	}
	if uid := int(cred.Uid); uid != os.Getuid() && uid != 0 {
		return fmt.Errorf("user %d may not use this envoy's admin socket: run the command as the envoy's user", uid)
	}
	return nil
}
