"""dom0 networking: the L2 switch, rate limiting, the uplink to the host."""
