# The two commands a newcomer needs: `make run` and `make test`.
GO ?= go
TEST_FLAGS ?= -race -count=1 -timeout 30m
FUZZTIME ?= 10s

.PHONY: run test fuzz build vet demo

## run: start fleetd with its embedded PostgreSQL under ./fleetd-data
run:
	$(GO) run ./cmd/fleetd $(ARGS)

## test: every test, against real PostgreSQL (started by the tests) and real MQTT clients
test:
	$(GO) test $(TEST_FLAGS) ./...

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
