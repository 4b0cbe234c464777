"""Segment ids (packed sequences) on the Mosaic GPU kernels: the tiles a block visits.

Query i sees key j only where their segment ids are equal. A segment mask has no static
shape, so the tile ranges come from the ids themselves, computed once per call by XLA
before the kernels run (`segment_tile_ranges`): for every block of rows, the column tiles
that may hold an equal pair (bounded by the smallest and largest id on either side) and the
tiles where every row and every column carry one and the same id (fully visible: no mask).
Packed documents (ids that do not decrease along the sequence) then visit only the tiles of
their own documents, and tiles inside one document run unmasked, as the band's do.

The kernels intersect these ranges with the band's (`clip_range`, `clip_full`) and compare
ids on the partial tiles (`masked_by`). The ranges bound rather than list: ids that come
back (1, 2, 1) visit every tile between, masked, and stay correct.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ._compat import mosaic_load

# the columns of a range array: visited tiles [LB, UB), fully visible tiles [FS, FE)
LB, FS, FE, UB = range(4)


def _first_and_end(hits):
    """(first index, last index + 1) of the True entries along the last axis; (0, 0) where none."""
    n = hits.shape[-1]
    found = hits.any(-1)
    first = jnp.argmax(hits, axis=-1)
    end = n - jnp.argmax(hits[..., ::-1], axis=-1)
    return jnp.where(found, first, 0), jnp.where(found, end, 0)


def segment_tile_ranges(row_ids: jax.Array, col_ids: jax.Array, row_block: int, col_block: int) -> jax.Array:
    """int32 `[B, rows // row_block, 4]`: for each block of `row_block` rows of `row_ids`
    (int32 `[B, rows]`), the tiles of `col_block` columns of `col_ids` (`[B, cols]`) [LB, UB)
    that may hold a pair with equal ids, and [FS, FE) where all of the block's rows and the
    tile's columns have one id (empty where those tiles are not contiguous)."""
    b, rows = row_ids.shape
    cols = col_ids.shape[1]
    r = row_ids.reshape(b, rows // row_block, row_block)
    c = col_ids.reshape(b, cols // col_block, col_block)
    rmin, rmax = r.min(-1)[:, :, None], r.max(-1)[:, :, None]
    cmin, cmax = c.min(-1)[:, None, :], c.max(-1)[:, None, :]
    meet = (cmin <= rmax) & (cmax >= rmin)
    one_id = (rmin == rmax) & (cmin == cmax) & (cmin == rmin)
    lb, ub = _first_and_end(meet)
    fs, fe = _first_and_end(one_id)
    fe = jnp.where(one_id.sum(-1) == fe - fs, fe, fs)  # full tiles with a gap: none counted full
    return jnp.stack([lb, fs, fe, ub], axis=-1).astype(jnp.int32)


def clip_range(ranges_ref, bi, block, lb, ub):
    """The band's visited tiles [lb, ub) of row block `block` of batch row `bi`, cut to the
    segments' (`ranges_ref`: a `segment_tile_ranges` array; None: no segments)."""
    if ranges_ref is None:
        return lb, ub
    lb = jnp.maximum(lb, ranges_ref[bi, block, LB])
    return lb, jnp.maximum(jnp.minimum(ub, ranges_ref[bi, block, UB]), lb)


def clip_full(ranges_ref, bi, block, ub, fs, fe):
    """The band's fully visible tiles [fs, fe) (inside a visited range ending at `ub`), cut
    to the tiles where the segments are fully visible too."""
    if ranges_ref is None:
        return fs, fe
    fs = jnp.minimum(jnp.maximum(fs, ranges_ref[bi, block, FS]), ub)
    return fs, jnp.maximum(jnp.minimum(fe, ranges_ref[bi, block, FE]), fs)


def same_segment(row_ids, col_ids, shape: tuple[int, int]):
    """Boolean `shape`: where the id of the tile's row (`row_ids`, one per row) equals the
    id of its column (`col_ids`, one per column)."""
    return lax.broadcast_in_dim(row_ids, shape, [0]) == lax.broadcast_in_dim(col_ids, shape, [1])


def masked_by(vis, row_ids, col_ids, shape: tuple[int, int]):
    """A partial tile's mask: `vis` (the band's, or None: everywhere) and, where the step read
    segment ids (`col_ids` not None), equal ids of the tile's rows and columns."""
    if col_ids is None:
        return vis
    same = same_segment(row_ids, col_ids, shape)
    return same if vis is None else vis & same


# `segment_scratch`'s names: the own rows' ids and their barrier, the streamed tiles' ids and theirs
SEGMENT_SCRATCH = ("own_ids", "own_ids_bar", "tile_ids", "tile_ids_bar")


def segment_scratch(plgpu, consumers: int, own: int, tile: int, stages: int) -> dict[str, Any]:
    """Shared memory for a kernel's segment ids, by name: each of the `consumers`' `own` rows
    (read once) and a ring of `stages` tiles of `tile` ids streamed beside the other operand, with
    their barriers (`own_ids` and `tile_ids` take them)."""
    return dict(zip(SEGMENT_SCRATCH, (plgpu.SMEM((consumers, own), jnp.int32),
                                      plgpu.Barrier(num_arrivals=1, num_barriers=consumers),
                                      plgpu.SMEM((stages, tile), jnp.int32),
                                      plgpu.Barrier(num_arrivals=1, num_barriers=stages))))


def segment_smem(consumers: int, own: int, tile: int, stages: int) -> tuple[list[int], int]:
    """What `segment_scratch` takes: (its buffers' bytes, its barriers), for the kernels'
    shared-memory budgets (`pallas_compat.smem_footprint`)."""
    return [consumers * own * 4, stages * tile * 4], consumers + stages


def own_ids(plgpu, src, smem, barrier, layout):
    """The ids of a consumer's own rows (`src`, a gmem slice), copied once and loaded in `layout`."""
    plgpu.copy_gmem_to_smem(src, smem, barrier)
    plgpu.barrier_wait(barrier)
    return mosaic_load(plgpu, smem, layout)


def tile_ids(plgpu, smem, barrier, masked: bool, layout):
    """The ids of a streamed tile (its slot `smem`), in `layout` on a masked step, else None.
    Every step waits on the slot's barrier, so that its phase keeps pace with the stream."""
    plgpu.barrier_wait(barrier)
    return mosaic_load(plgpu, smem, layout) if masked else None
