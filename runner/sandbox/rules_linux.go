package sandbox

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/landlock-lsm/go-landlock/landlock"
	ll "github.com/landlock-lsm/go-landlock/landlock/syscall"
)

// systemReadOnly are what programs and their interpreters need to start:
// binaries, shared libraries, and /etc (ld.so.cache, passwd, locale, SSL
// roots). Missing ones are skipped.
var systemReadOnly = []string{"/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt"}

// systemReadOnlyFiles are global /proc and /sys entries runtimes read to
// size themselves (glibc, CPython, OpenBLAS, PyTorch, Go); nothing in them
// belongs to another process. /proc as a whole stays closed: its pid
// directories would show the envoy's command line.
var systemReadOnlyFiles = []string{
	"/proc/cpuinfo", "/proc/meminfo", "/proc/stat", "/proc/loadavg", "/proc/uptime",
	"/proc/version", "/proc/filesystems", "/proc/sys/vm/overcommit_memory",
	"/proc/sys/kernel/osrelease", "/proc/sys/crypto/fips_enabled",
	"/sys/devices/system/cpu", "/sys/devices/system/node",
	"/sys/kernel/mm/transparent_hugepage",
}

// systemDevices may be read and written; opening them for writing is how
// programs discard output.
var systemDevices = []string{"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"}

// systemReadWrite is POSIX shared memory: PyTorch's data loaders pass
// tensors through it and Python's multiprocessing keeps its locks there.
var systemReadWrite = []string{"/dev/shm"}

// access is what a rule grants beneath its path.
type access int

const (
	readOnly  access = iota // read, list and execute
	readWrite               // also create, write, remove, rename within
	devices                 // readWrite, plus ioctl on the devices beneath
	procSelf                // read, list, and write existing files (comm, oom_score_adj)
)

// rule is one Landlock path rule, on a path already free of symbolic links.
type rule struct {
	path   string
	access access
	dir    bool
}

// builder turns a Policy into rules, expanding directories that hold
// hidden paths.
type builder struct {
	hidden   []string // resolved
	rules    []rule
	expanded map[string]bool
}

// rules lists the path rules for p: the system's, then the policy's. It
// resolves paths as the calling process sees them (/proc/self is the
// caller), so the trampoline calls it for itself.
func (p Policy) rules() ([]rule, error) {
	b := &builder{expanded: map[string]bool{}}
	for _, h := range p.Hidden {
		if !filepath.IsAbs(h) {
			return nil, fmt.Errorf("sandbox: hidden path %q is not absolute", h)
		}
		r, err := resolveLoosely(h)
		if err != nil {
			return nil, fmt.Errorf("sandbox: hidden path %s: %w", h, err)
		}
		b.hidden = append(b.hidden, r)
	}
	// The command's own /proc entries (its pid survives execve). Those
	// of processes it starts are not allowed: the rule is on this pid's
	// directory.
	self := []string{"/proc/self"}
	for _, g := range []struct {
		paths  []string
		access access
	}{{systemReadOnly, readOnly}, {systemReadOnlyFiles, readOnly}, {systemDevices, readWrite}, {systemReadWrite, readWrite}, {self, procSelf}} {
		for _, pth := range g.paths {
			if err := b.allow(pth, g.access); err != nil {
				return nil, err
			}
		}
	}
	for _, pth := range p.ReadOnly {
		if err := b.allowExplicit("ReadOnly", pth, readOnly); err != nil {
			return nil, err
		}
	}
	for _, pth := range p.ReadWrite {
		if err := b.allowExplicit("ReadWrite", pth, devices); err != nil {
			return nil, err
		}
	}
	return b.rules, nil
}

// allowExplicit allows a path the site named. Unlike a system path it must
// exist, and it is allowed even inside a hidden path (the experiment
// inside the work directory), but not when it is a hidden path.
func (b *builder) allowExplicit(field, pth string, a access) error {
	if !filepath.IsAbs(pth) {
		return fmt.Errorf("sandbox: %s path %q is not absolute", field, pth)
	}
	r, err := filepath.EvalSymlinks(pth)
	if err != nil {
		return fmt.Errorf("sandbox: %s path %s: %w (create it, or leave it out of the policy)", field, pth, err)
	}
	for _, h := range b.hidden {
		if r == h {
			return fmt.Errorf("sandbox: %s path %s is also hidden (as %s); a path cannot be both", field, pth, h)
		}
	}
	return b.add(r, a)
}

