"""Host-side resource control for domains: cgroups (scheduling, accounting, teardown) and CPU pinning."""
