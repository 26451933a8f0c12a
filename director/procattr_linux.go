package director

import "syscall"

// childProcAttr puts an aggregator process in its own process group, so a
// terminal's Ctrl-C reaches only the director, which stops it; and has
// Linux kill it when the director dies, so that no aggregator outlives the
// director that answers for it (a standby taking over starts its own).
func childProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}
