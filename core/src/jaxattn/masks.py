"""Attention masks as objects: what each query may see, without building a q×kv array.

Every mask answers three questions:

* `allowed(q_idx, kv_idx, q_len, kv_len)`: the boolean mask for some query and key
  positions (shape `[B|1, H|1, len(q_idx), len(kv_idx)]`, True = attend). The `xla`
  reference evaluates it one key block at a time, so long sequences never need the
  whole mask.
* `materialize(q_len, kv_len)`: the whole mask, for references and tests.
* `block_structure(q_len, kv_len, block_q, block_kv)`: for each (q-block, kv-block)
  tile whether it is EMPTY (skip it), FULL (no masking needed) or PARTIAL (apply the
  mask), computed from block bounds, so kernels can skip empty tiles.

Masks combine with `&` and `|`. Structural masks (causal, sliding window, chunked causal)
are written in terms of `d = j - i`, the distance from query `i` to key `j`; `band()`
gives the allowed range of `d`, which is all a kernel needs to apply them.

Offsets follow the semantics every backend computes (docs/semantics.md): `CausalMask(offset)`
lets query `i` see key `j` iff `j <= i + offset` (offset 0: top-left aligned). Sliding-window and chunked masks align
the last query with the last key unless given an explicit `offset`, as the
`sliding_window=` argument of `jaxattn.attention` does.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from ._compat import is_tracer

EMPTY, PARTIAL, FULL = 0, 1, 2
"""Tile classes of `Mask.block_structure`; ordered so that `&` is `min` and `|` is `max`."""


def _is_concrete(x: object) -> bool:
    return not is_tracer(x)


def _blocks(length: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """First and last index of each block of `block` positions in `length`."""
    starts = np.arange(0, length, block, dtype=np.int64)
    ends = np.minimum(starts + block, length) - 1
    return starts, ends


class Mask:
    """Base class of all masks. Subclasses are frozen dataclasses and JAX pytrees."""

    kind: ClassVar[str] = "mask"

    # -- evaluation -------------------------------------------------------------------
    def allowed(self, q_idx: jax.Array, kv_idx: jax.Array, q_len: int, kv_len: int) -> jax.Array:
        """Boolean `[B|1, H|1, len(q_idx), len(kv_idx)]`: may query `q_idx[a]` see key `kv_idx[b]`."""
        raise NotImplementedError

    def materialize(self, q_len: int, kv_len: int) -> jax.Array:
        """The whole mask, `[B|1, H|1, q_len, kv_len]` booleans."""
        return self.allowed(jnp.arange(q_len), jnp.arange(kv_len), q_len, kv_len)

    def block_structure(self, q_len: int, kv_len: int, block_q: int, block_kv: int) -> np.ndarray:
        """`int8 [ceil(q_len/block_q), ceil(kv_len/block_kv)]` of EMPTY / PARTIAL / FULL.

        Conservative: PARTIAL may be returned for a tile that is in fact empty or full
        (always so for masks whose arrays are traced). Sequence ends and per-example
        lengths are not part of a mask; kernels handle them separately.
        """
        raise NotImplementedError

    # -- description ------------------------------------------------------------------
    def kinds(self) -> frozenset[str]:
        """The mask kinds in this mask, e.g. {"causal", "segment"}; "or" if `|` is used."""
        return frozenset({self.kind})

    def conjuncts(self) -> tuple[Mask, ...]:
        """The masks that this one is the `&` of (itself when it is not an `&`)."""
        return (self,)

    def validate(self, batch: int, num_heads: int, q_len: int, kv_len: int) -> None:
        """Raise ValueError if this mask cannot apply to an attention of these sizes."""

    # -- combination ------------------------------------------------------------------
    def __and__(self, other: Mask) -> Mask:
        if not isinstance(other, Mask):
            return NotImplemented
        return AndMask(self, other)

    def __or__(self, other: Mask) -> Mask:
        if not isinstance(other, Mask):
            return NotImplemented
        return OrMask(self, other)


def _register(cls: type, data: Sequence[str] = ()) -> type:
    meta = [f.name for f in dataclasses.fields(cls) if f.name not in data]
    return jax.tree_util.register_dataclass(cls, data_fields=list(data), meta_fields=meta)


# -- structural masks (no arrays; a band of allowed j - i) -----------------------------


def clip_band(lo: int | None, hi: int | None, q_len: int, kv_len: int) -> tuple[int | None, int | None]:
    """The band `lo <= j - i <= hi` with each bound clipped to `[-q_len, kv_len]`.

    `j - i` only takes values in `[-(q_len - 1), kv_len - 1]`, so clipping changes nothing
    that is allowed; it keeps huge bounds (a window of 2**40, `CausalMask(2**40)`: in
    effect unbounded) inside int32, where kernels and `jnp` compute with them.
    """
    def clip(bound: int | None) -> int | None:
        return None if bound is None else int(min(max(bound, -q_len), kv_len))

    return clip(lo), clip(hi)


class BandMask(Mask):
    """A mask allowing `lo <= j - i <= hi` (None = unbounded), given the sequence lengths."""

    def band(self, q_len: int, kv_len: int) -> tuple[int | None, int | None]:
        raise NotImplementedError

    def bounds(self, q_len: int, kv_len: int) -> tuple[int | None, int | None]:
        """`band()` with its bounds clipped to the sequences (`clip_band`): what kernels use."""
        return clip_band(*self.band(q_len, kv_len), q_len, kv_len)

    def allowed(self, q_idx: jax.Array, kv_idx: jax.Array, q_len: int, kv_len: int) -> jax.Array:
        lo, hi = self.bounds(q_len, kv_len)
        d = kv_idx[None, :] - q_idx[:, None]
        ok = jnp.ones(d.shape, dtype=bool)
        if lo is not None:
            ok &= d >= lo
        if hi is not None:
            ok &= d <= hi
        return ok[None, None]

    def block_structure(self, q_len: int, kv_len: int, block_q: int, block_kv: int) -> np.ndarray:
        lo, hi = self.bounds(q_len, kv_len)
        return _band_blocks(lo, hi, q_len, kv_len, block_q, block_kv)


def _band_blocks(
    lo: int | None, hi: int | None, q_len: int, kv_len: int, block_q: int, block_kv: int
) -> np.ndarray:
    q0, q1 = _blocks(q_len, block_q)
    k0, k1 = _blocks(kv_len, block_kv)
    d_min = k0[None, :] - q1[:, None]
    d_max = k1[None, :] - q0[:, None]
    full = np.ones(d_min.shape, dtype=bool)
    empty = np.zeros(d_min.shape, dtype=bool)
    if lo is not None:
        full &= d_min >= lo
        empty |= d_max < lo
    if hi is not None:
        full &= d_max <= hi
        empty |= d_min > hi
    return np.where(empty, EMPTY, np.where(full, FULL, PARTIAL)).astype(np.int8)


@dataclass(frozen=True)
class FullMask(BandMask):
    """Every query sees every key."""

    kind: ClassVar[str] = "full"

    def band(self, q_len: int, kv_len: int) -> tuple[int | None, int | None]:
        return None, None


@dataclass(frozen=True)
class CausalMask(BandMask):
    """Query `i` sees key `j` iff `j <= i + offset` (offset 0: the usual lower triangle)."""

    offset: int = 0
    kind: ClassVar[str] = "causal"

    def __post_init__(self) -> None:
        if not isinstance(self.offset, (int, np.integer)):
            raise ValueError(f"CausalMask offset must be an int, got {self.offset!r}")

    def band(self, q_len: int, kv_len: int) -> tuple[int | None, int | None]:
        return None, int(self.offset)

    @classmethod
    def bottom_right(cls, q_len: int, kv_len: int) -> CausalMask:
        """The `is_causal=True` mask: the last query is aligned with the last key."""
        return cls(offset=kv_len - q_len)


@dataclass(frozen=True)
class SlidingWindowMask(BandMask):
    """Query `i` sees key `j` iff `i' - left <= j <= i' + right`, `i' = i + offset`.

    `offset=None` aligns the last query with the last key (`offset = kv_len - q_len`).
    """

    left: int
    right: int
    offset: int | None = None
    kind: ClassVar[str] = "sliding_window"

    def __post_init__(self) -> None:
        for name in ("left", "right"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"SlidingWindowMask {name} must be an int >= 0, got {value!r}")

    def band(self, q_len: int, kv_len: int) -> tuple[int | None, int | None]:
        off = kv_len - q_len if self.offset is None else self.offset
        return off - int(self.left), off + int(self.right)


@dataclass(frozen=True)
class ChunkedCausalMask(Mask):
    """Causal attention within chunks: `j <= i'` and `j // chunk_size == i' // chunk_size`.

    `i' = i + offset`, with `offset=None` meaning `kv_len - q_len` (last query on last key).
    """

    chunk_size: int
    offset: int | None = None
    kind: ClassVar[str] = "chunked_causal"

    def __post_init__(self) -> None:
        if not isinstance(self.chunk_size, (int, np.integer)) or self.chunk_size <= 0:
            raise ValueError(
                f"ChunkedCausalMask chunk_size must be an int > 0, got {self.chunk_size!r}"
            )

    def resolved_offset(self, q_len: int, kv_len: int) -> int:
        return kv_len - q_len if self.offset is None else int(self.offset)

    def resolved_chunk(self, q_len: int, kv_len: int) -> int:
        """`chunk_size`, at most `q_len + kv_len + |offset|`: a chunk longer than every
        position is one chunk (causal), and stays inside int32 where kernels compute with it."""
        return int(min(self.chunk_size, q_len + kv_len + abs(self.resolved_offset(q_len, kv_len))))

    def allowed(self, q_idx: jax.Array, kv_idx: jax.Array, q_len: int, kv_len: int) -> jax.Array:
        qi = q_idx[:, None] + self.resolved_offset(q_len, kv_len)
        kj = kv_idx[None, :]
        c = self.resolved_chunk(q_len, kv_len)
        return ((kj <= qi) & (jnp.floor_divide(kj, c) == jnp.floor_divide(qi, c)))[None, None]

    def block_structure(self, q_len: int, kv_len: int, block_q: int, block_kv: int) -> np.ndarray:
        off = self.resolved_offset(q_len, kv_len)
        causal = _band_blocks(None, off, q_len, kv_len, block_q, block_kv)
        q0, q1 = _blocks(q_len, block_q)
        k0, k1 = _blocks(kv_len, block_kv)
        c = self.resolved_chunk(q_len, kv_len)
        cq0, cq1 = (q0 + off) // c, (q1 + off) // c
        ck0, ck1 = k0 // c, k1 // c
        empty = (cq1[:, None] < ck0[None, :]) | (ck1[None, :] < cq0[:, None])
        full = (cq0 == cq1)[:, None] & (ck0 == ck1)[None, :] & (cq0[:, None] == ck0[None, :])
        chunk = np.where(empty, EMPTY, np.where(full, FULL, PARTIAL)).astype(np.int8)
        return np.minimum(causal, chunk)


# -- masks that carry arrays -----------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SegmentMask(Mask):
    """Query `i` of example `b` sees key `j` only if their segment ids are equal.

    `q_segment_ids` is `[batch, q_len]`, `kv_segment_ids` `[batch, kv_len]` (integers).
    """

    q_segment_ids: jax.Array
    kv_segment_ids: jax.Array
    kind: ClassVar[str] = "segment"

    def allowed(self, q_idx: jax.Array, kv_idx: jax.Array, q_len: int, kv_len: int) -> jax.Array:
        q = jnp.take(self.q_segment_ids, q_idx, axis=1, mode="clip")
        k = jnp.take(self.kv_segment_ids, kv_idx, axis=1, mode="clip")
        return (q[:, :, None] == k[:, None, :])[:, None]

    def block_structure(self, q_len: int, kv_len: int, block_q: int, block_kv: int) -> np.ndarray:
        nq, nk = -(-q_len // block_q), -(-kv_len // block_kv)
        if not (_is_concrete(self.q_segment_ids) and _is_concrete(self.kv_segment_ids)):
            return np.full((nq, nk), PARTIAL, dtype=np.int8)
        q = np.asarray(self.q_segment_ids)
        k = np.asarray(self.kv_segment_ids)
        q_lo, q_hi = _block_minmax(q, block_q)  # [B, nq]
        k_lo, k_hi = _block_minmax(k, block_kv)  # [B, nk]
        empty = (q_hi[:, :, None] < k_lo[:, None, :]) | (k_hi[:, None, :] < q_lo[:, :, None])
        single = (q_lo == q_hi)[:, :, None] & (k_lo == k_hi)[:, None, :]
        full = single & (q_lo[:, :, None] == k_lo[:, None, :])
        return _batch_verdict(empty, full)

    def validate(self, batch: int, num_heads: int, q_len: int, kv_len: int) -> None:
        for name, ids, length in (
            ("q_segment_ids", self.q_segment_ids, q_len),
            ("kv_segment_ids", self.kv_segment_ids, kv_len),
        ):
            if tuple(ids.shape) != (batch, length):
                raise ValueError(
                    f"segment_ids: {name} must have shape [batch, seq] = {(batch, length)}, "
                    f"got {tuple(ids.shape)}"
                )
            if not jnp.issubdtype(ids.dtype, jnp.integer):
                raise ValueError(f"segment_ids: {name} must be integers, got {ids.dtype}")


def _block_minmax(ids: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    length = ids.shape[1]
    pad = -length % block
    lo = np.pad(ids, ((0, 0), (0, pad)), mode="edge").reshape(ids.shape[0], -1, block)
    return lo.min(axis=2), lo.max(axis=2)


def _batch_verdict(empty: np.ndarray, full: np.ndarray) -> np.ndarray:
    """Collapse per-example tile verdicts `[B, nq, nk]`: a tile is empty/full only for all."""
    verdict = np.full(empty.shape[1:], PARTIAL, dtype=np.int8)
    verdict[empty.all(axis=0)] = EMPTY
    verdict[full.all(axis=0)] = FULL
    return verdict


@dataclass(frozen=True, eq=False)
class DenseMask(Mask):
    """An explicit boolean mask (True = attend), broadcastable to `[B, H, q_len, kv_len]`.

    Ranks 2 to 4 are accepted and read with NumPy broadcasting (a rank-2 mask is
    `[q_len, kv_len]`, rank 3 is `[H, q_len, kv_len]`).
    """

    array: jax.Array
    kind: ClassVar[str] = "dense"

    def __post_init__(self) -> None:
        # JAX rebuilds pytrees with placeholder leaves (and shard_map with specs): only
        # real arrays are checked.
        if not (hasattr(self.array, "shape") and hasattr(self.array, "dtype")):
            return
        if not 2 <= self.array.ndim <= 4:
            raise ValueError(
                "mask: a dense mask must be a boolean array of rank 2 to 4 broadcastable to "
                f"[batch, heads, q_len, kv_len], got shape {tuple(self.array.shape)}"
            )
        if self.array.dtype != jnp.bool_:
            raise ValueError(f"mask: a dense mask must be boolean (True = attend), got {self.array.dtype}")

    @property
    def array4d(self) -> jax.Array:
        return self.array.reshape((1,) * (4 - self.array.ndim) + tuple(self.array.shape))

    def allowed(self, q_idx: jax.Array, kv_idx: jax.Array, q_len: int, kv_len: int) -> jax.Array:
        m = self.array4d
        if m.shape[2] != 1:
            m = jnp.take(m, q_idx, axis=2, mode="clip")
        if m.shape[3] != 1:
            m = jnp.take(m, kv_idx, axis=3, mode="clip")
        return jnp.broadcast_to(m, m.shape[:2] + (q_idx.shape[0], kv_idx.shape[0]))

    def block_structure(self, q_len: int, kv_len: int, block_q: int, block_kv: int) -> np.ndarray:
        nq, nk = -(-q_len // block_q), -(-kv_len // block_kv)
        if not _is_concrete(self.array):
            return np.full((nq, nk), PARTIAL, dtype=np.int8)
        m = np.broadcast_to(np.asarray(self.array4d), self.array4d.shape[:2] + (q_len, kv_len))
        m = m.reshape(-1, q_len, kv_len)
        padded = np.pad(m, ((0, 0), (0, nq * block_q - q_len), (0, nk * block_kv - kv_len)), mode="edge")
        tiles = padded.reshape(m.shape[0], nq, block_q, nk, block_kv)
        return _batch_verdict(~tiles.any(axis=(2, 4)), tiles.all(axis=(2, 4)))

    def validate(self, batch: int, num_heads: int, q_len: int, kv_len: int) -> None:
        want = (batch, num_heads, q_len, kv_len)
        got = self.array4d.shape
        if any(g not in (1, w) for g, w in zip(got, want)):
            raise ValueError(
                f"mask: shape {tuple(self.array.shape)} is not broadcastable to "
                f"[batch, heads, q_len, kv_len] = {want}"
            )


_WIDEST = 2**30  # window sides beyond this reach past any position a cache can hold


@dataclass(frozen=True, eq=False)
class QueryPositionMask(Mask):
    """Causal (optionally windowed) attention from explicit query positions.

    Query `i` of example `b` stands at key position `p = positions[b, i]` and sees key `j`
    iff `p - left <= j <= p + right` (`left=None`: no left bound). The default
    `(left=None, right=0)` is causal. This is how attention over a KV cache sees exactly
    the keys written up to each query, whatever each sequence's length (`jaxattn.KVCache`):
    the alignment of `is_causal` (last query on last key) is one offset for the whole
    batch, a cache needs one per sequence.
    """

    positions: jax.Array
    left: int | None = None
    right: int = 0
    kind: ClassVar[str] = "query_positions"

    def __post_init__(self) -> None:
        if self.left is not None and (not isinstance(self.left, (int, np.integer)) or self.left < 0):
            raise ValueError(f"QueryPositionMask left must be an int >= 0 or None, got {self.left!r}")
        if not isinstance(self.right, (int, np.integer)) or self.right < 0:
            raise ValueError(f"QueryPositionMask right must be an int >= 0, got {self.right!r}")

    def allowed(self, q_idx: jax.Array, kv_idx: jax.Array, q_len: int, kv_len: int) -> jax.Array:
        p = jnp.take(self.positions, q_idx, axis=1, mode="clip")[:, :, None]  # [B, nq, 1]
        d = kv_idx[None, None, :] - p
        ok = d <= min(self.right, _WIDEST)  # a wider window is the same window: kept inside int32
        if self.left is not None:
            ok &= d >= -min(self.left, _WIDEST)
        return ok[:, None]

    def block_structure(self, q_len: int, kv_len: int, block_q: int, block_kv: int) -> np.ndarray:
        nq, nk = -(-q_len // block_q), -(-kv_len // block_kv)
        if not _is_concrete(self.positions):
            return np.full((nq, nk), PARTIAL, dtype=np.int8)
        p_lo, p_hi = _block_minmax(np.asarray(self.positions, np.int64), block_q)  # [B, nq]
        k0, k1 = _blocks(kv_len, block_kv)
        hi_lo, hi_hi = p_lo[:, :, None] + self.right, p_hi[:, :, None] + self.right
        empty = k0[None, None, :] > hi_hi
        full = k1[None, None, :] <= hi_lo
        if self.left is not None:
            empty |= k1[None, None, :] < p_lo[:, :, None] - self.left
            full &= k0[None, None, :] >= p_hi[:, :, None] - self.left
        return _batch_verdict(empty, full)

    def validate(self, batch: int, num_heads: int, q_len: int, kv_len: int) -> None:
        shape = tuple(getattr(self.positions, "shape", ()))
        if shape != (batch, q_len):
            raise ValueError(f"mask: QueryPositionMask positions must have shape [batch, q_len] = "
                             f"{(batch, q_len)}, got {shape}")
        if not jnp.issubdtype(self.positions.dtype, jnp.integer):
            raise ValueError(f"mask: QueryPositionMask positions must be integers, got {self.positions.dtype}")


# -- combinations ----------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Combination(Mask):
    """Two masks joined elementwise by `combine` (tiles by `combine_tiles`)."""

    a: Mask
    b: Mask
    combine: ClassVar[Callable[[jax.Array, jax.Array], jax.Array]]
    combine_tiles: ClassVar[Callable[[np.ndarray, np.ndarray], np.ndarray]]

    def allowed(self, q_idx: jax.Array, kv_idx: jax.Array, q_len: int, kv_len: int) -> jax.Array:
        args = (q_idx, kv_idx, q_len, kv_len)
        return type(self).combine(self.a.allowed(*args), self.b.allowed(*args))

    def block_structure(self, q_len: int, kv_len: int, block_q: int, block_kv: int) -> np.ndarray:
        args = (q_len, kv_len, block_q, block_kv)
        return type(self).combine_tiles(self.a.block_structure(*args), self.b.block_structure(*args))

    def kinds(self) -> frozenset[str]:
        return self.a.kinds() | self.b.kinds()

    def validate(self, batch: int, num_heads: int, q_len: int, kv_len: int) -> None:
        self.a.validate(batch, num_heads, q_len, kv_len)
        self.b.validate(batch, num_heads, q_len, kv_len)


@dataclass(frozen=True, eq=False)
class AndMask(_Combination):
    """Attend where both masks allow (`a & b`). A tile is EMPTY if either is, FULL if both are."""

    kind: ClassVar[str] = "and"
    combine = staticmethod(operator.and_)
    combine_tiles = staticmethod(np.minimum)

    def conjuncts(self) -> tuple[Mask, ...]:
        return self.a.conjuncts() + self.b.conjuncts()


@dataclass(frozen=True, eq=False)
class OrMask(_Combination):
    """Attend where either mask allows (`a | b`). A tile is FULL if either is, EMPTY if both are."""

    kind: ClassVar[str] = "or"
    combine = staticmethod(operator.or_)
    combine_tiles = staticmethod(np.maximum)

    def kinds(self) -> frozenset[str]:
        return super().kinds() | {"or"}


for _cls, _data in (
    (FullMask, ()),
    (CausalMask, ()),
    (SlidingWindowMask, ()),
    (ChunkedCausalMask, ()),
    (SegmentMask, ("q_segment_ids", "kv_segment_ids")),
    (DenseMask, ("array",)),
    (QueryPositionMask, ("positions",)),
    (AndMask, ("a", "b")),
    (OrMask, ("a", "b")),
):
    _register(_cls, _data)


# -- the normalized form kernels use ---------------------------------------------------


@dataclass(frozen=True, eq=False)
class MaskParts:
    """A conjunction of masks reduced to what a tiled kernel applies.

    Query `i` sees key `j` iff all of:
    `band_lo <= j - i <= band_hi` (None = unbounded);
    `(j // chunk_size) == ((i + chunk_offset) // chunk_size)` when `chunk_size` is set;
    equal segment ids when `q_segment_ids` is set; `dense[b, h, i, j]` when `dense` is set.
    """

    band_lo: int | None = None
    band_hi: int | None = None
    chunk_size: int | None = None
    chunk_offset: int = 0
    q_segment_ids: jax.Array | None = None
    kv_segment_ids: jax.Array | None = None
    dense: jax.Array | None = None

    @property
    def is_empty_band(self) -> bool:
        return self.band_lo is not None and self.band_hi is not None and self.band_lo > self.band_hi


def mask_parts(mask: Mask | None, q_len: int, kv_len: int) -> MaskParts:
    """Reduce `mask` (an `&` of masks, no `|`) to `MaskParts`.

    Raises ValueError for what a band-and-chunk kernel cannot express: `|`, two
    different chunk sizes, or two segment masks.
    """
    if mask is None:
        return MaskParts()
    lo: int | None = None
    hi: int | None = None
    chunk: tuple[int, int] | None = None
    segments: SegmentMask | None = None
    dense: jax.Array | None = None
    for part in mask.conjuncts():
        if isinstance(part, BandMask):
            p_lo, p_hi = part.bounds(q_len, kv_len)
        elif isinstance(part, ChunkedCausalMask):
            off = part.resolved_offset(q_len, kv_len)
            p_lo, p_hi = None, off
            this = (part.resolved_chunk(q_len, kv_len), off)
            if chunk is not None and chunk != this:
                raise ValueError("mask: two different chunked-causal masks cannot be combined here")
            chunk = this
        elif isinstance(part, SegmentMask):
            if segments is not None:
                raise ValueError("mask: at most one segment mask can be combined here")
            segments = part
            continue
        elif isinstance(part, DenseMask):
            dense = part.array4d if dense is None else dense & part.array4d
            continue
        else:
            raise ValueError(f"mask: {part.kind!r} masks cannot be reduced to a band (use the xla backend)")
        if p_lo is not None:
            lo = p_lo if lo is None else max(lo, p_lo)
        if p_hi is not None:
            hi = p_hi if hi is None else min(hi, p_hi)
    return MaskParts(
        band_lo=lo,
        band_hi=hi,
        chunk_size=chunk[0] if chunk else None,
        chunk_offset=chunk[1] if chunk else 0,
        q_segment_ids=segments.q_segment_ids if segments else None,
        kv_segment_ids=segments.kv_segment_ids if segments else None,
        dense=dense,
    )
