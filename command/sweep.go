package command

import "context"

// Sweep settles the commands whose time is up: queued past their expiry
// (expired) and delivered past their deadline (timed_out). Every replica
// sweeps; each command is settled by one of them (Store.Expire).
func (s *Service) Sweep(ctx context.Context) {
	cs, err := s.store.Expire(ctx, s.opts.Now())
	for _, c := range cs {
		s.changed(c)
	}
	if err != nil && ctx.Err() == nil {
		s.log.Warn("cannot apply command timeouts", "err", err)
	}
}

// Prune deletes finished commands past the retention or past the newest
// KeepPerDevice of their device.
func (s *Service) Prune(ctx context.Context) {
	n, err := s.store.Prune(ctx, s.opts.Now(), s.opts.Retention, s.opts.KeepPerDevice)
	switch {
	case err != nil && ctx.Err() == nil:
		s.log.Warn("cannot prune finished commands", "err", err)
	case n > 0:
		s.log.Debug("finished commands pruned", "rows", n)
	}
}
