"""The shared memory Mosaic GPU's lowering allocates for a kernel, read on any machine (lowering
for CUDA needs no GPU), so a plugin can hold its budget (`pallas_compat.smem_footprint`) to it.

    with lowered_smem() as counted:
        jax.jit(kernel).trace(*shapes).lower(lowering_platforms=("cuda",))
    assert counted == [my_budget(...)]
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def lowered_smem() -> Iterator[list[int]]:
    """Every Mosaic GPU kernel lowered inside the block appends its bytes of shared memory
    (buffers, reduction scratch and barriers, as the lowering checks them against the block's
    limit) to the list it yields. The count comes from Mosaic GPU's private layout function:
    where a jax has moved it, the calling test is skipped (pytest), not failed."""
    import pytest

    core = pytest.importorskip("jax.experimental.mosaic.gpu.core")
    count = getattr(core, "_smem_tree_size", None)
    if count is None:
        pytest.skip("this jax lays out a Mosaic GPU kernel's shared memory elsewhere (private API)")
    counted: list[int] = []

    def counting(tree):
        counted.append(count(tree))
        return counted[-1]

    core._smem_tree_size = counting
    try:
        yield counted
    finally:
        core._smem_tree_size = count
