"""A Hopper decode kernel over a paged KV cache in Pallas's Mosaic GPU lowering (opt-in:
config `mosaic=1`; measured on an H200 in BENCHMARKS.md, "The Mosaic decode kernel in
FlashDecoding's transposed form").

Why: the Triton kernel (`kernel.py`) reads bf16 pages at ~3.8 TB/s but one-byte pages at only
2.3-2.7 TB/s: its per-element widening and the dot operands' layout changes bound it, not the
bytes. Here a producer warpgroup brings whole pages with TMA (one copy per page and kv head: a
`[page_size, D]` box of the `[pages, page_size, kv_heads, D]` cache) into a ring of `stages`
slots of `block_kv` tokens, so loads run ahead of the math without registers.

The tokens are the rows of both products (FlashDecoding's transposed form): logitsᵀ
`[block_kv, G]` = K·Qᵀ and outᵀ `[Dv, G]` += Vᵀ·Pᵀ, with the G query heads of a kv head as the
columns, padded to a multiple of 8 (wgmma's N), where the first form padded them to 64 rows
(wgmma's M) and spent 16x the tensor-core work and softmax at G = 4. Keys are wgmma's A operand
as they lie in the slot (their contraction dimension, head_dim, is contiguous), so int8 keys
need no widening when the queries are quantized too (`quantized_qk`: per query head, to the pages'
dtype: int8 wgmma with int32 sums, as the Triton kernel's `int8_dots=1`, or float8 wgmma with
float32 sums, config `fp8_dots=1`). Values are read transposed, which
wgmma allows for 16-bit operands only: one-byte values are widened in shared memory (exact: int8
to the query's dtype, float8_e4m3fn to float16, one instruction per pair; the products of float8
pages then run in float16, which holds the widened values and probabilities more finely than
bfloat16), and one-byte keys too without `quantized_qk`:
by the consumer before its products, or (`widener=True`) by a third warpgroup into a ring of
16-bit slots, one per one-byte slot, while the consumer computes on the slot before. With
`consumers=2` (config `mosaic=2`) two consumer warpgroups take a split's steps in turn.

A key's scale multiplies its logit row, a value's scale its probability row (per token and
head, `[pages, page_size, kv_heads]`, gathered per call into each sequence's token order
`[batch, kv_heads, tokens]` so a step's scales are one contiguous TMA box: a page's own box
would land at shared addresses that are not 128-byte aligned, which TMA faults on (found on an
H200 at page_size 16)). Keys past the sequence's length are masked and their value rows zeroed
before Vᵀ·Pᵀ (a never-written slot may hold NaN). Split-KV: a unit of work is a (sequence,
kv head, split) triple, a split a range of the sequence's steps; each unit writes its normalized
partial output and natural-log lse, and `kernel.merge_splits` combines them. Either each unit
has its own CUDA block, or (`ctas`) the blocks stay resident and take units in turn, the ring
and a pair of query slots running on from one unit into the next, so only a block's first unit
starts from an empty ring (and no block waits for a wave to finish).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ._compat import mosaic_gpu, mosaic_interpret_kwargs, mosaic_load, mosaic_params, ref_transpose
from .mosaic_serves import ONE_BYTE, mosaic_reasons, padded_group, query_scale_row, widener_fits

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
M_FLOOR = -1e30  # initial running max (log2 units): finite, below any real logit
# The widener warpgroup for int8 pages with int8 products where its ring fits: on an H200 at 3
# stages 1.03-1.07x faster than the consumer widening (32 x 8192, 64 x 4096, 1 x 131072; float8
# pages, whose keys are widened too, fit 2 stages with it and ran 1-4% slower; BENCHMARKS.md "A
# widener warpgroup"). `test_mosaic_decode_gpu` runs both forms with partial pages and NaN past
# the lengths.
WIDENER_BY_DEFAULT = True


def _swizzled(plgpu, shape, dtype):
    """Shared memory for wgmma operands and TMA boxes: 128-byte swizzle where a row is that wide."""
    elem = jnp.dtype(dtype).itemsize
    swizzle = min(128, shape[-1] * elem)
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, swizzle // elem)),
                                                plgpu.SwizzleTransform(swizzle)))


def _cdiv(a, b: int):
    return lax.div(jnp.asarray(a, jnp.int32) + (b - 1), jnp.int32(b))


def mosaic_decode(q, k_pages, v_pages, kv_lengths, page_table, k_scale=None, v_scale=None, *, scale: float,
                  block_kv: int = 128, stages: int = 2, splits: int = 1, quantized_qk: bool = False,
                  widener: bool = False, consumers: int = 1, producer_warps: int | None = None,
                  ctas: int | None = None, order: str = "heads", interpret: bool = False):
    """q `[B, Hq, D]` (bf16/fp16), pages `[P, page_size, Hkv, D]` (q's dtype, or int8 /
    float8_e4m3fn with per-token scales `[P, page_size, Hkv]` float32), kv_lengths `[B]`, page_table `[B, max_pages]`
    -> (out `[splits * consumers, B, Hq, D]` float32, normalized per part; lse
    `[splits * consumers, B, Hq]`, -inf where a part saw no key). `quantized_qk` (one-byte
    pages only): K·Qᵀ on the pages' one-byte tensor cores, the queries quantized per head
    (symmetric: int8 at max|q| / 127, float8_e4m3fn at max|q| / 448).
    `widener` (one-byte pages only): a third warpgroup widens each slot's values (and keys
    without `quantized_qk`) into a ring of 16-bit slots while the consumer computes on the previous
    slot. `consumers` (1 or 2): consumer warpgroups taking a split's steps in turn, each with
    its own running softmax and slots (`stages` a multiple of it), so one's products overlap the
    other's softmax (each writes its own part of the output); their reductions across warps take
    turns, in step order, since Mosaic GPU gives every reduction the same shared-memory scratch.
    `producer_warps` (1 or 4; default 4, 1 in the interpreter, which runs no per-warp code): the
    producer warpgroup's copies issued by one thread, or by each of its four warps for every
    fourth page of a step (each reading its own page numbers from the table), so a step's
    page-table reads and TMA issues run four at a time: a page of 16 one-byte tokens is 2 KB, and
    one thread issuing them one by one bounded int8 pages at 2.7 TB/s (BENCHMARKS.md).
    `ctas`: CUDA blocks that stay resident (persistent), block c taking the (sequence, kv head,
    split) units c, c + ctas, ... in turn, its ring running on from one unit into the next; None:
    one block per unit. `order`: which runs fastest along the units: "heads" (the kv heads of a
    sequence's split side by side, sharing its pages' rows) or "sequences".
    `interpret`: Pallas's Mosaic GPU interpreter (CPU; checks the kernel's logic, slowly)."""
    plgpu = mosaic_gpu()
    b, hq, d = q.shape
    num_pages, ps, hkv, dv = v_pages.shape
    group = hq // hkv
    gn = padded_group(group)
    quant = k_pages.dtype in ONE_BYTE
    int8_pages = k_pages.dtype == jnp.int8
    reasons = mosaic_reasons(q, k_pages, v_pages, block_kv=block_kv, stages=stages,
                             int8_dots=int(quantized_qk and int8_pages),
                             fp8_dots=int(quantized_qk and k_pages.dtype == jnp.float8_e4m3fn), consumers=consumers)
    if quantized_qk and not quant:
        reasons.append("quantized_qk=True quantizes the queries to the pages' one-byte dtype; these are 16-bit")
    if quant != (k_scale is not None) or v_pages.dtype != k_pages.dtype:
        reasons.append("one-byte pages take k_scale and v_scale; 16-bit pages take none")
    if widener and not quant:
        reasons.append("widener=True widens one-byte pages; these are 16-bit")
    elif widener and consumers != 1:
        reasons.append(f"widener=True feeds one consumer warpgroup, not consumers={consumers}")
    elif widener and not widener_fits(d, group, block_kv, stages, quantized_qk):
        reasons.append(f"widener=True at block_kv {block_kv} and {stages} stages does not fit in shared memory")
    if producer_warps is None:
        producer_warps = 1 if interpret else 4
    if producer_warps not in (1, 4):
        reasons.append(f"producer_warps is 1 or 4 (the producer warpgroup's warps), got {producer_warps}")
    elif producer_warps == 4 and interpret:
        reasons.append("producer_warps=4 runs per-warp code, which Pallas's Mosaic GPU interpreter cannot run: "
                       "use producer_warps=1 with interpret=True")
    if ctas is not None and (not isinstance(ctas, int) or ctas < 1):
        reasons.append(f"ctas is None (a block per unit) or a positive int, got {ctas!r}")
    if order not in ("heads", "sequences"):
        reasons.append(f"order is 'heads' or 'sequences', got {order!r}")
    if reasons:
        raise ValueError("mosaic_decode: " + "; ".join(reasons))
    dtype = q.dtype
    # The 16-bit operands' dtype: float8 pages widen to float16 in one instruction per pair (exact),
    # to bfloat16 only through float32 before ptxas's ISA 9.2 (CUDA 13.0 has 9.0), so their
    # products run in float16 (queries by `f16_operands`, value scales by `unit_scales`).
    wide = jnp.dtype(jnp.float16) if k_pages.dtype == jnp.float8_e4m3fn else jnp.dtype(dtype)
    widen_keys = quant and not quantized_qk
    pages_per_step = block_kv // ps
    max_pages = page_table.shape[1]
    steps_per_split = math.ceil(math.ceil(max_pages / pages_per_step) / splits)
    c = scale * LOG2E

    # The queries per head first (quantized, or shifted into float16), then each kv head's group
    # padded to gn columns (zero rows, scale 1): XLA makes one reduction over q and one pass after it.
    q_rows = q.reshape(b, hkv, group, d)
    if quantized_qk and int8_pages:  # per query head, as the Triton kernel's int8_dots: the logits' columns
        from .kernel import _int8_rows  # carry its scale (and c)

        q_int, q_scale = _int8_rows(q_rows.reshape(-1, d))
        q_rows, q_scale = q_int.reshape(q_rows.shape), q_scale.reshape(b, hkv, group)
    elif quantized_qk:
        from jaxattn import quantize_kv

        q_rows, q_scale = quantize_kv(q_rows, k_pages.dtype)
    elif wide != dtype:
        q_rows, q_scale = f16_operands(q_rows)
    else:
        q_scale = jnp.ones((b, hkv, group), jnp.float32)
    pad = ((0, 0), (0, 0), (0, gn - group))
    q_cols = jnp.pad(q_rows, (*pad, (0, 0)))
    col_scale = jnp.pad(q_scale, pad, constant_values=1.0) * c
    args = [q_cols, col_scale, k_pages, v_pages, kv_lengths.astype(jnp.int32), page_table.astype(jnp.int32)]
    names = ["q", "qs", "k", "v", "lens", "table"]
    if quant:  # each sequence's scales in token order, one step's a contiguous TMA box: [B, Hkv, tokens]
        tokens = steps_per_split * splits * block_kv

        def in_token_order(s):  # (a gather clamps its indices itself: no pass over the table before it)
            s = jnp.take(jnp.broadcast_to(s, (num_pages, ps, hkv)).astype(jnp.float32), page_table, axis=0,
                         mode="clip")  # [B, pages, ps, Hkv]
            s = s.reshape(b, max_pages * ps, hkv).transpose(0, 2, 1)
            return jnp.pad(s, ((0, 0), (0, 0), (0, tokens - max_pages * ps)))

        vs_tokens = in_token_order(v_scale)
        if wide == jnp.float16:  # probabilities times value scales as float16: over their largest, in [0, 1]
            vs_tokens, v_max = unit_scales(vs_tokens, kv_lengths)
        args += [in_token_order(k_scale), vs_tokens]
        names += ["ks", "vs"]
    # TMA copies that arrive on a slot's barrier: K and V per page, the scales per step
    copies = 2 * pages_per_step + (2 if quant else 0)

    # Register layouts: the interpreter has none, so there these are a plain read, the value
    # itself and a plain iota.
    def load(ref, layout):
        return ref[...] if interpret else mosaic_load(plgpu, ref, layout)

    def cast(x, layout):
        return x if interpret else plgpu.layout_cast(x, layout)

    def iota(shape, dim, layout):
        return lax.broadcasted_iota(jnp.int32, shape, dim) if interpret else plgpu.broadcasted_iota(
            jnp.int32, shape, dim, layout=layout)

    acc_dtype = jnp.int32 if quantized_qk and int8_pages else jnp.float32  # of the logits' wgmma
    units = b * hkv * splits
    grid = units if ctas is None else min(ctas, units)

    def unit_at(c, j):
        """Block `c`'s `j`-th unit: (sequence, kv head, split)."""
        pos = c + j * grid
        if order == "heads":
            return lax.div(pos, hkv * splits), lax.rem(pos, hkv), lax.rem(lax.div(pos, hkv), splits)
        return lax.rem(pos, b), lax.rem(lax.div(pos, b), hkv), lax.div(pos, b * hkv)

    def unit_steps(length, si):
        """(lb, ub, full_end): a unit's steps [lb, ub), those before full_end unmasked."""
        n_steps = lax.max(_cdiv(length, block_kv), 0)
        lb = lax.min(si * steps_per_split, n_steps)
        ub = lax.min(lb + steps_per_split, n_steps)
        return lb, ub, lax.max(lax.min(ub, lax.div(length, jnp.int32(block_kv))), lb)

    def kernel(*refs):
        ins = dict(zip(names, refs))
        o_ref, lse_ref, *scratch = refs[len(names):]
        q_smem, qs_smem, k_smem, v_smem, p_smem, o_smem, lse_smem, q_bar, q_free, kv_bar, free, *extra = scratch
        k16 = extra.pop(0) if widen_keys else None
        v16, ks_smem, vs_smem = extra[:3] if quant else (None,) * 3
        wide_bar = extra[3] if widener else None  # a slot's widened tiles are ready
        turn = extra[-1] if consumers > 1 else None  # whose softmax reductions run now
        c = lax.axis_index("c")
        wg = lax.axis_index("wg")
        my_units = _cdiv(units - c, grid)
        layout = plgpu.Layout.WGMMA

        def each_unit(body):
            """`body(j, bi, hi, si, length, lb, ub, full_end, g0)` over the block's units in turn; g0: the
            block's steps before this unit's (a step's ring slot is its block-wide count mod stages)."""
            def one(j, g0):
                bi, hi, si = unit_at(c, j)
                length = ins["lens"][bi]
                lb, ub, full_end = unit_steps(length, si)
                body(j, bi, hi, si, length, lb, ub, full_end, g0)
                return g0 + (ub - lb)

            return lax.fori_loop(0, my_units, one, jnp.int32(0))

        def widen(src, dst, length=None, row0=None):
            """One-byte tile -> the 16-bit operands' dtype (exact); with `row0` (the token of its
            first row), rows at or past `length` zeroed."""
            lay = layout if interpret else plgpu.Layout.WGMMA_8BIT  # four bytes a thread, no float32
            x = load(src, lay).astype(wide)
            if row0 is not None:
                x = jnp.where(iota(x.shape, 0, lay) + row0 < length, x, jnp.zeros_like(x))
            dst[...] = x

        def consumer(ci: int):
            """Consumer warpgroup `ci`: the block-wide steps g with g % consumers == ci."""
            plgpu.set_max_registers(232, action="increase")
            rows_l, cols_l = layout.reduce(1), layout.reduce(0)  # per token / per query head
            p_tile, o_tile, lse_tile = p_smem.at[ci], o_smem.at[ci], lse_smem.at[ci]
            if turn is not None:  # the block's steps, for the last hand-over of the reductions' turn
                total = each_unit(lambda *_: None)
                if ci == 1:  # the first step's reductions are consumer 0's
                    pl.when(total > 0)(lambda: plgpu.barrier_arrive(turn.at[0]))

            def unit(j, bi, hi, si, length, lb, ub, full_end, g0):
                q_slot = lax.rem(j, 2)
                plgpu.barrier_wait(q_bar.at[q_slot])
                col_c = load(qs_smem.at[q_slot, pl.ds(0, gn)], cols_l)
                q_tile = q_smem.at[q_slot]
                shift = g0 - lb  # step t is the block's step t + shift

                def step(t, carry, *, masked):
                    acc, m, l = carry
                    slot = lax.rem(t + shift, stages)
                    plgpu.barrier_wait(kv_bar.at[slot])
                    if widener:
                        plgpu.barrier_wait(wide_bar.at[slot])
                    ok = ok_rows = None
                    if masked:  # keys past the length: -inf logits, zero value rows
                        j_tok = iota((block_kv, gn), 0, layout) + t * block_kv
                        ok = j_tok < length
                        r = iota((block_kv, dv), 0, layout) + t * block_kv
                        ok_rows = r < length
                    keys, values = k_smem.at[slot], v_smem.at[slot]
                    if widener:  # the widener warpgroup made this slot's 16-bit tiles
                        keys = k16.at[slot] if widen_keys else keys
                        values = v16.at[slot]
                    elif quant:  # this consumer's own 16-bit tiles
                        if widen_keys:
                            widen(keys, k16.at[ci])
                            keys = k16.at[ci]
                        widen(values, v16.at[ci], length, t * block_kv if masked else None)
                        values = v16.at[ci]
                    elif masked:  # a 16-bit slot: clean its rows past the length in place
                        x = load(values, layout)
                        values[...] = jnp.where(ok_rows, x, jnp.zeros_like(x))
                    if (quant and not widener) or (masked and not quant):
                        plgpu.commit_smem()

                    def qk(s_ref):  # logitsᵀ [block_kv, gn] = K · Qᵀ
                        plgpu.wgmma(s_ref, keys, ref_transpose(plgpu, q_tile))
                        return s_ref[...]

                    if interpret:  # the interpreter's wgmma takes no transposed operand
                        s = jnp.dot(keys[...], q_tile[...].T, preferred_element_type=acc_dtype)
                    else:
                        s = pl.run_scoped(qk, plgpu.ACC((block_kv, gn), acc_dtype))
                    s = s.astype(jnp.float32) * lax.broadcast_in_dim(col_c, (block_kv, gn), [1])
                    if quant:
                        ks = load(ks_smem.at[slot], rows_l)
                        s = s * lax.broadcast_in_dim(ks, s.shape, [0])
                    if ok is not None:
                        s = jnp.where(ok, s, -jnp.inf)
                    if turn is not None:  # the reductions across warps share one scratch: in step order
                        plgpu.barrier_wait(turn.at[ci])
                    m_new = jnp.maximum(m, s.max(axis=0))
                    p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [1]))
                    alpha = jnp.exp2(m - m_new)
                    l = l * alpha + p.sum(axis=0)
                    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [1])
                    if quant:
                        vs = load(vs_smem.at[slot], rows_l)
                        p = p * lax.broadcast_in_dim(vs, p.shape, [0])
                        if ok is not None:  # a never-written slot's scale may be NaN: 0 * NaN
                            p = jnp.where(ok, p, 0.0)
                    # Pᵀ into shared memory, tokens contiguous: wgmma's B operand of Vᵀ·Pᵀ
                    if interpret:
                        p_tile[...] = p.astype(wide).T
                    else:
                        ref_transpose(plgpu, p_tile)[...] = cast(p.astype(wide), plgpu.Layout.WGMMA_TRANSPOSED)
                    plgpu.commit_smem()  # (a warpgroup barrier: every warp is past the reductions)
                    if turn is not None:  # the next step is the other's (every arrival has its wait)
                        pl.when(t + shift + 1 < total)(lambda: plgpu.barrier_arrive(turn.at[1 - ci]))

                    def pv(pv_ref):  # Vᵀ · Pᵀ [dv, gn], added to outᵀ in registers (8 per thread at gn 8)
                        plgpu.wgmma(pv_ref, ref_transpose(plgpu, values), ref_transpose(plgpu, p_tile))
                        return pv_ref[...]

                    if interpret:
                        acc = acc + jnp.dot(values[...].T, p_tile[...].T, preferred_element_type=jnp.float32)
                    else:
                        acc = acc + pl.run_scoped(pv, plgpu.ACC((dv, gn), jnp.float32))
                    plgpu.barrier_arrive(free.at[slot])
                    return acc, m_new, l

                acc = cast(jnp.zeros((dv, gn), jnp.float32), layout)
                m = cast(jnp.full((gn,), M_FLOOR, jnp.float32), cols_l)
                l = cast(jnp.zeros((gn,), jnp.float32), cols_l)
                carry = own_steps(lb, full_end, ci, shift, lambda t, cr: step(t, cr, masked=False), (acc, m, l))
                acc, m, l = own_steps(full_end, ub, ci, shift, lambda t, cr: step(t, cr, masked=True), carry)
                plgpu.barrier_arrive(q_free.at[q_slot])  # its products have waited: the queries are read
                live = l != 0.0
                l_safe = jnp.where(live, l, 1.0)
                o_tile[...] = acc * lax.broadcast_in_dim(jnp.where(live, 1.0 / l_safe, 0.0), acc.shape, [1])
                lse_tile[...] = jnp.where(live, m * LN2 + jnp.log(l_safe), -jnp.inf)
                plgpu.commit_smem()
                part = ((bi * hkv + hi) * splits + si) * consumers + ci  # [B, Hkv, splits, consumers]
                plgpu.copy_smem_to_gmem(o_tile, o_ref.at[part])
                plgpu.copy_smem_to_gmem(lse_tile, lse_ref.at[part])
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the tiles are the next unit's

            each_unit(unit)

        def own_steps(start, end, ci: int, shift, body, carry):
            """`body` over the steps t in [start, end) with (t + shift) % consumers == ci."""
            if consumers == 1:
                return lax.fori_loop(start, end, body, carry)
            first = start + lax.rem(lax.rem(ci - (start + shift), consumers) + consumers, consumers)
            count = jnp.maximum(_cdiv(jnp.maximum(end - first, 0), consumers), 0)
            return lax.fori_loop(0, count, lambda k, cr: body(first + k * consumers, cr), carry)

        for ci in range(consumers):
            pl.when(wg == ci)(lambda ci=ci: consumer(ci))

        if widener:
            @pl.when(wg == consumers + 1)
            def _widener():
                def unit(j, bi, hi, si, length, lb, ub, full_end, g0):
                    def widen_slot(t, masked: bool):
                        """Step `t`'s one-byte tiles -> its 16-bit slot, 64 rows at a time (rows past
                        the length zeroed where `masked`); then the consumer may take the slot."""
                        slot = lax.rem(t + g0 - lb, stages)
                        plgpu.barrier_wait(kv_bar.at[slot])
                        for r in range(0, block_kv, 64):
                            rows = pl.ds(r, 64)
                            widen(v_smem.at[slot, rows], v16.at[slot, rows], length,
                                  t * block_kv + r if masked else None)
                            if widen_keys:
                                widen(k_smem.at[slot, rows], k16.at[slot, rows])
                        plgpu.commit_smem()  # the stores, visible to the consumer's wgmma
                        plgpu.barrier_arrive(wide_bar.at[slot])

                    pl.loop(lb, full_end)(lambda t: widen_slot(t, False))
                    pl.loop(full_end, ub)(lambda t: widen_slot(t, True))

                each_unit(unit)

        def produce(my_pages: tuple[int, ...], my_scales: tuple[str, ...], loads_q: bool):
            """Fill the ring: the copies of `my_pages` (a step's pages, by position) and of
            `my_scales` for every step of every unit of the block; `loads_q`: each unit's queries
            too, into the ring of two query slots."""

            def unit(j, bi, hi, si, length, lb, ub, full_end, g0):
                if loads_q:
                    q_slot = lax.rem(j, 2)
                    pl.when(j >= 2)(lambda: plgpu.barrier_wait(q_free.at[q_slot]))  # unit j - 2 is done
                    plgpu.copy_gmem_to_smem(ins["q"].at[bi, hi], q_smem.at[q_slot], q_bar.at[q_slot])
                    plgpu.copy_gmem_to_smem(ins["qs"].at[bi, hi], qs_smem.at[q_slot, pl.ds(0, gn)], q_bar.at[q_slot])

                @pl.loop(lb, ub)
                def _(t):
                    g = t + g0 - lb
                    slot = lax.rem(g, stages)
                    pl.when(g >= stages)(lambda: plgpu.barrier_wait(free.at[slot]))  # step g - stages is done
                    for i in my_pages:  # every copy arrives, so the barrier's count holds
                        idx = lax.min(t * pages_per_step + i, max_pages - 1)  # lax: warp code lowers no jit
                        page = lax.max(0, lax.min(ins["table"][bi, idx], num_pages - 1))
                        rows = pl.ds(i * ps, ps)
                        plgpu.copy_gmem_to_smem(ins["k"].at[page, :, hi], k_smem.at[slot, rows], kv_bar.at[slot])
                        plgpu.copy_gmem_to_smem(ins["v"].at[page, :, hi], v_smem.at[slot, rows], kv_bar.at[slot])
                    for name in my_scales:  # one box per step (a page's own box may not be 128-byte aligned)
                        dst = ks_smem if name == "ks" else vs_smem
                        plgpu.copy_gmem_to_smem(ins[name].at[bi, hi, pl.ds(t * block_kv, block_kv)], dst.at[slot],
                                                kv_bar.at[slot])

            total = each_unit(unit)
            # the phases not yet waited for, so every wait sees each phase (Pallas's interpreter checks it)
            pl.loop(lax.max(total - stages, 0), total)(lambda g: plgpu.barrier_wait(free.at[lax.rem(g, stages)]))
            if loads_q:
                pl.loop(lax.max(my_units - 2, 0), my_units)(lambda j: plgpu.barrier_wait(q_free.at[lax.rem(j, 2)]))

        @pl.when(wg == consumers)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")
            scales = ("ks", "vs") if quant else ()
            if producer_warps == 1:
                produce(tuple(range(pages_per_step)), scales, True)
                return

            @pl.core_map(plgpu.WarpMesh(axis_name="warp"))
            def _per_warp():  # warp w: the pages w, w + 4, ... of each step; the scales after them
                warp = lax.axis_index("warp")
                for w in range(4):
                    mine = tuple(range(w, pages_per_step, 4))
                    my_scales = tuple(s for j, s in enumerate(scales) if (pages_per_step + j) % 4 == w)
                    loads_q = w == (pages_per_step + len(scales)) % 4  # the warp with the fewest copies
                    if mine or my_scales or loads_q:
                        pl.when(warp == w)(lambda mine=mine, my_scales=my_scales, loads_q=loads_q:
                                           produce(mine, my_scales, loads_q))

    page_dtype = k_pages.dtype
    scratch = [
        _swizzled(plgpu, (2, gn, d), q_cols.dtype),  # two units' queries: the next one's load runs ahead
        plgpu.SMEM((2, query_scale_row(group)), jnp.float32),  # two units' query scales
        _swizzled(plgpu, (stages, block_kv, d), page_dtype),
        _swizzled(plgpu, (stages, block_kv, dv), page_dtype),
        _swizzled(plgpu, (consumers, gn, block_kv), wide),
        plgpu.SMEM((consumers, dv, gn), jnp.float32),
        plgpu.SMEM((consumers, gn), jnp.float32),
        plgpu.Barrier(num_arrivals=2, num_barriers=2),
        plgpu.Barrier(num_arrivals=consumers, num_barriers=2),
        plgpu.Barrier(num_arrivals=copies, num_barriers=stages),
        plgpu.Barrier(num_arrivals=1, num_barriers=stages),
    ]
    ring = (stages,) if widener else (consumers,)  # the widener's ring of 16-bit slots, or one per consumer
    if widen_keys:
        scratch.append(_swizzled(plgpu, (*ring, block_kv, d), wide))
    if quant:  # the widened values and each slot's scales
        scratch += [_swizzled(plgpu, (*ring, block_kv, dv), wide),
                    plgpu.SMEM((stages, block_kv), jnp.float32), plgpu.SMEM((stages, block_kv), jnp.float32)]
    if widener:
        scratch.append(plgpu.Barrier(num_arrivals=1, num_barriers=stages))
    if consumers > 1:
        scratch.append(plgpu.Barrier(num_arrivals=1, num_barriers=2))
    parts = splits * consumers
    out_type = (jax.ShapeDtypeStruct((b * hkv * parts, dv, gn), jnp.float32),
                jax.ShapeDtypeStruct((b * hkv * parts, gn), jnp.float32))
    out, lse = plgpu.kernel(kernel, out_type=out_type, scratch_types=scratch, grid=(grid,),
                            grid_names=("c",), num_threads=consumers + (2 if widener else 1), thread_name="wg",
                            compiler_params=mosaic_params(plgpu), **mosaic_interpret_kwargs(interpret))(*args)
    # [B, Hkv, parts, ...] -> [parts, B, Hkv, ...]
    out = jnp.moveaxis(out.reshape(b, hkv, parts, dv, gn), 2, 0)
    lse = jnp.moveaxis(lse.reshape(b, hkv, parts, gn), 2, 0)
    if quant and wide == jnp.float16:
        out = out * v_max[None, :, :, None, None]
    out = jnp.swapaxes(out, -1, -2)[:, :, :, :group].reshape(parts, b, hq, dv)
    return out, lse[:, :, :, :group].reshape(parts, b, hq)


