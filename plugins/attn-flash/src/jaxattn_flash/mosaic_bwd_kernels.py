"""The Hopper backward kernels: dq and dk/dv in Pallas's Mosaic GPU lowering (wgmma, TMA,
warp specialization); by default dq is made inside the dk/dv kernel (`MosaicBwdSpec.fused_dq`).

Both kernels have the shape of the forward (`mosaic_kernels.py`): one producer warpgroup
streams tiles through a ring of `stages` shared-memory slots with TMA, two consumer
warpgroups (64 rows each, one wgmma M) run the matrix products with float32 accumulators
in registers, and a static band `band_lo <= j - i <= band_hi` (and a chunk, as the forward's,
per-batch key lengths and segment ids, `mosaic_segments.py`) limits every block to the tiles
that hold a visible pair, applying the mask only on the partial tiles.

* dq (`mosaic_bwd_dq.py`), one CUDA block per (batch, query head, 128 query rows): for every key tile,
  S = Q·Kᵀ and dP = dO·Vᵀ (issued together), P = exp2(S·log2e·scale - lse₂),
  dS = P ∘ (dP - delta), dQ += dS·K.
* dk/dv, one CUDA block per (batch, key/value head, 128 key rows): K and V stay in shared
  memory; the producer streams Q, dO, lse₂ and delta of every query head of the GQA group
  and every query tile of the band, so dk/dv of a K/V head sum over its group in
  registers (nothing repeated, no reduction afterwards): Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ,
  Pᵀ, dSᵀ as above, dV += Pᵀ·dO, dK += dSᵀ·Q.
* fused dQ (FlashAttention-3's): the dk/dv kernel also stores dSᵀ in shared memory (wgmma
  reads a transposed A only from there) and adds dSᵀ·K into a zero-initialised float32 dq
  with a TMA reduction per tile pair: 5 matrix products per pair instead of 7 and no dq
  kernel, but float32 sums in arrival order (not bitwise deterministic; the dq kernel, where
  each output tile has one writer, is). The buffer is a mutable ref (`jax.new_ref`, which exists only
  under jit) that the kernel closes over and adds into in place; its other inputs are plain
  operands and dk, dv plain outputs.

The inputs follow the Triton backward's conventions (`triton_vjp._flash_bwd`): lse₂ is
the lse in base 2, +inf on rows without keys (every probability 0), NaN on a row that
saw a non-finite logit (its gradients are NaN; masked tiles zero P and dS of the pairs the
band removes, so nothing reaches a key the row does not see); delta = rowsum(dO ∘ O) -
dlse; values finite. A logit soft-cap c multiplies dS by 1 - tanh²(s/c).

Measured on an H200 (BENCHMARKS.md, "Mosaic GPU backward"): the forward's ping-pong (consumers
taking turns on the tensor cores) costs 8-13% here, and computing dSᵀ while the dV product runs
gains nothing; the dq key tile (64/128) and 2 or 3 stages are level.

The dk/dv grid may launch in passes (`MosaicBwdSpec.passes`, `launch_order.py`: every
(batch, kv head)'s heavy key blocks before the light ones); measured on an H200 it gains in the
wide kernel (causal GQA at head_dim 256: +6%) and not in this one, so only the wide one takes
it by default (`config.mosaic_dkv_passes`).

The accumulators live in registers: dk + dv of 64 rows take 2·64·D/128 registers per
thread, so head_dim 256 does not fit here: `mosaic_bwd_wide.py` splits their columns between
the consumers instead, and dq comes from the dq kernel with key tiles of 32.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxattn.pallas_compat import smem_footprint

from ._compat import gmem_ref, mosaic_gpu, mosaic_load, ref_transpose
from .config import WIDE_DQ_BLOCK_KV, wide_backward
from .launch_order import clustered_ids, launch_order
from .mosaic_barriers import CONSUMERS
from .mosaic_exp2 import check_degree, split_exp2
from .mosaic_kernels import LOG2E
from .mosaic_launch import launch, launch_closing_over_refs, swizzled
from .mosaic_segments import (
    SEGMENT_SCRATCH,
    clip_full,
    clip_range,
    masked_by,
    own_ids,
    segment_scratch,
    segment_smem,
    segment_tile_ranges,
    tile_ids,
)
from .mosaic_tiles import _cdiv, _div, _i32, full_key_tiles, key_tiles, visible

WG_ROWS = 64  # rows of one consumer warpgroup (one wgmma M)
BLOCK_ROWS = CONSUMERS * WG_ROWS  # rows of one CUDA block, both kernels


@dataclass(frozen=True)
class MosaicBwdSpec:
    """Static facts of one call of the Mosaic backward (hashable)."""

    scale: float
    band_lo: int | None
    band_hi: int | None
    soft_cap: float | None = None
    dq_block_kv: int = 64  # key tile of the dq kernel
    dkv_block_q: int = 64  # query tile of the dk/dv kernel
    stages: int = 2
    # dQ inside the dk/dv kernel (FlashAttention-3's way: 5 products per tile pair, not 7),
    # summed over key blocks by TMA reductions into float32, so not bitwise deterministic:
    # None: the separate dq kernel; "split": the two consumers share dS through shared memory
    # and each adds half of dQ's columns; "own": each adds its own keys' share of all columns.
    fused_dq: str | None = None
    chunk: int | None = None  # chunked causal, as `MosaicSpec`
    chunk_offset: int = 0
    # per-batch key/value lengths (an int32 [B] input): keys past them are masked, their dk/dv
    # zero. Query lengths need nothing here: rows past them are dead (lse -inf, so P = 0).
    kv_lengths: bool = False
    segments: bool = False  # query and key segment ids (int32 [B, S] inputs), as `MosaicSpec`
    # launch passes of the dk/dv grid (`launch_order.py`): > 1 launches every (batch, kv head)'s
    # heavy key blocks first, so the launch does not end on them (causal GQA)
    passes: int = 1
    cluster: int = 0  # > 1: launch this many (batch, kv head) groups at a time, heavy blocks first
    # > 0: one exp2 of P in every this many on the FMA pipe (`mosaic_exp2`, flushed below 2^-125
    # as MUFU's is), by a polynomial of degree poly_degree; the forward's split, here untimed
    poly_exp2: int = 0
    poly_degree: int = 3

    def __post_init__(self) -> None:
        if self.poly_exp2 < 0:
            raise ValueError(f"MosaicBwdSpec: poly_exp2 must be >= 0, got {self.poly_exp2}")
        check_degree("MosaicBwdSpec", self.poly_degree)


def _probabilities(spec: MosaicBwdSpec, s, lse2, vis):
    """(P, the soft-cap factor 1 - tanh² or None) of raw logits `s` whose rows' lse₂ is broadcast."""
    t = None
    if spec.soft_cap is not None:
        t = jnp.tanh(s * (spec.scale / spec.soft_cap))
        z = t * (spec.soft_cap * LOG2E)
    else:
        z = s * (spec.scale * LOG2E)
    if spec.poly_exp2:  # z - lse2 <= 0 where visible, -inf on rows without keys: flushed to 0
        p = split_exp2(mosaic_gpu(), z - lse2, spec.poly_exp2, degree=spec.poly_degree, flush=True)
    else:
        p = jnp.exp2(z - lse2)
    if vis is not None:
        p = jnp.where(vis, p, 0.0)
    return p, (None if t is None else 1.0 - t * t)


