# syntax=docker/dockerfile:1

# fleetd container image.
#
# Build stage: a static, CGO-free binary, so the runtime image needs neither
# libc from the build image nor any of the Go toolchain.
FROM golang:1.26-bookworm AS build
WORKDIR /src

# Module downloads get their own layer: it is rebuilt only when go.mod or
# go.sum change, not on every source edit.
COPY go.mod go.sum ./
RUN go mod download

COPY . .
# The build cache mount (BuildKit) only speeds up rebuilds; the binary does
# not depend on it.
RUN --mount=type=cache,target=/root/.cache/go-build \
    CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o /out/fleetd ./cmd/fleetd

# Runtime stage: Alpine for busybox wget (used by HEALTHCHECK) and the CA
# bundle it ships (TLS to a managed PostgreSQL, firmware download URLs).
# No tzdata package: the time zones of campaign maintenance windows are
# compiled into fleetd (time/tzdata).
FROM alpine:3.20

# A fixed, numeric uid/gid so that volume ownership is stable across rebuilds
# and Kubernetes' runAsNonRoot can verify the user.
RUN addgroup -S -g 10001 fleetd \
 && adduser -S -D -H -u 10001 -G fleetd -h /var/lib/fleetd -s /sbin/nologin fleetd \
 && mkdir -p /var/lib/fleetd \
 && chown 10001:10001 /var/lib/fleetd \
 && chmod 0750 /var/lib/fleetd

COPY --from=build /out/fleetd /usr/local/bin/fleetd

ENV FLEETD_DATA_DIR=/var/lib/fleetd
WORKDIR /var/lib/fleetd

# 1883: MQTT over TCP. 8080: HTTP (/healthz, /readyz, /metrics, /api/v1).
EXPOSE 1883 8080

USER 10001:10001

# /readyz answers 200 only when the database and the broker are ready.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD wget -q -O /dev/null http://127.0.0.1:8080/readyz || exit 1

ENTRYPOINT ["/usr/local/bin/fleetd"]