def f16_operands(q_rows):
    """Queries as float16 for float8 pages' float16 products: each query head's row over a power
    of two that puts its largest magnitude in [2^13, 2^14) (exact, far from float16's 65504
    and its subnormals); returns (rows, the powers of two `[B, Hkv, G]` that undo it)."""
    x = q_rows.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1)
    shift = jnp.exp2(jnp.where(amax > 0, jnp.floor(jnp.log2(jnp.where(amax > 0, amax, 1.0))) - 13, 0.0))
    return (x / shift[..., None]).astype(jnp.float16), shift


def unit_scales(scales, kv_lengths):
    """Value scales `[B, Hkv, tokens]` over each (sequence, kv head)'s largest written one, so
    probabilities times them stay in [0, 1] as float16; returns (scales, the largest `[B, Hkv]`).
    Slots past a sequence's length (never written: any value) are zeroed."""
    written = jnp.arange(scales.shape[-1])[None, None, :] < kv_lengths[:, None, None]
    scales = jnp.where(written, scales, 0.0)
    top = jnp.max(jnp.abs(scales), axis=-1)
    top = jnp.where((top > 0) & jnp.isfinite(top), top, 1.0)
    return scales / top[..., None], top


def one_wave_splits(items: int, kv_heads: int, max_steps: int, config) -> int:
    """Splits of the grid's sequences (`config.num_splits` where set): one CUDA block fills an SM
    (the K/V ring takes most of its shared memory), so where the (sequence, kv head) pairs are
    fewer than the SMs the split fills them once, rounding down: rounding up (as the Triton
    kernel's several blocks per SM allow) would start a second wave of a few blocks that runs as
    long as the first (17 splits of 8 kv heads: 136 blocks on 132 SMs): `kernel.choose_splits` at
    one block per SM, rounding down."""
    from .kernel import choose_splits

    return choose_splits(items, kv_heads, max_steps, config, blocks_per_sm=1, round_down=True)


