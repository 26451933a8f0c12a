package tracing_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/fx-fl/fx/experiment"
	"github.com/fx-fl/fx/internal/testfed"
	"github.com/fx-fl/fx/internal/tracing"
	"github.com/fx-fl/fx/pki"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// TestOneExperimentIsOneTrace: with tracing on (an in-memory exporter in
// place of an OTLP collector), a real director and two envoys on loopback
// run a two-round experiment, and its spans form one tree: the experiment,
// its submission and offer; each round; in each round the aggregator's
// fold and checkpoint and every collaborator's download, tasks and
// uploads; and under a collaborator's download, the gRPC calls it made,
// on both sides of the wire.
func TestOneExperimentIsOneTrace(t *testing.T) {
	spans := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(spans))
	defer tp.Shutdown(context.Background())
	tracing.Install(tp)

	f := testfed.New(t)
	files := f.CA.Files(pki.RoleResearcher, "alice")
	c, err := experiment.Dial(f.Ctx, experiment.ClientConfig{Director: f.Addr, ServerName: "localhost", Cert: files.Cert, Key: files.Key, CA: files.CA})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(f.Ctx, 2*time.Minute)
	defer cancel()
	if err := c.WaitForEnvoys(ctx, len(testfed.Envoys)); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	plan := `name: traced
rounds: 2
participants: {min: 2, tags: [synthetic]}
runner: {kind: builtin, model: softmax, hyperparameters: {lr: 0.1, epochs: 1, batch_size: 32}}
stragglers: {deadline: 1m}
`
	if err := os.WriteFile(filepath.Join(dir, experiment.PlanFile), []byte(plan), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Submit(ctx, dir, experiment.SubmitOptions{}); err != nil {
		t.Fatal(err)
	}
	e, err := c.Wait(ctx, "traced")
	if err != nil || e.GetState() != fxv1.ExperimentState_FINISHED {
		t.Fatalf("experiment %v, %v", e.GetState(), err)
	}

	// The experiment's span ends with it; wait for it to be exported.
	var all tracetest.SpanStubs
	deadline := time.Now().Add(30 * time.Second)
	for {
		all = spans.GetSpans()
		if find(all, "experiment traced") != nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	root := find(all, "experiment traced")
	if root == nil {
		t.Fatalf("no experiment span among %d spans: %v", len(all), names(all))
	}
	trace := root.SpanContext.TraceID()
	children := func(parent *tracetest.SpanStub) []*tracetest.SpanStub {
		var out []*tracetest.SpanStub
		for i := range all {
			if all[i].Parent.SpanID() == parent.SpanContext.SpanID() && all[i].SpanContext.TraceID() == trace {
				out = append(out, &all[i])
			}
		}
		return out
	}
	child := func(parent *tracetest.SpanStub, name string) *tracetest.SpanStub {
		t.Helper()
		for _, s := range children(parent) {
			if s.Name == name {
				return s
			}
		}
		t.Fatalf("span %q has no child %q (children: %v)", parent.Name, name, names(deref(children(parent))))
		return nil
	}
	child(root, "submit")
	child(root, "offer")
	for round := 1; round <= 2; round++ {
		r := child(root, fmt.Sprintf("round %d", round))
		child(r, "fold")
		child(r, "checkpoint")
		perSite := map[string]int{}
		for _, s := range children(r) {
			for _, a := range s.Attributes {
				if a.Key == "collaborator" {
					perSite[a.Value.AsString()]++
				}
			}
		}
		for _, site := range testfed.Envoys {
			// download, three tasks, three uploads
			if perSite[site] != 7 {
				t.Errorf("round %d: %d spans of %s, want 7 (download, 3 tasks, 3 uploads): %v", round, perSite[site], site, names(deref(children(r))))
			}
		}
		download := child(r, "download")
		call := child(download, "fx.v1.Aggregator/FetchModel") // the client side
		child(call, "fx.v1.Aggregator/FetchModel")             // the aggregator's, across the wire
		upload := child(r, "upload train")
		child(upload, "fx.v1.Aggregator/UploadResult")
	}
}

func find(spans tracetest.SpanStubs, name string) *tracetest.SpanStub {
	for i := range spans {
		if spans[i].Name == name {
			return &spans[i]
		}
	}
	return nil
}

func names(spans tracetest.SpanStubs) string {
	var out []string
	for _, s := range spans {
		out = append(out, s.Name)
	}
	return strings.Join(out, ", ")
}

func deref(p []*tracetest.SpanStub) tracetest.SpanStubs {
	var out tracetest.SpanStubs
	for _, s := range p {
		out = append(out, *s)
	}
	return out
}
