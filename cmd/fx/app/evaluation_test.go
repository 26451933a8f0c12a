package app

import (
	"bytes"
	"strings"
	"testing"

	"github.com/fx-fl/fx/experiment"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

func TestPrintEvaluation(t *testing.T) {
	site := func(name string, samples int64, m map[string]float64) *fxv1.MetricEvent {
		return &fxv1.MetricEvent{Round: 1, Task: "aggregated_model_validation", Collaborator: name, Samples: samples, Metrics: m}
	}
	var b bytes.Buffer
	err := printEvaluation(&b, &experiment.Evaluation{
		Sites: []*fxv1.MetricEvent{
			site("site-1", 100, map[string]float64{"accuracy": 0.9, "loss": 0.3}),
			site("site-2", 300, map[string]float64{"accuracy": 0.7}),
		},
		Overall: site("", 400, map[string]float64{"accuracy": 0.75, "loss": 0.3}),
	})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		"EVALUATION                     SAMPLES  ACCURACY  LOSS",
		"site-1                         100      0.9       0.3",
		"site-2                         300      0.7       -",
		"overall (weighted by samples)  400      0.75      0.3",
	}
	if got := strings.Split(strings.TrimSpace(b.String()), "\n"); strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("got\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	b.Reset()
	if err := printEvaluation(&b, &experiment.Evaluation{}); err != nil || !strings.Contains(b.String(), "no site reported") {
		t.Errorf("empty evaluation: %q, %v", b.String(), err)
	}
}
