package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// prometheusBin is Debian's Prometheus server.
const prometheusBin = "/usr/bin/prometheus"

// TestPrometheusScrapesTheFederation: a real Prometheus server scrapes a
// director and two envoys (their metrics listeners on loopback) while an
// experiment runs to its end; its HTTP API then answers queries over fx's
// series that agree with what happened, and the probes answer without a
// client certificate.
func TestPrometheusScrapesTheFederation(t *testing.T) {
	requireE2E(t)
	if _, err := os.Stat(prometheusBin); err != nil {
		t.Skipf("no Prometheus server (apt-get install prometheus): %v", err)
	}
	names := []string{"site-1", "site-2"}
	f := newFed(t, []string{"alice"}, names)
	targets := map[string]string{"director": fmt.Sprintf("127.0.0.1:%d", freePort(t))}
	f.startDirector(directorOptions{metricsListen: targets["director"]})
	for i, name := range names {
		targets[name] = fmt.Sprintf("127.0.0.1:%d", freePort(t))
		f.startEnvoyOpts(name, syntheticShard(i+1, len(names), ""), envoyOptions{metricsListen: targets[name]})
	}
	c := f.researcher("alice")
	f.waitEnvoysOnline(c, names...)

	// The probes need no certificate: plain HTTP on the listener.
	for party, addr := range targets {
		for _, path := range []string{"/healthz", "/readyz"} {
			f.waitFor(30*time.Second, party+path, func() (bool, error) {
				code, body, err := httpGet("http://" + addr + path)
				return code == http.StatusOK, fmt.Errorf("%d %s %v", code, body, err)
			})
		}
	}

	prom := startPrometheus(t, f, targets)
	for party := range targets {
		prom.waitValue(f, fmt.Sprintf(`up{party=%q}`, party), func(v float64) bool { return v == 1 })
	}

	const rounds = 2
	f.submit("alice", writePlan(t, syntheticPlan("watched", rounds, "", "")))
	f.waitState(c, "watched", 2*time.Minute, fxv1.ExperimentState_FINISHED)

	// Each series as Prometheus stored it from the scrapes that followed.
	for _, q := range []struct {
		query string
		ok    func(float64) bool
		want  string
	}{
		{`fx_director_envoys{status="online"}`, func(v float64) bool { return v == 2 }, "2 envoys online"},
		{`fx_director_experiments{state="FINISHED"}`, func(v float64) bool { return v == 1 }, "1 finished experiment"},
		{`fx_aggregator_rounds_completed_total{party="director"}`, func(v float64) bool { return v >= rounds }, fmt.Sprintf("≥ %d rounds", rounds)},
		{`sum(fx_round_phase_duration_seconds_count{party="director",phase="fold"})`, func(v float64) bool { return v >= rounds }, "a fold per training round"},
		{`sum(fx_round_phase_duration_seconds_count{party=~"site-.",phase="download"})`, func(v float64) bool { return v >= 2*rounds }, "a download per site per round"},
		{`sum(fx_model_bytes_total{party="director",direction="sent"})`, func(v float64) bool { return v > 0 }, "model bytes sent by the aggregator"},
		{`sum(fx_model_bytes_total{party=~"site-.",direction="sent"})`, func(v float64) bool { return v > 0 }, "model bytes uploaded by the sites"},
		{`sum(fx_runner_tasks_total{outcome="ok",task="train"})`, func(v float64) bool { return v >= 2*rounds }, "a train task per site per round"},
		{`sum(fx_runner_tasks_total{outcome="failed"}) or vector(0)`, func(v float64) bool { return v == 0 }, "no failed task"},
		{`sum(fx_aggregator_results_total{outcome="counted"})`, func(v float64) bool { return v > 0 }, "results counted"},
		{`fx_director_store_commit_duration_seconds_count{party="director"}`, func(v float64) bool { return v > 0 }, "store commits timed"},
		{`sum(fx_envoy_director_connected)`, func(v float64) bool { return v == 2 }, "envoys connected"},
		{`count(fx_build_info{role="envoy"}) + count(fx_build_info{role="director"})`, func(v float64) bool { return v == 3 }, "a build_info per process, with its role"},
		{`count(fx_aggregator_rounds_completed_total)`, func(v float64) bool { return v == 1 }, "only the director exports aggregator series"},
		{`count(fx_runner_tasks_total{party="director"}) or vector(0)`, func(v float64) bool { return v == 0 }, "only envoys export runner series"},
	} {
		prom.waitValue(f, q.query, q.ok)
		t.Logf("%s: %s", q.want, q.query)
	}

	// An envoy cut from its director is not ready, and says why, while
	// its process (and /healthz) goes on.
	f.director.stop(t)
	f.waitFor(60*time.Second, "site-2's /readyz to answer 503", func() (bool, error) {
		code, body, err := httpGet("http://" + targets["site-2"] + "/readyz")
		return code == http.StatusServiceUnavailable && strings.Contains(body, "not connected to the director"), fmt.Errorf("%d %q %v", code, body, err)
	})
	if code, _, err := httpGet("http://" + targets["site-2"] + "/healthz"); code != http.StatusOK {
		t.Errorf("site-2's /healthz without a director: %d %v", code, err)
	}
}

