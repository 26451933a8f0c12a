//go:build !linux

package envoy

import "net"

// checkPeer relies on the socket's file modes alone where the kernel's peer
// credentials are not read.
func checkPeer(net.Conn) error { return nil }
