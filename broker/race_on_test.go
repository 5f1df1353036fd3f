//go:build race

package broker

// idleStackLimit is the stack an idle device's read loop may keep under the
// race detector, whose instrumentation deepens every frame and doubles the
// guard Go keeps free: 8 KiB there stands for the 4 KiB of a normal build.
const idleStackLimit = 8 << 10
