"""The dk/dv kernel of the Mosaic GPU backward at head_dim 256, where dk and dv of one
consumer's 64 keys (2 x 64 x 256 float32) would not fit in its registers.

FlashAttention-3's split, in Pallas's Mosaic GPU lowering: one CUDA block per (batch, key/value
head, 64 keys); K and V stay in shared memory for both consumer warpgroups, and consumer `w`
owns the columns [128 w, 128 w + 128) of dK and dV (2 x 64 x 128 float32: 128 registers per
thread). For every query tile of 64 rows the producer streams (Q, dO, lse₂, delta of every query
head of the GQA group, as `mosaic_bwd_kernels._dkdv`), and

* consumer `w` computes its half of the tile's logits, Sᵀ and dPᵀ for keys x queries
  [32 w, 32 w + 32) (wgmma N = 32), then Pᵀ and dSᵀ of that half;
* both consumers write their halves to shared memory and meet (named barrier 10), then each
  adds Pᵀ·dO and dSᵀ·Q over both halves into its columns of dV and dK (four products with
  K = 32), and meets the other again before the next tile overwrites the halves.

No logit is computed twice and no accumulator spills; the price is two barriers per tile.
dQ comes from the separate dq kernel (with key tiles of 32 at this head_dim: its Q, dO and
the K/V ring then fit in shared memory). Masks, GQA and key/value lengths as the other
kernels; segment ids are not taken here (the Triton backward serves them at head_dim 256).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ._compat import mosaic_gpu, mosaic_load
from .mosaic_bwd_kernels import (
    MosaicBwdSpec,
    _dlogits,
    _probabilities,
    _scores_and_dp,
    _three_loops,
    q_full_range,
    q_tile_range,
    stream_query_tiles,
)
from .mosaic_kernels import CONSUMERS, _consumers_sync, _swizzled, launch, visible

KEYS = 64  # keys per CUDA block: one wgmma M, shared by both consumers
HALF = 32  # queries of a tile whose logits one consumer computes


def mosaic_dkdv_wide(spec: MosaicBwdSpec, q, k, v, do, lse2, delta, kv_lens=None):
    """(dk, dv) `[B, Skv, Hkv, 256]` (Skv % 64 == 0, Sq % dkv_block_q == 0)."""
    plgpu = mosaic_gpu()
    b, sq, hq, d = q.shape
    _, skv, hkv, dv_dim = v.shape
    group = hq // hkv
    bq = spec.dkv_block_q
    if bq != CONSUMERS * HALF:
        raise ValueError(f"mosaic_dkdv_wide: query tiles of {CONSUMERS * HALF} (two halves of {HALF}), got {bq}")
    nq = sq // bq
    cols, v_cols = d // CONSUMERS, dv_dim // CONSUMERS  # the dK / dV columns one consumer owns
    dtype = q.dtype
    tile_layout = plgpu.Layout.WGMMA
    col_layout = plgpu.Layout.WGMMA.reduce(0)
    stages = spec.stages
    names = ["q", "k", "v", "do", "lse", "delta"] + ["kv_lens"] * spec.kv_lengths

    def kernel(*refs):
        ins = dict(zip(names, refs))
        k_ref, v_ref = ins["k"], ins["v"]  # the producer streams the query side (stream_query_tiles)
        (dk_ref, dv_ref, k_s, v_s, q_smem, do_smem, lse_smem, delta_smem, p_smem, ds_smem,
         kv_bar, q_bar, do_bar, lse_bar, delta_bar, free) = refs[len(names):]
        bi, kvh = lax.axis_index("b"), lax.axis_index("h")
        c0, wg = lax.axis_index("k") * KEYS, lax.axis_index("wg")
        kv_end = ins["kv_lens"][bi] if spec.kv_lengths else None
        keys = pl.ds(c0, KEYS)
        lb, ub = q_tile_range(spec, c0, KEYS, bq, nq, kv_end)
        per_head = ub - lb

        def consumer(w: int):
            plgpu.set_max_registers(232, action="increase")

            if w == 0:  # one copy of K and V for both consumers
                plgpu.copy_gmem_to_smem(k_ref.at[bi, keys, kvh], k_s, kv_bar.at[0])
                plgpu.copy_gmem_to_smem(v_ref.at[bi, keys, kvh], v_s, kv_bar.at[1])

            plgpu.barrier_wait(kv_bar.at[0])
            plgpu.barrier_wait(kv_bar.at[1])
            fs, fe = q_full_range(spec, c0, bq, lb, ub, kv_end)
            half = pl.ds(w * HALF, HALF)

            def step(qi, carry, *, gi, masked):
                dk, dv = carry
                slot = lax.rem(gi * per_head + (qi - lb), stages)
                for bar in (q_bar, do_bar, lse_bar, delta_bar):
                    plgpu.barrier_wait(bar.at[slot])
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
                    vis = visible(spec, i + q0, j + c0, q0, kv_end)
                p, cap = _probabilities(spec, s, lax.broadcast_in_dim(lse_col, s.shape, [1]), vis)
                ds = _dlogits(p, dp, lax.broadcast_in_dim(delta_col, s.shape, [1]), vis, cap)
                _consumers_sync(plgpu)  # the other consumer is done reading the previous tile's halves
                p_smem.at[w][...] = p.astype(dtype)
                ds_smem.at[w][...] = ds.astype(dtype)
                plgpu.commit_smem()
                _consumers_sync(plgpu)  # both halves are written

                def accumulate(refs):
                    dv_ref, dk_ref = refs
                    for h in range(CONSUMERS):  # sum over the tile's two query halves
                        rows = pl.ds(h * HALF, HALF)
                        plgpu.wgmma(dv_ref, p_smem.at[h], do_smem.at[slot, rows, pl.ds(w * v_cols, v_cols)])
                        plgpu.wgmma(dk_ref, ds_smem.at[h], q_smem.at[slot, rows, pl.ds(w * cols, cols)])

                dv, dk = pl.run_state(accumulate)((plgpu.ACC.init(dv), plgpu.ACC.init(dk)))
                plgpu.barrier_arrive(free.at[slot])
                return dk, dv

            def head(gi, carry):
                return _three_loops(lb, fs, fe, ub, functools.partial(step, gi=gi), carry)

            dk = plgpu.layout_cast(jnp.zeros((KEYS, cols), jnp.float32), tile_layout)
            dv = plgpu.layout_cast(jnp.zeros((KEYS, v_cols), jnp.float32), tile_layout)
            dk, dv = lax.fori_loop(0, group, head, (dk, dv))
            _consumers_sync(plgpu)  # both are done with K and V: their buffers take dK and dV
            k_s.at[:, pl.ds(w * cols, cols)][...] = (dk * spec.scale).astype(dtype)
            v_s.at[:, pl.ds(w * v_cols, v_cols)][...] = dv.astype(dtype)
            plgpu.commit_smem()
            _consumers_sync(plgpu)  # both halves are in place: one copy each, of whole tiles (TMA takes
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
            stream_query_tiles(plgpu, ins, ring, free, bi=bi, kvh=kvh, group=group, lb=lb, per_head=per_head,
                               bq=bq, stages=stages)

    scratch = (
        # 64-byte swizzles: the dK and dV products contract over a query half (32)
        _swizzled(plgpu, (KEYS, d), dtype, 64),  # K, then dK (each consumer its columns)
        _swizzled(plgpu, (KEYS, dv_dim), dtype, 64),  # V, then dV
        _swizzled(plgpu, (stages, bq, d), dtype, 64),
        _swizzled(plgpu, (stages, bq, dv_dim), dtype, 64),
        plgpu.SMEM((stages, bq), jnp.float32),
        plgpu.SMEM((stages, bq), jnp.float32),
        _swizzled(plgpu, (CONSUMERS, KEYS, HALF), dtype),  # Pᵀ of each query half
        _swizzled(plgpu, (CONSUMERS, KEYS, HALF), dtype),  # dSᵀ of each query half
        plgpu.Barrier(num_arrivals=1, num_barriers=2),  # K, V loaded
        *[plgpu.Barrier(num_arrivals=1, num_barriers=stages)] * 4,
        plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),
    )
    out_type = (jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype))
    extra = [kv_lens.astype(jnp.int32)] if spec.kv_lengths else []
    grid = {"b": b, "h": hkv, "k": skv // KEYS}
    return launch(plgpu, kernel, out_type, scratch, grid)(q, k, v, do, lse2, delta, *extra)


def wide_smem_bytes(head_dim: int, value_head_dim: int, block_q: int, stages: int, itemsize: int = 2) -> int:
    """Shared memory of `mosaic_dkdv_wide`'s tiles (barriers apart)."""
    kv = KEYS * (head_dim + value_head_dim)
    ring = stages * block_q * (head_dim + value_head_dim)
    halves = 2 * CONSUMERS * KEYS * HALF
    return itemsize * (kv + ring + halves) + 2 * stages * block_q * 4