def _scores_and_dp(plgpu, s_operands, dp_operands, layout):
    """(A·Bᵀ of `s_operands`, of `dp_operands`): S and dP of one tile pair (or their transposes),
    issued together so that one wait covers both; float32 in `layout`."""
    (s_lhs, s_rhs), (dp_lhs, dp_rhs) = s_operands, dp_operands
    shape = (s_lhs.shape[0], s_rhs.shape[0])

    def products(refs):
        s_ref, dp_ref = refs
        plgpu.wgmma(s_ref, s_lhs, ref_transpose(plgpu, s_rhs))
        plgpu.wgmma(dp_ref, dp_lhs, ref_transpose(plgpu, dp_rhs))

    zeros = plgpu.layout_cast(jnp.zeros(shape, jnp.float32), layout)
    return pl.run_state(products)((plgpu.ACC.init(zeros), plgpu.ACC.init(zeros)))


def _dlogits(p, dp, delta, vis, cap_factor):
    ds = p * (dp - delta)
    if cap_factor is not None:
        ds = ds * cap_factor
    if vis is not None:  # a NaN row's delta would reach the keys it does not see
        ds = jnp.where(vis, ds, 0.0)
    return ds


def q_tile_range(spec: MosaicBwdSpec, c0, rows: int, block_q: int, num_q_tiles: int, kv_end=None):
    """Query tiles [lb, ub) that hold a visible pair for key rows [c0, c0 + rows) (keys before
    `kv_end`: none when they start at or past it)."""
    lb, ub = _i32(0), _i32(num_q_tiles)
    last = _i32(c0 + rows - 1)  # the last key
    if kv_end is not None:
        last = jnp.minimum(last, kv_end - 1)
    if spec.band_hi is not None:  # i >= j - band_hi
        lb = _div(c0 - spec.band_hi, block_q)
    if spec.band_lo is not None:  # i <= j - band_lo
        ub = jnp.minimum(ub, _cdiv(last + 1 - spec.band_lo, block_q))
    if spec.chunk is not None:  # i + chunk_offset < the end of the last key's chunk
        end = (_div(last, spec.chunk) + 1) * spec.chunk
        ub = jnp.minimum(ub, _cdiv(end - spec.chunk_offset, block_q))
    if kv_end is not None:
        ub = jnp.where(c0 < kv_end, ub, 0)
    lb = jnp.minimum(lb, ub)
    return lb, ub


