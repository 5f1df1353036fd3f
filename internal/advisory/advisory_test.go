package advisory

import "testing"

func TestKeysAreDistinct(t *testing.T) {
	seen := map[Key]int{}
	for i, k := range All {
		if j, dup := seen[k]; dup {
			t.Fatalf("advisory keys %d and %d are both %#x", j, i, int64(k))
		}
		seen[k] = i
	}
}
