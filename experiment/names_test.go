package experiment

import (
	"errors"
	"strings"
	"testing"
)

func TestValidateName(t *testing.T) {
	cases := []struct {
		name string
		// msg is empty for a valid name, else a part of the error.
		msg string
	}{
		{"fashion-mlp", ""},
		{"a", ""},
		{"Site_01.eu-west", ""},
		{"v1.2", ""},
		{"a-", ""},
		{"x.", ""},
		{strings.Repeat("n", 64), ""},

		{"", "must not be empty"},
		{strings.Repeat("n", 65), "is 65 characters long: at most 64"},
		{"../x", "use letters, digits, '.', '_' and '-' only"},
		{"a/b", "use letters, digits"},
		{`a\b`, "use letters, digits"},
		{"a b", "use letters, digits"},
		{"a\x00b", "use letters, digits"},
		{"ümlaut", "use letters, digits"},
		{"a:b", "use letters, digits"},
		{".hidden", "must not start with '.' or '-'"},
		{"-rf", "must not start with '.' or '-'"},
		{"..", "must not start"},
		{"a..b", `must not contain ".."`},
		{"a...", `must not contain ".."`},
	}
	for _, c := range cases {
		err := ValidateName("experiment", c.name)
		if c.msg == "" {
			if err != nil {
				t.Errorf("%q: unexpected error %v", c.name, err)
			}
			continue
		}
		if err == nil {
			t.Errorf("%q: accepted", c.name)
			continue
		}
		if !errors.Is(err, ErrInvalidName) {
			t.Errorf("%q: error does not match ErrInvalidName", c.name)
		}
		if !strings.Contains(err.Error(), c.msg) {
			t.Errorf("%q: error %q does not contain %q", c.name, err, c.msg)
		}
		if !strings.HasPrefix(err.Error(), "experiment name ") {
			t.Errorf("%q: error %q does not name the kind", c.name, err)
		}
	}
}

func TestValidateNameMessage(t *testing.T) {
	err := ValidateName("envoy", "../x")
	want := `envoy name "../x": use letters, digits, '.', '_' and '-' only`
	if err == nil || err.Error() != want {
		t.Fatalf("got %v, want %s", err, want)
	}
	var ne *NameError
	if !errors.As(err, &ne) || ne.Kind != "envoy" || ne.Name != "../x" {
		t.Fatalf("want a *NameError for envoy ../x, got %#v", err)
	}
}