def q_full_range(spec: MosaicBwdSpec, c, block_q: int, lb, ub, kv_end=None):
    """Of [lb, ub), the query tiles fully visible for key rows [c, c + WG_ROWS) (none when one
    of them is at or past `kv_end`)."""
    fs, fe = lb, ub
    if spec.band_hi is not None:
        fs = jnp.maximum(fs, _cdiv(c + WG_ROWS - 1 - spec.band_hi, block_q))
    if spec.band_lo is not None:
        fe = jnp.minimum(fe, _div(c - spec.band_lo + 1, block_q))
    fs = jnp.minimum(fs, ub)
    if spec.chunk is not None:  # full only where all keys share one chunk, for the queries inside it
        first, last = _div(c, spec.chunk), _div(c + WG_ROWS - 1, spec.chunk)
        fe = jnp.where(first == last,
                       jnp.minimum(fe, _div((first + 1) * spec.chunk - spec.chunk_offset, block_q)), fs)
    if kv_end is not None:
        fe = jnp.where(c + WG_ROWS <= kv_end, fe, fs)
    return fs, jnp.maximum(fe, fs)


def kv_tile_range(spec: MosaicBwdSpec, r0, rows: int, block_kv: int, num_kv_tiles: int, kv_end=None):
    """Key tiles [lb, ub) that hold a visible pair for query rows [r0, r0 + rows) (keys before `kv_end`)."""
    return key_tiles(spec, r0, rows, block_kv, num_kv_tiles, kv_end)


def kv_full_range(spec: MosaicBwdSpec, r, block_kv: int, lb, ub, kv_end=None):
    """Of [lb, ub), the key tiles fully visible for query rows [r, r + WG_ROWS) (keys before `kv_end`)."""
    return full_key_tiles(spec, r, WG_ROWS, block_kv, lb, ub, kv_end)


def dkdv_block_ids(spec: MosaicBwdSpec, num_key_blocks: int, num_kv_heads: int, batch: int):
    """(batch row, kv head, key block) of this CUDA block of a dk/dv grid {"b", "h", "k"}. CUDA
    launches it key block fastest (Pallas reverses the grid), then head, then batch: the linear
    order `launch_order` remaps into `spec.passes` passes, or `clustered_ids` into clusters of
    `spec.cluster` (batch, kv head) groups (neither: the grid's own ids)."""
    kb, kvh, bi = lax.axis_index("k"), lax.axis_index("h"), lax.axis_index("b")
    if spec.cluster > 1:
        kb, bi, kvh = clustered_ids(kb, bi, kvh, num_key_blocks, batch, num_kv_heads, spec.cluster)
        return bi, kvh, kb
    kb, kvh, bi = launch_order(kb, kvh, bi, num_key_blocks, num_kv_heads, batch, spec.passes)
    return bi, kvh, kb


