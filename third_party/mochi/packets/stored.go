// SPDX-License-Identifier: MIT
// SPDX-FileContributor: fleetd (patch to mochi-mqtt/server v2.7.9)

package packets

import "reflect"

// storedPacket is how Packets keeps a packet: the fields of a PUBLISH (a
// retained message, a delayed will) inline, in about an eighth of a Packet's
// size, its v5 properties behind a pointer only when it has any, and any other
// packet whole behind a pointer. Go keeps a map's values inline up to 128
// bytes: this type must stay under that, which TestStoredPacketSize checks.
type storedPacket struct {
	full            *Packet     // a packet with fields a publish has not; nil for a publish
	properties      *Properties // nil when the packet has none
	payload         []byte
	topicName       string
	origin          string
	created         int64
	expiry          int64
	fixedHeader     FixedHeader
	packetID        uint16
	protocolVersion byte
}

// storePacket returns pk in its stored form. The copy is shallow, as a Packet
// stored by value is: slices are shared with pk.
func storePacket(pk Packet) storedPacket {
	if !publishFieldsOnly(&pk) {
		return storedPacket{full: &pk}
	}
	sp := storedPacket{
		payload:         pk.Payload,
		topicName:       pk.TopicName,
		origin:          pk.Origin,
		created:         pk.Created,
		expiry:          pk.Expiry,
		fixedHeader:     pk.FixedHeader,
		packetID:        pk.PacketID,
		protocolVersion: pk.ProtocolVersion,
	}
	if !reflect.ValueOf(&pk.Properties).Elem().IsZero() {
		props := pk.Properties
		sp.properties = &props
	}
	return sp
}

// publishFieldsOnly reports whether every field storedPacket leaves out is
// zero (a nil slice, not an empty one), so that packet gives pk back exactly.
func publishFieldsOnly(pk *Packet) bool {
	return pk.ReasonCodes == nil && pk.Filters == nil && pk.Mods == (Mods{}) &&
		!pk.SessionPresent && pk.ReasonCode == 0 && pk.ReservedBit == 0 && !pk.Ignore &&
		reflect.ValueOf(&pk.Connect).Elem().IsZero()
}

// packet returns the Packet that was stored.
func (sp *storedPacket) packet() Packet {
	if sp.full != nil {
		return *sp.full
	}
	pk := Packet{
		Payload:         sp.payload,
		TopicName:       sp.topicName,
		Origin:          sp.origin,
		Created:         sp.created,
		Expiry:          sp.expiry,
		FixedHeader:     sp.fixedHeader,
		PacketID:        sp.packetID,
		ProtocolVersion: sp.protocolVersion,
	}
	if sp.properties != nil {
		pk.Properties = *sp.properties
	}
	return pk
}
