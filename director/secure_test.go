package director

import (
	"strings"
	"testing"

	"google.golang.org/grpc/codes"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// A plan that asks for secure aggregation with an algorithm that needs each
// site's update is refused at submission, with the reason, and leaves no
// experiment behind; with fedavg it is accepted.
func TestSubmitRefusesSecureWithIndividualAggregation(t *testing.T) {
	f := newFed(t, nil)
	for _, alg := range []string{"median", "trimmed_mean", "krum"} {
		plan := planTwo + "aggregation: {algorithm: " + alg + ", secure: true}\n"
		_, err := submit(ctxT(t), f.researcher("alice"), upload{plan: plan, data: archive(t, plan, nil)})
		if code(err) != codes.InvalidArgument {
			t.Fatalf("%s: submit = %v, want InvalidArgument", alg, err)
		}
		want := "aggregation.secure: cannot be combined with algorithm " + alg + ": it needs each site's update, and under secure aggregation the aggregator sees only their sum"
		if !strings.Contains(err.Error(), want) {
			t.Errorf("%s: message %q does not say %q", alg, err, want)
		}
	}
	resp, err := f.admin().ListExperiments(ctxT(t), &fxv1.ListExperimentsRequest{})
	must(t, err)
	if n := len(resp.GetExperiments()); n != 0 {
		t.Errorf("%d experiments recorded", n)
	}
	plan := planTwo + "aggregation: {algorithm: fedavg, secure: true, secure_threshold: 2}\n"
	if _, err := submit(ctxT(t), f.researcher("alice"), upload{plan: plan, data: archive(t, plan, nil)}); err != nil {
		t.Fatalf("secure fedavg: %v", err)
	}
}
