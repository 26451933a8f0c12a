package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"
)

type tlsSettings struct {
	Cert string `mapstructure:"cert"`
	Key  string `mapstructure:"key"`
}

type settings struct {
	Listen    string        `mapstructure:"listen"`
	Period    time.Duration `mapstructure:"heartbeat_period"`
	MaxActive int           `mapstructure:"max_active"`
	Tags      []string      `mapstructure:"tags"`
	TLS       tlsSettings   `mapstructure:"tls"`
}

func defaults() settings {
	return settings{Listen: "default:1", Period: time.Second, MaxActive: 1, TLS: tlsSettings{Cert: "default.crt", Key: "default.key"}}
}

func writeFile(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "c.yaml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func flags(t *testing.T, args ...string) *pflag.FlagSet {
	t.Helper()
	fs := pflag.NewFlagSet("test", pflag.ContinueOnError)
	fs.String("listen", "flagdefault:9", "")
	fs.String("tls-cert", "", "")
	fs.Int("max-active", 0, "")
	fs.StringSlice("tags", nil, "")
	if err := fs.Parse(args); err != nil {
		t.Fatal(err)
	}
	return fs
}

var flagKeys = map[string]string{"tls-cert": "tls.cert", "max-active": "max_active"}

func TestPrecedence(t *testing.T) {
	file := writeFile(t, "listen: file:2\nheartbeat_period: 5s\ntls:\n  cert: file.crt\n  key: file.key\nmax_active: 3\n")
	tests := []struct {
		name  string
		file  string
		env   []string
		args  []string
		check func(settings) string
	}{
		{"defaults only", "", nil, nil, func(s settings) string {
			if s.Listen != "default:1" || s.Period != time.Second || s.TLS.Cert != "default.crt" {
				return "defaults not kept"
			}
			return ""
		}},
		{"unset flag does not mask the file", file, nil, nil, func(s settings) string {
			if s.Listen != "file:2" || s.Period != 5*time.Second || s.TLS.Key != "file.key" || s.MaxActive != 3 {
				return "file values not applied"
			}
			return ""
		}},
		{"environment beats file, nested keys too", file, []string{"FX_LISTEN=env:3", "FX_TLS_CERT=env.crt", "FX_HEARTBEAT_PERIOD=7s", "OTHER=x"}, nil, func(s settings) string {
			if s.Listen != "env:3" || s.TLS.Cert != "env.crt" || s.Period != 7*time.Second || s.TLS.Key != "file.key" {
				return "environment not applied over file"
			}
			return ""
		}},
		{"flag beats environment", file, []string{"FX_LISTEN=env:3", "FX_TLS_CERT=env.crt", "FX_MAX_ACTIVE=4"}, []string{"--listen=flag:4", "--tls-cert=flag.crt", "--tags=a,b"}, func(s settings) string {
			if s.Listen != "flag:4" || s.TLS.Cert != "flag.crt" || s.MaxActive != 4 || strings.Join(s.Tags, "|") != "a|b" {
				return "flags not applied over environment"
			}
			return ""
		}},
		{"environment list", "", []string{"FX_TAGS=x,y"}, nil, func(s settings) string {
			if strings.Join(s.Tags, "|") != "x|y" {
				return "list from environment not split"
			}
			return ""
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := defaults()
			env := tc.env
			if env == nil {
				env = []string{}
			}
			if err := Load(Source{File: tc.file, Flags: flags(t, tc.args...), FlagKeys: flagKeys, Environ: env}, &s); err != nil {
				t.Fatalf("Load: %v", err)
			}
			if msg := tc.check(s); msg != "" {
				t.Fatalf("%s: got %+v", msg, s)
			}
		})
	}
}

func TestErrorsNameTheKey(t *testing.T) {
	tests := []struct {
		name, file string
		env        []string
		want       string
	}{
		{"unknown top-level key", "listen: a\nlisten_adress: b\n", nil, `unknown key "listen_adress"`},
		{"unknown nested key", "tls:\n  cert: a\n  kee: b\n", nil, `unknown key "tls.kee"`},
		{"bad duration in file", "heartbeat_period: soon\n", nil, "heartbeat_period"},
		{"bad number from environment", "", []string{"FX_MAX_ACTIVE=many"}, "max_active"},
		// A bare number is not nanoseconds: it is refused, naming the key
		// and showing a duration with its unit.
		{"duration without a unit in the file", "heartbeat_period: 10\n", nil, "heartbeat_period"},
		{"duration without a unit, what to write", "heartbeat_period: 10\n", nil, "10s"},
		{"fractional duration without a unit", "heartbeat_period: 2.5\n", nil, "has no unit"},
		{"duration without a unit from environment", "", []string{"FX_HEARTBEAT_PERIOD=5"}, "heartbeat_period"},
		{"duration without a unit from environment, what to write", "", []string{"FX_HEARTBEAT_PERIOD=5"}, "such as 10s"},
		{"not yaml", "listen: [unclosed\n", nil, "c.yaml"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := defaults()
			err := Load(Source{File: writeFile(t, tc.file), Environ: append([]string{}, tc.env...)}, &s)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error = %v, want it to mention %q", err, tc.want)
			}
		})
	}
	s := defaults()
	if err := Load(Source{File: writeFile(t, "heartbeat_period: 10s\n"), Environ: []string{}}, &s); err != nil || s.Period != 10*time.Second {
		t.Fatalf("heartbeat_period: 10s loaded as %s, %v", s.Period, err)
	}
	if err := Load(Source{File: filepath.Join(t.TempDir(), "missing.yaml"), Environ: []string{}}, &s); err == nil || !strings.Contains(err.Error(), "does not exist") {
		t.Fatalf("missing file: error = %v", err)
	}
}

func TestEnvName(t *testing.T) {
	if got := EnvName("tls.cert"); got != "FX_TLS_CERT" {
		t.Fatalf("EnvName = %s", got)
	}
}
