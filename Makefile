# fx developer tasks. `make test` is the command CI runs (through .ci/run).
GO ?= go
BIN ?= bin

.PHONY: build test test-accuracy test-python quickstart test-short proto proto-check mocks mocks-check lint bench

# The version, commit and date `fx version` shows, envoys report to the
# director, and logs name at start (see internal/version); a plain `go build`
# in a git checkout records the commit and its date by itself.
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo devel)
COMMIT ?= $(shell git rev-parse HEAD 2>/dev/null)
DATE ?= $(shell date -u +%Y-%m-%dT%H:%M:%SZ)
LDFLAGS = -X github.com/fx-fl/fx/internal/version.version=$(VERSION) -X github.com/fx-fl/fx/internal/version.commit=$(COMMIT) -X github.com/fx-fl/fx/internal/version.date=$(DATE)

build:
	$(GO) build -ldflags "$(LDFLAGS)" -o $(BIN)/fx ./cmd/fx

# The whole suite with the race detector, as CI runs it.
test:
	$(GO) test -race -timeout 30m ./...

# The accuracy tests on Fashion-MNIST, which the race detector would make too
# slow and so skips: here without it.
test-accuracy:
	$(GO) test -count=1 -run 'TestFashion' -v ./runner/builtin/

# The Python notebook client against a real federation.
test-python:
	bash sdk/python/run-tests.sh

# The README's first command, in a throw-away directory.
quickstart:
	dir=$$(mktemp -d) && $(GO) run ./cmd/fx quickstart --workdir "$$dir" && rm -rf "$$dir"

# Unit tests only: skips slow accuracy and end-to-end tests.
test-short:
	$(GO) test -short ./...

# Regenerate protocol code after editing proto/fx/v1/*.proto.
proto:
	bash scripts/gen-proto.sh

# Fail if the committed generated code differs from a fresh generation.
proto-check: proto
	@git diff --exit-code -- proto sdk/python || { echo "generated code is stale: run 'make proto' and commit" >&2; exit 1; }
	@test -z "$$(git status --porcelain -- proto sdk/python)" || { git status --porcelain -- proto sdk/python; echo "generated code is stale: run 'make proto' and commit" >&2; exit 1; }

# Regenerate the gomock mocks (mock_*_test.go) after changing an interface
# a go:generate mockgen line names.
mocks:
	$(GO) generate -run mockgen ./...

# Fail if the committed mocks differ from a fresh generation.
mocks-check: mocks
	@git diff --exit-code -- '*mock_*_test.go' || { echo "mocks are stale: run 'make mocks' and commit" >&2; exit 1; }
	@test -z "$$(git ls-files --others --exclude-standard -- '*mock_*_test.go')" || { git ls-files --others --exclude-standard -- '*mock_*_test.go'; echo "new mocks not committed: run 'make mocks' and commit" >&2; exit 1; }

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); test -z "$$out" || { echo "gofmt would change:"; echo "$$out"; exit 1; }
	$(GO) vet ./...

bench:
	GO=$(GO) bash bench/run.sh
