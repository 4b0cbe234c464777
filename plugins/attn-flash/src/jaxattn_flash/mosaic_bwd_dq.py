"""The Mosaic GPU backward's dq kernel (`mosaic_bwd_kernels.py` has the spec, the dk/dv kernel
and the entry point `mosaic_backward`): one CUDA block per (batch, query head, 128 query rows);
for every key tile of the band, S = Q·Kᵀ and dP = dO·Vᵀ (issued together),
P = exp2(S·log2e·scale - lse₂), dS = P ∘ (dP - delta), dQ += dS·K. Each dq tile has one writer,
so it is bitwise deterministic; it serves `mosaic_dq="separate"` and head dims past 128
(with key tiles of 32 beside `mosaic_bwd_wide.py`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxattn.pallas_compat import smem_footprint

from ._compat import mosaic_gpu, mosaic_load
from .config import heavy_first
from .mosaic_barriers import CONSUMERS
from .mosaic_bwd_kernels import (
    BLOCK_ROWS,
    INPUTS,
    WG_ROWS,
    MosaicBwdSpec,
    _dlogits,
    _input_names,
    _optional_inputs,
    _probabilities,
    _scores_and_dp,
    _three_loops,
    kv_full_range,
    kv_tile_range,
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


def dq_smem_bytes(head_dim: int, value_head_dim: int, block_kv: int, stages: int, segments: bool,
                  itemsize: int = 2) -> int:
    """Shared memory of `mosaic_dq`'s scratch (its dict below, buffer by buffer; no cross-warp
    reductions), as Mosaic GPU's lowering lays it out: what `gpu_path` checks a config by."""
    bq, d, dv = WG_ROWS, head_dim, value_head_dim
    buffers = [CONSUMERS * bq * d * itemsize, CONSUMERS * bq * dv * itemsize, CONSUMERS * bq * 4,
               CONSUMERS * bq * 4, stages * block_kv * d * itemsize, stages * block_kv * dv * itemsize]
    barriers = 4 * CONSUMERS + 3 * stages
    if segments:  # a consumer's query ids, a ring of key tiles' ids
        ids, id_barriers = segment_smem(CONSUMERS, bq, block_kv, stages)
        buffers += ids
        barriers += id_barriers
    return smem_footprint(buffers, barriers, reductions=False)


