// Package version says which build of fx this is: its version, commit and
// build date, stamped by the linker (make build) or read from what the Go
// toolchain records in every binary (debug.ReadBuildInfo), and whether two
// parties' versions can work together.
package version

import (
	"fmt"
	"runtime/debug"
	"strconv"
	"strings"
)

// Set at build time by make build:
//
//	-ldflags "-X github.com/fx-fl/fx/internal/version.version=v0.4.0
//	          -X github.com/fx-fl/fx/internal/version.commit=<sha>
//	          -X github.com/fx-fl/fx/internal/version.date=<RFC 3339>"
//
// A plain `go build` leaves them empty, and Get reads the module version
// and the VCS stamp instead.
var version, commit, date string

// Info describes a build.
type Info struct {
	// Version is a release ("v0.4.0") or, for a development build,
	// "devel" followed by its commit ("devel-0123456789ab").
	Version string
	// Commit is the VCS revision, "" if unknown; Modified says the work
	// tree had changes the commit does not hold.
	Commit   string
	Modified bool
	// Date is when the commit was made (or the build, with ldflags).
	Date string
	// Go is the toolchain that built it.
	Go string
}

// Get returns this build's Info.
func Get() Info {
	info := Info{Version: version, Commit: commit, Date: date}
	bi, ok := debug.ReadBuildInfo()
	if ok {
		info.Go = bi.GoVersion
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				if info.Commit == "" {
					info.Commit = s.Value
				}
			case "vcs.time":
				if info.Date == "" {
					info.Date = s.Value
				}
			case "vcs.modified":
				info.Modified = s.Value == "true"
			}
		}
		if info.Version == "" && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			info.Version = bi.Main.Version
		}
	}
	if info.Version == "" {
		info.Version = "devel"
		if len(info.Commit) >= 12 {
			info.Version += "-" + info.Commit[:12]
		}
		if info.Modified {
			info.Version += "+dirty"
		}
	}
	return info
}

// String is one line for `fx version` and start-up logs.
func (i Info) String() string {
	var extra []string
	if i.Commit != "" {
		c := i.Commit
		if len(c) > 12 {
			c = c[:12]
		}
		if i.Modified {
			c += " with local changes"
		}
		extra = append(extra, "commit "+c)
	}
	if i.Date != "" {
		extra = append(extra, "dated "+i.Date)
	}
	if i.Go != "" {
		extra = append(extra, i.Go)
	}
	if len(extra) == 0 {
		return i.Version
	}
	return i.Version + " (" + strings.Join(extra, ", ") + ")"
}

// Compatible says why two parties' versions may not work together, or nil.
// Releases speak the same protocol within one minor series before 1.0 and
// within one major series after it (v0.4.x with v0.4.y; v1.x with v1.y).
// Development builds are assumed to match each other and any release: fx
// developers run them together on purpose.
func Compatible(a, b string) error {
	ra, okA := release(a)
	rb, okB := release(b)
	if !okA || !okB {
		return nil
	}
	if ra[0] != rb[0] || ra[0] == 0 && ra[1] != rb[1] {
		series := func(r [3]int) string {
			if r[0] == 0 {
				return fmt.Sprintf("v0.%d.x", r[1])
			}
			return fmt.Sprintf("v%d.x", r[0])
		}
		return fmt.Errorf("fx %s and fx %s are of different release series (%s and %s) and may not speak the same protocol: upgrade the older party", a, b, series(ra), series(rb))
	}
	return nil
}

// release parses "vX.Y.Z" (with an optional -pre or +build suffix).
func release(v string) ([3]int, bool) {
	var r [3]int
	v, ok := strings.CutPrefix(v, "v")
	if !ok {
		return r, false
	}
	if i := strings.IndexAny(v, "-+"); i >= 0 {
		v = v[:i]
	}
	parts := strings.Split(v, ".")
	if len(parts) != 3 {
		return r, false
	}
	for i, p := range parts {
		n, err := strconv.Atoi(p)
		if err != nil || n < 0 {
			return r, false
		}
		r[i] = n
	}
	return r, true
}
