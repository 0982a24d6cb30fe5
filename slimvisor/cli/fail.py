"""How every command fails: one line on stderr, as xl's, and an exit status."""

from __future__ import annotations

import sys
from typing import NoReturn

import click


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"slimvisor: error: {message}", err=True)
    sys.exit(code)
