//go:build !linux

package sandbox

import (
	"fmt"
	"os/exec"
	"runtime"
)

// Check reports that this system cannot sandbox a command.
func Check() (Support, error) {
	return Support{}, fmt.Errorf("%w: sandboxing needs Linux with Landlock, and this is %s", ErrUnsupported, runtime.GOOS)
}

// Apply refuses: this system cannot sandbox a command.
func (p Policy) Apply(cmd *exec.Cmd) error {
	_, err := Check()
	return err
}

// Main does nothing: no trampoline runs on this system.
func Main() {}

// ProtectSelf does nothing on this system.
func ProtectSelf() error { return nil }
