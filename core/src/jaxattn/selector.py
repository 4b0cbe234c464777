"""Choosing the backend for a call: `auto` ranking, explicit overrides, and why.

For a request, every registered backend of the right op answers `supports()`. The usable
ones are ranked: first those a tuning cache measured fastest for this request and
hardware (a seam for `jaxattn bench`'s cache), then by declared per-platform priority,
then by name. Overrides, strongest first: `backend=` in the call, the context manager
`use_backend(...)`, the environment variable `JAXATTN_BACKEND` (a comma-separated
preference list). Each of them also takes EasyDeL's mechanism names, which stand for
preference lists (`mechanisms.py`). A forced backend that cannot serve the request is an
error with its reasons, never a silent fallback. All of this runs at trace time.

`is_available`, `supports` and `priority_on` are plugin code: each call goes through
`faults.call_plugin`, and a backend that raises (or answers with the wrong type) is marked
broken in the registry and left out, so one buggy plugin cannot fail every `auto` call;
`Selection.explain()` lists what is broken. A chosen backend that fails when it runs is
not replaced by another: the call raises `BackendFailedError`, which names the backend and
how to run without it.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from .faults import PluginFault, call_plugin
from .hardware import Hardware
from .mechanisms import backends_for
from .operation import OperationImpl
from .registry import DISABLE_ENV_VAR, BrokenPlugin, Registry, default_registry
from .request import AttentionRequest
from .support import Support

ENV_VAR = "JAXATTN_BACKEND"


class BackendUnavailableError(ValueError):
    """A forced backend (or every backend of a forced list) cannot serve the request."""


class NoBackendError(RuntimeError):
    """No installed backend can serve the request under `auto`."""


class BackendFailedError(RuntimeError):
    """The backend `auto` chose raised while running; the original error is its `__cause__`."""


@dataclass(frozen=True)
class Rejection:
    backend: str
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class Selection:
    """The chosen backend for a request, and why every other one was not chosen."""

    backend: OperationImpl
    request: AttentionRequest
    hardware: Hardware
    source: str  # "auto", "backend=", "use_backend", or ENV_VAR
    ranking: tuple[str, ...]  # usable backends, best first (the choice included)
    rejected: tuple[Rejection, ...]
    broken: tuple[BrokenPlugin, ...] = ()  # plugins and backends of this op left out as broken
    split: str = ""  # how the call is split over devices (set by the API for a mesh), or ""

    @property
    def name(self) -> str:
        return self.backend.name

    def explain(self) -> str:
        """Human-readable: the request, the choice, then every rejection with its reasons."""
        lines = [
            f"request:  {self.request.describe()}",
            f"hardware: {self.hardware.platform} ({self.hardware.device_kind})",
            f"chosen:   {self.name} (by {self.source})",
        ]
        if self.split:
            lines.append(f"split:    {self.split}")
        others = [n for n in self.ranking if n != self.name]
        if others:
            lines.append(f"also usable, ranked: {', '.join(others)}")
        for rejection in self.rejected:
            lines.append(f"rejected: {rejection.backend}")
            lines.extend(f"  - {reason}" for reason in rejection.reasons)
        for broken in self.broken:
            lines.append(f"broken:   {broken.describe()}")
        return "\n".join(lines)

    def failed(self, err: Exception) -> BackendFailedError:
        """The error for the chosen backend failing with `err`: names it and the way out."""
        other = next((n for n in self.ranking if n != self.name), "xla")
        return BackendFailedError(
            f"backend {self.name!r}, chosen by auto for {self.request.describe()}, failed: "
            f"{type(err).__name__}: {err}\nauto does not fall back to another backend. To run without "
            f"{self.name!r}, set {DISABLE_ENV_VAR}={self.name} (discovery skips it), or choose another: "
            f"backend={other!r}, jaxattn.use_backend({other!r}) or {ENV_VAR}={other}."
        )


class TuningCache(Protocol):
    """Measured preferences: backend names fastest first for a request (may be empty)."""

    def ranking(self, request: AttentionRequest, hardware: Hardware) -> Sequence[str]: ...


class _NoMeasurements:
    def ranking(self, request: AttentionRequest, hardware: Hardware) -> Sequence[str]:
        return ()


_tuning_cache: TuningCache = _NoMeasurements()
_forced: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "jaxattn_forced_backend", default=None
)
_cache: dict[tuple[object, ...], Selection] = {}


def set_tuning_cache(cache: TuningCache | None) -> None:
    """Install measured preferences that `auto` consults before declared priorities."""
    global _tuning_cache
    _tuning_cache = cache if cache is not None else _NoMeasurements()
    _cache.clear()


def _names(value: str | Sequence[str], what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        names = tuple(n.strip() for n in value.split(",") if n.strip())
    elif isinstance(value, Sequence) and all(isinstance(n, str) for n in value):
        names = tuple(value)
    else:
        raise ValueError(f"{what}: expected a backend name or a list of names, got {value!r}")
    if not names:
        raise ValueError(f"{what}: expected at least one backend name, got {value!r}")
    return names


@contextlib.contextmanager
def use_backend(name_or_names: str | Sequence[str]) -> Iterator[None]:
    """Force a backend (or a preference list) for the calls inside the block."""
    token = _forced.set(_names(name_or_names, "use_backend"))
    try:
        yield
    finally:
        _forced.reset(token)


def _override(backend: str | Sequence[str] | None) -> tuple[tuple[str, ...] | None, str]:
    if backend is not None and backend != "auto":
        return _names(backend, "backend"), "backend="
    forced = _forced.get()
    if forced is not None and forced != ("auto",):
        return forced, "use_backend"
    env = os.environ.get(ENV_VAR, "").strip()
    if env and env != "auto":
        return _names(env, ENV_VAR), ENV_VAR
    return None, "auto"


def forced_names(backend: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """The backend names the user forced (by `backend=`, `use_backend` or the environment), or None."""
    return _override(backend)[0]


def _verdict(impl: OperationImpl, request: AttentionRequest, hardware: Hardware,
             registry: Registry) -> tuple[str, ...] | PluginFault:
    """Why `impl` cannot serve `request` (empty: it can), or its fault (it is now broken)."""
    if impl.op != request.op:
        return (f"{impl.name} implements {impl.op}, not {request.op}",)
    try:
        available = call_plugin("is_available()", impl.is_available, hardware, returns=Support)
        if not available:
            return available.reasons
        return call_plugin("supports()", impl.supports, request, hardware, returns=Support).reasons
    except PluginFault as fault:
        registry.mark_broken(impl, fault)
        return fault


def _priority(impl: OperationImpl, hardware: Hardware, registry: Registry) -> int | None:
    try:
        return call_plugin("priority_on()", impl.priority_on, hardware.platform, returns=int)
    except PluginFault as fault:
        registry.mark_broken(impl, fault)
        return None


def _broken(registry: Registry, op: str) -> tuple[BrokenPlugin, ...]:
    return tuple(b for b in registry.broken if b.op in ("", op))


def select(
    request: AttentionRequest,
    hardware: Hardware,
    backend: str | Sequence[str] | None = "auto",
    registry: Registry | None = None,
) -> Selection:
    """Choose the backend for `request` on `hardware` (see the module docstring)."""
    registry = registry or default_registry()
    registry.records()  # discover first: the cache key holds the registry's generation
    forced, source = _override(backend)
    if forced is not None and all(backends_for(n, request.op) == ("auto",) for n in forced):
        forced = None  # mechanisms such as "ring" leave the backend to auto (the scheme is the API's)
    key = (request, hardware, forced, source, id(registry), registry.generation, id(_tuning_cache))
    if key not in _cache:
        if forced is not None:
            _cache[key] = _select_forced(request, hardware, forced, source, registry)
        else:
            _cache[key] = _select_auto(request, hardware, registry)
    return _cache[key]


def _select_auto(request: AttentionRequest, hardware: Hardware, registry: Registry) -> Selection:
    usable: dict[OperationImpl, int] = {}  # backend -> priority
    rejected: list[Rejection] = []
    for impl in registry.backends(request.op):
        reasons = _verdict(impl, request, hardware, registry)
        if isinstance(reasons, PluginFault):
            continue  # broken now: listed in the selection's `broken`
        if reasons:
            rejected.append(Rejection(impl.name, reasons))
            continue
        priority = _priority(impl, hardware, registry)
        if priority is not None:
            usable[impl] = priority
    broken = _broken(registry, request.op)
    if not usable:
        detail = "; ".join(f"{r.backend}: {' / '.join(r.reasons)}" for r in rejected) or "none installed"
        detail += "".join(f"; broken: {b.describe()}" for b in broken)
        raise NoBackendError(f"no backend can serve {request.describe()} ({detail})")
    measured = list(_tuning_cache.ranking(request, hardware))
    order = {name: i for i, name in enumerate(measured)}
    ranked = sorted(usable, key=lambda b: (order.get(b.name, len(order)), -usable[b], b.name))
    return Selection(ranked[0], request, hardware, "auto", tuple(b.name for b in ranked), tuple(rejected), broken)


def _select_forced(
    request: AttentionRequest,
    hardware: Hardware,
    names: tuple[str, ...],
    source: str,
    registry: Registry,
) -> Selection:
    rejected: list[Rejection] = []
    chosen: OperationImpl | None = None
    usable: list[str] = []
    for name, via in _expand(names, request.op):
        if via is not None and not registry.has(name, request.op):
            try:  # a list entry named by a mechanism: not installed or broken is a rejection
                registry.get(name, request.op)
            except ValueError as err:
                rejected.append(Rejection(name, (f"named by the mechanism {via!r}, but {err}",)))
                continue
        impl = registry.get(name, request.op)  # unknown or broken names: ValueError saying so
        reasons = _verdict(impl, request, hardware, registry)
        if isinstance(reasons, PluginFault):
            reasons = (f"{impl.name} is broken: {reasons}",)
        if reasons:
            rejected.append(Rejection(impl.name, reasons))
        else:
            usable.append(impl.name)
            chosen = chosen or impl
    if chosen is None:
        detail = "; ".join(f"{r.backend} cannot: {' / '.join(r.reasons)}" for r in rejected)
        raise BackendUnavailableError(
            f"{source} asked for {', '.join(names)} for {request.describe()}, but {detail}"
        )
    # Backends of the list after the choice are only "also usable"; those before were rejected.
    return Selection(chosen, request, hardware, source, tuple(usable), tuple(rejected),
                     _broken(registry, request.op))


def _expand(names: tuple[str, ...], op: str) -> list[tuple[str, str | None]]:
    """Backend names with EasyDeL mechanism names replaced by their preference lists:
    `(backend, mechanism it came from or None)`, each backend once."""
    out: list[tuple[str, str | None]] = []
    for name in names:
        listed = backends_for(name, op)
        for backend, via in ([(name, None)] if listed is None else [(b, str(name)) for b in listed]):
            if all(backend != seen for seen, _ in out):
                out.append((backend, via))
    return out
