"""Splash `MaskInfo` for lazy masks, built from tile classes in O(number of tiles).

jax's `process_mask` evaluates the mask tile by tile in a Python loop (seconds at 32k
tokens with 512-blocks, minutes with 128-blocks). For a lazy mask (`lazy.Node`) the tile
classes follow from block bounds alone, so this module builds the same arrays (checked
equal to `process_mask`'s by the tests) with a few vectorized NumPy operations:

* `block_mask[1, nq, nk]`: 0 empty / 1 partial / 2 full tile;
* `data_next[1, nq, nk]`: the kv block (forward, dq) or q block (dkv) the kernel fetches at
  each grid step: the next non-empty tile in the kernel's iteration order;
* both "shrunk" as jax does: each q row (forward, dq) or kv column (dkv) keeps only its
  non-empty tiles, so the grid has as many steps as the busiest row (a sliding window
  over 32k tokens runs a few kv steps per row, not 64);
* `q_sequence`: `arange(q_len)`; the kernel computes partial tiles with the node as its
  `mask_function`, so no mask tile is ever stored (`mask_next`, `partial_mask_blocks`
  are None).

Results are cached (`functools.lru_cache`) on the hashable node, the lengths and the
block shape: a model with many layers, or a jitted step traced again, reuses them.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from . import _compat
from .lazy import Full, Node


def _downcast(array: np.ndarray) -> np.ndarray:
    """The smallest of int8/int16/int32 that holds `array` (what the kernel's SMEM wants)."""
    top = int(array.max()) if array.size else 0
    for dtype in (np.int8, np.int16):
        if top <= np.iinfo(dtype).max:
            return array.astype(dtype)
    return array.astype(np.int32)


def _next_nonempty(nonempty_in_order: np.ndarray) -> np.ndarray:
    """For each position of a flat iteration order, the position of the next non-empty one
    at or after it (wrapping around to the first); zeros when nothing is non-empty."""
    positions = np.flatnonzero(nonempty_in_order)
    if positions.size == 0:
        return np.zeros(nonempty_in_order.shape, np.int64)
    idx = np.searchsorted(positions, np.arange(nonempty_in_order.size))
    idx[idx == positions.size] = 0
    return positions[idx]


def _shrink_rows(block_mask: np.ndarray, data_next: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep each row's non-empty tiles (in column order), padded at the end with zeros."""
    nonempty = block_mask > 0
    width = max(1, int(nonempty.sum(axis=1).max()))
    order = np.argsort(~nonempty, axis=1, kind="stable")[:, :width]
    keep = np.take_along_axis(nonempty, order, axis=1)
    return (np.where(keep, np.take_along_axis(block_mask, order, axis=1), 0),
            np.where(keep, np.take_along_axis(data_next, order, axis=1), 0))


def _shrink_cols(block_mask: np.ndarray, data_next: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep each column's non-empty tiles (in row order), padded at the front with zeros."""
    nonempty = block_mask > 0
    height = max(1, int(nonempty.sum(axis=0).max()))
    # Non-empty rows last, in row order: take the last `height` entries of each column.
    order = np.argsort(nonempty, axis=0, kind="stable")[-height:, :]
    keep = np.take_along_axis(nonempty, order, axis=0)
    return (np.where(keep, np.take_along_axis(block_mask, order, axis=0), 0),
            np.where(keep, np.take_along_axis(data_next, order, axis=0), 0))


@functools.lru_cache(maxsize=64)
def lazy_mask_info(node: Node, q_len: int, kv_len: int, block_q: int, block_kv: int,
                   dkv: bool = False, shrink: bool = True) -> Any:
    """The splash `MaskInfo` (NumPy arrays) of `node` on a `q_len x kv_len` grid of tiles.

    `dkv=True` gives the layout of the dK/dV kernel (it walks q blocks inside each kv
    block). Lengths must be multiples of the blocks. Cached.
    """
    if q_len % block_q or kv_len % block_kv:
        raise ValueError(f"lengths ({q_len}, {kv_len}) must be multiples of the blocks ({block_q}, {block_kv})")
    block_mask = node.tiles(q_len, kv_len, block_q, block_kv).astype(np.int32)
    nq, nk = block_mask.shape
    if dkv:  # iteration order: kv block, then q block
        nxt = _next_nonempty((block_mask > 0).T.ravel()).reshape(nk, nq).T
        data_next = nxt % nq
    else:  # iteration order: q block, then kv block
        nxt = _next_nonempty((block_mask > 0).ravel()).reshape(nq, nk)
        data_next = nxt % nk
    data_next = data_next.astype(np.int32)
    if shrink:
        block_mask, data_next = (_shrink_cols if dkv else _shrink_rows)(block_mask, data_next)
    q_sequence = None if isinstance(node, Full) else np.arange(q_len, dtype=np.int32)
    info = _compat.MaskInfo(
        data_next=_downcast(data_next[None]),
        mask_next=None,
        block_mask=_downcast(block_mask[None]),
        partial_mask_blocks=None,
        q_sequence=q_sequence,
    )
    for array in (info.data_next, info.block_mask, info.q_sequence):
        if array is not None:
            array.setflags(write=False)  # shared by every user of the cache
    return info
