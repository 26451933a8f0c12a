package exec

import (
	"errors"
	"fmt"
	"os"
	osexec "os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
)

// envVar is one of the site's KEY=VALUE variables.
type envVar struct{ key, value string }

// envName is what a portable environment variable name looks like; anything
// else is more likely a typo than a need.
var envName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// parseEnv checks the site's extra variables: KEY=VALUE, a portable name,
// no NUL, no repeats, and nothing in the protocol's FX_ namespace (a site
// variable must not be able to redirect the command's inputs or outputs).
func parseEnv(entries []string) ([]envVar, error) {
	vars := make([]envVar, 0, len(entries))
	seen := make(map[string]bool, len(entries))
	for _, e := range entries {
		k, v, ok := strings.Cut(e, "=")
		switch {
		case !ok:
			return nil, fmt.Errorf("exec runner: environment entry %q is not KEY=VALUE", e)
		case !envName.MatchString(k):
			return nil, fmt.Errorf("exec runner: environment variable name %q is not a letter or _ followed by letters, digits and _", k)
		case strings.HasPrefix(strings.ToUpper(k), "FX_"):
			return nil, fmt.Errorf("exec runner: environment variable %s: names starting with FX_ are reserved for the runner protocol", k)
		case strings.ContainsRune(v, 0):
			return nil, fmt.Errorf("exec runner: environment variable %s holds a NUL character", k)
		case seen[k]:
			return nil, fmt.Errorf("exec runner: environment variable %s is set twice", k)
		}
		seen[k] = true
		vars = append(vars, envVar{k, v})
	}
	return vars, nil
}

// lookupEnv finds a site variable by name.
func lookupEnv(vars []envVar, key string) (string, bool) {
	for _, v := range vars {
		if v.key == key {
			return v.value, true
		}
	}
	return "", false
}

// pythonNames are the program names that mean "the site's Python".
var pythonNames = []string{"python", "python3"}

// resolveCommand turns argv[0] into the absolute path of the program to run:
// an absolute path as it is; a path with a slash inside dir (refusing one
// that leaves it, by ".." or through a symbolic link); python or python3 as
// the site's interpreter when it names one; any other bare name through
// searchPath, whose relative entries are skipped (they would depend on the
// envoy's working directory).
func resolveCommand(dir string, argv []string, searchPath, python string) (string, error) {
	if len(argv) == 0 {
		return "", errors.New("exec runner: no command (the plan's runner.command is empty)")
	}
	for i, a := range argv {
		if strings.ContainsRune(a, 0) {
			return "", fmt.Errorf("exec runner: command argument %d holds a NUL character", i)
		}
	}
	name := argv[0]
	switch {
	case strings.TrimSpace(name) == "":
		return "", errors.New("exec runner: the command's program name is empty")
	case filepath.IsAbs(name):
		return checkProgram(name, name)
	case strings.Contains(name, "/"):
		if !filepath.IsLocal(name) {
			return "", fmt.Errorf("exec runner: command %q leaves the experiment directory; name a program inside it (such as ./run.sh) or one in PATH (such as python3)", name)
		}
		p := filepath.Join(dir, name)
		real, err := filepath.EvalSymlinks(p)
		if err != nil {
			return "", fmt.Errorf("exec runner: command %q: %w", name, err)
		}
		realDir, err := filepath.EvalSymlinks(dir)
		if err != nil {
			return "", fmt.Errorf("exec runner: experiment directory: %w", err)
		}
		if rel, err := filepath.Rel(realDir, real); err != nil || !filepath.IsLocal(rel) {
			return "", fmt.Errorf("exec runner: command %q resolves to %s, outside the experiment directory", name, real)
		}
		return checkProgram(name, p)
	}
	if python != "" && slices.Contains(pythonNames, name) {
		if !filepath.IsAbs(python) {
			return "", fmt.Errorf("exec runner: the site's Python interpreter %q (exec.python) must be an absolute path", python)
		}
		p, err := checkProgram(python, python)
		if err != nil {
			return "", fmt.Errorf("%w (the site's exec.python, which runs plans whose command is %s)", err, name)
		}
		return p, nil
	}
	for _, d := range filepath.SplitList(searchPath) {
		if d == "" || !filepath.IsAbs(d) {
			continue
		}
		p := filepath.Join(d, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o111 != 0 {
			return p, nil
		}
	}
	hint := ""
	if slices.Contains(pythonNames, name) {
		hint = "; the site can name its interpreter with exec.python"
	}
	return "", fmt.Errorf("exec runner: command %q not found in the runners' PATH %q (the site's exec.env PATH, else %s)%s", name, searchPath, DefaultPath, hint)
}

// checkProgram checks that p is an executable regular file.
func checkProgram(name, p string) (string, error) {
	fi, err := os.Stat(p)
	if err != nil {
		return "", fmt.Errorf("exec runner: command %q: %w", name, err)
	}
	if !fi.Mode().IsRegular() {
		return "", fmt.Errorf("exec runner: command %q is not a regular file", name)
	}
	if fi.Mode().Perm()&0o111 == 0 {
		return "", fmt.Errorf("exec runner: command %q is not executable; run it through its interpreter (such as [sh, %s] or [python3, %s]) or set its execute bit before packing", name, name, name)
	}
	return p, nil
}

// describeExit says how the command ended, from cmd.Wait's error.
func describeExit(err error) string {
	var ee *osexec.ExitError
	if !errors.As(err, &ee) {
		return err.Error()
	}
	if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return fmt.Sprintf("the command was killed by signal %d (%s)", int(ws.Signal()), ws.Signal())
	}
	return fmt.Sprintf("the command exited with status %d", ee.ExitCode())
}
