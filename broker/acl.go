package broker

import "strings"

// Devices live under devices/{id}/ and may touch only their own topics
// (DESIGN: device protocol).

// devicePrefix returns "devices/{id}/".
func devicePrefix(id string) string { return "devices/" + id + "/" }

// deviceTopic returns what follows "devices/{id}/" in topic, and whether
// topic starts so. The hooks ask it of every publish: it compares in place
// rather than building the prefix (a concatenation, on the heap once an id
// is long).
func deviceTopic(id, topic string) (rest string, ok bool) {
	rest, ok = strings.CutPrefix(topic, "devices/")
	if !ok {
		return "", false
	}
	rest, ok = strings.CutPrefix(rest, id)
	if !ok || rest == "" || rest[0] != '/' {
		return "", false
	}
	return rest[1:], true
}

// canPublish reports whether device id may publish to topic: its status
// (birth and will), telemetry, OTA status, its answers to commands and its
// configuration reports.
func canPublish(id, topic string) bool {
	rest, ok := deviceTopic(id, topic)
	if !ok {
		return false
	}
	return rest == "status" || rest == "telemetry" || rest == "ota/status" || rest == cmdResponse || rest == configReported
}

// cmdResponse is where a device answers commands, under devices/{id}/. It
// is the device's to publish, never to receive: it lies under cmd/, which
// devices subscribe to with a wildcard, and a device must not get its own
// answers back as a command named "response".
const cmdResponse = "cmd/response"

// configReported is where a device reports its configuration, under
// devices/{id}/: the device's to publish, never to receive (it lies under
// config/, which a device may subscribe to with a wildcard).
const configReported = "config/reported"

// canWill reports whether a device may leave a will on topic: what it may
// publish, except its command answers and configuration reports (the
// broker publishes a will when the device is gone; an answer or a report
// cannot come from a device that is gone).
func canWill(id, topic string) bool {
	rest, _ := deviceTopic(id, topic)
	return canPublish(id, topic) && rest != cmdResponse && rest != configReported
}

// canSubscribe reports whether device id may subscribe to filter (or receive
// a message on topic): its OTA jobs, anything below its cmd/ topic, and its
// desired configuration (config/desired, or config/# and config/+, which
// match it). Wildcards are allowed only inside cmd/ and config/, so a device
// can never widen its filter to another device's topics.
func canSubscribe(id, filter string) bool {
	rest, ok := deviceTopic(id, filter)
	if !ok {
		return false
	}
	switch rest {
	case "ota/job", "config/desired", "config/#", "config/+":
		return true
	case cmdResponse, configReported:
		return false
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
func retainable(id, topic string) bool {
	rest, ok := deviceTopic(id, topic)
	return ok && rest == "status"
}
