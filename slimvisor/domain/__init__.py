"""Running one domain: host checks and boot defaults (`check`), isolation (`isolation`), its
devices (`devices`), one boot of it (`incarnation`), its console (`console`: the pump, the
terminal), the foreground runner (`runner`, `slimvisor run`) and the daemon's per-domain
supervisor (`supervisor`). Its modules are imported by name: they start processes and sockets."""
