package version

import (
	"strings"
	"testing"
)

func TestCompatible(t *testing.T) {
	for _, tc := range []struct {
		a, b string
		ok   bool
	}{
		{"v0.4.0", "v0.4.7", true},
		{"v0.4.0", "v0.5.0", false},
		{"v1.2.0", "v1.9.3", true},
		{"v1.2.0", "v2.0.0", false},
		{"v1.2.0-rc.1", "v1.0.0+build.5", true},
		{"v0.4.0", "devel-0123456789ab", true},
		{"devel", "devel-0123456789ab+dirty", true},
		{"v0.4", "v0.5.0", true}, // not a release: not judged
	} {
		err := Compatible(tc.a, tc.b)
		if (err == nil) != tc.ok {
			t.Errorf("Compatible(%s, %s) = %v, want ok %v", tc.a, tc.b, err, tc.ok)
		}
		if err != nil && (!strings.Contains(err.Error(), tc.a) || !strings.Contains(err.Error(), "upgrade")) {
			t.Errorf("error %q does not name the versions and what to do", err)
		}
	}
}

// TestGet: a test binary has no linker stamp; its Info still names a
// version and the toolchain.
func TestGet(t *testing.T) {
	i := Get()
	if i.Version == "" || !strings.HasPrefix(i.Go, "go") {
		t.Fatalf("Get() = %+v", i)
	}
	if s := i.String(); !strings.HasPrefix(s, i.Version) || !strings.Contains(s, i.Go) {
		t.Errorf("String() = %q", s)
	}
}

func TestStringOfAStampedRelease(t *testing.T) {
	i := Info{Version: "v0.4.0", Commit: "0123456789abcdef0123", Date: "2026-12-06T12:00:00Z", Go: "go1.26.8", Modified: true}
	want := "v0.4.0 (commit 0123456789ab with local changes, dated 2026-12-06T12:00:00Z, go1.26.8)"
	if got := i.String(); got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
}
