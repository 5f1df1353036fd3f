package broker

import "strings"

// Devices live under devices/{id}/ and may touch only their own topics
// (DESIGN: device protocol).

// devicePrefix returns "devices/{id}/".
func devicePrefix(id string) string { return "devices/" + id + "/" }

// canPublish reports whether device id may publish to topic: its status
// (birth and will), telemetry and OTA status.
func canPublish(id, topic string) bool {
	rest, ok := strings.CutPrefix(topic, devicePrefix(id))
	if !ok {
		return false
	}
	return rest == "status" || rest == "telemetry" || rest == "ota/status"
}

// canSubscribe reports whether device id may subscribe to filter (or receive
// a message on topic): its OTA jobs and anything below its cmd/ topic.
// Wildcards are allowed only inside cmd/, so a device can never widen its
// filter to another device's topics.
func canSubscribe(id, filter string) bool {
	rest, ok := strings.CutPrefix(filter, devicePrefix(id))
	if !ok {
		return false
	}
	if rest == "ota/job" {
		return true
	}
	sub, ok := strings.CutPrefix(rest, "cmd/")
	if !ok && rest != "cmd" {
		return false
	}
	if rest == "cmd" {
		return true
	}
	levels := strings.Split(sub, "/")
	for i, l := range levels {
		if l == "#" && i != len(levels)-1 {
			return false
		}
		if l != "#" && l != "+" && strings.ContainsAny(l, "#+") {
			return false
		}
	}
	return true
}

// retainable reports whether a device may retain a message on topic: only its
// status is retained, so a device cannot fill the broker's memory with
// retained telemetry.
func retainable(id, topic string) bool { return topic == devicePrefix(id)+"status" }
