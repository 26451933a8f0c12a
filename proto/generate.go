// Package proto holds fx's wire protocol. The .proto files and the Go code
// generated from them live in fx/v1; run `make proto` (or `go generate
// ./proto/...`) after editing a .proto file, and commit the result.
package proto

//go:generate bash ../scripts/gen-proto.sh