def mosaic_paged_decode(query, key_pages, value_pages, kv_lengths, page_table, *, scale: float, k_scale=None,
                        v_scale=None, config=None):
    """`kernel.paged_attention_kernel`'s decode outputs through `mosaic_decode`: out `[B, Hq, Dv]`
    (query dtype; zeros for a sequence without keys) and lse `[Hq, B]` float32. `config` (a
    `kernel.KernelConfig`): its `block_kv`, `num_stages` (the ring's slots), `int8_dots` (>= 1:
    K·Qᵀ on int8 tensor cores), `mosaic` (the consumer warpgroups: 1 or 2) and `num_splits` /
    `target_programs` as the Triton kernel reads them, the automatic split by `one_wave_splits`; as
    many persistent blocks as `target_programs` (default: one per SM) where the units outnumber
    them (BENCHMARKS.md "Persistent blocks": 9% faster for int8 pages at 64 x 4096)."""
    from .kernel import DECODE_CONFIG, merge_splits, target_programs

    config = config or DECODE_CONFIG
    block_kv = config.block_kv
    num_seqs, pages_per_seq = page_table.shape
    steps = -(-pages_per_seq * key_pages.shape[1] // block_kv)
    splits = one_wave_splits(num_seqs, key_pages.shape[2], steps, config)

    num_pages, ps, hkv, _ = key_pages.shape
    quant = key_pages.dtype in ONE_BYTE
    if quant:  # scalar scales become per token: the kernel reads one kind
        k_scale, v_scale = (jnp.broadcast_to(jnp.asarray(s, jnp.float32), (num_pages, ps, hkv))
                            for s in (k_scale, v_scale))
    quantized_qk = (config.int8_dots >= 1 if key_pages.dtype == jnp.int8
                    else key_pages.dtype == jnp.float8_e4m3fn and config.fp8_dots >= 1)
    consumers = max(1, config.mosaic)
    widener = (WIDENER_BY_DEFAULT and consumers == 1 and quantized_qk
               and widener_fits(query.shape[-1], query.shape[1] // hkv, block_kv, config.num_stages, True))
    out, lse = mosaic_decode(query, key_pages, value_pages, kv_lengths, page_table, k_scale, v_scale, scale=scale,
                             block_kv=block_kv, stages=config.num_stages, splits=splits, quantized_qk=quantized_qk,
                             widener=widener, consumers=consumers, ctas=target_programs(config, 1))
    out, lse = merge_splits(out, lse)
    return out.astype(query.dtype), lse.T
