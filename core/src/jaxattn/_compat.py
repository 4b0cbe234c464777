"""Every difference between the JAX versions we support, in one place.

Supported: jax 0.10.x (the newest on Python 3.11, CPU CI) through 0.11.x and later
(the GPU machine). Other modules import these names instead of testing versions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

JAX_VERSION: tuple[int, ...] = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())


def shard_map(fn: Callable[..., Any], *, mesh: Any, in_specs: Any, out_specs: Any) -> Callable[..., Any]:
    """`jax.shard_map` without replication checks (kernels inside are opaque to them)."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map as legacy  # jax < 0.7

    return legacy(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def _varying(x: Any) -> frozenset:
    """The manual mesh axes `x` varies over (jax 0.10 keeps them in `aval.mat.varying`, other
    releases in `aval.vma`); empty outside `shard_map`."""
    if not hasattr(jax, "typeof"):
        return frozenset()
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)
    return frozenset(getattr(mat, "varying", None) or getattr(aval, "vma", None) or ())


def vary_like(x: Any, like: Any) -> Any:
    """`x` marked as varying over the manual mesh axes `like` varies over.

    Inside a user's `shard_map` (with its default `check_vma=True`), a `lax.scan` whose
    carry starts as a constant (zeros) but is updated from sharded inputs fails to type
    check; the initial carry must vary like the inputs. Outside `shard_map` this is `x`.
    """
    missing = tuple(sorted(_varying(like) - _varying(x)))
    if not missing:
        return x
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(x, missing, to="varying")
    return jax.lax.pvary(x, missing)  # jax releases before pcast


def is_batched(x: Any) -> bool:
    """True for values being traced by `jax.vmap` (batching tracers have no public type)."""
    return isinstance(x, jax.core.Tracer) and type(x).__name__ == "BatchTracer"


def is_tracer(x: Any) -> bool:
    """True for abstract values (inside jit/grad), whose contents cannot be inspected."""
    return isinstance(x, jax.core.Tracer)


def cudnn_version() -> int | None:
    """The loaded cuDNN's version as an int (9.8.0 -> 90800), or None without cuDNN.

    JAX reports it only through a private module, whose location may move between releases.
    """
    try:
        from jax._src.lib import cuda_versions
    except ImportError:
        return None
    if cuda_versions is None:
        return None
    try:
        return int(cuda_versions.cudnn_get_version())
    except Exception:  # noqa: BLE001 - no cuDNN loaded is an answer, not an error
        return None


def is_forward_mode_error(err: BaseException) -> bool:
    """Whether `err` is JAX refusing forward-mode autodiff (`jax.jvp`, `jacfwd`) of a
    `custom_vjp` function (recognized by its message, which JAX may reword)."""
    text = str(err)
    return isinstance(err, TypeError) and "custom_vjp" in text and ("jvp" in text or "forward-mode" in text)