// allow allows a system path if it exists and is not inside a hidden path.
func (b *builder) allow(pth string, a access) error {
	r, err := filepath.EvalSymlinks(pth)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("sandbox: %s: %w", pth, err)
	}
	if b.isHidden(r) {
		return nil
	}
	return b.add(r, a)
}

// add allows the resolved path r whole, or, if a hidden path lies beneath
// it, each of its entries but the hidden ones.
func (b *builder) add(r string, a access) error {
	fi, err := os.Stat(r)
	if err != nil {
		return fmt.Errorf("sandbox: %w", err)
	}
	if !fi.IsDir() || !b.holdsHidden(r) {
		b.rules = append(b.rules, rule{path: r, access: a, dir: fi.IsDir()})
		return nil
	}
	if b.expanded[r] {
		return nil
	}
	b.expanded[r] = true
	entries, err := os.ReadDir(r)
	if err != nil {
		return fmt.Errorf("sandbox: listing %s, which holds a hidden path: %w", r, err)
	}
	for _, e := range entries {
		child := filepath.Join(r, e.Name())
		// A symbolic link grants nothing by itself: Landlock checks
		// the file it leads to where that file lies. Allowing the
		// directory whole would not have reached its target either.
		if e.Type()&fs.ModeSymlink != 0 || b.isHidden(child) {
			continue
		}
		if err := b.add(child, a); err != nil {
			return err
		}
	}
	return nil
}

// isHidden reports whether r is a hidden path or lies beneath one.
func (b *builder) isHidden(r string) bool {
	for _, h := range b.hidden {
		if within(r, h) {
			return true
		}
	}
	return false
}

// holdsHidden reports whether a hidden path lies strictly beneath dir.
func (b *builder) holdsHidden(dir string) bool {
	for _, h := range b.hidden {
		if h != dir && within(h, dir) {
			return true
		}
	}
	return false
}

// within reports whether path is dir or beneath it (both clean and
// absolute).
func within(path, dir string) bool {
	return path == dir || dir == "/" || strings.HasPrefix(path, dir+"/")
}

// resolveLoosely resolves the symbolic links of the longest existing
// prefix of an absolute path and appends the rest, so that a hidden path
// that does not exist yet (a key the envoy will write on rotation) is
// hidden where it will appear.
func resolveLoosely(p string) (string, error) {
	p = filepath.Clean(p)
	var rest []string
	for {
		r, err := filepath.EvalSymlinks(p)
		if err == nil {
			return filepath.Join(append([]string{r}, rest...)...), nil
		}
		if !errors.Is(err, fs.ErrNotExist) {
			return "", err
		}
		parent := filepath.Dir(p)
		if parent == p {
			return "", err
		}
		rest = append([]string{filepath.Base(p)}, rest...)
		p = parent
	}
}

// landlockRules turns rules into go-landlock rules for the given ABI.
func landlockRules(rules []rule, abi int) []landlock.Rule {
	out := make([]landlock.Rule, 0, len(rules))
	for _, r := range rules {
		var fr landlock.FSRule
		switch {
		case r.access == readOnly && r.dir:
			fr = landlock.RODirs(r.path)
		case r.access == readOnly:
			fr = landlock.ROFiles(r.path)
		case r.access == procSelf:
			a := landlock.AccessFSSet(ll.AccessFSReadFile | ll.AccessFSReadDir | ll.AccessFSWriteFile)
			if abi >= abiTruncate {
				a |= ll.AccessFSTruncate // echo name > /proc/self/comm opens with O_TRUNC
			}
			fr = landlock.PathAccess(a, r.path)
		case r.dir:
			fr = landlock.RWDirs(r.path)
			if abi >= 2 {
				// Renaming within the directory (an atomic save)
				// needs "refer" from ABI 2 on; ABI 1 denies it
				// always, and asking for it there would turn
				// the whole sandbox off.
				fr = fr.WithRefer()
			}
		default:
			fr = landlock.RWFiles(r.path)
		}
		if r.access == devices {
			// A device the site lists as writable (a GPU) is
			// useless without its ioctls. The system's devices
			// (/dev/null, /dev/urandom) need none.
			fr = fr.WithIoctlDev()
		}
		out = append(out, fr)
	}
	return out
}
