"""Pallas's Mosaic GPU API across the JAX versions jaxattn supports (0.10.x on CPU CI, 0.11.x on
GPUs), in one place for every GPU backend package: the flash and ragged plugins, and a third
party's. Nothing here is imported by `import jaxattn`; a kernel module imports it when it is.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ._compat import JAX_VERSION

# How Pallas's Mosaic GPU lowering lays out a kernel's shared memory (jax 0.10 and 0.11): each
# scratch buffer from a 1024-byte boundary, then the scratch of cross-warp reductions where the
# kernel has any (`CompilerParams.reduction_scratch_bytes`, 2048 by default), the mbarriers after
# them, 8 bytes each; the lowering refuses a kernel over the block's opt-in 227 KB on Hopper.
SMEM_ALIGNMENT = 1024
SMEM_PER_BLOCK = 227 * 1024
REDUCTION_SCRATCH = 2048
MBARRIER_BYTES = 8

_MOSAIC: dict[str, Any] = {}


def mosaic_gpu() -> Any:
    """`jax.experimental.pallas.mosaic_gpu`, imported on first use (ImportError if it cannot be):
    CPU CI only lowers the kernels written in it, so its import must not be needed to start."""
    if "module" not in _MOSAIC:
        try:
            from jax.experimental.pallas import mosaic_gpu as plgpu_mosaic

            _MOSAIC["module"], _MOSAIC["error"] = plgpu_mosaic, None
        except Exception as e:  # noqa: BLE001 - any failure means "no Mosaic GPU here"
            _MOSAIC["module"], _MOSAIC["error"] = None, f"{type(e).__name__}: {e}"
    if _MOSAIC["module"] is None:
        raise ImportError(f"jax.experimental.pallas.mosaic_gpu cannot be imported ({_MOSAIC['error']})")
    return _MOSAIC["module"]


def mosaic_import_error() -> str | None:
    """Why Mosaic GPU cannot be imported here, or None when it can."""
    try:
        mosaic_gpu()
    except ImportError as e:
        return str(e)
    return None


def mosaic_params(plgpu_mosaic: Any) -> Any:
    """Compiler parameters of jaxattn's Mosaic GPU kernels. The default lowering semantics changed
    from Lane (jax 0.10) to Warpgroup (jax 0.11); they name Warpgroup on both."""
    return plgpu_mosaic.CompilerParams(
        approx_math=True, lowering_semantics=plgpu_mosaic.LoweringSemantics.Warpgroup)


def ref_transpose(plgpu_mosaic: Any, ref: Any) -> Any:
    """A 2-D shared-memory ref seen transposed (`transpose_ref` is deprecated from jax 0.11)."""
    if JAX_VERSION >= (0, 11):
        return ref.transpose((1, 0))
    return plgpu_mosaic.transpose_ref(ref, (1, 0))


def mosaic_load(plgpu_mosaic: Any, ref: Any, layout: Any) -> Any:
    """A whole shared-memory ref loaded into registers with `layout` (the separate index
    argument of `load` is required before jax 0.11 and deprecated from it)."""
    if JAX_VERSION >= (0, 11):
        return plgpu_mosaic.load(ref, layout=layout)
    return plgpu_mosaic.load(ref, (), layout=layout)


def smem_footprint(buffers: Iterable[int], barriers: int, reductions: bool) -> int:
    """Shared memory of a Mosaic GPU kernel with scratch `buffers` (bytes each), `barriers`
    mbarriers and, where `reductions`, cross-warp reductions: what its lowering allocates, so a
    plugin can refuse tiles that do not fit (`SMEM_PER_BLOCK`) before it traces them."""
    aligned = sum(-(-size // SMEM_ALIGNMENT) * SMEM_ALIGNMENT for size in buffers)
    return aligned + (REDUCTION_SCRATCH if reductions else 0) + MBARRIER_BYTES * barriers


__all__ = ["SMEM_PER_BLOCK", "mosaic_gpu", "mosaic_import_error", "mosaic_load", "mosaic_params", "ref_transpose",
           "smem_footprint"]
