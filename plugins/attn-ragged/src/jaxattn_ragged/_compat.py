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


# The Mosaic GPU version guards every GPU backend shares live in the core (`jaxattn.pallas_compat`).
from jaxattn.pallas_compat import mosaic_gpu, mosaic_load, mosaic_params, ref_transpose  # noqa: E402


def mosaic_interpret_kwargs(interpret: bool) -> dict[str, Any]:
    """`plgpu.kernel`'s argument for Pallas's Mosaic GPU interpreter (simulated shared memory,
    warpgroups and barriers on CPU), which jax 0.10 and 0.11 keep in a private module."""
    if not interpret:
        return {}
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return {"interpret": InterpretGPUParams()}


__all__ = ["mosaic_gpu", "mosaic_interpret_kwargs", "mosaic_load", "mosaic_params", "ref_transpose", "pl", "plgpu",
           "triton_params", "masked_load", "masked_store", "tpu_ragged_paged_attention",
           "tpu_interpret_mode", "num_sms"]
