"""Lazy (computable) masks: what a jaxattn mask becomes inside the splash kernel.

A structural jaxattn mask (causal with any offset, sliding windows, chunked causal, full,
and `&`/`|` of them) is turned into a small hashable tree of nodes over absolute
positions `i` (query row) and `j` (key column):

* `Band(lo, hi)`: `lo <= j - i <= hi` (None = unbounded);
* `Chunk(size, offset)`: `j <= i + offset` and `j // size == (i + offset) // size`;
* `KeyBelow(n)`: `j < n` (masks the keys added when the kernel pads the key sequence);
* `All(parts)` / `Any(parts)`: `&` / `|`;
* `Full()`.

Each node is evaluated elementwise on index arrays (numpy or jax), which is exactly the
`mask_function(q_ids, kv_ids)` that splash's kernel calls on every partial tile; and each
classifies a grid of (q-block, kv-block) tiles as EMPTY / PARTIAL / FULL from the block
bounds alone (`tiles`), in O(number of tiles), never touching a q_len x kv_len array.
`to_splash_mask` gives the equivalent object of jax's splash mask library (its own
`CausalMask`, `LocalMask`, `ChunkedCausalMask`, `FullMask` where one fits, else
`ComputableMask` below), for jax's own mask-info preprocessing and for tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _compat

EMPTY, PARTIAL, FULL = 0, 1, 2  # the values of splash's block_mask (and jaxattn's tiles)


class Node:
    """A computable mask over absolute (query, key) positions."""

    def __call__(self, q_ids: Any, kv_ids: Any) -> Any:
        """Elementwise: may query `q_ids` see key `kv_ids` (broadcasting int arrays)."""
        raise NotImplementedError

    def tiles(self, q_len: int, kv_len: int, block_q: int, block_kv: int) -> np.ndarray:
        """`int8 [nq, nk]` of EMPTY / PARTIAL / FULL; PARTIAL may be conservative."""
        raise NotImplementedError

    def row_ranges(self, q_len: int, kv_len: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Exact `[first, last]` allowed key per row, if the allowed keys of every row are one
        contiguous range (None when this node cannot say, e.g. for `Any`)."""
        return None

    def __and__(self, other: Node) -> Node:
        return conjoin([self, other])


