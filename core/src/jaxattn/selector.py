"""Choosing the backend for a call: `auto` ranking, explicit overrides, and why.

For a request, every registered backend of the right op answers `supports()`. The usable
ones are ranked: first as a tuning table measured them for this request and hardware
(`jaxattn tune`'s cache and the tables plugins ship: `jaxattn.tuning`, read lazily), then
by declared per-platform priority, then by name.

A request that needs gradients gets two choices under `auto`, without the user saying
which call is which: the `Selection` itself serves differentiated calls, and its
`forward_only` serves calls that are not differentiated (the same request without
`needs_grad`, ranked by forward-only measurements). `dispatch.py` runs each where it
belongs. Overrides, strongest first: `backend=` in the call, the context manager
`use_backend(...)`, the environment variable `JAXATTN_BACKEND` (a comma-separated
preference list). Each of them also takes EasyDeL's mechanism names, which stand for
preference lists (`mechanisms.py`); a forced backend serves both kinds of call. A forced
backend that cannot serve the request is an error with its reasons, never a silent
fallback.

`is_available`, `supports` and `priority_on` are plugin code: each call goes through
`faults.call_plugin`, and a backend that raises (or answers with the wrong type) is marked
broken in the registry and left out, so one buggy plugin cannot fail every `auto` call;
`Selection.explain()` lists what is broken. A chosen backend that fails when it runs is
not replaced by another: the call raises `BackendFailedError`, which names the backend and
how to run without it.

All of this runs at trace time. Selections are cached (bounded, least recently used
first out) and each new one is logged once on the `jaxattn` logger.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .faults import PluginFault, call_plugin
from .hardware import Hardware
from .mechanisms import backends_for
from .operation import OperationImpl
from .registry import DISABLE_ENV_VAR, BrokenPlugin, Registry, default_registry
from .request import AttentionRequest
from .support import Support

ENV_VAR = "JAXATTN_BACKEND"
CACHE_SIZE = 1024  # selections kept (one per distinct request, hardware, override and registry state)

logger = logging.getLogger("jaxattn")


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
class MeasuredRanking:
    """A tuning table's answer for one request: backend names fastest first, with the evidence.

    `seconds` and `configs` are parallel to `names` when known: the best time of each
    backend and the settings it was measured with (`{}` = its defaults). `source` says
    where the measurement comes from, `match` whether it was of this exact shape or of the
    nearest measured bucket.
    """

    names: tuple[str, ...]
    seconds: tuple[float, ...] = ()
    configs: tuple[Mapping[str, Any], ...] = ()
    source: str = ""
    match: str = ""

    def seconds_of(self, name: str) -> float | None:
        return self.seconds[self.names.index(name)] if name in self.names and self.seconds else None

    def config_of(self, name: str) -> dict[str, Any]:
        return dict(self.configs[self.names.index(name)]) if name in self.names and self.configs else {}


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


@dataclass(frozen=True)
class Selection:
    """The chosen backend for a request, and why every other one was not chosen.

    `measured` is the tuning-table ranking that put the choice first (None when declared
    priority decided). `forward_only` is the choice for calls that are not differentiated
    when `auto` chose separately for them (a request with `needs_grad`), else None.
    """

    backend: OperationImpl
    request: AttentionRequest
    hardware: Hardware
    source: str  # "auto", "backend=", "use_backend", or ENV_VAR
    ranking: tuple[str, ...]  # usable backends, best first (the choice included)
    rejected: tuple[Rejection, ...]
    broken: tuple[BrokenPlugin, ...] = ()  # plugins and backends of this op left out as broken
    split: str = ""  # how the call is split over devices (set by the API for a mesh), or ""
    measured: MeasuredRanking | None = None
    forward_only: Selection | None = None

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def config(self) -> dict[str, Any]:
        """The tuned settings of the chosen backend (`{}`: its defaults). A config the call's
        metadata gives for that backend wins over it."""
        return self.measured.config_of(self.name) if self.measured is not None else {}

    @property
    def splits(self) -> bool:
        """True when forward-only and differentiated calls run different backends or settings."""
        fwd = self.forward_only
        return fwd is not None and (fwd.name, fwd.config) != (self.name, self.config)

    def why(self) -> str:
        """How the choice was made, e.g. "by auto: measured 1.12x faster than cudnn (...)"."""
        if self.source != "auto":
            return f"by {self.source}"
        m = self.measured
        if m is None:
            return "by auto: declared priority, no measurement for this call"
        mine = m.seconds_of(self.name)
        runner = next((n for n in self.ranking if n != self.name and m.seconds_of(n) is not None), None)
        kind = "forward+backward" if self.request.needs_grad else "forward"
        if mine is None:
            margin = "ranked first"
        elif runner is None:
            margin = f"{_ms(mine)}, no other usable backend measured"
        else:
            theirs = m.seconds_of(runner) or mine
            margin = f"{theirs / mine:.2f}x faster than {runner} ({_ms(mine)} vs {_ms(theirs)})"
        config = f", settings {self.config}" if self.config else ""
        return f"by auto: measured {kind}, {margin}{config}; {m.source}, {m.match}"

    def explain(self) -> str:
        """Human-readable: the request, the choice(s), then every rejection with its reasons."""
        lines = [
            f"request:  {self.request.describe()}",
            f"hardware: {self.hardware.platform} ({self.hardware.device_kind})",
        ]
        fwd = self.forward_only
        same = fwd is not None and (fwd.name, fwd.why(), fwd.ranking) == (self.name, self.why(), self.ranking)
        if fwd is None or same:
            both = " for differentiated and forward-only calls" if same else ""
            lines.append(f"chosen:   {self.name}{both} ({self.why()})")
            others = [n for n in self.ranking if n != self.name]
            if others:
                lines.append(f"also usable, ranked: {', '.join(others)}")
        else:
            lines.append(f"chosen:   {self.name} for differentiated calls ({self.why()})")
            lines.append(f"          {fwd.name} for forward-only calls ({fwd.why()})")
            for label, sel in (("differentiated", self), ("forward-only", fwd)):
                others = [n for n in sel.ranking if n != sel.name]
                if others:
                    lines.append(f"also usable for {label} calls, ranked: {', '.join(others)}")
        usable_forward = set(fwd.ranking) if fwd is not None else set()
        if self.split:
            lines.append(f"split:    {self.split}")
        for rejection in self.rejected:
            only = " for differentiated calls" if rejection.backend in usable_forward else ""
            lines.append(f"rejected{only}: {rejection.backend}")
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

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: what `jaxattn explain --json` prints."""
        m = self.measured
        return {
            "backend": self.name,
            "source": self.source,
            "why": self.why(),
            "config": self.config,
            "request": _jsonable(dataclasses.asdict(self.request)),
            "hardware": _jsonable(dataclasses.asdict(self.hardware)),
            "ranking": list(self.ranking),
            "rejected": [{"backend": r.backend, "reasons": list(r.reasons)} for r in self.rejected],
            "broken": [b.to_dict() for b in self.broken],
            "measured": None if m is None else {
                "seconds": dict(zip(m.names, m.seconds)), "configs": dict(zip(m.names, m.configs)),
                "source": m.source, "match": m.match,
            },
            "forward_only": None if self.forward_only is None else self.forward_only.to_dict(),
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (frozenset, set)):
        return sorted(value)
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