def _three_loops(lb, fs, fe, ub, step, carry):
    """`step(i, carry, masked=...)` over [lb, fs) masked, [fs, fe) unmasked, [fe, ub) masked."""
    carry = lax.fori_loop(lb, fs, functools.partial(step, masked=True), carry)
    carry = lax.fori_loop(fs, fe, functools.partial(step, masked=False), carry)
    return lax.fori_loop(fe, ub, functools.partial(step, masked=True), carry)


def sum_over_group(plgpu, step, group: int, tiles, dk_shape, dv_shape, layout):
    """(dk, dv) of one consumer's keys: float32 accumulators of `dk_shape`/`dv_shape` carried
    through `step(qi, (dk, dv), gi=..., masked=...)` over the query tiles `tiles` = (lb, fs, fe,
    ub) (`_three_loops`) of each of the GQA group's query heads."""
    def head(gi, carry):
        return _three_loops(*tiles, functools.partial(step, gi=gi), carry)

    dk = plgpu.layout_cast(jnp.zeros(dk_shape, jnp.float32), layout)
    dv = plgpu.layout_cast(jnp.zeros(dv_shape, jnp.float32), layout)
    return lax.fori_loop(0, group, head, (dk, dv))


# -- inputs of both kernels ----------------------------------------------------------------------


INPUTS = ("q", "k", "v", "do", "lse", "delta")


def _input_names(spec: MosaicBwdSpec) -> list[str]:
    """The kernels' inputs in order: the fixed ones, then the optional ones `spec` asks for."""
    return [*INPUTS] + ["kv_lens"] * spec.kv_lengths + ["q_seg", "kv_seg", "seg_ranges"] * spec.segments


def _optional_inputs(spec: MosaicBwdSpec, kv_lens, q_seg, kv_seg, row_block: int, col_block: int,
                     *, keys_major: bool = False) -> list:
    """The arrays of `_input_names`' optional inputs; the segment tile ranges are per block of
    `row_block` queries over tiles of `col_block` keys (the other way round if `keys_major`)."""
    extra = [kv_lens.astype(jnp.int32)] if spec.kv_lengths else []
    if spec.segments:
        q_seg, kv_seg = q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)
        rows, cols = (kv_seg, q_seg) if keys_major else (q_seg, kv_seg)
        extra += [q_seg, kv_seg, segment_tile_ranges(rows, cols, row_block, col_block)]
    return extra


# -- dk, dv ---------------------------------------------------------------------------------------


def stream_query_tiles(plgpu, ins, ring, free, *, bi, kvh, group: int, lb, per_head, bq: int, stages: int) -> None:
    """The producer warpgroup of a dk/dv kernel: for t in [0, group * per_head), query tile
    `lb + t % per_head` of query head `kvh * group + t // per_head` into ring slot t % stages:
    Q, dO, lse₂, delta and, where `ring` holds a fifth (buffer, barrier) pair, the tile's segment
    ids (`ins` names the inputs). Slot reuse waits on `free`, which both consumers arrive on."""
    plgpu.set_max_registers(40, action="decrease")
    total = group * per_head

    def load(t):
        slot = lax.rem(t, stages)
        h = kvh * group + lax.div(t, jnp.maximum(per_head, 1))
        rows = pl.ds((lb + lax.rem(t, jnp.maximum(per_head, 1))) * bq, bq)
        sources = [ins["q"].at[bi, rows, h], ins["do"].at[bi, rows, h], ins["lse"].at[bi, h, rows],
                   ins["delta"].at[bi, h, rows]]
        if len(ring) > len(sources):
            sources.append(ins["q_seg"].at[bi, rows])
        for src, (buf, bar) in zip(sources, ring, strict=True):
            plgpu.copy_gmem_to_smem(src, buf.at[slot], bar.at[slot])

    for i in range(stages):
        pl.when(i < total)(functools.partial(load, _i32(i)))

    @pl.loop(0, total - stages)
    def _(t):
        plgpu.barrier_wait(free.at[lax.rem(t, stages)])
        load(t + stages)


