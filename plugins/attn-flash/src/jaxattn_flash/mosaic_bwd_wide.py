"""The dk/dv kernel of the Mosaic GPU backward at wide head dims (head_dim + value head_dim > 256:
256/256, MLA's 192/128), where dk and dv of one consumer's 64 keys (64 x (d + dv) float32) would
not fit in its registers.

FlashAttention-3's split, in Pallas's Mosaic GPU lowering: one CUDA block per (batch, key/value
head, 64 keys); K and V stay in shared memory for both consumer warpgroups, and consumer `w`
owns the w-th half of dK's columns and of dV's (at 256/256: 2 x 64 x 128 float32, 128 registers
per thread; at 192/128: 96 and 64 columns). For every query tile of 64 rows the producer
streams (Q, dO, lse₂, delta of every query head of the GQA group, as
`mosaic_bwd_kernels._dkdv`), and

* consumer `w` computes its half of the tile's logits, Sᵀ and dPᵀ for keys x queries
  [32 w, 32 w + 32) (wgmma N = 32), then Pᵀ and dSᵀ of that half;
* both consumers write their halves to shared memory and meet (named barrier 10), then each
  adds Pᵀ·dO and dSᵀ·Q over both halves into its columns of dV and dK (four products with
  K = 32), and meets the other again before the next tile overwrites the halves.

No logit is computed twice and no accumulator spills; the price is two barriers per tile.
dQ comes from the separate dq kernel (with key tiles of 32 at these head dims: its Q, dO and
the K/V ring then fit in shared memory). Masks, GQA, key/value lengths and segment ids as the
other kernels (each consumer reads the block's 64 key ids once; the producer streams each
query tile's ids, a consumer compares its half of them).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxattn.pallas_compat import smem_footprint

from ._compat import mosaic_gpu, mosaic_load
from .mosaic_barriers import CONSUMERS, consumers_sync
from .mosaic_bwd_kernels import (
    MosaicBwdSpec,
    _dlogits,
    _input_names,
    _optional_inputs,
    _probabilities,
    _scores_and_dp,
    dkdv_block_ids,
    q_full_range,
    q_tile_range,
    stream_query_tiles,
    sum_over_group,
)
from .mosaic_launch import launch, swizzled
from .mosaic_segments import (
    SEGMENT_SCRATCH,
    clip_full,
    clip_range,
    masked_by,
    own_ids,
    segment_scratch,
    segment_smem,
    tile_ids,
)
from .mosaic_tiles import visible

KEYS = 64  # keys per CUDA block: one wgmma M, shared by both consumers
HALF = 32  # queries of a tile whose logits one consumer computes


def mosaic_dkdv_wide(spec: MosaicBwdSpec, q, k, v, do, lse2, delta, kv_lens=None, q_seg=None, kv_seg=None):
    """(dk `[B, Skv, Hkv, D]`, dv `[B, Skv, Hkv, Dv]`) (Skv % 64 == 0, Sq % dkv_block_q == 0; each half of D
    and of Dv a multiple of 32: the products' 64-byte swizzle); `kv_lens` with
    `spec.kv_lengths`, segment ids `q_seg`/`kv_seg` (`[B, S]`) with `spec.segments`."""
    plgpu = mosaic_gpu()
    b, sq, hq, d = q.shape
    _, skv, hkv, dv_dim = v.shape
    group = hq // hkv
    bq = spec.dkv_block_q
    if bq != CONSUMERS * HALF:
        raise ValueError(f"mosaic_dkdv_wide: query tiles of {CONSUMERS * HALF} (two halves of {HALF}), got {bq}")
    nq = sq // bq
    cols, v_cols = d // CONSUMERS, dv_dim // CONSUMERS  # the dK / dV columns one consumer owns
    if cols % HALF or v_cols % HALF:
        raise ValueError(f"mosaic_dkdv_wide: each consumer's half of head dims {d}/{dv_dim} must be a multiple "
                         f"of {HALF} columns")
    dtype = q.dtype
    tile_layout = plgpu.Layout.WGMMA
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    col_layout = plgpu.Layout.WGMMA.reduce(0)
    stages = spec.stages
    names = _input_names(spec)

    def kernel(*refs, scratch):
        ins = dict(zip(names, refs))
        k_ref, v_ref = ins["k"], ins["v"]  # the producer streams the query side (stream_query_tiles)
        dk_ref, dv_ref = refs[len(names):]
        k_s, v_s, q_smem, do_smem, lse_smem, delta_smem, p_smem, ds_smem = (
            scratch[n] for n in ("k_dk", "v_dv", "q", "do", "lse", "delta", "p", "ds"))
        kv_bar, q_bar, do_bar, lse_bar, delta_bar, free = (
            scratch[n] for n in ("kv_bar", "q_bar", "do_bar", "lse_bar", "delta_bar", "free"))
        kseg_smem, kseg_bar, qseg_smem, qseg_bar = (scratch.get(n) for n in SEGMENT_SCRATCH)
        ranges = ins.get("seg_ranges")
        bi, kvh, kb = dkdv_block_ids(spec, skv // KEYS, hkv, b)
        wg = lax.axis_index("wg")
        c0 = kb * KEYS
        kv_end = ins["kv_lens"][bi] if spec.kv_lengths else None
        keys = pl.ds(c0, KEYS)
        lb, ub = clip_range(ranges, bi, kb, *q_tile_range(spec, c0, KEYS, bq, nq, kv_end))
        per_head = ub - lb

        def consumer(w: int):
            plgpu.set_max_registers(232, action="increase")

            if w == 0:  # one copy of K and V for both consumers
                plgpu.copy_gmem_to_smem(k_ref.at[bi, keys, kvh], k_s, kv_bar.at[0])
                plgpu.copy_gmem_to_smem(v_ref.at[bi, keys, kvh], v_s, kv_bar.at[1])

            plgpu.barrier_wait(kv_bar.at[0])
            plgpu.barrier_wait(kv_bar.at[1])
            fs, fe = clip_full(ranges, bi, kb, ub, *q_full_range(spec, c0, bq, lb, ub, kv_end))
            half = pl.ds(w * HALF, HALF)
            k_ids = None
            if spec.segments:  # each consumer its own copy of the block's key ids
                k_ids = own_ids(plgpu, ins["kv_seg"].at[bi, keys], kseg_smem.at[w], kseg_bar.at[w], row_layout)

            def step(qi, carry, *, gi, masked):
                dk, dv = carry
                slot = lax.rem(gi * per_head + (qi - lb), stages)
                for bar in (q_bar, do_bar, lse_bar, delta_bar):
                    plgpu.barrier_wait(bar.at[slot])
                q_ids = None
                if spec.segments:  # this consumer's half of the tile's query ids
                    q_ids = tile_ids(plgpu, qseg_smem.at[slot, half], qseg_bar.at[slot], masked, col_layout)
                # this consumer's half of the tile's queries: Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ (keys x 32)
                s, dp = _scores_and_dp(plgpu, (k_s, q_smem.at[slot, half]), (v_s, do_smem.at[slot, half]),
                                       tile_layout)
                lse_col = mosaic_load(plgpu, lse_smem.at[slot, half], col_layout)
                delta_col = mosaic_load(plgpu, delta_smem.at[slot, half], col_layout)
                vis = None
                if masked:
                    q0 = qi * bq + w * HALF
                    j = plgpu.broadcasted_iota(jnp.int32, (KEYS, HALF), 0, layout=tile_layout)
                    i = plgpu.broadcasted_iota(jnp.int32, (KEYS, HALF), 1, layout=tile_layout)
                    vis = masked_by(visible(spec, i + q0, j + c0, q0, kv_end), k_ids, q_ids, (KEYS, HALF))
                p, cap = _probabilities(spec, s, lax.broadcast_in_dim(lse_col, s.shape, [1]), vis)
                ds = _dlogits(p, dp, lax.broadcast_in_dim(delta_col, s.shape, [1]), vis, cap)
                consumers_sync(plgpu)  # the other consumer is done reading the previous tile's halves
                p_smem.at[w][...] = p.astype(dtype)
                ds_smem.at[w][...] = ds.astype(dtype)
                plgpu.commit_smem()
                consumers_sync(plgpu)  # both halves are written

                def accumulate(refs):
                    dv_ref, dk_ref = refs
                    for h in range(CONSUMERS):  # sum over the tile's two query halves
                        rows = pl.ds(h * HALF, HALF)
                        plgpu.wgmma(dv_ref, p_smem.at[h], do_smem.at[slot, rows, pl.ds(w * v_cols, v_cols)])
                        plgpu.wgmma(dk_ref, ds_smem.at[h], q_smem.at[slot, rows, pl.ds(w * cols, cols)])

                dv, dk = pl.run_state(accumulate)((plgpu.ACC.init(dv), plgpu.ACC.init(dk)))
                plgpu.barrier_arrive(free.at[slot])
                return dk, dv

            dk, dv = sum_over_group(plgpu, step, group, (lb, fs, fe, ub), (KEYS, cols), (KEYS, v_cols), tile_layout)
            consumers_sync(plgpu)  # both are done with K and V: their buffers take dK and dV
            k_s.at[:, pl.ds(w * cols, cols)][...] = (dk * spec.scale).astype(dtype)
            v_s.at[:, pl.ds(w * v_cols, v_cols)][...] = dv.astype(dtype)
            plgpu.commit_smem()
            consumers_sync(plgpu)  # both halves are in place: one copy each, of whole tiles (TMA takes
            # contiguous shared memory only)
            if w == 0:
                plgpu.copy_smem_to_gmem(k_s, dk_ref.at[bi, keys, kvh])
            else:
                plgpu.copy_smem_to_gmem(v_s, dv_ref.at[bi, keys, kvh])
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

        for w in range(CONSUMERS):  # static: `w` slices columns and query halves
            pl.when(wg == w)(functools.partial(consumer, w))

        @pl.when(wg == CONSUMERS)
        def _producer():
            ring = [(q_smem, q_bar), (do_smem, do_bar), (lse_smem, lse_bar), (delta_smem, delta_bar)]
            stream_query_tiles(plgpu, ins, ring + [(qseg_smem, qseg_bar)] * spec.segments, free, bi=bi, kvh=kvh,
                               group=group, lb=lb, per_head=per_head, bq=bq, stages=stages)

    scratch = {
        # 64-byte swizzles: the dK and dV products contract over a query half (32)
        "k_dk": swizzled(plgpu, (KEYS, d), dtype, 64),  # K, then dK (each consumer its columns)
        "v_dv": swizzled(plgpu, (KEYS, dv_dim), dtype, 64),  # V, then dV
        "q": swizzled(plgpu, (stages, bq, d), dtype, 64),
        "do": swizzled(plgpu, (stages, bq, dv_dim), dtype, 64),
        "lse": plgpu.SMEM((stages, bq), jnp.float32),
        "delta": plgpu.SMEM((stages, bq), jnp.float32),
        "p": swizzled(plgpu, (CONSUMERS, KEYS, HALF), dtype),  # Pᵀ of each query half
        "ds": swizzled(plgpu, (CONSUMERS, KEYS, HALF), dtype),  # dSᵀ of each query half
        "kv_bar": plgpu.Barrier(num_arrivals=1, num_barriers=2),  # K, V loaded
        **{n: plgpu.Barrier(num_arrivals=1, num_barriers=stages) for n in ("q_bar", "do_bar", "lse_bar",
                                                                          "delta_bar")},
        "free": plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),
        **(segment_scratch(plgpu, CONSUMERS, KEYS, bq, stages) if spec.segments else {}),
    }
    out_type = (jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype))
    extra = _optional_inputs(spec, kv_lens, q_seg, kv_seg, KEYS, bq, keys_major=True)
    grid = {"b": b, "h": hkv, "k": skv // KEYS}
    return launch(plgpu, kernel, out_type, scratch, grid)(q, k, v, do, lse2, delta, *extra)


def wide_smem_bytes(head_dim: int, value_head_dim: int, block_q: int, stages: int, itemsize: int = 2,
                    segments: bool = False) -> int:
    """Shared memory of `mosaic_dkdv_wide`'s scratch (its dict above, buffer by buffer; no
    cross-warp reductions), as Mosaic GPU's lowering lays it out: what `gpu_path` checks by."""
    d, dv = head_dim, value_head_dim
    buffers = [KEYS * d * itemsize, KEYS * dv * itemsize, stages * block_q * d * itemsize,
               stages * block_q * dv * itemsize, stages * block_q * 4, stages * block_q * 4,
               CONSUMERS * KEYS * HALF * itemsize, CONSUMERS * KEYS * HALF * itemsize]
    barriers = 2 + 5 * stages
    if segments:  # the block's key ids, a ring of query tiles' ids
        ids, id_barriers = segment_smem(CONSUMERS, KEYS, block_q, stages)
        buffers += ids
        barriers += id_barriers
    return smem_footprint(buffers, barriers, reductions=False)
