package dashboard

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"math"
	"mime"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fx-fl/fx/experiment"
)

// get requests path from the dashboard with the given extra headers
// (a "Host" entry sets the Host).
func (f *fixture) get(method, path string, header map[string]string) *http.Response {
	f.t.Helper()
	req, err := http.NewRequestWithContext(f.Ctx, method, f.base+path, nil)
	if err != nil {
		f.t.Fatal(err)
	}
	for k, v := range header {
		if k == "Host" {
			req.Host = v
			continue
		}
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		f.t.Fatal(err)
	}
	return resp
}

// getJSON fetches path, checks the status and decodes the body into v.
func (f *fixture) getJSON(path string, want int, v any) {
	f.t.Helper()
	resp := f.get(http.MethodGet, path, nil)
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != want {
		f.t.Fatalf("GET %s: %s, want %d: %s", path, resp.Status, want, body)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		f.t.Errorf("GET %s: Content-Type %q", path, ct)
	}
	if err := json.Unmarshal(body, v); err != nil {
		f.t.Fatalf("GET %s: %v: %s", path, err, body)
	}
}

// TestAPI reads every JSON endpoint of a dashboard on a real federation
// that ran an experiment, and checks their shapes against the director's
// answers through the Go client.
func TestAPI(t *testing.T) {
	f := newFixture(t)

	var id map[string]any
	f.getJSON("/api/identity", http.StatusOK, &id)
	if id["name"] != "alice" || id["role"] != "researcher" || id["director"] != f.Addr {
		t.Errorf("identity = %v", id)
	}

	var envoys []map[string]any
	f.getJSON("/api/envoys", http.StatusOK, &envoys)
	if len(envoys) != 2 {
		t.Fatalf("envoys = %v", envoys)
	}
	for i, e := range envoys {
		for _, k := range []string{"name", "online", "last_seen", "registered_at", "version", "tags", "sample_shape", "target_shape", "train_samples", "valid_samples", "classes", "max_experiments", "experiments"} {
			if _, ok := e[k]; !ok {
				t.Errorf("envoy %d has no %q: %v", i, k, e)
			}
		}
		if e["name"] != "site-"+strconv.Itoa(i+1) || e["online"] != true || e["classes"] != 3.0 || e["train_samples"].(float64) <= 0 {
			t.Errorf("envoy %d = %v", i, e)
		}
		if tags, _ := e["tags"].([]any); len(tags) != 1 || tags[0] != "synthetic" {
			t.Errorf("envoy %d tags = %v", i, e["tags"])
		}
		if _, err := time.Parse(time.RFC3339Nano, e["last_seen"].(string)); err != nil {
			t.Errorf("envoy %d last_seen: %v", i, err)
		}
	}

	var none []Experiment
	f.getJSON("/api/experiments", http.StatusOK, &none)
	if none == nil || len(none) != 0 {
		t.Errorf("experiments before any = %v, want []", none)
	}

	const rounds = 2
	f.submit("run-1", rounds)
	f.wait("run-1")
	var list []Experiment
	f.getJSON("/api/experiments", http.StatusOK, &list)
	if len(list) != 1 {
		t.Fatalf("experiments = %+v", list)
	}
	e := list[0]
	if e.Name != "run-1" || e.Owner != "alice" || e.State != "FINISHED" || !e.Ended || e.Round != rounds || e.Rounds != rounds ||
		e.Best == nil || e.Best.Metric != "accuracy" || e.CreatedAt == nil || e.PlanYAML != "" {
		t.Errorf("experiment in the list = %+v", e)
	}
	if len(e.Participants) != 2 {
		t.Fatalf("participants = %+v", e.Participants)
	}
	for _, p := range e.Participants {
		if p.State != "COMPLETED" || p.LastRound < rounds {
			t.Errorf("participant = %+v", p)
		}
	}
	if _, ok := e.LatestMetrics["aggregated_model_validation/accuracy"]; !ok {
		t.Errorf("latest metrics = %v", e.LatestMetrics)
	}

	var one Experiment
	f.getJSON("/api/experiments/alice/run-1", http.StatusOK, &one)
	if one.ID != e.ID || !strings.Contains(one.PlanYAML, "rounds: 2") {
		t.Errorf("experiment = %+v", one)
	}
	var apiErr APIError
	f.getJSON("/api/experiments/alice/nope", http.StatusNotFound, &apiErr)
	if apiErr.Code != "NotFound" || !strings.Contains(apiErr.Error, "nope") {
		t.Errorf("unknown experiment: %+v", apiErr)
	}
	f.getJSON("/api/experiments/bob/run-1", http.StatusNotFound, &apiErr)
	f.getJSON("/api/nothing", http.StatusNotFound, &apiErr)
	f.getJSON("/api/experiments/alice/run-1/model/first", http.StatusBadRequest, &apiErr)
	f.getJSON("/api/experiments/alice/run-1/events?after=-1", http.StatusBadRequest, &apiErr)

	// The envoys' current experiments are ids, of experiments the list has.
	f.getJSON("/api/envoys", http.StatusOK, &envoys)
	for _, e := range envoys {
		if x, _ := e["experiments"].([]any); len(x) != 0 {
			t.Errorf("envoy %v still in experiments %v after the end", e["name"], x)
		}
	}
}

