"""Every `slimvisor` command, in one place: the group and dom0's local commands (main.py), and the
xl-style commands, each one call of slimvisord's public API (xl.py)."""

from slimvisor.cli.main import cli, main

__all__ = ["cli", "main"]
