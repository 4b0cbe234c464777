"""Launching the Mosaic GPU kernels (one producer and `CONSUMERS` consumer warpgroups per block)
and their shared memory: swizzled buffers for wgmma operands, scratch by name.
"""

from __future__ import annotations

import functools
from typing import Any

import jax.numpy as jnp
from jax.experimental import pallas as pl

from ._compat import mosaic_params
from .mosaic_barriers import CONSUMERS


def swizzled(plgpu, shape, dtype, widest: int = 128):
    """Shared memory for wgmma operands, swizzled by the row's bytes up to `widest`. A product's
    contraction must be a multiple of swizzle / itemsize (64 elements of 2 bytes at 128), so
    kernels that contract over 32 take `widest=64` for every operand of the product."""
    elem_bytes = jnp.dtype(dtype).itemsize
    swizzle = widest if shape[-1] * elem_bytes >= widest else shape[-1] * elem_bytes
    transforms = (plgpu.TilingTransform((8, swizzle // elem_bytes)), plgpu.SwizzleTransform(swizzle))
    return plgpu.SMEM(shape, dtype, transforms=transforms)


def launch(plgpu, body, out_type, scratch: dict[str, Any], grid: dict[str, int]):
    """`body` as a warp-specialized Mosaic GPU kernel: the named `grid`, CONSUMERS + 1 warpgroups
    (axis "wg"), our compiler parameters. `scratch` names each shared-memory buffer and barrier;
    the body takes its operand refs, then `scratch=` those refs by the same names (allocated in
    the dict's order: a name, not a position in a list of optional pieces, says which is which)."""
    names = tuple(scratch)

    @functools.wraps(body)  # the kernel keeps the body's name
    def named(*refs):
        cut = len(refs) - len(names)
        body(*refs[:cut], scratch=dict(zip(names, refs[cut:])))

    return plgpu.kernel(named, out_type=out_type, scratch_types=tuple(scratch.values()), grid=tuple(grid.values()),
                        grid_names=tuple(grid), num_threads=CONSUMERS + 1, thread_name="wg",
                        compiler_params=mosaic_params(plgpu))


def launch_closing_over_refs(plgpu, body, out_type, scratch: dict[str, Any], grid: dict[str, int]):
    """`launch` for a body that closes over mutable global-memory refs (`gmem_ref`: the fused
    backward's dq sum), which Pallas's `pl.kernel` aliases in and out of the kernel (`plgpu.kernel`'s
    batching wrapper cannot trace a closed-over ref on jax 0.10)."""
    mesh = plgpu.Mesh(grid=tuple(grid.values()), grid_names=tuple(grid), num_threads=CONSUMERS + 1,
                      thread_name="wg")
    names = tuple(scratch)

    def scoped(*refs):
        def named(*scratch_refs):
            body(*refs, scratch=dict(zip(names, scratch_refs)))

        pl.run_scoped(named, *scratch.values(), collective_axes="wg")

    return pl.kernel(scoped, out_type=out_type, mesh=mesh, compiler_params=mosaic_params(plgpu))