def mosaic_dkdv(spec: MosaicBwdSpec, q, k, v, do, lse2, delta, kv_lens=None, q_seg=None, kv_seg=None):
    """(dk, dv) `[B, Skv, Hkv, D]` (Skv % 128 == 0, Sq % dkv_block_q == 0); with `spec.fused_dq`,
    (dq, dk, dv): dq summed into a float32 buffer by TMA reductions (see `MosaicBwdSpec`)."""
    extra = _optional_inputs(spec, kv_lens, q_seg, kv_seg, BLOCK_ROWS, spec.dkv_block_q, keys_major=True)
    if spec.fused_dq:
        return _fused(spec, q, k, v, do, lse2, delta, *extra)
    return _dkdv(spec, q, k, v, do, lse2, delta, *extra)


def _fused(spec: MosaicBwdSpec, *args):
    """The fused form: jitted (its dq buffer is a mutable ref, which exists only under jit), and
    under vmap the mapped axis joins the batch axis (the kernel that closes over the buffer has no batching rule)."""

    @jax.custom_batching.custom_vmap
    def run(*args):
        return _dkdv_jit(spec, *args)

    @run.def_vmap
    def _batched(axis_size, in_batched, *args):
        args = [x if batched else jnp.broadcast_to(x, (axis_size, *x.shape)) for x, batched in zip(args, in_batched)]
        outs = run(*(x.reshape(axis_size * x.shape[1], *x.shape[2:]) for x in args))
        return tuple(o.reshape(axis_size, -1, *o.shape[1:]) for o in outs), (True,) * len(outs)

    return run(*args)


def dkdv_smem_bytes(head_dim: int, value_head_dim: int, stages: int, fused: str | None, segments: bool,
                    itemsize: int = 2) -> int:
    """Shared memory of `_dkdv`'s scratch (its dict below, buffer by buffer; no cross-warp
    reductions), as Mosaic GPU's lowering lays it out: what `gpu_path` checks a config by."""
    bk, bq = WG_ROWS, 64  # keys of a consumer, queries of a tile (`MosaicBwdSpec.dkv_block_q`)
    d, dv = head_dim, value_head_dim
    buffers = [CONSUMERS * bk * d * itemsize, CONSUMERS * bk * dv * itemsize, stages * bq * d * itemsize,
               stages * bq * dv * itemsize, stages * bq * 4, stages * bq * 4]
    barriers = 2 * CONSUMERS + 5 * stages
    if segments:  # a consumer's key ids, a ring of query tiles' ids
        ids, id_barriers = segment_smem(CONSUMERS, bk, bq, stages)
        buffers += ids
        barriers += id_barriers
    if fused:  # dSᵀ two tiles deep, the float32 dQ part each consumer adds
        dq_cols = d // CONSUMERS if fused == "split" else d
        buffers += [2 * CONSUMERS * bk * bq * itemsize, CONSUMERS * bq * dq_cols * 4]
        barriers += 2 + 1
    return smem_footprint(buffers, barriers, reductions=False)


