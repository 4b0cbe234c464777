"""Discovery of backends: the `jaxattn.backends` entry-point group, loaded with pluggy.

A plugin package declares, in its pyproject.toml::

    [project.entry-points."jaxattn.backends"]
    mybackend = "my_package.plugin"

and `my_package.plugin` holds a function marked with `jaxattn.hookimpl`::

    @jaxattn.hookimpl
    def jaxattn_register_backends():
        return [MyBackend()]

A plugin may also ship measured tuning tables (JSON files in the format `jaxattn tune
--json-out` writes, as package data) so that `auto` ranks by measurement before a user
runs `jaxattn tune`; it returns their locations from a second hook in the same module::

    @jaxattn.hookimpl
    def jaxattn_tuning_tables():
        return jaxattn.tuning.package_tables("my_package")   # my_package/tuning/*.json

Discovery runs once, lazily, on first use, and again on `refresh()`. A plugin that fails
to import, fails to register, or registers a name already taken is recorded as a
`BrokenPlugin` (shown by `jaxattn list-backends`); it never stops the other backends.
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from os import PathLike
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pluggy

from .operation import OperationImpl

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

PROJECT = "jaxattn"
ENTRY_POINT_GROUP = "jaxattn.backends"
BUILTIN_MODULE = "jaxattn.backends.xla"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class BackendSpecs:
    """The hooks a jaxattn plugin may implement."""

    @hookspec
    def jaxattn_register_backends(self) -> Sequence[OperationImpl | type[OperationImpl]]:  # type: ignore[empty-body]
        """Return the backends this plugin provides (instances, or classes to instantiate)."""

    @hookspec
    def jaxattn_tuning_tables(self) -> Sequence[str | PathLike[str] | Traversable]:  # type: ignore[empty-body]
        """Return the measured tuning tables this plugin ships (paths or package resources)."""


@dataclass(frozen=True)
class BackendRecord:
    """A registered backend and where it came from."""

    impl: OperationImpl
    plugin: str
    distribution: str
    version: str


@dataclass(frozen=True)
class TableRecord:
    """A tuning table a plugin ships, and where it came from."""

    location: str | PathLike[str] | Traversable
    plugin: str
    distribution: str
    version: str


@dataclass(frozen=True)
class BrokenPlugin:
    """A plugin (or one backend of it) that could not be registered, and why."""

    plugin: str
    distribution: str
    version: str
    error: str
    detail: str = ""


def _dist_of(entry_point: importlib_metadata.EntryPoint) -> tuple[str, str]:
    dist = getattr(entry_point, "dist", None)
    if dist is None:
        return "?", "?"
    return dist.metadata["Name"] or "?", dist.version or "?"


def _core_version() -> str:
    try:
        return importlib_metadata.version(PROJECT)
    except importlib_metadata.PackageNotFoundError:
        return "source"


class Registry:
    """The set of backends of this process, found through entry points."""

    def __init__(self, group: str = ENTRY_POINT_GROUP) -> None:
        self.group = group
        self._lock = threading.RLock()
        self._records: dict[tuple[str, str], BackendRecord] | None = None  # (op, name)
        self._aliases: dict[tuple[str, str], str] = {}  # (op, alias) -> name
        self._broken: list[BrokenPlugin] = []
        self._tables: list[TableRecord] = []
        self._extra: list[tuple[Any, str, str, str]] = []
        self.generation = 0  # bumped by each discovery; selection caches key on it

    # -- discovery --------------------------------------------------------------------
    def refresh(self) -> None:
        """Forget what was found and discover again on next use."""
        with self._lock:
            self._records = None

    def _ensure(self) -> dict[tuple[str, str], BackendRecord]:
        with self._lock:
            if self._records is None:
                self._discover()
            assert self._records is not None
            return self._records

    def _discover(self) -> None:
        self.generation += 1
        self._records, self._aliases, self._broken, self._tables = {}, {}, [], []
        manager = pluggy.PluginManager(PROJECT)
        manager.add_hookspecs(BackendSpecs)
        sources: dict[str, tuple[str, str]] = {}
        if self.group == ENTRY_POINT_GROUP and not any(
            ep.value == BUILTIN_MODULE for ep in importlib_metadata.entry_points(group=self.group)
        ):
            # Running from a source tree without the core's entry points installed: the
            # built-in backend still registers through the same hook.
            from .backends import xla

            manager.register(xla, name="xla")
            sources["xla"] = (PROJECT, _core_version())
        # The core's own backend registers first: a plugin cannot take its names.
        entry_points = sorted(importlib_metadata.entry_points(group=self.group),
                              key=lambda e: (e.value != BUILTIN_MODULE, e.name))
        for ep in entry_points:
            dist, version = _dist_of(ep)
            if ep.name in sources:
                self._broken.append(BrokenPlugin(ep.name, dist, version,
                                                 f"entry point name {ep.name!r} is declared twice"))
                continue
            try:
                plugin = ep.load()
                manager.register(plugin, name=ep.name)
            except Exception as err:  # noqa: BLE001 - any failure is recorded, never raised
                self._broken.append(BrokenPlugin(ep.name, dist, version, _one_line(err),
                                                 traceback.format_exc()))
                continue
            sources[ep.name] = (dist, version)
        for plugin, name, dist, version in self._extra:
            try:
                manager.register(plugin, name=name)
                sources[name] = (dist, version)
            except Exception as err:  # noqa: BLE001
                self._broken.append(BrokenPlugin(name, dist, version, _one_line(err), traceback.format_exc()))
        order = {name: i for i, name in enumerate(sources)}
        hooks = sorted(manager.hook.jaxattn_register_backends.get_hookimpls(),
                       key=lambda h: order.get(h.plugin_name, len(order)))
        for hook in hooks:
            dist, version = sources.get(hook.plugin_name, ("?", "?"))
            try:
                produced = hook.function()
                impls = list(_instances(produced))
            except Exception as err:  # noqa: BLE001
                self._broken.append(BrokenPlugin(hook.plugin_name, dist, version, _one_line(err),
                                                 traceback.format_exc()))
                continue
            for impl in impls:
                self._add(BackendRecord(impl, hook.plugin_name, dist, version))
        self._collect_tables(manager, sources, order)

    def _collect_tables(self, manager: pluggy.PluginManager, sources: dict[str, tuple[str, str]],
                        order: dict[str, int]) -> None:
        hooks = sorted(manager.hook.jaxattn_tuning_tables.get_hookimpls(),
                       key=lambda h: order.get(h.plugin_name, len(order)))
        for hook in hooks:
            dist, version = sources.get(hook.plugin_name, ("?", "?"))
            try:
                locations = list(hook.function() or ())
            except Exception as err:  # noqa: BLE001 - recorded like a failing registration
                self._broken.append(BrokenPlugin(hook.plugin_name, dist, version, _one_line(err),
                                                 traceback.format_exc()))
                continue
            self._tables.extend(TableRecord(loc, hook.plugin_name, dist, version) for loc in locations)

    def _add(self, record: BackendRecord) -> None:
        assert self._records is not None
        impl = record.impl
        problem = None
        if not impl.name:
            problem = f"{type(impl).__name__} has no name"
        else:
            for label in (impl.name, *impl.aliases):
                owner = self._lookup(label, impl.op)
                if owner is not None:
                    problem = (f"backend name {label!r} for {impl.op} is already taken by "
                               f"{owner.impl.name!r} from {owner.distribution} {owner.version}")
                    break
        if problem:
            self._broken.append(BrokenPlugin(record.plugin, record.distribution, record.version, problem))
            return
        self._records[(impl.op, impl.name)] = record
        for alias in impl.aliases:
            self._aliases[(impl.op, alias)] = impl.name

    def _lookup(self, name: str, op: str) -> BackendRecord | None:
        assert self._records is not None
        canonical = name if (op, name) in self._records else self._aliases.get((op, name))
        return None if canonical is None else self._records[(op, canonical)]

    def add_plugin(self, plugin: ModuleType | object, name: str, distribution: str = "local",
                   version: str = "0") -> None:
        """Register an object with `jaxattn_register_backends` without an entry point.

        For programs and tests that define a backend in-process; it joins the next
        discovery exactly as an installed plugin would.
        """
        with self._lock:
            self._extra.append((plugin, name, distribution, version))
            self._records = None

    def remove_plugin(self, name: str) -> None:
        with self._lock:
            self._extra = [e for e in self._extra if e[1] != name]
            self._records = None

    # -- queries ----------------------------------------------------------------------
    def records(self, op: str | None = None) -> list[BackendRecord]:
        records = self._ensure().values()
        return [r for r in records if op is None or r.impl.op == op]

    def backends(self, op: str | None = None) -> list[OperationImpl]:
        return [r.impl for r in self.records(op)]

    def tuning_tables(self) -> list[TableRecord]:
        """The tuning tables plugins ship, in discovery order (the core's first)."""
        self._ensure()
        return list(self._tables)

    @property
    def broken(self) -> list[BrokenPlugin]:
        self._ensure()
        return list(self._broken)

    def record(self, name: str, op: str = "attention") -> BackendRecord:
        """The backend called `name` (or with that alias) for `op`; ValueError if none."""
        records = self._ensure()
        found = self._lookup(name, op)
        if found is not None:
            return found
        other = [o for o in ("attention", "paged_attention") if o != op and self._lookup(name, o)]
        known = ", ".join(sorted(n for o, n in records if o == op)) or "none"
        hint = f"; {name!r} implements {other[0]}, not {op}" if other else ""
        broken = [b.plugin for b in self._broken]
        if broken:
            hint += f"; broken plugins: {', '.join(broken)}"
        raise ValueError(f"backend: no {op} backend named {name!r} (installed: {known}{hint})")

    def get(self, name: str, op: str = "attention") -> OperationImpl:
        return self.record(name, op).impl


def _instances(produced: Iterable[Any] | None) -> Iterable[OperationImpl]:
    for item in produced or ():
        if isinstance(item, type) and issubclass(item, OperationImpl):
            item = item()
        if not isinstance(item, OperationImpl):
            raise TypeError(f"jaxattn_register_backends returned {item!r}, not an OperationImpl")
        yield item


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0]


_default = Registry()


def default_registry() -> Registry:
    """The process-wide registry that `jaxattn.attention` uses."""
    return _default
