// Command fx is the one binary of the fx federated-learning system: it starts
// a director or an envoy, manages certificates, and drives experiments. The
// commands live in package app, so that another main package can build an fx
// with its own additions (see app.Main).
package main

import "github.com/fx-fl/fx/cmd/fx/app"

func main() { app.Main() }
