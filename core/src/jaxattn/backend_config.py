"""Typed per-backend settings: `BackendConfig`, the base of `XlaConfig`, `FlashConfig`, ...

A backend's settings (block sizes, kernel choices) were plain dicts in
`OperationMetadata.operation_configs`, checked wherever a key happened to be read, so a
typo surfaced late or not at all. A backend now declares a frozen dataclass (its
`config_class`) whose fields are its keys, `None` meaning "the backend's default". The
core turns a dict into it (`from_mapping`) before any kernel runs, so a bad setting is a
`ValueError` naming the key and the expected form. Dicts stay accepted everywhere:
`operation_configs={"flash": {"block_q": 64}}` and `{"flash": FlashConfig(block_q=64)}`
mean the same, and `to_dict()` gives the dict back (what the tuning cache stores).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar, TypeVar

C = TypeVar("C", bound="BackendConfig")


@dataclass(frozen=True)
class BackendConfig:
    """Settings of one backend; subclasses add optional fields (None = the default).

    Subclasses validate their fields in `__post_init__` with the `check_*` helpers, which
    raise `ValueError` naming `metadata.operation_configs[<backend>][<key>]`.
    """

    backend: ClassVar[str] = ""

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_mapping(cls: type[C], value: Mapping[str, Any] | BackendConfig | None) -> C:
        """`value` as this config: a dict of its keys, an instance, or None (all defaults)."""
        where = f"metadata.operation_configs[{cls.backend!r}]"
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, BackendConfig):
            raise ValueError(f"{where}: expected a {cls.__name__} or a dict, got a {type(value).__name__}")
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: expected a {cls.__name__} or a dict, got {type(value).__name__}")
        unknown = sorted(set(value) - set(cls.keys()))
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(cls.keys())}")
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        """The keys that are set (not None): what `operation_configs` would hold."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    # -- validation helpers for subclasses --------------------------------------------
    def _where(self, key: str) -> str:
        return f"metadata.operation_configs[{self.backend!r}][{key!r}]"

    def check_int(self, key: str, *, minimum: int = 1, maximum: int | None = None,
                  power_of_two: bool = False, multiple_of: int | None = None) -> None:
        """`key` is None or an int in range (and a power of two / a multiple when asked)."""
        value = getattr(self, key)
        if value is None:
            return
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
        ok = ok and (maximum is None or value <= maximum)
        ok = ok and (not power_of_two or value & (value - 1) == 0)
        ok = ok and (multiple_of is None or value % multiple_of == 0)
        if not ok:
            if power_of_two:
                form = f"a power of two >= {minimum}"
            elif multiple_of is not None:
                form = f"a positive multiple of {multiple_of}"
            elif maximum is not None:
                form = f"an int from {minimum} to {maximum}"
            else:
                form = f"an int >= {minimum}"
            raise ValueError(f"{self._where(key)} must be {form}, got {value!r}")

    def check_choice(self, key: str, choices: Sequence[Any]) -> None:
        """`key` is None or one of `choices`, of the same type (64.0 is not the tile 64, True not 1)."""
        value = getattr(self, key)
        if value is not None and (type(value) not in {type(c) for c in choices} or value not in choices):
            shown = ", ".join(repr(c) for c in choices)
            raise ValueError(f"{self._where(key)} must be one of {shown}, got {value!r}")
