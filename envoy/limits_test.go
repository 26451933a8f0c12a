package envoy

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/fx-fl/fx/dataset"
	"github.com/fx-fl/fx/pki"
	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// A failure whose message is longer than the protocol allows a reason
// (a runner that printed a lot, where the site shares its output) is
// still reported, clipped to the limit: the director would refuse the
// whole report otherwise, and the envoy would not send it again.
func TestLongFailureReasonReportedClipped(t *testing.T) {
	d := newFakeDirector(t)
	s := startSite(t, testConfig(t, d, "site-a"), nil)
	plan := fmt.Sprintf(softmaxPlan, "fails")
	d.push("site-a", d.offer("exp-f", makeArchive(t, plan, 0), plan), true)
	d.answer("site-a", "exp-f")
	d.push("site-a", startAssignment("exp-f"), true)
	s.collab.waitFor(t, "the collaborator", func() bool { return s.collab.active["exp-f"] })
	s.collab.finishCh("exp-f") <- errors.New("train: out of memory; " + strings.Repeat("traceback line\n", 5000))
	d.waitFor("a failure report", func() bool { return len(d.failures) == 1 })
	d.mu.Lock()
	defer d.mu.Unlock()
	reason := d.failures[0].GetReason()
	if !strings.Contains(reason, "out of memory") || len(reason) > fxv1.MaxReasonBytes() {
		t.Fatalf("reported %d bytes starting %.60q; want the start of the message within %d bytes", len(reason), reason, fxv1.MaxReasonBytes())
	}
}

// A dataset description names the data's path, which may be longer than the
// protocol lets a description be; the envoy registers it clipped rather than
// being refused at every registration.
func TestLongDescriptionRegistersClipped(t *testing.T) {
	d := &dataset.Dataset{SampleShape: []int64{4}, Description: "IDX images from " + strings.Repeat("/a-very-long-directory-name", 100)}
	shard := describeShard(d, []string{"mnist"})
	if n := len(shard.GetDescription()); n > fxv1.MaxDescriptionBytes() || !strings.HasPrefix(shard.GetDescription(), "IDX images from /a-very-long") {
		t.Fatalf("description of %d bytes: %.60q", n, shard.GetDescription())
	}
	if err := pki.CheckRequest(&fxv1.RegisterEnvoyRequest{EnvoyName: "site-a", Shard: shard}); err != nil {
		t.Fatalf("the director would refuse the registration: %v", err)
	}
}
