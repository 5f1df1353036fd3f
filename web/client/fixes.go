package client

import (
	"context"
	"net/http"

	"github.com/fleetd/fleetd/fix"
)

// ApplyFix applies the configuration change a problem's diagnosis names to
// the devices the request names or selects (POST /api/v1/fixes).
func (c *Client) ApplyFix(ctx context.Context, r fix.Request) (fix.Result, error) {
	var res fix.Result
	err := c.do(ctx, http.MethodPost, "/api/v1/fixes", r, &res)
	return res, err
}
