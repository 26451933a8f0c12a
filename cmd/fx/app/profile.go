package app

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime/pprof"
)

// cpuProfileEnv names a directory where each fx process writes a CPU profile
// of its whole run (<command>-<pid>.pprof), for fx's maintainers measuring
// the product as users run it (bench/README.md). Unset, nothing happens.
const cpuProfileEnv = "FX_CPUPROFILE"

// startProfile starts the CPU profile FX_CPUPROFILE asks for and returns
// the function that writes it out.
func startProfile() (stop func()) {
	dir := os.Getenv(cpuProfileEnv)
	if dir == "" {
		return func() {}
	}
	name := "fx"
	if len(os.Args) > 1 {
		name += "-" + os.Args[1]
	}
	f, err := os.Create(filepath.Join(dir, fmt.Sprintf("%s-%d.pprof", name, os.Getpid())))
	if err != nil {
		fmt.Fprintf(os.Stderr, "fx: %s: %v\n", cpuProfileEnv, err)
		return func() {}
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		fmt.Fprintf(os.Stderr, "fx: %s: %v\n", cpuProfileEnv, err)
		f.Close()
		return func() {}
	}
	return func() {
		pprof.StopCPUProfile()
		f.Close()
	}
}
