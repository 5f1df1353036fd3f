package broker

import "strings"

// matches reports whether an MQTT topic filter matches a topic name: "+"
// stands for one level, a trailing "#" for any number of levels, the parent
// level included ([MQTT-4.7.1-2]).
func matches(filter, topic string) bool {
	for {
		f, fRest, fMore := strings.Cut(filter, "/")
		if f == "#" && !fMore {
			return true
		}
		t, tRest, tMore := strings.Cut(topic, "/")
		if f != "+" && f != t {
			return false
		}
		switch {
		case !fMore && !tMore:
			return true
		case !tMore:
			return fRest == "#" // "a/#" matches "a"
		case !fMore:
			return false
		}
		filter, topic = fRest, tRest
	}
}
