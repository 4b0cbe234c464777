"""FlashAttention-2 in Pallas with the Triton lowering: the forward kernel, and the tiling
and masking pieces the backward kernels (`triton_vjp.py`) share with it.

Layout is jaxattn's `[batch, seq, heads, head_dim]`; kernels read it in place (strided
block specs), never transposing or repeating K/V. Grouped-query attention reads the K/V
head `h // group`.

Masks arrive as `jaxattn.mask_parts`: a band `band_lo <= j - i <= band_hi` (causal,
sliding window, q_len != kv_len), a chunk rule, segment ids. For each q block (k/v block
in the dk/dv kernel) the kernel computes from the band and chunk the range of tiles that
can hold a visible pair and never visits the others; inside that range the tiles that
are entirely visible run a loop without any mask arithmetic, only the partial tiles at
its two ends apply the mask. Sequence lengths shorten the ranges at run time.

Numerics: logits in float32, softmax in base 2 (`exp2`, the scale folded with log2(e)),
running max initialised to a finite floor so masked (-inf) logits never form `-inf -
-inf`. A row whose running sum stays 0 saw no key (or only -inf logits): out 0, lse
-inf; a NaN sum (a non-finite logit it sees) propagates. Partial tiles zero the values
of keys with a non-finite value before `p @ v` (`nonfinite.masked_values`), so a row
that does not see such a key is untouched and a row that does is NaN. float32 inputs use
IEEE float32 dots (precision HIGHEST); bf16/fp16 use the tensor cores with float32
accumulation.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ._compat import multiple_of, triton_params
from .nonfinite import masked_values

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
M_FLOOR = -1e30  # initial running max (log2 units): finite, below any real logit


@dataclass(frozen=True)
class Tiles:
    """Tile sizes and Triton launch settings of one kernel."""

    block_q: int
    block_kv: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class KernelSpec:
    """Everything static about one attention call (hashable: a custom_vjp static arg).

    `q_len`/`kv_len` are the real lengths, `q_pad`/`kv_pad` the padded ones the arrays
    have. Band/chunk follow `jaxattn.MaskParts`.
    """

    q_len: int
    kv_len: int
    q_pad: int
    kv_pad: int
    group: int
    scale: float
    soft_cap: float | None
    band_lo: int | None
    band_hi: int | None
    chunk_size: int | None
    chunk_offset: int
    segments: bool
    q_lens: bool
    kv_lens: bool
    sinks: bool
    fwd: Tiles
    dq: Tiles
    dkdv: Tiles
    exact: bool  # float32 inputs: IEEE float32 dots
    interpret: bool = False
    dkdv_passes: int = 1  # launch passes of the dk/dv grid (launch_order.py)
    mosaic_bwd: Any = None  # a MosaicBwdSpec when the backward runs on Mosaic GPU (unpadded calls)

    @property
    def precision(self):
        return lax.Precision.HIGHEST if self.exact else None

    @property
    def reverse_q(self) -> bool:
        """Start the heavy q blocks first when the band makes the last ones heavier."""
        return self.band_hi is not None and self.band_lo is None


# -- scalar helpers (traced int32, Triton-friendly: only truncating division on values >= 0)


def _i32(x):
    return jnp.asarray(x, jnp.int32)


def _max(a, b):
    return jnp.maximum(_i32(a), _i32(b))


def _min(a, b):
    return jnp.minimum(_i32(a), _i32(b))


def _div(a, b: int):
    """floor(a / b) for a >= 0."""
    return lax.div(_i32(a), jnp.int32(b))


def _cdiv(a, b: int):
    """ceil(a / b) for a >= 0."""
    return lax.div(_i32(a) + (b - 1), jnp.int32(b))


def _dot(a, b, spec: KernelSpec, *, trans_a: bool = False, trans_b: bool = False):
    dims = (((0,) if trans_a else (1,)), ((1,) if trans_b else (0,)))
    return lax.dot_general(a, b, (dims, ((), ())), precision=spec.precision,
                           preferred_element_type=jnp.float32)


def _logits(s, spec: KernelSpec):
    """Raw q·k (float32) -> (logits in log2 units, tanh term or None)."""
    if spec.soft_cap is None:
        return s * (spec.scale * LOG2E), None
    t = jnp.tanh(s * (spec.scale / spec.soft_cap))
    return t * (spec.soft_cap * LOG2E), t


# -- visit ranges -----------------------------------------------------------------------


def _key_ranges(spec: KernelSpec, r0, block_q: int, block_kv: int, kv_end):
    """For rows [r0, r0 + block_q): kv blocks [start, full_start) masked, [full_start,
    full_end) unmasked, [full_end, end) masked; every other kv block is empty."""
    r1 = r0 + (block_q - 1)
    klo, khi = _i32(0), _i32(kv_end)
    flo, fhi = _i32(0), _i32(kv_end)
    if spec.band_lo is not None:
        klo = _max(klo, r0 + spec.band_lo)
        flo = _max(flo, r1 + spec.band_lo)
    if spec.band_hi is not None:
        khi = _min(khi, r1 + spec.band_hi + 1)
        fhi = _min(fhi, r0 + spec.band_hi + 1)
    if spec.chunk_size is not None:
        c, off = spec.chunk_size, spec.chunk_offset
        c0 = _div(_max(r0 + off, 0), c)
        c1 = _div(_max(r1 + off, 0), c)
        klo = _max(klo, c0 * c)
        khi = _min(khi, c1 * c + c)
        flo = _max(flo, c0 * c)
        fhi = jnp.where(c0 == c1, _min(fhi, c0 * c + c), flo)
    if spec.segments:
        fhi = flo
    klo = _max(klo, 0)
    khi = _max(khi, klo)
    start = _div(klo, block_kv)
    end = _max(_cdiv(khi, block_kv), start)
    fs = _min(_max(_cdiv(_max(flo, 0), block_kv), start), end)
    fe = _min(_max(_div(_max(fhi, 0), block_kv), fs), end)
    return start, fs, fe, end


def _query_ranges(spec: KernelSpec, c0, block_q: int, block_kv: int, q_end, kv_end):
    """For keys [c0, c0 + block_kv): q blocks [start, fs) masked, [fs, fe) unmasked,
    [fe, end) masked (the dk/dv kernel's loop)."""
    c1 = c0 + (block_kv - 1)
    qlo, qhi = _i32(0), _i32(q_end)
    flo, fhi = _i32(0), _i32(q_end)
    if spec.band_hi is not None:  # i >= j - hi
        qlo = _max(qlo, c0 - spec.band_hi)
        flo = _max(flo, c1 - spec.band_hi)
    if spec.band_lo is not None:  # i <= j - lo
        qhi = _min(qhi, c1 - spec.band_lo + 1)
        fhi = _min(fhi, c0 - spec.band_lo + 1)
    if spec.chunk_size is not None:
        c, off = spec.chunk_size, spec.chunk_offset
        k0, k1 = _div(c0, c), _div(c1, c)
        qlo = _max(qlo, k0 * c - off)
        qhi = _min(qhi, k1 * c + c - off)
        flo = _max(flo, k0 * c - off)
        fhi = jnp.where(k0 == k1, _min(fhi, k0 * c + c - off), flo)
    if spec.segments:
        fhi = flo
    # keys past the end: a tile holding one is partial; a block entirely past it is empty
    fhi = jnp.where(c1 < kv_end, fhi, flo)
    qhi = jnp.where(c0 < kv_end, qhi, qlo)
    qlo = _max(qlo, 0)
    qhi = _max(qhi, qlo)
    start = _div(qlo, block_q)
    end = _max(_cdiv(qhi, block_q), start)
    fs = _min(_max(_cdiv(_max(flo, 0), block_q), start), end)
    fe = _min(_max(_div(_max(fhi, 0), block_q), fs), end)
    return start, fs, fe, end


def _visible(spec: KernelSpec, q_pos, k_pos, kv_end, q_seg=None, kv_seg=None):
    """Boolean [bq, bk]: the mask on a partial tile (band, chunk, segments, key end)."""
    ok = (k_pos < kv_end)[None, :]
    d = k_pos[None, :] - q_pos[:, None]
    if spec.band_lo is not None:
        ok = ok & (d >= spec.band_lo)
    if spec.band_hi is not None:
        ok = ok & (d <= spec.band_hi)
    if spec.chunk_size is not None:
        c = jnp.int32(spec.chunk_size)
        qc = lax.div(jnp.maximum(q_pos + spec.chunk_offset, 0), c)
        ok = ok & (lax.div(k_pos, c)[None, :] == qc[:, None])
    if q_seg is not None:
        ok = ok & (q_seg[:, None] == kv_seg[None, :])
    return ok


def _loop3(ranges, body, carry):
    start, fs, fe, end = ranges
    carry = lax.fori_loop(start, fs, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(fs, fe, functools.partial(body, masked=False), carry)
    return lax.fori_loop(fe, end, functools.partial(body, masked=True), carry)


def _loop3_heads(ranges, body, carry, group: int):
    """`_loop3` over q blocks for each of `group` query heads, as one flat loop per
    phase (head-major), so the software pipeline runs on across heads."""
    if group == 1:
        return _loop3(ranges, lambda ib, c, masked: body(0, ib, c, masked=masked), carry)
    start, fs, fe, end = ranges
    for lo, hi, masked in ((start, fs, True), (fs, fe, False), (fe, end, True)):
        n = hi - lo

        def step(it, c, lo=lo, n=n, masked=masked):
            gi = lax.div(it, n)
            return body(gi, lo + (it - gi * n), c, masked=masked)

        carry = lax.fori_loop(0, n * group, step, carry)
    return carry


class KernelRefs(NamedTuple):
    """A kernel's refs by name: the optional inputs are None where the spec has none (the
    order they are passed in is `_common_specs`'s, then the sinks of the forward)."""

    fixed: tuple[Any, ...]  # q, k, v (and do, lse, delta in the backward kernels)
    q_seg: Any
    kv_seg: Any
    q_len: Any
    kv_len: Any
    sinks: Any
    outputs: tuple[Any, ...]


def kernel_refs(refs: tuple[Any, ...], spec: KernelSpec, *, fixed: int, sinks: bool = False) -> KernelRefs:
    """Names the refs a row- or column-parallel kernel receives."""
    rest = list(refs[fixed:])

    def take(present: bool, n: int = 1) -> list[Any]:
        if not present:
            return [None] * n
        taken = rest[:n]
        del rest[:n]
        return taken

    q_seg, kv_seg = take(spec.segments, 2)
    (q_len,), (kv_len,), (sink,) = take(spec.q_lens), take(spec.kv_lens), take(sinks)
    return KernelRefs(tuple(refs[:fixed]), q_seg, kv_seg, q_len, kv_len, sink, tuple(rest))


def valid_end(length_ref, static_len: int):
    """The run-time length (`min(length_ref[0], static_len)`), or the static one without a ref."""
    return _i32(static_len) if length_ref is None else _min(length_ref[0], static_len)


def q_block_index(spec: KernelSpec, block_q: int, i):
    """The q block that program `i` of a row-parallel grid handles (the last first when
    `reverse_q`): the kernel body and its index maps both ask this, so they agree."""
    nq = spec.q_pad // block_q
    return (nq - 1 - i) if spec.reverse_q else i


def row_block(spec: KernelSpec, block_q: int, block_kv: int, kv_len_ref):
    """A row-parallel kernel's q block: (its first row, the end of the valid keys, the key
    ranges `_key_ranges` gives for it)."""
    r0 = q_block_index(spec, block_q, pl.program_id(0)) * block_q
    kv_end = valid_end(kv_len_ref, spec.kv_len)
    return r0, kv_end, _key_ranges(spec, r0, block_q, block_kv, kv_end)


# -- forward ----------------------------------------------------------------------------


def _fwd_kernel(*refs, spec: KernelSpec):
    named = kernel_refs(refs, spec, fixed=3, sinks=spec.sinks)
    (q_ref, k_ref, v_ref), (o_ref, lse_ref) = named.fixed, named.outputs
    q_seg_ref, kv_seg_ref, sink_ref = named.q_seg, named.kv_seg, named.sinks

    bq, bk = spec.fwd.block_q, spec.fwd.block_kv
    r0, kv_end, ranges = row_block(spec, bq, bk, named.kv_len)
    q_valid_end = valid_end(named.q_len, spec.q_len)
    if named.q_len is not None:
        start, fs, fe, end = ranges
        end = jnp.where(r0 < q_valid_end, end, start)
        ranges = (start, _min(fs, end), _min(fe, end), end)

    q = q_ref[...]
    q_pos = r0 + jnp.arange(bq, dtype=jnp.int32)
    q_seg = q_seg_ref[...] if q_seg_ref is not None else None
    dv = v_ref.shape[-1]

    def body(jb, carry, *, masked):
        acc, m, l, poisoned = carry
        start = multiple_of(jb * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        s, _ = _logits(_dot(q, k, spec, trans_b=True), spec)
        if masked:
            k_pos = start + jnp.arange(bk, dtype=jnp.int32)
            kv_seg = kv_seg_ref[pl.ds(start, bk)] if kv_seg_ref is not None else None
            vis = _visible(spec, q_pos, k_pos, kv_end, q_seg, kv_seg)
            s = jnp.where(vis, s, -jnp.inf)
            v, seen = masked_values(v, vis)
            poisoned = jnp.maximum(poisoned, seen)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, spec)
        return acc, m_new, l, poisoned

    init = (jnp.zeros((bq, dv), jnp.float32), jnp.full((bq,), M_FLOOR, jnp.float32),
            jnp.zeros((bq,), jnp.float32), jnp.zeros((bq,), jnp.float32))
    acc, m, l, poisoned = _loop3(ranges, body, init)

    real = q_pos < q_valid_end
    has = (l != 0.0) & real  # a NaN sum (a non-finite logit) counts: it propagates
    if sink_ref is not None:
        sink = sink_ref[0].astype(jnp.float32) * LOG2E
        m_all = jnp.maximum(m, sink)
        corr = jnp.exp2(m - m_all)
        l = l * corr + jnp.exp2(sink - m_all)
        acc = acc * corr[:, None]
        m = m_all
    l_safe = jnp.where(has, l, 1.0)
    out = acc * (1.0 / l_safe)[:, None]
    out = jnp.where(has[:, None], out, 0.0)
    out = jnp.where(((poisoned > 0.0) & real)[:, None], jnp.nan, out)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = jnp.where(has, m * LN2 + jnp.log(l_safe), -jnp.inf)


def _common_specs(spec: KernelSpec, q_seg, kv_seg, q_lens, kv_lens, *, rows, batch_of):
    """Block specs and arrays of the optional inputs (segments, lengths) of the
    row-parallel kernels (forward, dq)."""
    specs, arrays = [], []
    if spec.segments:
        specs += [rows, pl.BlockSpec((None, spec.kv_pad), lambda *g: (batch_of(*g), 0))]
        arrays += [q_seg, kv_seg]
    if spec.q_lens:
        specs.append(pl.BlockSpec((1,), lambda *g: (batch_of(*g),)))
        arrays.append(q_lens)
    if spec.kv_lens:
        specs.append(pl.BlockSpec((1,), lambda *g: (batch_of(*g),)))
        arrays.append(kv_lens)
    return specs, arrays


def forward(spec: KernelSpec, q, k, v, sinks, q_seg, kv_seg, q_lens, kv_lens):
    """Padded inputs -> (out `[B, Sq', Hq, Dv']` in q.dtype, lse `[B, Hq, Sq']` natural log)."""
    b, _, hq, d = q.shape
    dv = v.shape[-1]
    t = spec.fwd
    nq = spec.q_pad // t.block_q
    g = spec.group
    qi = functools.partial(q_block_index, spec, t.block_q)

    in_specs = [
        pl.BlockSpec((None, t.block_q, None, d), lambda i, bb, h: (bb, qi(i), h, 0)),
        pl.BlockSpec((None, spec.kv_pad, None, d), lambda i, bb, h: (bb, 0, lax.div(h, g), 0)),
        pl.BlockSpec((None, spec.kv_pad, None, dv), lambda i, bb, h: (bb, 0, lax.div(h, g), 0)),
    ]
    arrays = [q, k, v]
    extra_specs, extra = _common_specs(
        spec, q_seg, kv_seg, q_lens, kv_lens,
        rows=pl.BlockSpec((None, t.block_q), lambda i, bb, h: (bb, qi(i))),
        batch_of=lambda i, bb, h: bb)
    in_specs += extra_specs
    arrays += extra
    if spec.sinks:
        in_specs.append(pl.BlockSpec((1,), lambda i, bb, h: (h,)))
        arrays.append(sinks.astype(jnp.float32))
    out_specs = [
        pl.BlockSpec((None, t.block_q, None, dv), lambda i, bb, h: (bb, qi(i), h, 0)),
        pl.BlockSpec((None, None, t.block_q), lambda i, bb, h: (bb, h, qi(i))),
    ]
    out_shape = [jax.ShapeDtypeStruct((b, spec.q_pad, hq, dv), q.dtype),
                 jax.ShapeDtypeStruct((b, hq, spec.q_pad), jnp.float32)]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, spec=spec),
        grid=(nq, b, hq),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=triton_params(t.num_warps, t.num_stages),
        interpret=spec.interpret,
        name="flash_fwd",
    )(*arrays)