type sseEvent struct {
	name, id string
	data     []byte
}

// readEvents reads a Server-Sent Events stream until it ends.
func readEvents(t *testing.T, r io.Reader) []sseEvent {
	t.Helper()
	var out []sseEvent
	var ev sseEvent
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == "":
			if ev.name != "" {
				out = append(out, ev)
			}
			ev = sseEvent{}
		case strings.HasPrefix(line, "event: "):
			ev.name = strings.TrimPrefix(line, "event: ")
		case strings.HasPrefix(line, "id: "):
			ev.id = strings.TrimPrefix(line, "id: ")
		case strings.HasPrefix(line, "data: "):
			ev.data = []byte(strings.TrimPrefix(line, "data: "))
		}
	}
	return out
}

// TestEvents follows a running experiment's event stream to its end: it
// starts with the experiment, carries every metric event the director has
// (the same as the client's own watch) in order with its sequence as the
// id, shows the rounds moving on, and ends with "end" and the finished
// experiment. A stream resumed with Last-Event-ID starts after it.
func TestEvents(t *testing.T) {
	f := newFixture(t)
	const rounds = 3
	f.submit("live", rounds)

	resp := f.get(http.MethodGet, "/api/experiments/alice/live/events", nil)
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("events: %s, %q", resp.Status, resp.Header.Get("Content-Type"))
	}
	events := readEvents(t, resp.Body)
	resp.Body.Close()

	if len(events) == 0 || events[0].name != "experiment" {
		t.Fatalf("the stream does not start with the experiment: %+v", events)
	}
	var metrics []MetricEvent
	var rounds_ []int32
	for i, ev := range events {
		switch ev.name {
		case "metric":
			var m MetricEvent
			if err := json.Unmarshal(ev.data, &m); err != nil {
				t.Fatal(err)
			}
			if ev.id != strconv.FormatInt(m.Sequence, 10) {
				t.Errorf("event id %q for sequence %d", ev.id, m.Sequence)
			}
			metrics = append(metrics, m)
		case "experiment":
			var e Experiment
			if err := json.Unmarshal(ev.data, &e); err != nil {
				t.Fatal(err)
			}
			rounds_ = append(rounds_, e.Round)
		case "end":
			if i != len(events)-1 {
				t.Errorf("end is not the last event: %+v", events[i:])
			}
			var e Experiment
			if err := json.Unmarshal(ev.data, &e); err != nil || e.State != "FINISHED" || e.Round != rounds {
				t.Errorf("end = %s (%v)", ev.data, err)
			}
		default:
			t.Errorf("unexpected event %q: %s", ev.name, ev.data)
		}
	}
	if last := events[len(events)-1]; last.name != "end" {
		t.Errorf("the stream ended with %q, not end", last.name)
	}
	if len(rounds_) < 2 || rounds_[len(rounds_)-1] != rounds {
		t.Errorf("the experiment events showed rounds %v", rounds_)
	}

	var want []MetricEvent
	for ev, err := range f.client.Metrics(f.Ctx, "live", 0) {
		if err != nil {
			t.Fatal(err)
		}
		want = append(want, metricView(ev))
	}
	if len(want) != eventsPerRun(rounds) || len(metrics) != len(want) {
		t.Fatalf("the stream carried %d metric events, the director has %d (want %d)", len(metrics), len(want), eventsPerRun(rounds))
	}
	for i := range want {
		g, w := metrics[i], want[i]
		if g.Sequence != int64(i+1) || g.Sequence != w.Sequence || g.Round != w.Round || g.Task != w.Task || g.Collaborator != w.Collaborator || g.Samples != w.Samples || len(g.Metrics) != len(w.Metrics) {
			t.Errorf("event %d = %+v, want %+v", i, g, w)
		}
		for k, v := range w.Metrics {
			if g.Metrics[k] != v {
				t.Errorf("event %d %s = %v, want %v", i, k, g.Metrics[k], v)
			}
		}
	}

	// Resume: Last-Event-ID, or ?after=, whichever is later.
	for _, tc := range []struct {
		header map[string]string
		query  string
	}{{map[string]string{"Last-Event-ID": "25"}, ""}, {nil, "?after=25"}, {map[string]string{"Last-Event-ID": "25"}, "?after=3"}} {
		resp := f.get(http.MethodGet, "/api/experiments/alice/live/events"+tc.query, tc.header)
		events := readEvents(t, resp.Body)
		resp.Body.Close()
		var ids []string
		for _, ev := range events {
			if ev.name == "metric" {
				ids = append(ids, ev.id)
			}
		}
		if len(ids) != eventsPerRun(rounds)-25 || ids[0] != "26" || events[len(events)-1].name != "end" {
			t.Errorf("resumed after 25 (%v %q): ids %v", tc.header, tc.query, ids)
		}
	}
	resp = f.get(http.MethodGet, "/api/experiments/alice/gone/events", nil)
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("events of an unknown experiment: %s", resp.Status)
	}
}