def _bounds(length: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    first = np.arange(0, length, block, dtype=np.int64)
    return first, np.minimum(first + block, length) - 1


def _classify(empty: np.ndarray, full: np.ndarray) -> np.ndarray:
    return np.where(empty, EMPTY, np.where(full, FULL, PARTIAL)).astype(np.int8)


def _band_tiles(lo: int | None, hi: int | None, q0: np.ndarray, q1: np.ndarray, k0: np.ndarray,
                k1: np.ndarray) -> np.ndarray:
    """Tiles of `lo <= j - i <= hi` for rows [q0, q1] and columns [k0, k1] of each block."""
    d_lo = k0[None, :] - q1[:, None]  # the smallest j - i of each tile
    d_hi = k1[None, :] - q0[:, None]  # the largest
    empty = np.zeros(d_lo.shape, bool)
    full = np.ones(d_lo.shape, bool)
    if lo is not None:
        empty |= d_hi < lo
        full &= d_lo >= lo
    if hi is not None:
        empty |= d_lo > hi
        full &= d_hi <= hi
    return _classify(empty, full)


@dataclass(frozen=True)
class Full(Node):
    def __call__(self, q_ids: Any, kv_ids: Any) -> Any:
        return (q_ids >= 0) | (kv_ids >= 0) | True

    def tiles(self, q_len: int, kv_len: int, block_q: int, block_kv: int) -> np.ndarray:
        return np.full((-(-q_len // block_q), -(-kv_len // block_kv)), FULL, np.int8)

    def row_ranges(self, q_len: int, kv_len: int) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros(q_len, np.int64), np.full(q_len, kv_len - 1, np.int64)


@dataclass(frozen=True)
class Band(Node):
    """`lo <= j - i <= hi`."""

    lo: int | None
    hi: int | None

    def __call__(self, q_ids: Any, kv_ids: Any) -> Any:
        d = kv_ids - q_ids
        if self.lo is None:
            return d <= self.hi
        if self.hi is None:
            return d >= self.lo
        return (d >= self.lo) & (d <= self.hi)

    def tiles(self, q_len: int, kv_len: int, block_q: int, block_kv: int) -> np.ndarray:
        return _band_tiles(self.lo, self.hi, *_bounds(q_len, block_q), *_bounds(kv_len, block_kv))

    def row_ranges(self, q_len: int, kv_len: int) -> tuple[np.ndarray, np.ndarray]:
        i = np.arange(q_len, dtype=np.int64)
        first = np.zeros(q_len, np.int64) if self.lo is None else np.maximum(i + self.lo, 0)
        last = np.full(q_len, kv_len - 1, np.int64) if self.hi is None else np.minimum(i + self.hi, kv_len - 1)
        return first, last


@dataclass(frozen=True)
class Chunk(Node):
    """Causal within chunks: `j <= i'` and `j // size == i' // size`, `i' = i + offset`."""

    size: int
    offset: int = 0

    def __call__(self, q_ids: Any, kv_ids: Any) -> Any:
        qi = q_ids + self.offset if self.offset else q_ids
        return (kv_ids <= qi) & (kv_ids // self.size == qi // self.size)

    def tiles(self, q_len: int, kv_len: int, block_q: int, block_kv: int) -> np.ndarray:
        q0, q1 = _bounds(q_len, block_q)
        k0, k1 = _bounds(kv_len, block_kv)
        q0, q1 = q0 + self.offset, q1 + self.offset
        c = self.size
        causal = _band_tiles(None, 0, q0, q1, k0, k1)
        cq0, cq1, ck0, ck1 = q0 // c, q1 // c, k0 // c, k1 // c
        empty = (cq1[:, None] < ck0[None, :]) | (ck1[None, :] < cq0[:, None])
        full = ((cq0 == cq1)[:, None] & (ck0 == ck1)[None, :]) & (cq0[:, None] == ck0[None, :])
        return np.minimum(causal, _classify(empty, full))

    def row_ranges(self, q_len: int, kv_len: int) -> tuple[np.ndarray, np.ndarray]:
        qi = np.arange(q_len, dtype=np.int64) + self.offset
        first = np.maximum((qi // self.size) * self.size, 0)
        last = np.minimum(qi, kv_len - 1)
        return first, last




@dataclass(frozen=True)
class KeyBelow(Node):
    """`j < n`: hides the keys the kernel's padding adds."""

    n: int

    def __call__(self, q_ids: Any, kv_ids: Any) -> Any:
        return (kv_ids < self.n) | (q_ids < 0)

    def tiles(self, q_len: int, kv_len: int, block_q: int, block_kv: int) -> np.ndarray:
        nq = -(-q_len // block_q)
        k0, k1 = _bounds(kv_len, block_kv)
        row = _classify(k0 >= self.n, k1 < self.n)
        return np.broadcast_to(row[None, :], (nq, row.shape[0])).copy()

    def row_ranges(self, q_len: int, kv_len: int) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros(q_len, np.int64), np.full(q_len, min(self.n, kv_len) - 1, np.int64)


@dataclass(frozen=True)
class All(Node):
    parts: tuple[Node, ...]

    def __call__(self, q_ids: Any, kv_ids: Any) -> Any:
        out = self.parts[0](q_ids, kv_ids)
        for part in self.parts[1:]:
            out = out & part(q_ids, kv_ids)
        return out

    def tiles(self, q_len: int, kv_len: int, block_q: int, block_kv: int) -> np.ndarray:
        out = self.parts[0].tiles(q_len, kv_len, block_q, block_kv)
        for part in self.parts[1:]:
            out = np.minimum(out, part.tiles(q_len, kv_len, block_q, block_kv))
        return out

    def row_ranges(self, q_len: int, kv_len: int) -> tuple[np.ndarray, np.ndarray] | None:
        first = np.zeros(q_len, np.int64)
        last = np.full(q_len, kv_len - 1, np.int64)
        for part in self.parts:
            ranges = part.row_ranges(q_len, kv_len)
            if ranges is None:
                return None
            first, last = np.maximum(first, ranges[0]), np.minimum(last, ranges[1])
        return first, last


@dataclass(frozen=True)
class Any_(Node):
    parts: tuple[Node, ...]

    def __call__(self, q_ids: Any, kv_ids: Any) -> Any:
        out = self.parts[0](q_ids, kv_ids)
        for part in self.parts[1:]:
            out = out | part(q_ids, kv_ids)
        return out

    def tiles(self, q_len: int, kv_len: int, block_q: int, block_kv: int) -> np.ndarray:
        out = self.parts[0].tiles(q_len, kv_len, block_q, block_kv)
        for part in self.parts[1:]:
            out = np.maximum(out, part.tiles(q_len, kv_len, block_q, block_kv))
        return out


def conjoin(parts: list[Node]) -> Node:
    """`&` of nodes, simplified: nested `All`s flattened, bands intersected, `Full` dropped."""
    flat: list[Node] = []
    for part in parts:
        flat.extend(part.parts if isinstance(part, All) else (part,))
    lo: int | None = None
    hi: int | None = None
    has_band = False
    rest: list[Node] = []
    for part in flat:
        if isinstance(part, Full):
            continue
        if isinstance(part, Band):
            has_band = True
            if part.lo is not None:
                lo = part.lo if lo is None else max(lo, part.lo)
            if part.hi is not None:
                hi = part.hi if hi is None else min(hi, part.hi)
            continue
        if part not in rest:
            rest.append(part)
    out: list[Node] = ([Band(lo, hi)] if has_band and (lo is not None or hi is not None) else []) + rest
    if not out:
        return Full()
    return out[0] if len(out) == 1 else All(tuple(out))


def disjoin(parts: list[Node]) -> Node:
    """`|` of nodes (a `Full` part makes the whole `Full`)."""
    flat: list[Node] = []
    for part in parts:
        flat.extend(part.parts if isinstance(part, Any_) else (part,))
    if any(isinstance(p, Full) for p in flat):
        return Full()
    return flat[0] if len(flat) == 1 else Any_(tuple(flat))


def rows_with_keys(node: Node, q_len: int, kv_len: int) -> np.ndarray | None:
    """Exactly which of the `q_len` rows see at least one of `kv_len` keys, or None if unknown."""
    ranges = node.row_ranges(q_len, kv_len)
    if ranges is None:
        return None
    first, last = ranges
    return first <= last


# -- splash's own mask objects ---------------------------------------------------------


class ComputableMask(_compat.ComputableMaskBase):  # type: ignore[misc,valid-type]
    """A splash lazy mask computed by a `Node` (for what splash's own classes cannot say:
    chunks with an offset, unions, key padding...). jax's `process_mask` accepts it and
    hands `node` to the kernel as its `mask_function`."""

    def __init__(self, shape: tuple[int, int], node: Node, shard_count: int = 1):
        self.node = node
        super().__init__(shape=shape, mask_function=node, shard_count=shard_count)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ComputableMask):
            return NotImplemented
        return self.shape == other.shape and self.node == other.node

    def __hash__(self) -> int:
        return hash((type(self), self.shape, self.node))


def to_splash_mask(node: Node, shape: tuple[int, int]) -> Any:
    """The splash mask object (jax's class where one fits) computing `node` on `shape`."""
    ml = _compat.mask_lib
    if isinstance(node, Full):
        return ml.FullMask(shape)
    if isinstance(node, Band):
        if node.lo is None:
            return ml.CausalMask(shape, offset=node.hi)
        if node.hi is None:
            return ml.LocalMask(shape, window_size=(0, None), offset=node.lo)
        return ml.LocalMask(shape, window_size=(node.hi - node.lo, 0), offset=node.hi)
    if isinstance(node, Chunk) and node.offset == 0:
        return ml.ChunkedCausalMask(shape, chunk_size=node.size)
    return ComputableMask(shape, node)
