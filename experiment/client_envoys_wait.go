package experiment

import (
	"context"
	"fmt"
	"time"
)

// WaitForEnvoys returns once at least n envoys are online, polling the
// director every 50 ms; it fails when ctx ends first, saying how many came.
// A researcher uses it before submitting to a federation that is starting.
func (c *Client) WaitForEnvoys(ctx context.Context, n int) error {
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	online := 0
	for {
		if envoys, err := c.Envoys(ctx); err == nil {
			online = 0
			for _, e := range envoys {
				if e.GetOnline() {
					online++
				}
			}
			if online >= n {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("only %d of %d envoys came online: %w", online, n, ctx.Err())
		case <-tick.C:
		}
	}
}
