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

Discovery runs once, lazily, on first use, and again on `refresh()`. Plugin code is
third-party code, so every call into it goes through `faults.call_plugin`: a plugin that
fails to import (even with `sys.exit()`), has no marked hook, fails in its hook, returns
something that is not a backend, declares wrong attributes (`faults.declaration_problems`)
or registers a name already taken is recorded as a `BrokenPlugin` (shown by `jaxattn
list-backends`); a backend that later fails when the selector asks it something is moved
there too (`mark_broken`). None of it stops the other backends, and the built-in `xla`
registers first, so it is always there.

A plugin built for another core (its distribution's `Requires-Dist` on `jaxattn` excludes
the running version: `versions.core_mismatch`) is recorded as broken with both versions
before its module is imported.

`JAXATTN_DISABLE_PLUGINS` (comma-separated plugin or backend names) is the way out of a
plugin that misbehaves in ways the core cannot see (a kernel that fails when it runs):
discovery skips what it names, without importing a skipped plugin; `xla` cannot be
skipped. It is read at each discovery (`jaxattn.refresh_backends()` re-reads it).
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from os import PathLike
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pluggy

from .faults import PluginFault, call_plugin, declaration_problems
from .mechanisms import provider_hint
from .operation import OperationImpl
from .versions import __version__ as CORE_VERSION
from .versions import core_mismatch

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

PROJECT = "jaxattn"
ENTRY_POINT_GROUP = "jaxattn.backends"
BUILTIN_MODULE = "jaxattn.backends.xla"
DISABLE_ENV_VAR = "JAXATTN_DISABLE_PLUGINS"
NO_HOOK = "no `jaxattn_register_backends` hook implementation: missing `@jaxattn.hookimpl`?"

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
    """A plugin (or one backend of it) that could not be registered or failed when asked.

    `backend` is empty when the whole plugin failed; `origin` says where it failed (the
    import, the hook, registration, or the backend method that raised); `detail` holds
    the traceback when there was an exception.
    """

    plugin: str
    distribution: str
    version: str
    error: str
    detail: str = ""
    backend: str = ""
    op: str = ""
    origin: str = ""

    def describe(self) -> str:
        who = f"backend {self.backend} of plugin {self.plugin}" if self.backend else self.plugin
        where = f" in {self.origin}" if self.origin else ""
        return f"{who} ({self.distribution} {self.version}){where}: {self.error}"

    def to_dict(self) -> dict[str, str]:
        return {"plugin": self.plugin, "backend": self.backend, "op": self.op, "distribution": self.distribution,
                "version": self.version, "origin": self.origin, "error": self.error, "traceback": self.detail}


@dataclass(frozen=True)
class _Source:
    """A plugin to load: its name, how to get its module (or object), where it comes from."""

    name: str
    load: Callable[[], Any]
    origin: str  # what loading it runs, for the report
    distribution: str
    version: str
    builtin: bool = False
    requires: tuple[str, ...] = ()  # the distribution's Requires-Dist lines


    def broken(self, error: str, detail: str = "", backend: str = "", op: str = "",
               origin: str = "") -> BrokenPlugin:
        return BrokenPlugin(self.name, self.distribution, self.version, error, detail, backend, op, origin)


def _dist_of(entry_point: importlib_metadata.EntryPoint) -> tuple[str, str, tuple[str, ...]]:
    """(name, version, Requires-Dist lines) of the distribution that declares `entry_point`."""
    dist = getattr(entry_point, "dist", None)
    if dist is None:
        return "?", "?", ()
    return dist.metadata["Name"] or "?", dist.version or "?", tuple(dist.requires or ())


def disabled_names() -> frozenset[str]:
    """The plugin and backend names in `JAXATTN_DISABLE_PLUGINS`."""
    return frozenset(n.strip() for n in os.environ.get(DISABLE_ENV_VAR, "").split(",") if n.strip())


