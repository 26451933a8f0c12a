package dashboard

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
)

// chromiumPath is Debian's chromium (apt-get install chromium).
const chromiumPath = "/usr/bin/chromium"

// TestBrowser opens the dashboard in headless Chromium while an experiment
// runs, waits until the page's accuracy chart has a point for every round
// and the experiment shows FINISHED (updated by the event stream, not by
// reloading), checks the rest of the page and that the browser reported
// no error (a Content-Security-Policy violation included), and saves
// screenshots of the experiment and the overview: under the test's
// directory and, when FX_TEST_ARTIFACTS names a directory, there too.
func TestBrowser(t *testing.T) {
	if _, err := os.Stat(chromiumPath); err != nil {
		t.Skipf("no chromium at %s (apt-get install chromium): %v", chromiumPath, err)
	}
	f := newFixture(t)
	const rounds = 4
	start := time.Now()

	alloc, cancel := chromedp.NewExecAllocator(f.Ctx, append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chromiumPath),
		chromedp.Headless,
		chromedp.NoSandbox, // root in CI and containers
		chromedp.DisableGPU,
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(1280, 900),
	)...)
	defer cancel()
	ctx, cancel := chromedp.NewContext(alloc)
	defer cancel()
	// Start the browser with a context without deadline (see chromedp.Run).
	if err := chromedp.Do(ctx); err != nil {
		t.Fatalf("starting %s: %v", chromiumPath, err)
	}
	t.Logf("chromium started in %s", time.Since(start).Round(time.Millisecond))

	var mu sync.Mutex
	var problems []string
	console := chromedp.Console(ctx)
	go func() {
		for m, err := range console {
			if err != nil {
				return
			}
			if m.Type == chromedp.ConsoleError || m.IsException() || m.Type == chromedp.ConsoleWarning {
				mu.Lock()
				problems = append(problems, m.String())
				mu.Unlock()
			}
		}
	}()

	f.submit("browser", rounds)
	url := f.base + "/experiments/alice/browser"
	tctx, tcancel := context.WithTimeout(ctx, 3*time.Minute)
	defer tcancel()
	if err := chromedp.Do(tctx, chromedp.Navigate(url)); err != nil {
		t.Fatal(err)
	}
	// Watch the curve grow: the points the page showed over time.
	seen := []int{}
	deadline := time.Now().Add(2 * time.Minute)
	for {
		points, err := chromedp.Run(tctx, chromedp.Poll[int](`(() => {
			const svg = document.querySelector('svg.chart[data-metric="accuracy"]');
			return svg ? Number(svg.dataset.points) + 1 : 0;
		})()`, chromedp.WithPollingInterval(100*time.Millisecond), chromedp.WithPollingTimeout(time.Until(deadline))))
		if err != nil {
			t.Fatalf("waiting for the accuracy chart (%v): %v", seen, err)
		}
		points-- // the predicate adds 1 so that 0 points is truthy
		if len(seen) == 0 || seen[len(seen)-1] != points {
			seen = append(seen, points)
		}
		if points >= rounds {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the accuracy chart showed %v points, never %d", seen, rounds)
		}
		if _, err := chromedp.Run(tctx, chromedp.Poll[bool](fmt.Sprintf(`Number(document.querySelector('svg.chart[data-metric="accuracy"]').dataset.points) !== %d`, points),
			chromedp.WithPollingInterval(100*time.Millisecond), chromedp.WithPollingTimeout(time.Until(deadline)))); err != nil {
			t.Fatalf("the accuracy chart stayed at %d points (%v): %v", points, seen, err)
		}
	}
	t.Logf("accuracy points seen on the page: %v, after %s", seen, time.Since(start).Round(time.Millisecond))
	if _, err := chromedp.Run(tctx, chromedp.Poll[bool](`document.querySelector('#exp-state')?.dataset.state === 'FINISHED' && document.querySelector('.live')?.textContent.includes('ended')`,
		chromedp.WithPollingInterval(100*time.Millisecond), chromedp.WithPollingTimeout(time.Minute))); err != nil {
		t.Fatalf("the page never showed the experiment FINISHED: %v", err)
	}

	type pageState struct {
		Points     map[string]int `json:"points"`
		Sites      int            `json:"sites"`
		Best       string         `json:"best"`
		Last       string         `json:"last"`
		Round      string         `json:"round"`
		Legend     string         `json:"legend"`
		SiteLines  int            `json:"siteLines"`
		Circles    int            `json:"circles"`
		Background string         `json:"background"`
	}
	state, err := chromedp.Run(tctx, chromedp.Evaluate[pageState](`(() => {
		const points = {};
		for (const svg of document.querySelectorAll('svg.chart')) points[svg.dataset.metric] = Number(svg.dataset.points);
		const stat = [...document.querySelectorAll('.stat')].find((s) => s.querySelector('.k').textContent === 'Round');
		return {
			points,
			sites: document.querySelectorAll('tr[data-envoy]').length,
			best: document.querySelector('#download-best')?.getAttribute('href') || '',
			last: document.querySelector('#download-last')?.getAttribute('href') || '',
			round: stat ? stat.querySelector('.v').textContent : '',
			legend: document.querySelector('[data-chart="accuracy"] .legend')?.textContent || '',
			siteLines: document.querySelectorAll('svg.chart .line.site').length,
			circles: document.querySelectorAll('svg.chart[data-metric="accuracy"] circle').length,
			background: getComputedStyle(document.body).backgroundColor,
		};
	})()`))
	if err != nil {
		t.Fatal(err)
	}
	if state.Points["accuracy"] != rounds || state.Points["loss"] != rounds {
		t.Errorf("chart points %v, want %d for accuracy and loss", state.Points, rounds)
	}
	if state.Sites != 2 || state.Round != fmt.Sprintf("%d / %d", rounds, rounds) {
		t.Errorf("page: %d participants, round %q", state.Sites, state.Round)
	}
	if state.Best != "/api/experiments/alice/browser/model/best" || state.Last != "/api/experiments/alice/browser/model/last" {
		t.Errorf("download links: %q, %q", state.Best, state.Last)
	}
	if !strings.Contains(state.Legend, "global model") || !strings.Contains(state.Legend, "training") {
		t.Errorf("accuracy legend %q", state.Legend)
	}
	// Global model: rounds 0..N; training and locally tuned: 1..N.
	if state.Circles != 3*rounds+1 {
		t.Errorf("the accuracy chart has %d points drawn, want %d", state.Circles, 3*rounds+1)
	}
	if state.Background != "rgb(245, 246, 248)" {
		t.Errorf("the stylesheet did not apply (body background %q): blocked by the CSP?", state.Background)
	}
	// The per-site toggle adds a dashed line per site to every chart.
	siteLines, err := chromedp.Run(tctx, chromedp.Evaluate[int](`(async () => {
		document.querySelector('#per-site').click();
		await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
		return document.querySelectorAll('svg.chart[data-metric="accuracy"] .line.site').length;
	})()`, chromedp.EvalAwaitPromise))
	if err != nil || siteLines != 2 {
		t.Errorf("per-site lines on the accuracy chart: %d, %v", siteLines, err)
	}
	shot, err := chromedp.Run(tctx, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatal(err)
	}
	saveArtifact(t, "dashboard-experiment.png", shot)

	if err := chromedp.Do(tctx, chromedp.Navigate(f.base+"/")); err != nil {
		t.Fatal(err)
	}
	if _, err := chromedp.Run(tctx, chromedp.Poll[bool](`document.querySelectorAll('tr[data-envoy]').length === 2 && document.querySelector('tr[data-experiment="alice/browser"] .badge')?.textContent === 'FINISHED'`,
		chromedp.WithPollingInterval(100*time.Millisecond), chromedp.WithPollingTimeout(30*time.Second))); err != nil {
		t.Fatalf("the overview never listed both envoys and the finished experiment: %v", err)
	}
	shot, err = chromedp.Run(tctx, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatal(err)
	}
	saveArtifact(t, "dashboard-overview.png", shot)

	mu.Lock()
	defer mu.Unlock()
	for _, p := range problems {
		t.Errorf("the browser reported: %s", p)
	}
	t.Logf("browser test took %s", time.Since(start).Round(time.Millisecond))
}

// saveArtifact writes a test artefact under the test's directory and, when
// FX_TEST_ARTIFACTS is set, copies it there.
func saveArtifact(t *testing.T, name string, data []byte) {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("wrote %s (%d bytes)", path, len(data))
	if dir := os.Getenv("FX_TEST_ARTIFACTS"); dir != "" {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("copied to %s", p)
	}
}
