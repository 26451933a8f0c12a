package main

import (
	"bufio"
	"bytes"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// clockTicks is USER_HZ, the unit of utime and stime in /proc/PID/stat. It
// is 100 on every Linux architecture Go supports.
const clockTicks = 100

// procCPU returns the user+system CPU time of a process in seconds, from
// /proc/PID/stat (pid 0 means this process).
func procCPU(pid int) (float64, error) {
	path := "/proc/self/stat"
	if pid > 0 {
		path = fmt.Sprintf("/proc/%d/stat", pid)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	// The command name (field 2) may hold spaces; fields after it start
	// after the last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("%s: no ')'", path)
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state); utime is field 14, stime field 15.
	if len(f) < 13 {
		return 0, fmt.Errorf("%s: %d fields", path, len(f))
	}
	ut, err1 := strconv.ParseUint(f[11], 10, 64)
	st, err2 := strconv.ParseUint(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("%s: bad utime/stime %q %q", path, f[11], f[12])
	}
	return float64(ut+st) / clockTicks, nil
}

// procMem returns VmRSS and VmHWM in bytes from /proc/PID/status (pid 0
// means this process).
func procMem(pid int) (rss, hwm uint64, err error) {
	path := "/proc/self/status"
	if pid > 0 {
		path = fmt.Sprintf("/proc/%d/status", pid)
	}
	f, err := os.Open(path)
	if err != nil {
		return 0, 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		for _, k := range []struct {
			key string
			dst *uint64
		}{{"VmRSS:", &rss}, {"VmHWM:", &hwm}} {
			if rest, ok := strings.CutPrefix(line, k.key); ok {
				fs := strings.Fields(rest) // "123456 kB"
				if len(fs) > 0 {
					v, _ := strconv.ParseUint(fs[0], 10, 64)
					*k.dst = v << 10
				}
			}
		}
	}
	return rss, hwm, sc.Err()
}

// raiseNoFile raises the soft RLIMIT_NOFILE to the hard limit (Go already
// does this at start-up since 1.19; done here explicitly so a run says what
// it got) and fails when fewer than need descriptors are allowed.
func raiseNoFile(need uint64) (uint64, error) {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return 0, err
	}
	if rl.Max < need {
		// Only root can raise the hard limit; try, and report if refused.
		want := rl
		want.Max, want.Cur = need, need
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &want); err == nil {
			rl = want
		}
	}
	if rl.Cur < rl.Max {
		rl.Cur = rl.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
			return 0, err
		}
	}
	if rl.Cur < need {
		return rl.Cur, fmt.Errorf("RLIMIT_NOFILE is %d (hard %d); %d descriptors are needed: raise the hard limit (ulimit -Hn, limits.conf) or lower -n", rl.Cur, rl.Max, need)
	}
	return rl.Cur, nil
}

func mib(b uint64) float64 { return float64(b) / (1 << 20) }

// federationSetup is what a benchmark of fx processes starts from: the fx
// binary, a work directory (removed by done unless kept) and certificates
// for the director, a researcher and the envoys.
type federationSetup struct {
	bin, work string
	done      func()
	pki       *benchPKI
}

func setUpFederation(fxBin, prefix string, keep bool, pkiDir string, envoys int) (*federationSetup, error) {
	bin, err := fxBinary(fxBin)
	if err != nil {
		return nil, err
	}
	p, err := openBenchPKI(pkiDir)
	if err != nil {
		return nil, err
	}
	if _, err := p.envoys(envoys, 0); err != nil {
		return nil, err
	}
	work, done, err := workDir(prefix, keep)
	if err != nil {
		return nil, err
	}
	return &federationSetup{bin: bin, work: work, done: done, pki: p}, nil
}

// fxBinary is the absolute path of the fx binary a benchmark runs as its
// parties, which must have been built.
func fxBinary(path string) (string, error) {
	bin, err := filepath.Abs(path)
	if err != nil {
		return "", err
	}
	if _, err := os.Stat(bin); err != nil {
		return "", fmt.Errorf("-fx %s: %w (go build -o %s ./cmd/fx)", path, err, path)
	}
	return bin, nil
}

// workDir makes a benchmark's work directory; done removes it, unless keep
// asks to keep it (then it says where it is).
func workDir(prefix string, keep bool) (dir string, done func(), err error) {
	dir, err = os.MkdirTemp("", prefix)
	if err != nil {
		return "", nil, err
	}
	if keep {
		fmt.Printf("work directory (kept): %s\n", dir)
		return dir, func() {}, nil
	}
	return dir, func() { os.RemoveAll(dir) }, nil
}

// federationFlags defines the flags of every benchmark that runs a
// federation of fx processes: the certificate cache, the fx binary, the
// JSON result and whether to keep the work directory.
func federationFlags(fs *flag.FlagSet) (pkiDir, fxBin, out *string, keep *bool) {
	pkiDir = fs.String("pki", "bench/out/pki", "certificate cache (shared with capacity)")
	fxBin = fs.String("fx", "bench/out/fx", "the fx binary the director and envoys run")
	out = fs.String("out", "", "write the result as JSON here")
	keep = fs.Bool("keep", false, "keep the work directory (configurations, logs) and say where")
	return pkiDir, fxBin, out, keep
}