def _dkdv(spec: MosaicBwdSpec, q, k, v, do, lse2, delta, *extra):
    """The dk/dv kernel on `_input_names(spec)`' arrays (`extra`: the optional ones)."""
    plgpu = mosaic_gpu()
    b, sq, hq, d = q.shape
    _, skv, hkv, dv_dim = v.shape
    group = hq // hkv
    bk, bq = WG_ROWS, spec.dkv_block_q
    nkb, nq = skv // BLOCK_ROWS, sq // bq
    dtype = q.dtype
    tile_layout = plgpu.Layout.WGMMA
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    col_layout = plgpu.Layout.WGMMA.reduce(0)
    fused = spec.fused_dq
    dq_cols = d // CONSUMERS if fused == "split" else d  # dq columns one consumer adds per tile
    stages = spec.stages

    names = _input_names(spec)

    def kernel(*refs, scratch, dq_ref=None):
        ins = dict(zip(names, refs))
        k_ref, v_ref = ins["k"], ins["v"]  # the producer streams the query side (stream_query_tiles)
        dk_ref, dv_ref = refs[len(names):]
        k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem = (
            scratch[n] for n in ("k_dk", "v_dv", "q", "do", "lse", "delta"))
        k_bar, v_bar, q_bar, do_bar, lse_bar, delta_bar, free = (
            scratch[n] for n in ("k_bar", "v_bar", "q_bar", "do_bar", "lse_bar", "delta_bar", "free"))
        kseg_smem, kseg_bar, qseg_smem, qseg_bar = (scratch.get(n) for n in SEGMENT_SCRATCH)
        ds_smem, dq_smem, ds_bar, k_done = (scratch.get(n) for n in ("ds", "dq", "ds_bar", "k_done"))
        ranges = ins.get("seg_ranges")
        bi, kvh, kb = dkdv_block_ids(spec, nkb, hkv, b)
        wg = lax.axis_index("wg")
        c0 = kb * BLOCK_ROWS
        kv_end = ins["kv_lens"][bi] if spec.kv_lengths else None
        lb, ub = clip_range(ranges, bi, kb, *q_tile_range(spec, c0, BLOCK_ROWS, bq, nq, kv_end))
        per_head = ub - lb

        def share_ds(w, t, ds16):
            """dSᵀ of this consumer into shared memory (wgmma reads a transposed A only there);
            returns the (dSᵀ part, K part) pairs whose products sum to its share of dQ."""
            buf = lax.rem(t, 2)
            ds_smem.at[buf, wg][...] = ds16
            plgpu.commit_smem()
            if fused == "split":  # both halves of dS are needed: the other consumer's too
                plgpu.barrier_arrive(ds_bar.at[buf])
                others = [wg * 0 + w2 for w2 in range(CONSUMERS)]  # traced: Mosaic indexes refs by values
                return buf, [(ds_smem.at[buf, w2], k_smem.at[w2, :, pl.ds(w * dq_cols, dq_cols)]) for w2 in others]
            return buf, [(ds_smem.at[buf, wg], k_smem.at[wg])]

        def dq_product(acc_ref, buf, parts):
            if fused == "split":
                plgpu.barrier_wait(ds_bar.at[buf])
            for ds_part, k_part in parts:
                plgpu.wgmma(acc_ref, ref_transpose(plgpu, ds_part), k_part)

        def add_dq(w, qi, gi, dq):
            """Sum this consumer's share of query tile `qi`'s dQ (group head `gi`) into dq_ref."""
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's sum has read dq_smem
            dq_smem.at[wg][...] = dq
            plgpu.commit_smem()
            cols = pl.ds(w * dq_cols, dq_cols) if fused == "split" else pl.ds(0, d)
            plgpu.copy_smem_to_gmem(dq_smem.at[wg], dq_ref.at[bi, pl.ds(qi * bq, bq), kvh * group + gi, cols],
                                    reduction_op="add")

        def consumer(w):
            plgpu.set_max_registers(232, action="increase")
            c = c0 + w * bk
            keys = pl.ds(c, bk)
            k_s, v_s = k_smem.at[wg], v_smem.at[wg]
            plgpu.copy_gmem_to_smem(k_ref.at[bi, keys, kvh], k_s, k_bar.at[wg])
            plgpu.copy_gmem_to_smem(v_ref.at[bi, keys, kvh], v_s, v_bar.at[wg])
            plgpu.barrier_wait(k_bar.at[wg])
            plgpu.barrier_wait(v_bar.at[wg])
            fs, fe = clip_full(ranges, bi, kb, ub, *q_full_range(spec, c, bq, lb, ub, kv_end))
            k_ids = None
            if spec.segments:
                k_ids = own_ids(plgpu, ins["kv_seg"].at[bi, keys], kseg_smem.at[wg], kseg_bar.at[wg], row_layout)

            def step(qi, carry, *, gi, masked):
                dk, dv = carry
                t = gi * per_head + (qi - lb)
                slot = lax.rem(t, stages)
                for bar in (q_bar, do_bar, lse_bar, delta_bar):
                    plgpu.barrier_wait(bar.at[slot])
                q_ids = None
                if spec.segments:
                    q_ids = tile_ids(plgpu, qseg_smem.at[slot], qseg_bar.at[slot], masked, col_layout)

                s, dp = _scores_and_dp(plgpu, (k_s, q_smem.at[slot]), (v_s, do_smem.at[slot]), tile_layout)
                lse_col = mosaic_load(plgpu, lse_smem.at[slot], col_layout)
                delta_col = mosaic_load(plgpu, delta_smem.at[slot], col_layout)
                vis = None
                if masked:
                    j = plgpu.broadcasted_iota(jnp.int32, (bk, bq), 0, layout=tile_layout)
                    i = plgpu.broadcasted_iota(jnp.int32, (bk, bq), 1, layout=tile_layout)
                    vis = masked_by(visible(spec, i + qi * bq, j + c, qi * bq, kv_end), k_ids, q_ids, (bk, bq))
                p, cap = _probabilities(spec, s, lax.broadcast_in_dim(lse_col, s.shape, [1]), vis)
                ds = _dlogits(p, dp, lax.broadcast_in_dim(delta_col, s.shape, [1]), vis, cap)
                ds16 = ds.astype(dtype)
                if fused:
                    buf, parts = share_ds(w, t, ds16)

                def accumulate(refs):
                    dv_ref, dk_ref, *dq_ref = refs
                    plgpu.wgmma(dv_ref, p.astype(dtype), do_smem.at[slot])
                    plgpu.wgmma(dk_ref, ds16, q_smem.at[slot])
                    if fused:
                        dq_product(dq_ref[0], buf, parts)

                accs = [plgpu.ACC.init(dv), plgpu.ACC.init(dk)]
                if fused:
                    accs.append(plgpu.ACC.init(plgpu.layout_cast(jnp.zeros((bq, dq_cols), jnp.float32), tile_layout)))
                dv, dk, *dq = pl.run_state(accumulate)(tuple(accs))
                plgpu.barrier_arrive(free.at[slot])
                if fused:
                    add_dq(w, qi, gi, dq[0])
                return dk, dv

            dk, dv = sum_over_group(plgpu, step, group, (lb, fs, fe, ub), (bk, d), (bk, dv_dim), tile_layout)
            if fused == "split":  # the other consumer's last dQ product reads this K
                plgpu.barrier_arrive(k_done)
                plgpu.barrier_wait(k_done)
            k_s[...] = (dk * spec.scale).astype(dtype)
            v_s[...] = dv.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_s, dk_ref.at[bi, keys, kvh], commit_group=False)
            plgpu.copy_smem_to_gmem(v_s, dv_ref.at[bi, keys, kvh], commit_group=False)
            plgpu.commit_smem_to_gmem_group()
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

        if fused == "split":  # the consumer's index `w` is static: it slices K's columns
            for w in range(CONSUMERS):
                pl.when(wg == w)(functools.partial(consumer, w))
        else:
            pl.when(wg < CONSUMERS)(functools.partial(consumer, wg))

        @pl.when(wg == CONSUMERS)
        def _producer():
            ring = [(q_smem, q_bar), (do_smem, do_bar), (lse_smem, lse_bar), (delta_smem, delta_bar)]
            stream_query_tiles(plgpu, ins, ring + [(qseg_smem, qseg_bar)] * spec.segments, free, bi=bi, kvh=kvh,
                               group=group, lb=lb, per_head=per_head, bq=bq, stages=stages)

    scratch = {
        "k_dk": swizzled(plgpu, (CONSUMERS, bk, d), dtype),  # K, then dK, of each consumer
        "v_dv": swizzled(plgpu, (CONSUMERS, bk, dv_dim), dtype),  # V, then dV
        "q": swizzled(plgpu, (stages, bq, d), dtype),
        "do": swizzled(plgpu, (stages, bq, dv_dim), dtype),
        "lse": plgpu.SMEM((stages, bq), jnp.float32),
        "delta": plgpu.SMEM((stages, bq), jnp.float32),
        "k_bar": plgpu.Barrier(num_arrivals=1, num_barriers=CONSUMERS),
        "v_bar": plgpu.Barrier(num_arrivals=1, num_barriers=CONSUMERS),
        **{n: plgpu.Barrier(num_arrivals=1, num_barriers=stages) for n in ("q_bar", "do_bar", "lse_bar",
                                                                          "delta_bar")},
        "free": plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),
        **(segment_scratch(plgpu, CONSUMERS, bk, bq, stages) if spec.segments else {}),
    }
    grid = {"b": b, "h": hkv, "k": nkb}
    out_type = (jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype))
    args = (q, k, v, do, lse2, delta, *extra)
    if not fused:
        return launch(plgpu, kernel, out_type, scratch, grid)(*args)
    scratch.update({
        "ds": swizzled(plgpu, (2, CONSUMERS, bk, bq), dtype),  # dSᵀ of each consumer, two tiles deep
        "dq": swizzled(plgpu, (CONSUMERS, bq, dq_cols), jnp.float32),  # the dQ part a consumer adds
        "ds_bar": plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=2),  # both halves of dS are stored
        "k_done": plgpu.Barrier(num_arrivals=CONSUMERS),  # both consumers are done with K
    })
    # Only dq is a mutable ref (zeros the TMA reductions add into), closed over by the kernel; the
    # inputs stay plain operands and dk, dv plain outputs: a ref of every input (the earlier form)
    # cost copies, 2% of fwd+bwd at (4, 4096, 32/8, 128) on an H200 (BENCHMARKS.md).
    dq_sum = gmem_ref(plgpu, jnp.zeros(q.shape, jnp.float32))
    with_dq = functools.partial(kernel, dq_ref=dq_sum)
    dk, dv = launch_closing_over_refs(plgpu, with_dq, out_type, scratch, grid)(*args)
    return (dq_sum[...] * spec.scale).astype(dtype), dk, dv


