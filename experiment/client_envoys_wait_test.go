package experiment_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/fx-fl/fx/pki"
)

func TestWaitForEnvoys(t *testing.T) {
	f := newFederation(t)
	c := f.dial(f.config(pki.RoleResearcher, "alice"))
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	if err := c.WaitForEnvoys(ctx, 2); err != nil {
		t.Fatalf("both envoys: %v", err)
	}
	short, cancelShort := context.WithTimeout(t.Context(), 300*time.Millisecond)
	defer cancelShort()
	err := c.WaitForEnvoys(short, 3)
	if err == nil || !strings.Contains(err.Error(), "only 2 of 3 envoys") || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("a third envoy that never comes: %v", err)
	}
}