// TestModelDownload fetches the best and the last model through the
// dashboard and checks that the bytes are the director's (as the client's
// ModelToFile writes them), with the name, size and digest in the headers.
func TestModelDownload(t *testing.T) {
	f := newFixture(t)
	const rounds = 2
	var apiErr APIError
	f.submit("models", rounds)
	f.wait("models")
	f.getJSON("/api/experiments/alice/nope/model/best", http.StatusNotFound, &apiErr)

	for _, tc := range []struct {
		which string
		sel   experiment.ModelSelector
		file  string
	}{
		{"best", experiment.SelectBest, `models-best-round\d+\.safetensors`},
		{"last", experiment.SelectLast, `models-last-round2\.safetensors`},
		{"0", experiment.SelectRound(0), `models-round0\.safetensors`},
	} {
		path := filepath.Join(t.TempDir(), "direct.safetensors")
		info, err := f.client.ModelToFile(f.Ctx, "models", tc.sel, path)
		if err != nil {
			t.Fatal(err)
		}
		direct, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}

		resp := f.get(http.MethodGet, "/api/experiments/alice/models/model/"+tc.which, nil)
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("model %s: %s, %v: %s", tc.which, resp.Status, err, body)
		}
		if !bytes.Equal(body, direct) {
			t.Errorf("model %s: %d bytes differ from the director's %d", tc.which, len(body), len(direct))
		}
		sum := sha256.Sum256(body)
		h := resp.Header
		_, params, err := mime.ParseMediaType(h.Get("Content-Disposition"))
		if err != nil || !regexp.MustCompile(`^`+tc.file+`$`).MatchString(params["filename"]) {
			t.Errorf("model %s: Content-Disposition %q (%v), want filename %s", tc.which, h.Get("Content-Disposition"), err, tc.file)
		}
		if h.Get("Content-Length") != strconv.Itoa(len(direct)) || h.Get("Content-Type") != "application/octet-stream" ||
			h.Get("X-Fx-Model-Sha256") != hex.EncodeToString(sum[:]) || h.Get("X-Fx-Model-Sha256") != info.GetSha256() ||
			h.Get("Content-Digest") != "sha-256=:"+base64.StdEncoding.EncodeToString(sum[:])+":" ||
			h.Get("X-Fx-Model-Round") != strconv.Itoa(int(info.GetRound())) {
			t.Errorf("model %s: headers %v, want size %d, round %d, sha256 %s", tc.which, h, len(direct), info.GetRound(), info.GetSha256())
		}

		resp = f.get(http.MethodHead, "/api/experiments/alice/models/model/"+tc.which, nil)
		body, _ = io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || len(body) != 0 || resp.Header.Get("X-Fx-Model-Sha256") != info.GetSha256() {
			t.Errorf("HEAD model %s: %s, %d bytes, %v", tc.which, resp.Status, len(body), resp.Header)
		}
	}
}