_dkdv_jit = jax.jit(_dkdv, static_argnums=0)


def _dq_kernel():
    """`mosaic_bwd_dq.mosaic_dq` (its module imports this one's spec and helpers)."""
    from .mosaic_bwd_dq import mosaic_dq

    return mosaic_dq


def mosaic_backward(spec: MosaicBwdSpec, q, k, v, do, lse2, delta, kv_lens=None, q_seg=None, kv_seg=None):
    """(dq, dk, dv) of unpadded q/k/v (see the module docstring for lse₂ and delta); `kv_lens`
    (int32 `[B]`) with `spec.kv_lengths`, segment ids `q_seg`/`kv_seg` (`[B, S]`) with `spec.segments`."""
    if wide_backward(q.shape[-1], v.shape[-1]):  # dk and dv by column halves; dq from its own kernel
        from .mosaic_bwd_wide import mosaic_dkdv_wide

        if spec.fused_dq or spec.dq_block_kv != WIDE_DQ_BLOCK_KV:
            raise ValueError(f"the Mosaic backward at head dims {q.shape[-1]}/{v.shape[-1]} takes the separate dq "
                             f"kernel with key tiles of {WIDE_DQ_BLOCK_KV}; got {spec}")
        dq = _dq_kernel()(spec, q, k, v, do, lse2, delta, kv_lens, q_seg, kv_seg)
        return (dq, *mosaic_dkdv_wide(spec, q, k, v, do, lse2, delta, kv_lens, q_seg, kv_seg))
    if spec.fused_dq:
        return mosaic_dkdv(spec, q, k, v, do, lse2, delta, kv_lens, q_seg, kv_seg)
    dq = _dq_kernel()(spec, q, k, v, do, lse2, delta, kv_lens, q_seg, kv_seg)
    dk, dv = mosaic_dkdv(spec, q, k, v, do, lse2, delta, kv_lens, q_seg, kv_seg)
    return dq, dk, dv
