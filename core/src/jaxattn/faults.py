"""Fault isolation: how the core calls plugin code, and what it checks before trusting it.

Third-party code runs in the host's process at three moments: when its module is imported
(discovery), when its hook returns backends (registration), and when the selector asks a
backend `is_available`, `supports` and `priority_on` (trace time). Any of these may be
buggy. The core never lets such a bug end the host program, empty the registry or make
every `auto` call fail: each call goes through `call_plugin`, which turns any failure into
a `PluginFault` (exception, origin and traceback); the registry then records the backend
(or plugin) as broken and selection goes on without it.

`call_plugin` catches `BaseException`: a plugin calling `sys.exit()` at import is a
bug, not a request to stop the host. The one exception it lets through is a real user
interrupt. A `KeyboardInterrupt` is real when a SIGINT arrived while the plugin code ran:
in the main thread the call watches SIGINT (a handler that notes the signal and then runs
the handler that was installed); Python raises `KeyboardInterrupt` for a signal only in
the main thread, and only through a handler it can call, so anywhere else (another
thread, SIGINT ignored or left to the system) a `KeyboardInterrupt` can only have been
raised by the plugin itself.

`declaration_problems` checks, once at registration, the attributes a backend declares,
so that a wrong declaration is reported where it is made rather than failing every call.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import traceback
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from .capabilities import Capabilities
from .hardware import PLATFORMS
from .operation import OperationImpl
from .request import OPS

RESERVED_NAMES = ("auto",)  # backend="auto" asks the selector to choose
_FORWARDS = {"cpu": ("forward_cpu",), "gpu": ("forward_gpu", "forward_cuda", "forward_rocm"),
             "tpu": ("forward_tpu",)}


class PluginFault(Exception):
    """Plugin code failed: `origin` says which call, `error` the exception in one line."""

    def __init__(self, origin: str, error: BaseException) -> None:
        self.origin = origin
        self.error = one_line(error)
        self.detail = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        super().__init__(f"{origin}: {self.error}")


def one_line(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    return text.splitlines()[0]


class _SigintWatch:
    fired = False

    def __init__(self, previous: Callable[..., Any]) -> None:
        self.previous = previous

    def __call__(self, signum: int, frame: Any) -> Any:
        self.fired = True
        return self.previous(signum, frame)


@contextlib.contextmanager
def _watch_sigint() -> Iterator[_SigintWatch | None]:
    """Note a SIGINT arriving in the block; None where Python cannot raise one for it."""
    previous = signal.getsignal(signal.SIGINT)
    watch = None
    if callable(previous) and threading.current_thread() is threading.main_thread():
        watch = _SigintWatch(previous)
        try:
            signal.signal(signal.SIGINT, watch)
        except ValueError:  # a subinterpreter: its signals are handled by the main one
            watch = None
    try:
        yield watch
    finally:
        if watch is not None and signal.getsignal(signal.SIGINT) is watch:  # unless the plugin set its own
            signal.signal(signal.SIGINT, previous)


def call_plugin(origin: str, fn: Callable[..., Any], *args: Any, returns: type | None = None) -> Any:
    """`fn(*args)`, with any failure (or a result that is not a `returns`) as a `PluginFault`."""
    with _watch_sigint() as watch:
        try:
            result = fn(*args)
        except KeyboardInterrupt as err:
            if watch is not None and watch.fired:
                raise  # the user pressed Ctrl-C: stop, as they asked
            raise PluginFault(origin, err) from err
        except BaseException as err:  # noqa: BLE001 - SystemExit from a plugin is its bug too
            raise PluginFault(origin, err) from err
    if returns is not None and not isinstance(result, returns):
        wrong = TypeError(f"returned {result!r}, not a {returns.__name__}")
        raise PluginFault(origin, wrong)
    return result


def _is_name(value: object) -> bool:
    return isinstance(value, str) and bool(value) and not any(c == "," or c.isspace() for c in value)


def _overrides(cls: type, method: str) -> bool:
    return getattr(cls, method, None) is not getattr(OperationImpl, method)


def declaration_problems(impl: OperationImpl) -> list[str]:
    """What is wrong with the attributes `impl` declares (empty when it can be registered)."""
    problems = []
    name, aliases = impl.name, impl.aliases
    if not _is_name(name):
        problems.append(f"name must be a non-empty string without commas or spaces, got {name!r}")
    if not isinstance(aliases, tuple) or not all(_is_name(a) for a in aliases):
        problems.append(f"aliases must be a tuple of names (no commas or spaces), got {aliases!r}")
    for label in {name, *(aliases if isinstance(aliases, tuple) else ())} & set(RESERVED_NAMES):
        problems.append(f"name {label!r} is reserved: backend={label!r} asks the selector to choose")
    if impl.op not in OPS:
        problems.append(f"op must be one of {OPS}, got {impl.op!r}")
    platforms = impl.platforms
    if not isinstance(platforms, tuple) or not platforms or not all(p in PLATFORMS for p in platforms):
        problems.append(f"platforms must be a non-empty tuple of {PLATFORMS}, got {platforms!r}")
    elif not any(_overrides(type(impl), m) for m in ("forward_native", "dispatch", "__call__")):
        missing = [p for p in platforms if not any(_overrides(type(impl), m) for m in _FORWARDS[p])]
        if missing:
            wanted = " or ".join(m for p in missing for m in _FORWARDS[p])
            problems.append(f"no forward for platform {', '.join(missing)}: implement forward_native or {wanted}")
    priority = impl.priority
    if not isinstance(priority, Mapping) or not all(
        p in PLATFORMS and isinstance(v, int) and not isinstance(v, bool) for p, v in priority.items()
    ):
        problems.append(f"priority must be a mapping of platform ({', '.join(PLATFORMS)}) to int, got {priority!r}")
    if not _overrides(type(impl), "supports") and not isinstance(getattr(impl, "capabilities", None), Capabilities):
        problems.append("supports() is not implemented (and no capabilities are declared)")
    return problems
