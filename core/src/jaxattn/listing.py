"""`list_backends()`: what is installed, where it came from, and whether it can run here.

`is_available()` is plugin code: a backend whose answer raises (or is not a `Support`) is
marked broken and left out of the list; `broken_plugins()` then shows it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from . import hardware as _hardware
from .faults import PluginFault, call_plugin
from .hardware import Hardware
from .registry import BrokenPlugin, Registry, default_registry
from .support import Support


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
    """Every working backend, sorted by op then name, with its usability on `hardware`."""
    hardware = hardware or _hardware.current()
    registry = registry or default_registry()
    infos = []
    for record in registry.records():
        impl = record.impl
        try:
            available = call_plugin("is_available()", impl.is_available, hardware, returns=Support)
        except PluginFault as fault:
            registry.mark_broken(impl, fault)
            continue
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
    """Plugins, and backends of plugins, that failed to load, register or answer, with their errors."""
    return (registry or default_registry()).broken
