package liveserver

import (
	"os/exec"
	"syscall"
)

// dieWithParent kills the server when the test process dies without cleaning up (a test
// binary killed at its -timeout), so no server outlives its test.
func dieWithParent(process *exec.Cmd) {
	process.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
