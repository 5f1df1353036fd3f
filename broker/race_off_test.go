//go:build !race

package broker

// idleStackLimit is the stack an idle device's read loop may keep: Go's
// 4 KiB step, reached when under ~1.2 KB of it is in use when parked.
const idleStackLimit = 4 << 10
