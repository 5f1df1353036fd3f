// SPDX-License-Identifier: MIT
// SPDX-FileContributor: fleetd (patch to mochi-mqtt/server v2.7.9)

package packets

import (
	"testing"
	"unsafe"

	"github.com/stretchr/testify/require"
)

// TestStoredPacketSize keeps a stored packet inline in Packets' map: Go
// moves a map value over 128 bytes to its own allocation.
func TestStoredPacketSize(t *testing.T) {
	require.LessOrEqual(t, int(unsafe.Sizeof(storedPacket{})), 128)
}

// TestPacketsGiveBackWhatWasAdded adds every packet of the codec's test
// table, and a few publishes with and without properties, and reads each
// back whole.
func TestPacketsGiveBackWhatWasAdded(t *testing.T) {
	var cases []Packet
	for _, tt := range TPacketData {
		for _, c := range tt {
			if c.Packet != nil {
				cases = append(cases, *c.Packet)
			}
		}
	}
	cases = append(cases,
		Packet{FixedHeader: FixedHeader{Type: Publish, Retain: true, Qos: 1, Remaining: 9}, TopicName: "a/b", Payload: []byte("hi"),
			Origin: "cl1", Created: 1, Expiry: 2, PacketID: 7, ProtocolVersion: 4},
		Packet{FixedHeader: FixedHeader{Type: Publish, Retain: true}, TopicName: "a/b", Payload: []byte("hi"), ProtocolVersion: 5,
			Properties: Properties{MessageExpiryInterval: 30, User: []UserProperty{{Key: "k", Val: "v"}}}},
		Packet{FixedHeader: FixedHeader{Type: Publish}, TopicName: "a", ReasonCodes: []byte{}}, // empty, not nil
		Packet{FixedHeader: FixedHeader{Type: Publish}, TopicName: "a", Properties: Properties{User: []UserProperty{}}},
		Packet{FixedHeader: FixedHeader{Type: Publish}, TopicName: "a", Ignore: true},
		Packet{FixedHeader: FixedHeader{Type: Publish}, TopicName: "a", Connect: ConnectParams{WillTopic: "w"}},
	)
	s := NewPackets()
	for i, pk := range cases {
		s.Add("x", pk)
		got, ok := s.Get("x")
		require.True(t, ok)
		require.Equal(t, pk, got, "case %d", i)
		s.Range(func(_ string, got Packet) bool {
			require.Equal(t, pk, got, "case %d (Range)", i)
			return true
		})
		require.Equal(t, pk, s.GetAll()["x"], "case %d (GetAll)", i)
	}
}

// TestPublishStoredInline checks that a retained PUBLISH, with or without
// properties, is not kept as a whole Packet.
func TestPublishStoredInline(t *testing.T) {
	s := NewPackets()
	s.Add("a", Packet{FixedHeader: FixedHeader{Type: Publish, Retain: true}, TopicName: "a", Payload: []byte("x")})
	s.Add("b", Packet{FixedHeader: FixedHeader{Type: Publish, Retain: true}, TopicName: "b", Payload: []byte("x"),
		Properties: Properties{ContentType: "text/plain"}})
	require.Nil(t, s.internal["a"].full)
	require.Nil(t, s.internal["a"].properties)
	require.Nil(t, s.internal["b"].full)
	require.NotNil(t, s.internal["b"].properties)
}
