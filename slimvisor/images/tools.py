"""Running the host programs images are built with (dpkg-deb, depmod, sfdisk, mkfs.ext4, grub-mkimage...)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def run_tool(argv: list[str], error: type[Exception], cwd: Path | None = None, stdin: str | None = None) -> str:
    """argv's stdout; any failure, a missing program included, as `error` naming the command."""
    try:
        r = subprocess.run(argv, cwd=cwd, input=stdin, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise error(f"{argv[0]} is not installed") from e
    if r.returncode != 0:
        raise error(f"{' '.join(argv)} failed ({r.returncode}): {(r.stderr or r.stdout).strip()}")
    return r.stdout
