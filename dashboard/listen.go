package dashboard

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
)

// DefaultListen is where `fx dashboard` listens unless told otherwise.
const DefaultListen = "127.0.0.1:8642"

// ErrNotLoopback is matched by CheckListen's error for an address other
// machines could reach.
var ErrNotLoopback = errors.New("not a loopback address")

// CheckListen refuses a listen address other machines could reach unless
// allowRemote is set: the dashboard acts with the user's certificate, so
// anyone who can reach it could read the user's experiments and download
// their models as them. Loopback addresses and "localhost" pass.
func CheckListen(addr string, allowRemote bool) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("listen address %q is not host:port: %w", addr, err)
	}
	if allowRemote || isLoopback(host) {
		return nil
	}
	what := fmt.Sprintf("%s is not a loopback address", host)
	if host == "" || isUnspecified(host) {
		what = "it listens on every interface"
	}
	return fmt.Errorf("%w: refusing to listen on %s: %s, and the dashboard acts with your certificate: whoever reaches it reads your experiments and downloads your models as you. Keep it on 127.0.0.1 and reach it from another machine through an SSH tunnel (ssh -L 8642:127.0.0.1:8642 THIS-HOST), or give --allow-remote if everyone who can reach %s may act as you", ErrNotLoopback, addr, what, addr)
}

func isLoopback(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.IsLoopback()
}

func isUnspecified(host string) bool {
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.IsUnspecified()
}

// hostCheck is the DNS-rebinding guard: a page from evil.example whose name
// is made to resolve to 127.0.0.1 reaches the dashboard with
// "Host: evil.example:8642", which names no address of ours. A request
// passes when its Host is the dashboard's port with "localhost", a loopback
// address or the listen host; on an unspecified listen address (every
// interface, under --allow-remote) also with any IP address or this
// machine's host name. IP addresses cannot be rebound, so they are safe to
// accept; other names are refused.
type hostCheck struct {
	port     string
	listen   string // the listen host, lower case
	anyIP    bool
	hostname string
}

func newHostCheck(addr string) (hostCheck, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return hostCheck{}, fmt.Errorf("dashboard address %q is not host:port: %w", addr, err)
	}
	if port == "" || port == "0" {
		return hostCheck{}, fmt.Errorf("dashboard address %q: give the port actually bound", addr)
	}
	hc := hostCheck{port: port, listen: strings.ToLower(host)}
	if host == "" || isUnspecified(host) {
		hc.anyIP = true
		hc.hostname, _ = os.Hostname()
		hc.hostname = strings.ToLower(hc.hostname)
	}
	return hc, nil
}

func (hc hostCheck) allowed(hostport string) bool {
	hostport = strings.ToLower(hostport)
	host, port, err := net.SplitHostPort(hostport)
	if err != nil {
		// No port: a browser leaves out only the default one.
		host, port = strings.Trim(hostport, "[]"), "80"
	}
	if port != hc.port || host == "" {
		return false
	}
	switch {
	case isLoopback(host), host == hc.listen:
		return true
	case hc.anyIP:
		_, err := netip.ParseAddr(host)
		return err == nil || host == hc.hostname
	}
	return false
}

// want says which hosts pass, for the refusal.
func (hc hostCheck) want() string {
	s := fmt.Sprintf("localhost:%s and 127.0.0.1:%s", hc.port, hc.port)
	switch {
	case hc.anyIP:
		s += fmt.Sprintf(", this machine's IP addresses and host name at port %s", hc.port)
	case !isLoopback(hc.listen):
		s += fmt.Sprintf(" and %s", net.JoinHostPort(hc.listen, hc.port))
	}
	return s
}
