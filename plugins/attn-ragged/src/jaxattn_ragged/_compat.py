"""Everything that differs between the JAX versions we support (0.10.x on CI, 0.11.x on GPUs).

The Pallas Triton API (`pl.pallas_call`, `pl.BlockSpec`, `plgpu.load/store`,
`plgpu.CompilerParams`) is the same in 0.10.2 and 0.11.x; what may move is imported here,
once, with fallbacks, so the kernels never test versions themselves.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
from jax.experimental import pallas as pl

try:  # Triton-specific Pallas API
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - a JAX without the Triton backend
    plgpu = None  # type: ignore[assignment]

JAX_VERSION = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())


def triton_params(num_warps: int, num_stages: int) -> Any:
    """Compiler parameters for the Triton lowering (None when unavailable)."""
    if plgpu is None:
        return None
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def masked_load(ref: Any, mask: Any = None, other: Any = None) -> Any:
    if mask is None:
        return ref[...]
    return plgpu.load(ref, mask=mask, other=other)


def masked_store(ref: Any, value: Any, mask: Any) -> None:
    plgpu.store(ref, value, mask=mask)


def tpu_ragged_paged_attention() -> Any:
    """jax's TPU ragged paged attention function, or None where this JAX has none."""
    try:
        from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention
    except ImportError:
        return None
    return ragged_paged_attention


def tpu_interpret_mode() -> Any:
    """Context manager that runs TPU Pallas kernels in the TPU interpreter (or a null context)."""
    try:
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.force_tpu_interpret_mode()
    except (ImportError, AttributeError):
        return contextlib.nullcontext()


def num_sms(default: int = 132) -> int:
    """Streaming multiprocessors of the first GPU (for choosing the KV split)."""
    try:
        dev = jax.devices()[0]
    except RuntimeError:
        return default
    count = getattr(dev, "core_count", None)
    return int(count) if count else default


_MOSAIC: dict[str, Any] = {}


def mosaic_gpu() -> Any:
    """`jax.experimental.pallas.mosaic_gpu`, imported on first use (ImportError if it cannot be):
    the Hopper decode kernel's API; CPU CI only lowers it."""
    if "module" not in _MOSAIC:
        try:
            from jax.experimental.pallas import mosaic_gpu as plgpu_mosaic

            _MOSAIC["module"], _MOSAIC["error"] = plgpu_mosaic, None
        except Exception as e:  # noqa: BLE001 - any failure means "no Mosaic GPU here"
            _MOSAIC["module"], _MOSAIC["error"] = None, f"{type(e).__name__}: {e}"
    if _MOSAIC["module"] is None:
        raise ImportError(f"jax.experimental.pallas.mosaic_gpu cannot be imported ({_MOSAIC['error']})")
    return _MOSAIC["module"]


def mosaic_load(plgpu_mosaic: Any, ref: Any, layout: Any) -> Any:
    """A whole shared-memory ref in registers with `layout` (the index argument of `load` is
    required before jax 0.11 and deprecated from it)."""
    if JAX_VERSION >= (0, 11):
        return plgpu_mosaic.load(ref, layout=layout)
    return plgpu_mosaic.load(ref, (), layout=layout)


def ref_transpose(plgpu_mosaic: Any, ref: Any) -> Any:
    """A 2-D shared-memory ref seen transposed (`transpose_ref` is deprecated from jax 0.11)."""
    if JAX_VERSION >= (0, 11):
        return ref.transpose((1, 0))
    return plgpu_mosaic.transpose_ref(ref, (1, 0))


def mosaic_params(plgpu_mosaic: Any) -> Any:
    """Compiler parameters of the Mosaic GPU kernels (Warpgroup semantics on jax 0.10 and 0.11)."""
    return plgpu_mosaic.CompilerParams(approx_math=True, lowering_semantics=plgpu_mosaic.LoweringSemantics.Warpgroup)


def mosaic_interpret_kwargs(interpret: bool) -> dict[str, Any]:
    """`plgpu.kernel`'s argument for Pallas's Mosaic GPU interpreter (simulated shared memory,
    warpgroups and barriers on CPU), which jax 0.10 and 0.11 keep in a private module."""
    if not interpret:
        return {}
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return {"interpret": InterpretGPUParams()}


__all__ = ["mosaic_gpu", "mosaic_interpret_kwargs", "mosaic_load", "mosaic_params", "ref_transpose", "pl", "plgpu",
           "JAX_VERSION", "triton_params", "masked_load", "masked_store", "tpu_ragged_paged_attention",
           "tpu_interpret_mode", "num_sms"]