def mosaic_dq(spec: MosaicBwdSpec, q, k, v, do, lse2, delta, kv_lens=None, q_seg=None, kv_seg=None):
    """dq `[B, Sq, Hq, D]` (Sq % 128 == 0, Skv % dq_block_kv == 0)."""
    plgpu = mosaic_gpu()
    b, sq, hq, d = q.shape
    _, skv, hkv, dv = v.shape
    group = hq // hkv
    bq, bk = WG_ROWS, spec.dq_block_kv
    nq, nk = sq // BLOCK_ROWS, skv // bk
    stages = max(1, min(spec.stages, nk))
    dtype = q.dtype
    reverse = heavy_first(spec.band_lo, spec.band_hi, spec.chunk)
    tile_layout = plgpu.Layout.WGMMA
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    col_layout = plgpu.Layout.WGMMA.reduce(0)
    widest = 128 if bk % 64 == 0 else 64  # dQ += dS·K contracts over the key tile

    names = _input_names(spec)

    def kernel(*refs, scratch):
        ins = dict(zip(names, refs))
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = (ins[n] for n in INPUTS)
        (dq_ref,) = refs[len(names):]
        q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem = (scratch[n] for n in ("q_dq", "do", "lse", "delta",
                                                                                     "k", "v"))
        q_bar, do_bar, lse_bar, delta_bar, k_bar, v_bar, free = (
            scratch[n] for n in ("q_bar", "do_bar", "lse_bar", "delta_bar", "k_bar", "v_bar", "free"))
        qseg_smem, qseg_bar, kseg_smem, kseg_bar = (scratch.get(n) for n in SEGMENT_SCRATCH)
        ranges = ins.get("seg_ranges")
        bi, hi = lax.axis_index("b"), lax.axis_index("h")
        ti, wg = lax.axis_index("q"), lax.axis_index("wg")
        qb = (nq - 1 - ti) if reverse else ti
        block_r0 = qb * BLOCK_ROWS
        kv_end = ins["kv_lens"][bi] if spec.kv_lengths else None
        lb, ub = clip_range(ranges, bi, qb, *kv_tile_range(spec, block_r0, BLOCK_ROWS, bk, nk, kv_end))

        @pl.when(wg < CONSUMERS)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            r0 = block_r0 + wg * bq
            rows = pl.ds(r0, bq)
            q_s, do_s = q_smem.at[wg], do_smem.at[wg]
            plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, hi], q_s, q_bar.at[wg])
            plgpu.copy_gmem_to_smem(do_ref.at[bi, rows, hi], do_s, do_bar.at[wg])
            plgpu.copy_gmem_to_smem(lse_ref.at[bi, hi, rows], lse_smem.at[wg], lse_bar.at[wg])
            plgpu.copy_gmem_to_smem(delta_ref.at[bi, hi, rows], delta_smem.at[wg], delta_bar.at[wg])
            for bar in (q_bar, do_bar, lse_bar, delta_bar):
                plgpu.barrier_wait(bar.at[wg])
            lse_row = mosaic_load(plgpu, lse_smem.at[wg], row_layout)
            delta_row = mosaic_load(plgpu, delta_smem.at[wg], row_layout)
            fs, fe = clip_full(ranges, bi, qb, ub, *kv_full_range(spec, r0, bk, lb, ub, kv_end))
            q_ids = None
            if spec.segments:
                q_ids = own_ids(plgpu, ins["q_seg"].at[bi, rows], qseg_smem.at[wg], qseg_bar.at[wg], row_layout)

            def step(ki, dq, *, masked):
                slot = lax.rem(ki, stages)
                plgpu.barrier_wait(k_bar.at[slot])
                plgpu.barrier_wait(v_bar.at[slot])
                k_ids = None
                if spec.segments:
                    k_ids = tile_ids(plgpu, kseg_smem.at[slot], kseg_bar.at[slot], masked, col_layout)

                s, dp = _scores_and_dp(plgpu, (q_s, k_smem.at[slot]), (do_s, v_smem.at[slot]), tile_layout)
                vis = None
                if masked:
                    i = plgpu.broadcasted_iota(jnp.int32, (bq, bk), 0, layout=tile_layout)
                    j = plgpu.broadcasted_iota(jnp.int32, (bq, bk), 1, layout=tile_layout)
                    vis = masked_by(visible(spec, i + r0, j + ki * bk, r0, kv_end), q_ids, k_ids, (bq, bk))
                p, cap = _probabilities(spec, s, lax.broadcast_in_dim(lse_row, s.shape, [0]), vis)
                ds = _dlogits(p, dp, lax.broadcast_in_dim(delta_row, s.shape, [0]), vis, cap)

                def dq_product(acc_ref):
                    plgpu.wgmma(acc_ref, ds.astype(dtype), k_smem.at[slot])

                dq = pl.run_state(dq_product)(plgpu.ACC.init(dq))
                plgpu.barrier_arrive(free.at[slot])
                return dq

            dq = plgpu.layout_cast(jnp.zeros((bq, d), jnp.float32), tile_layout)
            dq = _three_loops(lb, fs, fe, ub, step, dq)
            q_s[...] = (dq * spec.scale).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_s, dq_ref.at[bi, rows, hi])
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

        @pl.when(wg == CONSUMERS)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")
            kvh = lax.div(hi, jnp.int32(group))

            def load(tile):
                slot = lax.rem(tile, stages)
                keys = pl.ds(tile * bk, bk)
                plgpu.copy_gmem_to_smem(k_ref.at[bi, keys, kvh], k_smem.at[slot], k_bar.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[bi, keys, kvh], v_smem.at[slot], v_bar.at[slot])
                if spec.segments:
                    plgpu.copy_gmem_to_smem(ins["kv_seg"].at[bi, keys], kseg_smem.at[slot], kseg_bar.at[slot])

            for i in range(stages):
                pl.when(lb + i < ub)(functools.partial(load, lb + i))

            @pl.loop(lb, ub - stages)
            def _(ki):
                plgpu.barrier_wait(free.at[lax.rem(ki, stages)])
                load(ki + stages)

    scratch = {
        "q_dq": swizzled(plgpu, (CONSUMERS, bq, d), dtype, widest),  # Q, then dQ, of each consumer
        "do": swizzled(plgpu, (CONSUMERS, bq, dv), dtype, widest),
        "lse": plgpu.SMEM((CONSUMERS, bq), jnp.float32),
        "delta": plgpu.SMEM((CONSUMERS, bq), jnp.float32),
        "k": swizzled(plgpu, (stages, bk, d), dtype, widest),
        "v": swizzled(plgpu, (stages, bk, dv), dtype, widest),
        **{n: plgpu.Barrier(num_arrivals=1, num_barriers=CONSUMERS) for n in ("q_bar", "do_bar", "lse_bar",
                                                                             "delta_bar")},
        "k_bar": plgpu.Barrier(num_arrivals=1, num_barriers=stages),
        "v_bar": plgpu.Barrier(num_arrivals=1, num_barriers=stages),
        "free": plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),
        **(segment_scratch(plgpu, CONSUMERS, bq, bk, stages) if spec.segments else {}),
    }
    out_type = jax.ShapeDtypeStruct(q.shape, dtype)
    extra = _optional_inputs(spec, kv_lens, q_seg, kv_seg, BLOCK_ROWS, bk)
    return launch(plgpu, kernel, out_type, scratch, {"b": b, "h": hq, "q": nq})(q, k, v, do, lse2, delta, *extra)
