package director

import (
	"bytes"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"

	"github.com/hashicorp/go-hclog"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// TestMetricsAndProbes: a director with a metrics listener exports its
// state as it is (envoys online, experiments by state, store commits) and
// is ready while it serves; once stopping it is not.
func TestMetricsAndProbes(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := newFed(t, func(c *Config) { c.MetricsListener = lis })
	f.running("alice")
	base := "http://" + lis.Addr().String()
	body := httpBody(t, base+"/metrics", http.StatusOK)
	for _, want := range []string{
		`fx_director_envoys{status="online"} 2`,
		`fx_director_envoys{status="offline"} 0`,
		`fx_director_experiments{state="RUNNING"} 1`,
		`fx_director_experiments{state="FINISHED"} 0`,
		"fx_tls_handshakes_waiting 0",
		`fx_build_info{role="director"`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	if !strings.Contains(body, "fx_director_store_commit_duration_seconds_count") || strings.Contains(body, "fx_director_store_commit_duration_seconds_count 0\n") {
		t.Error("/metrics counts no store commit after a submission and its start")
	}
	httpBody(t, base+"/readyz", http.StatusOK)
	f.stop()
	if err := f.d.readiness(); err == nil || !strings.Contains(err.Error(), "stopping") {
		t.Errorf("readiness of a stopped director: %v", err)
	}
}

func httpBody(t *testing.T, url string, wantCode int) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != wantCode {
		t.Fatalf("GET %s: %d %s, want %d", url, resp.StatusCode, b, wantCode)
	}
	return string(b)
}

// TestAnEnvoyOfAnotherReleaseSeriesIsWarnedAbout: the director logs a
// warning naming both versions when an envoy of another release series
// registers, and none for one of its own series.
func TestAnEnvoyOfAnotherReleaseSeriesIsWarnedAbout(t *testing.T) {
	var logs syncBuffer
	f := newFed(t, func(c *Config) {
		c.Version = "v0.4.2"
		c.Logger = hclog.New(&hclog.LoggerOptions{Level: hclog.Warn, Output: &logs})
	})
	for name, v := range map[string]string{"same": "v0.4.0", "newer": "v0.5.1"} {
		_, err := f.envoy(name).RegisterEnvoy(ctxT(t), &fxv1.RegisterEnvoyRequest{EnvoyName: name, Version: v,
			Shard: &fxv1.DatasetShard{SampleShape: []int64{4}, TrainSamples: 10}})
		must(t, err)
	}
	out := logs.String()
	if !strings.Contains(out, "envoy=newer") || !strings.Contains(out, "envoy_version=v0.5.1") || !strings.Contains(out, "director_version=v0.4.2") {
		t.Errorf("no warning about the v0.5.1 envoy:\n%s", out)
	}
	if strings.Contains(out, "envoy=same") {
		t.Errorf("a warning about an envoy of the director's own series:\n%s", out)
	}
}

// syncBuffer is a bytes.Buffer that loggers of several goroutines share.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
