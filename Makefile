# The two commands a newcomer needs: `make run` and `make test`.
GO ?= go
TEST_FLAGS ?= -race -count=1 -timeout 30m

.PHONY: run test build vet demo

## run: start fleetd with its embedded PostgreSQL under ./fleetd-data
run:
	$(GO) run ./cmd/fleetd $(ARGS)

## test: every test, against real PostgreSQL (started by the tests) and real MQTT clients
test:
	$(GO) test $(TEST_FLAGS) ./...

build:
	$(GO) build -o bin/ ./cmd/...

vet:
	$(GO) vet ./...

## demo: play the demo fleet of docs/fleet.example.yaml against a running `make run`
demo:
	$(GO) run ./cmd/fleetsim run -f docs/fleet.example.yaml
