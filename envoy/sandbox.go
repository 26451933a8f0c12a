package envoy

import (
	"fmt"
	"os"
	osexec "os/exec"
	"path/filepath"
	"strings"

	"github.com/hashicorp/go-hclog"

	"github.com/fx-fl/fx/runner/sandbox"
)

// checkSandbox says at start-up how the site's exec runners will run, and
// returns why they cannot (nil if they can): where exec runners are allowed
// and should be sandboxed but the system cannot sandbox them, they are
// refused, at review, with this reason.
func checkSandbox(cfg *Config, log hclog.Logger) error {
	if !cfg.Exec.Allow {
		return nil
	}
	if !cfg.Exec.Sandbox {
		log.Warn("exec runners run UNSANDBOXED (exec.sandbox: false): an experiment's code can read whatever the envoy can, its private key included")
		return nil
	}
	s, err := sandbox.Check()
	if err != nil {
		err = fmt.Errorf("exec runners are refused: this system cannot sandbox them (%w); a site that accepts the risk sets exec.sandbox: false", err)
		log.Error(err.Error())
		return err
	}
	log.Info("exec runners run sandboxed", "landlock", s.String(), "network", cfg.Exec.Network)
	return nil
}

// runnerPolicy is what an experiment's runner may touch at this site: the
// experiment (dir), the site's data, the interpreter and the directories
// the site named in exec.env and exec.python; its own scratch directory
// (workDir) to write; and never the envoy's key, certificates,
// configuration or work directory, which holds the other experiments.
func (e *Envoy) runnerPolicy(dir, workDir string) sandbox.Policy {
	c := &e.cfg
	p := sandbox.Policy{
		ReadOnly:     []string{dir},
		ReadWrite:    []string{workDir},
		AllowNetwork: c.Exec.Network,
	}
	addRead := func(path string) {
		if path == "" || !filepath.IsAbs(path) {
			return
		}
		if _, err := os.Stat(path); err == nil && !systemPath(path) {
			p.ReadOnly = append(p.ReadOnly, filepath.Clean(path))
		}
	}
	if c.Shard.Path != "" {
		if abs, err := filepath.Abs(c.Shard.Path); err == nil {
			addRead(abs)
		}
	}
	if c.Exec.Python != "" {
		// A virtual environment's interpreter lives in <venv>/bin and its
		// packages beside: the whole environment is read.
		addRead(filepath.Dir(filepath.Dir(c.Exec.Python)))
	}
	for _, kv := range c.Exec.Env {
		k, v, _ := strings.Cut(kv, "=")
		if k == "PATH" || k == "PYTHONPATH" || k == "LD_LIBRARY_PATH" {
			for _, d := range filepath.SplitList(v) {
				addRead(d)
			}
		}
	}
	for _, path := range []string{c.TLS.Key, c.TLS.Cert, c.TLS.CA, c.TLS.CRL, c.ConfigFile, c.WorkDir, c.AdminSocketPath(), c.Review.Allowlist} {
		if path == "" {
			continue
		}
		if abs, err := filepath.Abs(path); err == nil {
			p.Hidden = append(p.Hidden, abs)
		}
	}
	return p
}

// systemPath reports whether path lies in the directories every sandboxed
// command reads anyway.
func systemPath(path string) bool {
	for _, d := range []string{"/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/etc", "/opt"} {
		if path == d || strings.HasPrefix(path, d+"/") {
			return true
		}
	}
	return false
}

// contain is the exec runner's Contain hook for the policy, or nil where
// runners run unsandboxed.
func (e *Envoy) contain(dir, workDir string) func(*osexec.Cmd) error {
	if !e.cfg.Exec.Sandbox {
		return nil
	}
	p := e.runnerPolicy(dir, workDir)
	return p.Apply
}
