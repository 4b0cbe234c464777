"""`Support`: a backend's yes/no answer for one request, with the reasons for a no.

Backends collect every reason they cannot serve a request (not just the first) so that
`jaxattn.explain` can show a user everything that stands in the way at once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Support:
    """Whether a backend can serve a request; `reasons` says why not (empty when `ok`)."""

    ok: bool
    reasons: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.ok and self.reasons:
            raise ValueError("Support: a supported answer carries no reasons")
        if not self.ok and not self.reasons:
            raise ValueError("Support: an unsupported answer needs at least one reason")

    def __bool__(self) -> bool:
        return self.ok

    def __and__(self, other: Support) -> Support:
        return Support.from_reasons(self.reasons + other.reasons)

    @classmethod
    def yes(cls) -> Support:
        return cls(True)

    @classmethod
    def no(cls, *reasons: str) -> Support:
        return cls(False, tuple(reasons))

    @classmethod
    def from_reasons(cls, reasons: Iterable[str]) -> Support:
        """Supported exactly when `reasons` is empty."""
        reasons = tuple(reasons)
        return cls(not reasons, reasons)

    def __str__(self) -> str:
        return "supported" if self.ok else "; ".join(self.reasons)
