"""`list_backends()`: what is installed, where it came from, and whether it can run here."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from . import hardware as _hardware
from .hardware import Hardware
from .registry import BrokenPlugin, Registry, default_registry


@dataclass(frozen=True)
class BackendInfo:
    """One installed backend, as `jaxattn list-backends` shows it."""

    name: str
    aliases: tuple[str, ...]
    op: str
    distribution: str
    version: str
    platforms: tuple[str, ...]
    priority: dict[str, int]
    usable: bool
    reason: str  # why it is not usable on this machine ("" when usable)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def list_backends(hardware: Hardware | None = None, registry: Registry | None = None) -> list[BackendInfo]:
    """Every registered backend, sorted by op then name, with its usability on `hardware`."""
    hardware = hardware or _hardware.current()
    registry = registry or default_registry()
    infos = []
    for record in registry.records():
        impl = record.impl
        available = impl.is_available(hardware)
        infos.append(BackendInfo(
            name=impl.name,
            aliases=tuple(impl.aliases),
            op=impl.op,
            distribution=record.distribution,
            version=record.version,
            platforms=tuple(impl.platforms),
            priority=dict(impl.priority),
            usable=available.ok,
            reason="; ".join(available.reasons),
        ))
    return sorted(infos, key=lambda i: (i.op, i.name))


def broken_plugins(registry: Registry | None = None) -> list[BrokenPlugin]:
    """Plugins that failed to load or register, with their errors."""
    return (registry or default_registry()).broken