class TuningCache(Protocol):
    """Measured preferences: backend names fastest first for a request (may be empty).

    `ranking` may return a plain sequence of names or a `MeasuredRanking` (names with their
    times and where they were measured, which `explain` shows). `request.needs_grad` says
    whether forward+backward or forward-only measurements apply.
    """

    def ranking(self, request: AttentionRequest, hardware: Hardware) -> Sequence[str] | MeasuredRanking: ...


class _NoMeasurements:
    def ranking(self, request: AttentionRequest, hardware: Hardware) -> Sequence[str]:
        return ()


NO_MEASUREMENTS: TuningCache = _NoMeasurements()  # `set_tuning_cache(NO_MEASUREMENTS)`: declared priority only

_tuning_cache: TuningCache | None = None  # None: the default tables, created on first use
_forced: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "jaxattn_forced_backend", default=None
)
_cache: OrderedDict[tuple[object, ...], Selection] = OrderedDict()
_lock = threading.Lock()


def tuning_cache() -> TuningCache:
    """The measured preferences `auto` consults: the installed one, else the default tables
    (`jaxattn.tuning.MeasuredTables`: the user's tuning cache and the tables plugins ship)."""
    global _tuning_cache
    with _lock:
        if _tuning_cache is None:
            from .tuning.cache import MeasuredTables

            _tuning_cache = MeasuredTables()
        return _tuning_cache


