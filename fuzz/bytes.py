"""Reading structured choices out of fuzz bytes: every read succeeds (zeros past the end)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


class Input:
    """A cursor over the fuzzer's bytes; `more` says whether any are left."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def more(self) -> bool:
        return self.pos < len(self.data)

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out.ljust(n, b"\0")

    def num(self, n: int = 1) -> int:
        return int.from_bytes(self.take(n), "little")

    def below(self, bound: int) -> int:
        return self.num(2) % bound if bound > 0 else 0

    def pick(self, choices: Sequence[T]) -> T:
        return choices[self.num(1) % len(choices)]

    def rest(self, limit: int) -> bytes:
        n = self.num(2) % (limit + 1)
        return self.take(n)
