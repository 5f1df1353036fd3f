# The two commands a newcomer needs: `make run` and `make test`.
GO ?= go
TEST_FLAGS ?= -race -count=1 -timeout 30m
FUZZTIME ?= 10s
GOFMT ?= gofmt
# staticcheck is pinned: another release finds other things. `make tools`
# installs this version into bin/, which is then preferred to one on PATH.
STATICCHECK_VERSION := v0.8.2
STATICCHECK ?= $(if $(wildcard bin/staticcheck),bin/staticcheck,staticcheck)

.PHONY: run test lint tools fuzz build vet demo

## run: start fleetd with its embedded PostgreSQL under ./fleetd-data
run:
	$(GO) run ./cmd/fleetd $(ARGS)

## test: every test, against real PostgreSQL (started by the tests) and real MQTT clients,
## then the tests of the patched mochi copy (third_party/README.md; its own module, so not in ./...;
## without -race: some of mochi's own tests race on their fixtures, before the patches too)
test:
	$(GO) test $(TEST_FLAGS) ./...
	cd third_party/mochi && $(GO) test -count=1 -timeout 10m . ./packets

## lint: gofmt (lists the files it would change), go vet and staticcheck; CI runs it before the tests
lint:
	@files=$$($(GOFMT) -l $$(git ls-files -co --exclude-standard '*.go')); \
	if [ -n "$$files" ]; then echo "gofmt would change:"; echo "$$files"; exit 1; fi
	$(GO) vet ./...
	@$(STATICCHECK) -version
	$(STATICCHECK) ./...

## tools: install staticcheck $(STATICCHECK_VERSION) into bin/ from the module proxy
tools:
	GOBIN=$(CURDIR)/bin $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)

## fuzz: every fuzz target (func FuzzX in any package) for FUZZTIME each; a crash is saved under testdata/fuzz
fuzz:
	GO=$(GO) FUZZTIME=$(FUZZTIME) .ci/fuzz

build:
	$(GO) build -o bin/ ./cmd/...

vet:
	$(GO) vet ./...

## demo: play the demo fleet of docs/fleet.example.yaml against a running `make run`
demo:
	$(GO) run ./cmd/fleetsim run -f docs/fleet.example.yaml
