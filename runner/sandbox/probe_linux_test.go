package sandbox_test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// The test binary doubles as the hostile command: started with probeEnv
// set, it tries each access named in its arguments and prints, one JSON
// line each, whether the kernel let it.

const probeEnv = "FX_SANDBOX_TEST_PROBE"

// probeResult is one attempted access: Err is "" when it worked, else the
// errno's name (EACCES) or the error's text.
type probeResult struct {
	Probe string
	Err   string
}

// probeMain runs the probes in os.Args[1:], each "op:argument".
func probeMain() int {
	enc := json.NewEncoder(os.Stdout)
	for _, p := range os.Args[1:] {
		op, arg, _ := strings.Cut(p, ":")
		err := probe(op, arg)
		r := probeResult{Probe: p}
		if err != nil {
			r.Err = errName(err)
		}
		if err := enc.Encode(r); err != nil {
			return 1
		}
	}
	return 0
}

// errName reduces an error to its errno's name where it has one, so that
// tests can tell "denied" (EACCES, EPERM) from "missing" (ENOENT).
func errName(err error) string {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		if name := unix.ErrnoName(errno); name != "" {
			return name
		}
	}
	return err.Error()
}

// ppid substitutes the parent's pid (the test process) for PPID.
func ppid(arg string) string {
	return strings.ReplaceAll(arg, "PPID", strconv.Itoa(os.Getppid()))
}

func probe(op, arg string) error {
	arg = ppid(arg)
	switch op {
	case "read": // open a file and read a byte (or a directory and list it)
		f, err := os.Open(arg)
		if err != nil {
			return err
		}
		defer f.Close()
		if fi, err := f.Stat(); err == nil && fi.IsDir() {
			_, err = f.ReadDir(1)
			return err
		}
		_, err = f.Read(make([]byte, 1))
		if errors.Is(err, io.EOF) {
			err = nil
		}
		return err
	case "open": // open read-only, read nothing (/proc/<pid>/mem)
		f, err := os.Open(arg)
		if err != nil {
			return err
		}
		return f.Close()
	case "wait": // read a line from stdin: the test changes something meanwhile
		_, err := bufio.NewReader(os.Stdin).ReadString('\n')
		return err
	case "readlink":
		_, err := os.Readlink(arg)
		return err
	case "create": // create a new file and write to it
		f, err := os.OpenFile(arg, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
		if err != nil {
			return err
		}
		_, err = f.WriteString("x")
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		return err
	case "append": // open an existing file for writing
		f, err := os.OpenFile(arg, os.O_WRONLY|os.O_APPEND, 0)
		if err != nil {
			return err
		}
		return f.Close()
	case "truncate":
		return os.Truncate(arg, 0)
	case "mkdir":
		return os.Mkdir(arg, 0o700)
	case "remove":
		return os.Remove(arg)
	case "rename": // rename:from>to
		from, to, _ := strings.Cut(arg, ">")
		return os.Rename(from, to)
	case "exec":
		return exec.Command(arg).Run()
	case "tcp-connect":
		c, err := net.Dial("tcp", arg)
		if err != nil {
			return err
		}
		return c.Close()
	case "tcp-bind":
		l, err := (&net.ListenConfig{}).Listen(context.Background(), "tcp", arg)
		if err != nil {
			return err
		}
		return l.Close()
	case "mptcp-connect":
		return rawConnect(unix.AF_INET, unix.SOCK_STREAM, unix.IPPROTO_MPTCP, arg)
	case "udp-send":
		c, err := net.Dial("udp", arg)
		if err != nil {
			return err
		}
		defer c.Close()
		_, err = c.Write([]byte("x"))
		return err
	case "unix-connect": // a pathname socket, or @name for an abstract one
		c, err := net.Dial("unix", arg)
		if err != nil {
			return err
		}
		return c.Close()
	case "signal": // signal 0 (existence and permission check) to a pid
		pid, err := strconv.Atoi(arg)
		if err != nil {
			return err
		}
		return syscall.Kill(pid, 0)
	case "caps": // fails if the process holds any capability
		held, err := capabilities()
		if err == nil && len(held) > 0 {
			err = fmt.Errorf("holds %s", strings.Join(held, " "))
		}
		return err
	case "ptrace":
		pid, err := strconv.Atoi(arg)
		if err != nil {
			return err
		}
		return unix.PtraceSeize(pid)
	}
	return fmt.Errorf("unknown probe %q", op)
}

// rawConnect connects a socket of the given protocol to an IPv4 host:port.
func rawConnect(family, typ, proto int, hostport string) error {
	addr, err := net.ResolveTCPAddr("tcp4", hostport)
	if err != nil {
		return err
	}
	fd, err := unix.Socket(family, typ|unix.SOCK_CLOEXEC, proto)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	sa := &unix.SockaddrInet4{Port: addr.Port}
	copy(sa.Addr[:], addr.IP.To4())
	return unix.Connect(fd, sa)
}

// capabilities returns the capability lines of /proc/self/status that are
// not all zero.
func capabilities() ([]string, error) {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return nil, err
	}
	var held []string
	for _, line := range strings.Split(string(b), "\n") {
		k, v, _ := strings.Cut(line, ":")
		if strings.HasPrefix(k, "Cap") && strings.Trim(strings.TrimSpace(v), "0") != "" {
			held = append(held, k+"="+strings.TrimSpace(v))
		}
	}
	return held, nil
}