// prometheus is a Prometheus server of a test.
type prometheus struct {
	addr string
	proc *exec.Cmd
}

// startPrometheus runs Prometheus on loopback scraping targets every 500 ms,
// each labelled party=<name>.
func startPrometheus(t *testing.T, f *fed, targets map[string]string) *prometheus {
	t.Helper()
	dir := t.TempDir()
	var cfg strings.Builder
	cfg.WriteString("global: {scrape_interval: 500ms, scrape_timeout: 400ms}\nscrape_configs:\n")
	for party, addr := range targets {
		fmt.Fprintf(&cfg, "  - job_name: %s\n    static_configs: [{targets: [%q], labels: {party: %s}}]\n", party, addr, party)
	}
	file := filepath.Join(dir, "prometheus.yml")
	if err := os.WriteFile(file, []byte(cfg.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	p := &prometheus{addr: fmt.Sprintf("127.0.0.1:%d", freePort(t))}
	logf, err := os.Create(filepath.Join(f.dir, "prometheus.log"))
	if err != nil {
		t.Fatal(err)
	}
	p.proc = exec.Command(prometheusBin, "--config.file="+file, "--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address="+p.addr, "--log.level=warn")
	p.proc.Stdout, p.proc.Stderr = logf, logf
	if err := p.proc.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.proc.Process.Kill()
		p.proc.Wait()
		logf.Close()
		if t.Failed() {
			if b, err := os.ReadFile(logf.Name()); err == nil {
				t.Logf("prometheus log:\n%s", b)
			}
		}
	})
	return p
}

// waitValue waits until the instant query has a single sample that ok
// accepts.
func (p *prometheus) waitValue(f *fed, query string, ok func(float64) bool) {
	f.t.Helper()
	f.waitFor(60*time.Second, "Prometheus to answer "+query, func() (bool, error) {
		v, err := p.query(query)
		if err != nil {
			return false, err
		}
		return ok(v), fmt.Errorf("%s = %v", query, v)
	})
}

// query runs an instant query through the HTTP API and returns its one
// sample's value.
func (p *prometheus) query(q string) (float64, error) {
	code, body, err := httpGet("http://" + p.addr + "/api/v1/query?query=" + url.QueryEscape(q))
	if err != nil {
		return 0, err
	}
	if code != http.StatusOK {
		return 0, fmt.Errorf("HTTP %d: %s", code, body)
	}
	var resp struct {
		Status string `json:"status"`
		Data   struct {
			Result []struct {
				Value [2]any `json:"value"`
			} `json:"result"`
		} `json:"data"`
	}
	if err := json.Unmarshal([]byte(body), &resp); err != nil {
		return 0, err
	}
	if resp.Status != "success" || len(resp.Data.Result) != 1 {
		return 0, fmt.Errorf("want one sample, got %s", body)
	}
	s, _ := resp.Data.Result[0].Value[1].(string)
	return strconv.ParseFloat(s, 64)
}

// httpGet is one plain GET with a short deadline.
func httpGet(u string) (int, string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return 0, "", err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	return resp.StatusCode, string(b), err
}