class Registry:
    """The set of backends of this process, found through entry points."""

    def __init__(self, group: str = ENTRY_POINT_GROUP) -> None:
        self.group = group
        self._lock = threading.RLock()
        self._records: dict[tuple[str, str], BackendRecord] | None = None  # (op, name)
        self._aliases: dict[tuple[str, str], str] = {}  # (op, alias) -> name
        self._broken: list[BrokenPlugin] = []
        self._tables: list[TableRecord] = []
        self._disabled: dict[str, str] = {}  # name in JAXATTN_DISABLE_PLUGINS -> what it skipped
        self._extra: list[tuple[Any, str, str, str]] = []
        self.generation = 0  # bumped by each discovery and each mark_broken; selection caches key on it

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
        self._records, self._aliases, self._broken, self._disabled, self._tables = {}, {}, [], {}, []
        try:
            self._load_all()
        except BaseException:
            self._records = None  # a real interrupt: discover again on next use, never half-empty
            raise

    def _sources(self) -> list[_Source]:
        sources = []
        entry_points = importlib_metadata.entry_points(group=self.group)
        if self.group == ENTRY_POINT_GROUP and not any(ep.value == BUILTIN_MODULE for ep in entry_points):
            # Running from a source tree without the core's entry points installed: the
            # built-in backend still registers through the same hook.
            sources.append(_Source("xla", lambda: importlib.import_module(BUILTIN_MODULE),
                                   f"import {BUILTIN_MODULE}", PROJECT, CORE_VERSION, builtin=True))
        # The core's own backend registers first: a plugin cannot take its names.
        for ep in sorted(entry_points, key=lambda e: (e.value != BUILTIN_MODULE, e.name)):
            name, version, requires = _dist_of(ep)
            sources.append(_Source(ep.name, ep.load, f"import {ep.value}", name, version,
                                   builtin=ep.value == BUILTIN_MODULE, requires=requires))
        for plugin, name, dist, version in self._extra:
            sources.append(_Source(name, lambda plugin=plugin: plugin, "add_plugin", dist, version))
        return sources

    def _load_all(self) -> None:
        manager = pluggy.PluginManager(PROJECT)
        manager.add_hookspecs(BackendSpecs)
        disabled = disabled_names()
        seen: set[str] = set()
        for source in self._sources():
            if source.name in seen:
                self._broken.append(source.broken(f"plugin name {source.name!r} is declared twice",
                                                  origin="discovery"))
            elif source.name in disabled and not source.builtin:
                self._disabled[source.name] = f"plugin from {source.distribution} {source.version}"
            elif problem := core_mismatch(source.requires, source.distribution):
                self._broken.append(source.broken(problem, origin="core version check"))
            else:
                self._load(manager, source, disabled)
            seen.add(source.name)
        for name in sorted(disabled - set(self._disabled)):
            self._disabled[name] = "matches no installed plugin or backend"

    def _load(self, manager: pluggy.PluginManager, source: _Source, disabled: frozenset[str]) -> None:
        try:
            plugin = call_plugin(source.origin, source.load)
            call_plugin("hook registration", manager.register, plugin, source.name)
        except PluginFault as fault:
            self._broken.append(source.broken(fault.error, fault.detail, origin=fault.origin))
            return
        hooks = [h for h in manager.hook.jaxattn_register_backends.get_hookimpls() if h.plugin_name == source.name]
        tables = [h for h in manager.hook.jaxattn_tuning_tables.get_hookimpls() if h.plugin_name == source.name]
        if not hooks and not tables:
            self._broken.append(source.broken(NO_HOOK, origin="registration"))
        for hook in tables:
            found = self._hook_results(source, "jaxattn_tuning_tables()", hook.function)
            self._tables.extend(TableRecord(loc, source.name, source.distribution, source.version) for loc in found)
        for hook in hooks:
            for item in self._hook_results(source, "jaxattn_register_backends()", hook.function):
                self._register(item, source, disabled)

    def _hook_results(self, source: _Source, origin: str, hook: Any) -> list[Any]:
        """What one of a plugin's hooks returns, as a list; a hook that fails marks the plugin
        broken (with the fault) and counts as returning nothing."""
        try:
            return call_plugin(origin, lambda: list(hook() or ()))
        except PluginFault as fault:
            self._broken.append(source.broken(fault.error, fault.detail, origin=fault.origin))
            return []

    def _register(self, item: Any, source: _Source, disabled: frozenset[str]) -> None:
        try:
            impl, problems = call_plugin("registration", _checked, item)
        except PluginFault as fault:
            self._broken.append(source.broken(fault.error, fault.detail, origin=fault.origin))
            return
        label = impl.name if isinstance(impl.name, str) and impl.name else f"<{type(impl).__name__}>"
        op = impl.op if isinstance(impl.op, str) else ""
        if not problems:
            for name in (impl.name, *impl.aliases):
                owner = self._lookup(name, impl.op)
                if owner is not None:
                    problems = [f"backend name {name!r} for {impl.op} is already taken by "
                                f"{owner.impl.name!r} from {owner.distribution} {owner.version}"]
                    break
        if problems:
            self._broken.append(source.broken("; ".join(problems), backend=label, op=op, origin="registration"))
            return
        skipped = {impl.name, *impl.aliases} & disabled
        for name in skipped:
            self._disabled[name] = ("built in: never disabled" if source.builtin
                                    else f"backend {impl.name} ({op}) of plugin {source.name}")
        if skipped and not source.builtin:
            return
        assert self._records is not None
        self._records[(impl.op, impl.name)] = BackendRecord(impl, source.name, source.distribution, source.version)
        for alias in impl.aliases:
            self._aliases[(impl.op, alias)] = impl.name

    def mark_broken(self, impl: OperationImpl, fault: PluginFault) -> None:
        """Record that a registered backend failed when asked (`fault`); selection and
        listing stop asking it until the next discovery."""
        with self._lock:
            record = (self._records or {}).get((impl.op, impl.name))
            if record is None or record.impl is not impl:
                return  # already marked (or rediscovered since)
            assert self._records is not None
            del self._records[(impl.op, impl.name)]
            self._aliases = {k: v for k, v in self._aliases.items() if (k[0], v) != (impl.op, impl.name)}
            self._broken.append(BrokenPlugin(record.plugin, record.distribution, record.version, fault.error,
                                             fault.detail, impl.name, impl.op, fault.origin))
            self.generation += 1

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
        with self._lock:
            records = list(self._ensure().values())
        return [r for r in records if op is None or r.impl.op == op]

    def backends(self, op: str | None = None) -> list[OperationImpl]:
        return [r.impl for r in self.records(op)]

    def tuning_tables(self) -> list[TableRecord]:
        """The tuning tables plugins ship, in discovery order (the core's first)."""
        with self._lock:
            self._ensure()
            return list(self._tables)

    @property
    def broken(self) -> list[BrokenPlugin]:
        with self._lock:
            self._ensure()
            return list(self._broken)

    @property
    def disabled(self) -> dict[str, str]:
        """The names in `JAXATTN_DISABLE_PLUGINS` at discovery, and what each one skipped."""
        with self._lock:
            self._ensure()
            return dict(self._disabled)

    def record(self, name: str, op: str = "attention") -> BackendRecord:
        """The backend called `name` (or with that alias) for `op`; ValueError if none."""
        with self._lock:
            records = self._ensure()
            found = self._lookup(name, op)
            if found is not None:
                return found
            broken = [b for b in self._broken if b.backend == name and b.op == op]
            if broken:
                raise ValueError(f"backend: {op} backend {name!r} is broken ({broken[-1].describe()}); "
                                 "see `jaxattn list-backends`")
            if name in self._disabled:
                raise ValueError(f"backend: {name!r} is disabled by {DISABLE_ENV_VAR}")
            other = [o for o in ("attention", "paged_attention") if o != op and self._lookup(name, o)]
            known = ", ".join(sorted(n for o, n in records if o == op)) or "none"
            hint = f"; {name!r} implements {other[0]}, not {op}" if other else ""
            if not other:
                hint += provider_hint(name)
            broken_names = sorted({b.backend or b.plugin for b in self._broken})
            if broken_names:
                hint += f"; broken plugins: {', '.join(broken_names)}"
            raise ValueError(f"backend: no {op} backend named {name!r} (installed: {known}{hint})")

    def has(self, name: str, op: str = "attention") -> bool:
        """Is a backend called `name` (or with that alias) registered for `op`?"""
        self._ensure()
        return self._lookup(name, op) is not None

    def get(self, name: str, op: str = "attention") -> OperationImpl:
        return self.record(name, op).impl


def _checked(item: Any) -> tuple[OperationImpl, list[str]]:
    """The backend a hook returned (a class is instantiated) and what is wrong with it."""
    impl = item() if isinstance(item, type) and issubclass(item, OperationImpl) else item
    if not isinstance(impl, OperationImpl):
        raise TypeError(f"jaxattn_register_backends returned {item!r}, not an OperationImpl")
    return impl, declaration_problems(impl)


_default = Registry()


def default_registry() -> Registry:
    """The process-wide registry that `jaxattn.attention` uses."""
    return _default