def set_tuning_cache(cache: TuningCache | None) -> None:
    """Install measured preferences that `auto` consults before declared priorities.

    `None` goes back to the default tables, read again on next use (after `jaxattn tune`
    wrote a new cache, or `JAXATTN_TUNING_CACHE` changed); `NO_MEASUREMENTS` turns
    measurements off. Clears the selection cache.
    """
    global _tuning_cache
    with _lock:
        _tuning_cache = cache
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
    declared = impl.declared_reasons(request)
    if declared:
        return declared
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
    measurements = tuning_cache()
    key = (request, hardware, forced, source, id(registry), registry.generation, id(measurements))
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    if forced is not None:
        selection = _select_forced(request, hardware, forced, source, registry)
    else:
        selection = _rank(request, hardware, registry, measurements)
        if request.needs_grad:
            forward = dataclasses.replace(request, needs_grad=False)
            selection = dataclasses.replace(selection, forward_only=_rank(forward, hardware, registry, measurements))
    _log(selection)
    with _lock:
        _cache[key] = selection
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return selection


def _log(selection: Selection) -> None:
    described = selection.request.describe()
    logger.info("jaxattn: %s on %s -> %s (%s)", described, selection.hardware.device_kind, selection.name,
                selection.why())
    if selection.forward_only is not None:
        fwd = selection.forward_only
        logger.info("jaxattn: %s, forward-only calls -> %s (%s)", described, fwd.name, fwd.why())


def _measured(measurements: TuningCache, request: AttentionRequest, hardware: Hardware) -> MeasuredRanking:
    answer = measurements.ranking(request, hardware)
    if isinstance(answer, MeasuredRanking):
        return answer
    return MeasuredRanking(tuple(answer), source="tuning cache", match="as given")


def _sort_out(request: AttentionRequest, hardware: Hardware,
              registry: Registry) -> tuple[dict[OperationImpl, int], list[Rejection]]:
    """The usable backends with their priorities, and the rejections (broken ones: neither)."""
    usable: dict[OperationImpl, int] = {}
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
    return usable, rejected


def usable_backends(request: AttentionRequest, hardware: Hardware, registry: Registry | None = None) -> list[str]:
    """Every backend that can serve `request` on `hardware`, unranked (no override applies)."""
    return [impl.name for impl in _sort_out(request, hardware, registry or default_registry())[0]]


def _rank(request: AttentionRequest, hardware: Hardware, registry: Registry,
          measurements: TuningCache) -> Selection:
    usable, rejected = _sort_out(request, hardware, registry)
    broken = _broken(registry, request.op)
    if not usable:
        detail = "; ".join(f"{r.backend}: {' / '.join(r.reasons)}" for r in rejected) or "none installed"
        detail += "".join(f"; broken: {b.describe()}" for b in broken)
        raise NoBackendError(f"no backend can serve {request.describe()} ({detail})")
    measured = _measured(measurements, request, hardware)
    order = {name: i for i, name in enumerate(measured.names)}
    ranked = sorted(usable, key=lambda b: (order.get(b.name, len(order)), -usable[b], b.name))
    chosen = ranked[0]
    return Selection(chosen, request, hardware, "auto", tuple(b.name for b in ranked), tuple(rejected), broken,
                     measured=measured if chosen.name in order else None)


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
