// Package advisory names every PostgreSQL advisory lock key fleetd takes.
//
// Advisory locks are one namespace per database, shared by every replica
// and every subsystem: two subsystems that pick the same key serialise
// each other's work, or worse, one skips its run because the other holds
// "its" lock. Keeping the keys in one list makes a clash visible in review
// (and the package test fails on a duplicate).
package advisory

// Key is an advisory lock key. All keys start with the ASCII bytes of
// "fleetd" so that they do not collide with another application's locks
// on a shared database.
type Key int64

const prefix Key = 0x666c65657464 << 16

const (
	// Migrations serialises schema migrations across replicas starting
	// at once. It is the bare prefix for compatibility with databases
	// migrated by earlier releases (a replica on the old code takes it).
	Migrations Key = 0x666c65657464
	// Analysis lets one replica at a time run the learned-verdict analysis.
	Analysis Key = prefix + 1
	// LostSweep keeps two replicas from recording the same lost sessions.
	LostSweep Key = prefix + 2
	// EventMaintenance lets one replica at a time make an event
	// partition/rollup maintenance pass.
	EventMaintenance Key = prefix + 4
	// EventPartitions serialises every DDL on device_events partitions
	// (maintenance and the writer's create-on-miss).
	EventPartitions Key = prefix + 3
	// TelemetryPartitions serialises DDL on telemetry_points partitions.
	TelemetryPartitions Key = prefix + 0x5450 // "TP"
	// TelemetryRetention lets one replica at a time prune telemetry.
	TelemetryRetention Key = prefix + 0x5452 // "TR"
	// TelemetryRollup lets one replica at a time run the telemetry rollup
	// job (session lock).
	TelemetryRollup Key = prefix + 0x5455 // "TU"
	// TelemetrySeal is held shared by every telemetry batch write and
	// exclusively, for an instant, by the rollup job when it seals a minute
	// (transaction locks), so that no batch straddles the seal.
	TelemetrySeal Key = prefix + 0x5453 // "TS"
	// CommandRetention lets one replica at a time prune finished commands
	// (transaction lock).
	CommandRetention Key = prefix + 0x4352 // "CR"
	// CommandBulks serialises the creation of bulk commands, so that two
	// cannot pass the cap on running bulks together (transaction lock).
	CommandBulks Key = prefix + 0x4342 // "CB"
	// NotifyOffline lets one replica at a time make a round of the offline
	// watch (transaction lock).
	NotifyOffline Key = prefix + 0x4e4f // "NO"
)

// All lists every key, for the uniqueness test.
var All = []Key{Migrations, Analysis, LostSweep, EventMaintenance, EventPartitions, TelemetryPartitions, TelemetryRetention, TelemetryRollup, TelemetrySeal, CommandRetention, CommandBulks, NotifyOffline}
