"""Which key tiles a block of query rows visits, which of them it sees whole, and which (row, key)
pairs of a tile are visible: the band, chunks and lengths arithmetic the Mosaic GPU forward and
backward kernels share (`spec`: a `MosaicSpec` or a `MosaicBwdSpec`, each with `band_lo`,
`band_hi`, `chunk` and `chunk_offset`). Scalar int32 values, traced inside the kernels.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def _i32(x):
    return jnp.asarray(x, jnp.int32)


def _div(a, b: int):
    """floor(a / b) for a >= 0 (clamped)."""
    return lax.div(jnp.maximum(_i32(a), 0), jnp.int32(b))


def _cdiv(a, b: int):
    """ceil(a / b) for a >= 0 (clamped)."""
    return lax.div(jnp.maximum(_i32(a), 0) + (b - 1), jnp.int32(b))


def chunk_start(spec, q):
    """The first key of query `q`'s chunk (0 where `q + chunk_offset < 0`: such a query sees no key)."""
    return _div(q + spec.chunk_offset, spec.chunk) * spec.chunk


def visible(spec, q_pos, k_pos, q0, kv_end=None):
    """Where key `k_pos` is visible for query `q_pos` (iotas over one tile whose first query is the
    scalar `q0`): the band `band_lo <= k - q <= band_hi`, the chunk and keys before `kv_end` (a
    batch row's length; None: everywhere); `spec` is a forward or a backward spec. A tile's
    queries span at most two chunks (chunk >= its rows), so a query's chunk start is the first
    query's or the next one: no division per entry. The band's `band_hi <= chunk_offset`
    (chunked causal) bounds the chunk's other side."""
    ok = None
    diff = k_pos - q_pos
    if spec.band_lo is not None:
        ok = diff >= spec.band_lo
    if spec.band_hi is not None:
        ok = (diff <= spec.band_hi) if ok is None else ok & (diff <= spec.band_hi)
    if spec.chunk is not None:
        first = chunk_start(spec, q0)
        after = first + spec.chunk
        in_chunk = k_pos >= jnp.where(q_pos + spec.chunk_offset >= after, after, first)
        ok = in_chunk if ok is None else ok & in_chunk
    if kv_end is not None:
        ok = (k_pos < kv_end) if ok is None else ok & (k_pos < kv_end)
    return ok


def key_tiles(spec, r0, rows: int, block_kv: int, num_kv_tiles: int, kv_end=None):
    """Tiles [lb, ub) of `block_kv` keys that hold a visible pair for query rows [r0, r0 + rows),
    keys before `kv_end` (a batch row's length; None: all); `spec` is a forward or a backward spec
    (the forward block's and the dq kernel's ranges)."""
    lb, ub = _i32(0), _i32(num_kv_tiles)
    if spec.band_hi is not None:
        ub = jnp.minimum(ub, _cdiv(r0 + rows + spec.band_hi, block_kv))
    if spec.band_lo is not None:
        lb = jnp.maximum(lb, _div(r0 + spec.band_lo, block_kv))
    if spec.chunk is not None:
        lb = jnp.maximum(lb, _div(chunk_start(spec, r0), block_kv))
    if kv_end is not None:
        ub = jnp.minimum(ub, _cdiv(kv_end, block_kv))
    return lb, jnp.maximum(ub, lb)


def full_key_tiles(spec, r0, rows: int, block_kv: int, lb, ub, kv_end=None):
    """Of [lb, ub), the tiles [fs, fe) of `block_kv` keys fully visible for query rows
    [r0, r0 + rows), keys before `kv_end`; `spec` is a forward or a backward spec."""
    fs, fe = lb, ub
    if spec.band_lo is not None:
        fs = jnp.maximum(fs, _cdiv(r0 + rows - 1 + spec.band_lo, block_kv))
    if spec.band_hi is not None:
        fe = jnp.minimum(fe, _div(r0 + spec.band_hi + 1, block_kv))
    if kv_end is not None:
        fe = jnp.minimum(fe, _div(kv_end, block_kv))
    if spec.chunk is not None:  # not before the first row's chunk
        fs = jnp.maximum(fs, _cdiv(chunk_start(spec, r0), block_kv))
    fs = jnp.minimum(fs, ub)
    if spec.chunk is not None:  # full only where all rows share one chunk
        fe = jnp.where(chunk_start(spec, r0) == chunk_start(spec, r0 + rows - 1), fe, fs)
    return fs, jnp.maximum(fe, fs)