// TestGuards checks what the dashboard refuses and the headers it always
// sends: requests for another host (DNS rebinding), methods that write,
// API calls made by another site's page; the Content-Security-Policy; a
// page without inline script or style.
func TestGuards(t *testing.T) {
	f := newFixture(t)
	_, port, _ := strings.Cut(f.addr, ":")

	for _, host := range []string{"evil.example:" + port, "evil.example", "127.0.0.1:1", "localhost.evil.example:" + port, "127.0.0.1.nip.io:" + port} {
		resp := f.get(http.MethodGet, "/api/envoys", map[string]string{"Host": host})
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusMisdirectedRequest || !strings.Contains(string(body), "DNS rebinding") {
			t.Errorf("Host %q: %s: %s", host, resp.Status, body)
		}
		if resp.Header.Get("Content-Security-Policy") != ContentSecurityPolicy {
			t.Errorf("Host %q: refusal without the CSP", host)
		}
	}
	for _, host := range []string{f.addr, "localhost:" + port, "LOCALHOST:" + port, "[::1]:" + port} {
		resp := f.get(http.MethodGet, "/api/identity", map[string]string{"Host": host})
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Errorf("Host %q: %s", host, resp.Status)
		}
	}

	for _, method := range []string{http.MethodPost, http.MethodPut, http.MethodDelete, http.MethodPatch} {
		for _, path := range []string{"/api/experiments", "/api/experiments/alice/x", "/"} {
			resp := f.get(method, path, nil)
			resp.Body.Close()
			if resp.StatusCode != http.StatusMethodNotAllowed || resp.Header.Get("Allow") != "GET, HEAD" {
				t.Errorf("%s %s: %s, Allow %q", method, path, resp.Status, resp.Header.Get("Allow"))
			}
		}
	}

	resp := f.get(http.MethodGet, "/api/envoys", map[string]string{"Sec-Fetch-Site": "cross-site"})
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden {
		t.Errorf("a cross-site API request: %s", resp.Status)
	}
	for _, site := range []string{"same-origin", "none"} {
		resp := f.get(http.MethodGet, "/api/envoys", map[string]string{"Sec-Fetch-Site": site})
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Errorf("Sec-Fetch-Site %s: %s", site, resp.Status)
		}
	}

	for path, ctype := range map[string]string{
		"/":                        "text/html; charset=utf-8",
		"/experiments/alice/x":     "text/html; charset=utf-8",
		"/static/app.js":           "text/javascript; charset=utf-8",
		"/static/app.css":          "text/css; charset=utf-8",
		"/static/favicon.svg":      "image/svg+xml",
		"/api/identity":            "application/json",
		"/api/experiments/alice/x": "application/json",
	} {
		resp := f.get(http.MethodGet, path, nil)
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		h := resp.Header
		if h.Get("Content-Security-Policy") != ContentSecurityPolicy || h.Get("X-Content-Type-Options") != "nosniff" || h.Get("X-Frame-Options") != "DENY" {
			t.Errorf("%s: security headers %v", path, h)
		}
		if h.Get("Content-Type") != ctype {
			t.Errorf("%s: Content-Type %q, want %q", path, h.Get("Content-Type"), ctype)
		}
		if ctype == "text/html; charset=utf-8" {
			page := string(body)
			if !strings.Contains(page, `<script src="/static/app.js" defer></script>`) {
				t.Errorf("%s does not load /static/app.js:\n%s", path, page)
			}
			if n := strings.Count(page, "<script"); n != 1 || strings.Contains(page, "<style") || strings.Contains(page, " style=") || regexp.MustCompile(`\son[a-z]+=`).MatchString(page) {
				t.Errorf("%s has inline script or style:\n%s", path, page)
			}
		}
	}
	for _, p := range []string{"script-src 'self'", "style-src 'self'", "default-src 'none'", "frame-ancestors 'none'", "connect-src 'self'"} {
		if !strings.Contains(ContentSecurityPolicy, p) {
			t.Errorf("the CSP lacks %q", p)
		}
	}
	if strings.Contains(ContentSecurityPolicy, "unsafe") || strings.Contains(ContentSecurityPolicy, "http") {
		t.Errorf("the CSP allows too much: %s", ContentSecurityPolicy)
	}
}

