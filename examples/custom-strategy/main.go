// Command fx here is fx with one more aggregation algorithm, geomedian
// (see geomedian/): the whole fx command line (app.Main), built with a
// strategy registered. Build it with
//
//	go build -o fx ./examples/custom-strategy
//
// and run it wherever the stock fx would run: the director, which
// aggregates, must be this binary; envoys and researchers may use either.
package main

import (
	"github.com/fx-fl/fx/aggregator"
	"github.com/fx-fl/fx/cmd/fx/app"
	"github.com/fx-fl/fx/examples/custom-strategy/geomedian"
)

func main() {
	aggregator.RegisterStrategy(geomedian.Name, geomedian.Strategy{})
	app.Main()
}
