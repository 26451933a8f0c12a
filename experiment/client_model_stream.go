package experiment

import (
	"context"
	"io"

	fxv1 "github.com/fx-fl/fx/proto/fx/v1"
)

// ModelStream streams a model to the writer open returns for the director's
// description of it (its round, size, sha256 and metrics), chunk by chunk as
// the chunks arrive, holding no more of it in memory than one chunk: for
// passing a model on, as `fx dashboard` does to the browser, where Model
// would hold it all and ModelToFile would need a file.
//
// The size and sha256 are checked only once the last byte has been written,
// so on an error the writer may already hold part or all of a model that
// must be thrown away; open may refuse (return an error) to stop the
// download before any byte is written.
func (c *Client) ModelStream(ctx context.Context, name string, sel ModelSelector, open func(*fxv1.ModelInfo) (io.Writer, error)) (*fxv1.ModelInfo, error) {
	return c.download(ctx, name, sel, open)
}