func TestCheckListen(t *testing.T) {
	for _, addr := range []string{"127.0.0.1:8642", "127.0.0.1:0", "localhost:8642", "[::1]:8642", "127.3.4.5:1"} {
		if err := CheckListen(addr, false); err != nil {
			t.Errorf("CheckListen(%q): %v", addr, err)
		}
	}
	for _, addr := range []string{":8642", "0.0.0.0:8642", "[::]:8642", "192.168.1.5:8642", "example.org:8642"} {
		err := CheckListen(addr, false)
		if !errors.Is(err, ErrNotLoopback) || !strings.Contains(err.Error(), "--allow-remote") || !strings.Contains(err.Error(), "certificate") {
			t.Errorf("CheckListen(%q) = %v, want a refusal that says why", addr, err)
		}
		if err := CheckListen(addr, true); err != nil {
			t.Errorf("CheckListen(%q, allowRemote): %v", addr, err)
		}
	}
	if err := CheckListen("8642", true); err == nil {
		t.Error("CheckListen accepted an address without a host part")
	}
}

func TestHostCheck(t *testing.T) {
	hostname, _ := os.Hostname()
	for _, tc := range []struct {
		listen string
		ok, no []string
	}{
		{"127.0.0.1:8642",
			[]string{"127.0.0.1:8642", "localhost:8642", "[::1]:8642", "LocalHost:8642"},
			[]string{"127.0.0.1:8643", "evil.example:8642", "10.0.0.1:8642", "", "127.0.0.1", strings.ToLower(hostname) + ":8642"}},
		{"127.0.0.1:80", []string{"127.0.0.1", "localhost", "localhost:80"}, []string{"evil.example"}},
		{"192.168.1.5:8642", []string{"192.168.1.5:8642", "localhost:8642"}, []string{"192.168.1.6:8642", "evil.example:8642"}},
		{"0.0.0.0:8642", []string{"192.168.1.5:8642", "[fe80::1]:8642", "localhost:8642", hostname + ":8642"}, []string{"evil.example:8642", hostname + ".evil.example:8642", "192.168.1.5:8643"}},
	} {
		hc, err := newHostCheck(tc.listen)
		if err != nil {
			t.Fatal(err)
		}
		for _, h := range tc.ok {
			if !hc.allowed(h) {
				t.Errorf("listening on %s, Host %q refused", tc.listen, h)
			}
		}
		for _, h := range tc.no {
			if hc.allowed(h) {
				t.Errorf("listening on %s, Host %q allowed", tc.listen, h)
			}
		}
	}
	if _, err := newHostCheck("127.0.0.1:0"); err == nil {
		t.Error("newHostCheck accepted port 0")
	}
}

func TestHoldBack(t *testing.T) {
	var b bytes.Buffer
	h := &holdBack{w: &b}
	for _, p := range []string{"abc", "", "d", "efgh"} {
		if n, err := h.Write([]byte(p)); n != len(p) || err != nil {
			t.Fatalf("Write(%q) = %d, %v", p, n, err)
		}
		if len(h.pending) > 1 {
			t.Fatalf("holding back %q, more than the last byte", h.pending)
		}
	}
	if b.String() != "abcdefg" {
		t.Errorf("before release: %q", b.String())
	}
	if err := h.release(); err != nil || b.String() != "abcdefgh" {
		t.Errorf("after release: %q, %v", b.String(), err)
	}
}

func TestMetricsJSON(t *testing.T) {
	b, err := json.Marshal(Metrics{"a": 0.5, "n": math.NaN(), "p": math.Inf(1), "m": math.Inf(-1)})
	if err != nil || string(b) != `{"a":0.5,"m":"-Inf","n":"NaN","p":"+Inf"}` {
		t.Errorf("Metrics JSON = %s, %v", b, err)
	}
}
