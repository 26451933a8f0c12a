package e2e

import (
	"os"
	"strings"
	"testing"
	"time"
)

// TestConfigErrors: `fx director start` and `fx envoy start` refuse a bad
// setting at once, naming the key, wherever it comes from: the file, the
// FX_* environment or a flag, in that increasing precedence.
func TestConfigErrors(t *testing.T) {
	f := newFed(t, []string{"alice"}, []string{"site-1"})
	f.writeDirectorConfig(directorOptions{})
	good, err := os.ReadFile(f.dirConfig)
	if err != nil {
		t.Fatal(err)
	}
	bad := f.dirConfig + ".bad"
	if err := os.WriteFile(bad, append(good, []byte("listen_adress: 127.0.0.1:1\n")...), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		what string
		env  []string
		args []string
		want []string
	}{
		{"an unknown key in the file", nil, []string{"director", "start", "--config", bad}, []string{"listen_adress"}},
		{"a bad value from the environment", []string{"FX_REVIEW_POLICY=sometimes"}, []string{"director", "start", "--config", f.dirConfig}, []string{"review_policy", "sometimes"}},
		{"a flag over the environment", []string{"FX_REVIEW_POLICY=auto"}, []string{"director", "start", "--config", f.dirConfig, "--review-policy", "whenever"}, []string{"whenever"}},
		{"a missing certificate", []string{"FX_TLS_CERT=" + f.dir + "/nope.crt"}, []string{"director", "start", "--config", f.dirConfig}, []string{"tls.cert", "nope.crt"}},
	} {
		start := time.Now()
		r := f.runFxEnv(20*time.Second, c.env, c.args...)
		if r.err == nil || time.Since(start) > 15*time.Second {
			t.Errorf("%s: fx %v ended %v after %s, want an error at once", c.what, c.args, r.err, time.Since(start).Round(time.Millisecond))
			continue
		}
		for _, w := range c.want {
			if !strings.Contains(r.stderr, w) {
				t.Errorf("%s: %q does not name %q", c.what, strings.TrimSpace(r.stderr), w)
			}
		}
		t.Logf("%s: %s", c.what, strings.TrimSpace(r.stderr))
	}

	// An envoy whose data is missing, or whose name is not its CN.
	f.startDirector(directorOptions{})
	f.startEnvoy("site-1", syntheticShard(1, 1, ""))
	f.waitEnvoysOnline(f.researcher("alice"), "site-1")
	f.envoys["site-1"].stop(t)
	cfgFile := f.envoyConfigs["site-1"]
	for _, c := range []struct {
		what string
		env  []string
		args []string
		want []string
	}{
		{"missing data", []string{"FX_SHARD_KIND=idx", "FX_SHARD_PATH=/nonexistent/fashion"}, []string{"envoy", "start", "--config", cfgFile}, []string{"/nonexistent/fashion"}},
		{"a name that is not the certificate's", nil, []string{"envoy", "start", "--config", cfgFile, "--name", "site-9"}, []string{"site-9", "site-1"}},
	} {
		r := f.runFxEnv(20*time.Second, c.env, c.args...)
		if r.err == nil {
			t.Errorf("%s: fx %v succeeded", c.what, c.args)
			continue
		}
		for _, w := range c.want {
			if !strings.Contains(r.stderr, w) {
				t.Errorf("%s: %q does not name %q", c.what, strings.TrimSpace(r.stderr), w)
			}
		}
		t.Logf("%s: %s", c.what, strings.TrimSpace(r.stderr))
	}
}
