"""Every difference between the JAX versions this plugin supports, in one place.

CI runs jax 0.10.x on CPU (kernels in the Pallas interpreter); the GPU machine runs
jax 0.11.x. Other modules import these names instead of testing versions.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_TritonParams = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams


def triton_params(num_warps: int, num_stages: int) -> Any:
    """Triton compiler parameters (the class was renamed across jax releases)."""
    return _TritonParams(num_warps=num_warps, num_stages=num_stages)


def multiple_of(x: Any, m: int) -> Any:
    """Alignment hint for a traced index (a no-op where Pallas lacks it)."""
    fn = getattr(pl, "multiple_of", None)
    return fn(x, m) if fn is not None else x


# -- Mosaic GPU (the Hopper paths): the version guards every GPU backend shares live in the core
# (`jaxattn.pallas_compat`, imported only when a Mosaic module is); only this plugin's own here.

from jaxattn.pallas_compat import (  # noqa: E402, F401 - re-exported for the kernel modules
    mosaic_gpu,
    mosaic_import_error,
    mosaic_load,
    mosaic_params,
    ref_transpose,
)


def gmem_ref(plgpu_mosaic: Any, value: Any) -> Any:
    """A mutable global-memory ref holding `value`, for a kernel that writes in place (jax >= 0.11)."""
    if not hasattr(jax, "new_ref"):
        raise NotImplementedError(f"mutable refs need jax >= 0.11 (this is {jax.__version__})")
    return jax.new_ref(value, memory_space=plgpu_mosaic.GMEM)


# -- Pallas TPU (Mosaic) ----------------------------------------------------------------

from jax.experimental.pallas import tpu as pltpu  # noqa: E402

_TpuParams = getattr(pltpu, "CompilerParams", None) or pltpu.TPUCompilerParams


def tpu_compiler_params(dimension_semantics: tuple[str, ...]) -> Any:
    """Mosaic compiler parameters (`TPUCompilerParams` before the rename)."""
    return _TpuParams(dimension_semantics=tuple(dimension_semantics))


def tpu_prefetch_grid_spec(num_scalar_prefetch: int, grid, in_specs, out_specs, scratch_shapes) -> Any:
    return pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=num_scalar_prefetch, grid=grid, in_specs=in_specs,
                                        out_specs=out_specs, scratch_shapes=scratch_shapes)


def tpu_vmem(shape: tuple[int, ...], dtype: Any = None) -> Any:
    """A float32 (or `dtype`) VMEM scratch buffer."""
    import jax.numpy as jnp

    return pltpu.VMEM(shape, dtype or jnp.float32)


def tpu_smem() -> Any:
    """The SMEM memory space (for `BlockSpec(memory_space=...)`)."""
    return pltpu.SMEM


def tpu_interpret() -> Any:
    """The `interpret=` value that runs Pallas TPU kernels on CPU: the TPU interpreter
    (`InterpretParams`: simulated VMEM/SMEM and DMAs, NaN-filled scratch) where jax has
    it, else the generic interpreter."""
    params = getattr(pltpu, "InterpretParams", None)
    return params() if params is not None else True
