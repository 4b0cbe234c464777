"""The Hopper forward kernel: Pallas with the Mosaic GPU lowering (wgmma, TMA, warp specialization).

Imported on a GPU path that chose it (`gpu_path.py` decides) and by the CPU tests that lower it for CUDA.

One CUDA block serves `2 * block_q` query rows of one (batch, query head) with three
warpgroups:

* warpgroup 2, the producer, gives up registers (`setmaxnreg` 40) and streams the key and
  value tiles of the block's key range into a ring of `stages` shared-memory slots with
  the bulk tensor copy engine (TMA), one mbarrier per slot for "loaded" and one for
  "free"; K/V head `h // group` is read in place (native GQA, nothing repeated);
* warpgroups 0 and 1, the consumers (`setmaxnreg` 232), each own `block_q` rows: Q is
  copied once into shared memory, then for every key tile S = Q·Kᵀ and O += P·V run as
  `wgmma` with float32 accumulators in registers, the online softmax in base 2 between.

Ping-pong (as FlashAttention-3 does it): two named hardware barriers (ids 8 and 9; Mosaic
uses 0-4) order the consumers so that one warpgroup's softmax runs while the other's
matrix products occupy the tensor cores. Each consumer, per tile: issues its Q·Kᵀ, lets
the other warpgroup go (`bar.arrive` on the other's barrier), finishes its softmax, waits
for its turn (`bar.sync` on its own barrier), issues P·V. Warpgroup 1 starts with one
wait, warpgroup 0 ends with one extra arrive, so both see the same count. (FlashAttention-3's
other form, tile ki + 1's Q·Kᵀ issued before tile ki's softmax in the same warpgroup instead of the
ping-pong, was slower on an H200: flash BENCHMARKS.md, 2026-12-03.)

Masks: a static band `band_lo <= j - i <= band_hi` (full attention: no band; causal with
any offset, q_len != kv_len; sliding windows), and chunked causal (`chunk`: query i sees the
keys of chunk (i + chunk_offset) // chunk up to the band; chunks of at least 64, so a tile's
queries straddle at most one chunk boundary). The block visits only the key tiles
that hold a visible pair for one of its rows; inside that range each consumer runs the
tiles that are fully visible for its rows without any mask arithmetic, and applies the
band only on its partial tiles (both consumers visit the same tiles: they share the
K/V slots). The running max starts at a finite floor and masked logits are -inf, so a
row with no visible key keeps l = 0 and gives out 0, lse -inf; a NaN sum (a non-finite
logit the row sees) propagates.

Non-finite values (`guard_values`, where a mask can hide a key): `p @ v` with p = 0 on a
masked key would carry a NaN value into every row of its tile. The guarded form of a block: on the
tiles its mask cuts (the ones outside the block's fully visible range), the consumers stop
ping-ponging and clean the value tile in shared memory together (each its 64-key chunks:
non-finite entries zeroed, the keys that held one written to a small per-stage array), meet on
named barrier 10, and mark the rows that see a marked key; those rows are NaN at the end. On the
fully visible tiles a non-finite value reaches every row, as it must, with no work. Which blocks
take the guarded form is `guard_form` (`GUARD_FORMS`; the flash plugin's BENCHMARKS.md, "The value
guard as a retry", has the measurements):

* "retry" (the default): every block runs unguarded first. A masked key's non-finite value can
  only make rows NaN, so where none of the block's output is non-finite that output stands; the
  consumers test theirs, and one `bar.red.or` across the block's three warpgroups
  (`mosaic_barriers.block_any`) tells all of them whether to run the block again, guarded (the
  producer streams the tiles a second time). Clean calls pay a test of the output in registers,
  nothing else; a block whose rows see a NaN runs twice.
* "flags": one flag per (batch row, kv head) from a read of the values before the kernel; each
  block reads its flag and takes one of the two forms (a pass over v: 6-8% of a head_dim 64 call).
* "every block": all blocks guarded, no pass (slower: the cleaning sits on the consumers' path;
  three other in-kernel forms measured slower too, BENCHMARKS.md "The value guard in the kernel").

A logit soft-cap c replaces the scaled logits by c·tanh(s·scale/c) (one tanh per logit). Such
logits lie within ±c, so where exp2 of ±c·log2(e) summed over the keys stays far inside float32
and bfloat16 (`bounded_logits`, config.softcap_without_max), p = exp2(logit) needs no running max:
no row max, no rescale of the accumulator (tokamax's SM90 kernel skips it the same way); a
sink logit per query head joins each row's normalizer after the loop, as in the Triton
forward (a row without keys stays out 0, lse -inf).

Per-batch sequence lengths (`q_lengths`, `kv_lengths`: int32 `[B]`, read as scalars in the
kernel) stop a block's key range at the row's last key (that tile becomes a partial one) and
make rows past the query length zeros with lse -inf. Segment ids (`segments`) cut the ranges
by the bounds `mosaic_segments.py` computes from the ids and compare them on partial tiles;
the producer streams each key tile's ids beside it.

The lse (natural log, `[B, Hq, Sq]`, float32) is what the backward kernels read; a forward-only
call that does not return it goes without (`lse=False`: no log, no second TMA store per block).
The arrays' sequence lengths must be multiples of the tiles (`gpu_path.py` checks).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ._compat import mosaic_gpu, mosaic_load, ref_transpose
from .config import MOSAIC_VALUE_GUARD, MOSAIC_VALUE_GUARDS, heavy_first
from .launch_order import clustered_ids
from .mosaic_barriers import CONSUMERS, block_any, consumers_sync, named_barrier
from .mosaic_exp2 import check_degree, split_exp2
from .mosaic_launch import launch, swizzled
from .mosaic_segments import (
    SEGMENT_SCRATCH,
    clip_full,
    clip_range,
    masked_by,
    own_ids,
    segment_scratch,
    segment_tile_ranges,
    tile_ids,
)
from .mosaic_tiles import full_key_tiles, key_tiles, visible

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
M_FLOOR = -1e30  # initial running max (log2 units): finite, below any real logit
GUARD_KEYS, GUARD_COLS = 64, 128  # the value guard cleans a tile in chunks of this many keys x columns
GUARD_FORMS = MOSAIC_VALUE_GUARDS  # MosaicSpec.guard_form: which blocks clean (the module docstring says each)


@dataclass(frozen=True)
class MosaicSpec:
    """Static facts of one call of the Mosaic kernel (hashable)."""

    scale: float
    band_lo: int | None
    band_hi: int | None
    block_q: int = 64  # rows per consumer warpgroup (one wgmma M of 64)
    block_kv: int = 128
    stages: int = 2
    pingpong: bool = True
    fence: bool = False  # optimization barrier after the softmax (config.mosaic_fence: shape-dependent, H200)
    soft_cap: float | None = None  # logits c·tanh(s/c)
    sinks: bool = False  # one sink logit per query head joins each row's normalizer
    guard_values: bool = False  # keep non-finite values of masked keys from the rows that do not see them
    guard_form: str = MOSAIC_VALUE_GUARD  # which blocks clean (GUARD_FORMS): "retry", "flags" or "every block"
    chunk: int | None = None  # chunked causal: query i sees keys of chunk (i + chunk_offset) // chunk only
    chunk_offset: int = 0
    q_lengths: bool = False  # per-batch query lengths: rows past them give zeros and lse -inf
    kv_lengths: bool = False  # per-batch key/value lengths: keys past them are masked
    segments: bool = False  # query and key segment ids: a query sees the keys of its own segment only
    cluster: int = 0  # > 1: launch this many (batch, head) groups at a time, heavy blocks first (launch_order)
    bounded_logits: bool = False  # soft-capped logits bound exp2: no running max (config.softcap_without_max)
    poly_exp2: int = 0  # > 0 (bounded logits only): one exp2 in every this many on the FMA pipe (mosaic_exp2)
    poly_degree: int = 3  # of that exp2's polynomial: 3 or 2 (mosaic_exp2.POLYNOMIALS)
    lse: bool = True  # False: no lse output: forward-only calls that do not return it (1-2% on an H200)
    early_vote: bool = False  # the retry's vote on the output tile itself (no row max first) while
    # the O store is in flight, its wait after the vote (the guard's per-block cost; untimed)

    def __post_init__(self) -> None:
        if self.guard_form not in GUARD_FORMS:
            raise ValueError(f"MosaicSpec: guard_form must be one of {sorted(GUARD_FORMS)}, got {self.guard_form!r}")
        if self.bounded_logits and self.soft_cap is None:  # only a cap bounds the logits
            raise ValueError("MosaicSpec: bounded_logits=True needs a soft_cap")
        if self.poly_exp2 < 0 or (self.poly_exp2 and not self.bounded_logits):  # its 2^z needs |z| <= 125
            raise ValueError(f"MosaicSpec: poly_exp2 must be 0, or > 0 with bounded_logits, got {self.poly_exp2}")
        check_degree("MosaicSpec", self.poly_degree)

    @property
    def rows(self) -> int:
        return CONSUMERS * self.block_q


def block_range(spec: MosaicSpec, r0, num_kv_tiles: int, kv_end=None):
    """Key tiles [lb, ub) that hold a visible pair for the block's rows [r0, r0 + rows) (keys before `kv_end`)."""
    return key_tiles(spec, r0, spec.rows, spec.block_kv, num_kv_tiles, kv_end)


def full_range(spec: MosaicSpec, r0, lb, ub, rows: int | None = None, kv_end=None):
    """Of [lb, ub), the tiles [fs, fe) fully visible for rows [r0, r0 + rows) (default: block_q),
    keys before `kv_end`."""
    return full_key_tiles(spec, r0, spec.block_q if rows is None else rows, spec.block_kv, lb, ub, kv_end)


def mosaic_forward(spec: MosaicSpec, q, k, v, sinks=None, q_lens=None, kv_lens=None, q_seg=None, kv_seg=None,
                   bad_keys=None):
    """q `[B, Sq, Hq, D]`, k `[B, Skv, Hkv, D]`, v `[B, Skv, Hkv, Dv]` (bf16/fp16, Sq % rows == 0,
    Skv % block_kv == 0), sinks `[Hq]` when `spec.sinks`, int32 `[B]` lengths when
    `spec.q_lengths`/`spec.kv_lengths`, segment ids `[B, Sq]`/`[B, Skv]` when `spec.segments`;
    `bad_keys` (bool `[B, Skv, Hkv]`, `value_guard.bad_keys(v)`, where the caller has it already)
    saves the "flags" form its own read of v (the other forms read none)
    -> (out `[B, Sq, Hq, Dv]`, lse `[B, Hq, Sq]` natural log, -inf on rows without keys; None
    where `spec.lse` is False)."""
    plgpu = mosaic_gpu()
    b, sq, hq, d = q.shape
    _, skv, hkv, dv = v.shape
    group = hq // hkv
    bq, bk = spec.block_q, spec.block_kv
    rows = spec.rows
    nq, nk = sq // rows, skv // bk
    stages = max(1, min(spec.stages, nk))
    dtype = q.dtype
    c = spec.scale * LOG2E
    # causal-like bands: later query blocks have more keys; start them first
    reverse = heavy_first(spec.band_lo, spec.band_hi, spec.chunk)
    wgmma_layout = plgpu.Layout.WGMMA
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    col_layout = plgpu.Layout.WGMMA.reduce(0)
    guard = spec.guard_values
    own_out = dv != d  # O (value head_dim) has its own buffer; else it overwrites Q's

    names = (["q", "k", "v"] + ["sinks"] * spec.sinks + ["q_lens"] * spec.q_lengths + ["kv_lens"] * spec.kv_lengths
             + ["q_seg", "kv_seg", "seg_ranges"] * spec.segments + ["v_dirty"] * (guard and spec.guard_form == "flags"))

    def kernel(*refs, scratch):
        ins = dict(zip(names, refs))
        q_ref, k_ref, v_ref, sink_ref = ins["q"], ins["k"], ins["v"], ins.get("sinks")
        o_ref, *lse_out = refs[len(names):]
        lse_ref = lse_out[0] if spec.lse else None
        qo_smem, k_smem, v_smem, lse_smem = (scratch[n] for n in ("q_o", "k", "v", "lse"))
        q_bar, k_bar, v_bar, k_free, v_free = (scratch[n] for n in ("q_bar", "k_bar", "v_bar", "k_free", "v_free"))
        o_smem = scratch.get("o", qo_smem)  # O where it does not fit Q's buffer
        bad_smem = scratch.get("cleaned")
        qseg_smem, qseg_bar, kseg_smem, kseg_bar = (scratch.get(n) for n in SEGMENT_SCRATCH)
        ranges = ins.get("seg_ranges")
        bi, hi, ti = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("q")
        if spec.cluster > 1:  # clusters of (batch, head) groups, each query block index across them first
            ti, bi, hi = clustered_ids(ti, bi, hi, nq, b, hq, spec.cluster)
        wg = lax.axis_index("wg")
        qi = (nq - 1 - ti) if reverse else ti
        block_r0 = qi * rows
        kv_end = ins["kv_lens"][bi] if spec.kv_lengths else None  # this batch row's lengths
        q_end = ins["q_lens"][bi] if spec.q_lengths else None
        lb, ub = clip_range(ranges, bi, qi, *block_range(spec, block_r0, nk, kv_end))
        if q_end is not None:  # a block past the queries visits nothing
            ub = jnp.where(block_r0 < q_end, ub, lb)

        @pl.when(wg < CONSUMERS)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            r0 = block_r0 + wg * bq
            qo = qo_smem.at[wg]
            plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(r0, bq), hi], qo, q_bar.at[wg])
            q_ids = None
            if spec.segments:  # this consumer's rows' segment ids
                q_ids = own_ids(plgpu, ins["q_seg"].at[bi, pl.ds(r0, bq)], qseg_smem.at[wg], qseg_bar.at[wg],
                                row_layout)
            plgpu.barrier_wait(q_bar.at[wg])

            def clean_values(slot, ok, seen):
                """Zero the non-finite values of this tile in place (each consumer its 64-key chunks),
                then mark the rows that see one of them: `p @ v` with p = 0 on a masked key must not
                turn a NaN value into a NaN row."""
                for c in range(bk // GUARD_KEYS):
                    @pl.when(wg == c % CONSUMERS)
                    def _(c=c):
                        bad = None
                        for d0 in range(0, dv, GUARD_COLS):
                            cols = pl.ds(d0, min(GUARD_COLS, dv - d0))
                            part = v_smem.at[slot, pl.ds(c * GUARD_KEYS, GUARD_KEYS), cols]
                            x = mosaic_load(plgpu, part, wgmma_layout)
                            finite = (x - x) == 0  # false for NaN and +-inf
                            part[...] = jnp.where(finite, x, jnp.zeros_like(x))
                            worst = jnp.where(finite, jnp.float32(0.0), jnp.float32(1.0)).max(axis=1)
                            bad = worst if bad is None else jnp.maximum(bad, worst)
                        bad_smem.at[slot, pl.ds(c * GUARD_KEYS, GUARD_KEYS)][...] = bad
                plgpu.commit_smem()  # visible to the tensor cores and to this warpgroup
                consumers_sync(plgpu)  # and to the other consumer
                bad_keys = mosaic_load(plgpu, bad_smem.at[slot], col_layout)
                hit = jnp.where(ok, lax.broadcast_in_dim(bad_keys, (bq, bk), [1]), 0.0).max(axis=1)
                return jnp.maximum(seen, hit)

            def key_ids(slot, masked):
                """The segment ids of the key tile in `slot` (None without segment ids or on a full tile)."""
                if not spec.segments:
                    return None
                return tile_ids(plgpu, kseg_smem.at[slot], kseg_bar.at[slot], masked, col_layout)

            def band(ki, k_ids):
                """Which (row, key) pairs of key tile `ki` this consumer's rows see."""
                i = plgpu.broadcasted_iota(jnp.int32, (bq, bk), 0, layout=wgmma_layout)
                j = plgpu.broadcasted_iota(jnp.int32, (bq, bk), 1, layout=wgmma_layout)
                return masked_by(visible(spec, i + r0, j + ki * bk, r0, kv_end), q_ids, k_ids, (bq, bk))

            def softmax(s, ok, acc, m, l):
                """One key tile's logits `s` (float32, `ok`: the mask where the tile is cut) into the
                online softmax: (acc rescaled, new running max, new row sums, probabilities in the
                inputs' dtype for P·V)."""
                if spec.soft_cap is None:  # scale after the max: one multiply per row, an FMA per logit
                    if ok is not None:
                        s = jnp.where(ok, s, -jnp.inf)
                    m_new = jnp.maximum(m, s.max(axis=1) * c)
                    p = jnp.exp2(s * c - lax.broadcast_in_dim(m_new, s.shape, [0]))
                else:  # logits in log2 units: c·tanh(s·scale/c)·log2(e)
                    t = jnp.tanh(s * (spec.scale / spec.soft_cap))
                    if spec.poly_exp2:  # bounded too; its 2^-inf is not 0, so the mask goes on p
                        m_new, p = m, split_exp2(plgpu, t, spec.poly_exp2, spec.soft_cap * LOG2E,
                                                         spec.poly_degree)
                        p = p if ok is None else jnp.where(ok, p, 0.0)
                    else:
                        z = t * (spec.soft_cap * LOG2E)
                        if ok is not None:
                            z = jnp.where(ok, z, -jnp.inf)
                        if spec.bounded_logits:  # |z| <= c·log2(e): exp2(z) neither overflows nor flushes
                            m_new, p = m, jnp.exp2(z)
                        else:
                            m_new = jnp.maximum(m, z.max(axis=1))
                            p = jnp.exp2(z - lax.broadcast_in_dim(m_new, z.shape, [0]))
                if spec.bounded_logits:  # the max stays 0: nothing to rescale
                    l = l + p.sum(axis=1)
                else:
                    alpha = jnp.exp2(m - m_new)
                    l = l * alpha + p.sum(axis=1)
                    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                p16 = p.astype(dtype)
                if spec.fence:
                    acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
                return acc, m_new, l, p16

            def step(ki, carry, *, masked, pingpong, guarded=False):
                acc, m, l, seen = carry
                slot = lax.rem(ki, stages)
                k_ids = key_ids(slot, masked)

                def qk(s_ref):
                    plgpu.wgmma(s_ref, qo, ref_transpose(plgpu, k_smem.at[slot]))
                    if pingpong:
                        named_barrier(plgpu, "arrive", own=False)
                    return s_ref[...]

                s = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                ok = band(ki, k_ids) if masked else None
                acc, m_new, l, p16 = softmax(s, ok, acc, m, l)
                plgpu.barrier_wait(v_bar.at[slot])
                if guarded:
                    seen = clean_values(slot, ok, seen)
                elif pingpong:
                    named_barrier(plgpu, "sync", own=True)

                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, p16, v_smem.at[slot])

                    @pl.when(ki + 1 < ub)
                    def _():
                        plgpu.barrier_wait(k_bar.at[lax.rem(ki + 1, stages)])

                acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l, seen

            def write_rows(acc, m, l, seen, wait=True):
                """This consumer's rows: out = acc / l (zeros where no key is seen or past the query
                length, NaN where a cleaned value was seen), and the lse; `wait`: for their stores'
                reads of shared memory before returning."""
                live = l != 0.0  # a NaN sum (a non-finite logit the row sees) counts: it propagates
                real = None
                if q_end is not None:  # rows past the query length: zeros, lse -inf
                    real = plgpu.broadcasted_iota(jnp.int32, (bq,), 0, layout=row_layout) + r0 < q_end
                    live = live & real
                if sink_ref is not None:  # the sink joins the normalizer of rows with keys (as Triton)
                    plgpu.copy_gmem_to_smem(sink_ref.at[hi], lse_smem.at[wg], q_bar.at[wg])
                    plgpu.barrier_wait(q_bar.at[wg])
                    sink = mosaic_load(plgpu, lse_smem.at[wg], row_layout)
                    m_all = jnp.maximum(m, sink)
                    corr = jnp.exp2(m - m_all)
                    l = l * corr + jnp.exp2(sink - m_all)
                    acc = acc * lax.broadcast_in_dim(corr, acc.shape, [0])
                    m = m_all
                l_safe = jnp.where(live, l, 1.0)
                inv = jnp.where(live, 1.0 / l_safe, 0.0)
                out = acc * lax.broadcast_in_dim(inv, acc.shape, [0])
                if seen is not None:
                    out = jnp.where(lax.broadcast_in_dim(seen, acc.shape, [0]) > 0, jnp.float32(jnp.nan), out)
                if real is not None:
                    out = jnp.where(lax.broadcast_in_dim(real, acc.shape, [0]), out, 0.0)
                o = o_smem.at[wg]
                o[...] = out.astype(dtype)
                if lse_ref is not None:
                    lse_smem.at[wg][...] = jnp.where(live, m * LN2 + jnp.log(l_safe), -jnp.inf)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o, o_ref.at[bi, pl.ds(r0, bq), hi])
                if lse_ref is not None:
                    plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[bi, hi, pl.ds(r0, bq)])
                if wait:
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                return out

            def initial_state(guarded):
                """(acc, running max, row sums, and for a guarded block the rows that see a non-finite
                value in a cleaned tile (1.0), made NaN at the end; else None)."""
                acc = plgpu.layout_cast(jnp.zeros((bq, dv), jnp.float32), wgmma_layout)
                m = plgpu.layout_cast(jnp.full((bq,), 0.0 if spec.bounded_logits else M_FLOOR, jnp.float32),
                                      row_layout)
                l = plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), row_layout)
                seen = plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), row_layout) if guarded else None
                return acc, m, l, seen

            def attend(guarded, wait=True):
                """The block's key tiles, then `write_rows` (its float32 output). `guarded`: clean the
                value tiles the mask cuts (both consumers the same tiles, so the full range is the block's)."""
                @pl.when(ub > lb)
                def _():
                    plgpu.barrier_wait(k_bar.at[lax.rem(lb, stages)])

                if guarded:
                    fs, fe = full_range(spec, block_r0, lb, ub, spec.rows, kv_end)
                else:
                    fs, fe = full_range(spec, r0, lb, ub, kv_end=kv_end)
                fs, fe = clip_full(ranges, bi, qi, ub, fs, fe)
                acc, m, l, seen = initial_state(guarded)
                # Ping-pong pairs the consumers' steps; guarded steps (partial tiles whose values are
                # cleaned) run side by side instead: both consumers wait for each other's cleaning.
                pp = spec.pingpong
                edge = functools.partial(step, masked=True, pingpong=pp and not guarded, guarded=guarded)
                if pp and not guarded:
                    pl.when(wg == 1)(lambda: named_barrier(plgpu, "sync", own=True))
                carry = lax.fori_loop(lb, fs, edge, (acc, m, l, seen))
                if pp and guarded:
                    pl.when(wg == 1)(lambda: named_barrier(plgpu, "sync", own=True))
                carry = lax.fori_loop(fs, fe, functools.partial(step, masked=False, pingpong=pp), carry)
                if pp and guarded:
                    pl.when(wg == 0)(lambda: named_barrier(plgpu, "arrive", own=False))
                acc, m, l, seen = lax.fori_loop(fe, ub, edge, carry)
                if pp and not guarded:
                    pl.when(wg == 0)(lambda: named_barrier(plgpu, "arrive", own=False))
                return write_rows(acc, m, l, seen, wait)

            if guard and spec.guard_form == "flags":  # the guarded form only where this batch row and kv head hold one
                dirty = ins["v_dirty"][bi * hkv + lax.div(hi, jnp.int32(group))] != 0

                @pl.when(dirty)
                def _():
                    attend(True)

                @pl.when(jnp.logical_not(dirty))
                def _():
                    attend(False)
            elif guard and spec.guard_form == "retry":
                out = attend(False, wait=not spec.early_vote)
                # a masked key's non-finite value can only have made rows NaN: where no row of the
                # block is, the output stands; else the block runs again, guarded
                # (not `(out - out) == 0`: out is a product, and the compiler's fused multiply-add
                # leaves that product's rounding error in the difference)
                worst = jnp.where(jnp.abs(out) < jnp.inf, jnp.float32(0.0), jnp.float32(1.0))
                if spec.early_vote:  # block_any ORs every register of the tile itself
                    vote = block_any(plgpu, worst, wgmma_layout)
                else:
                    vote = block_any(plgpu, worst.max(axis=1), row_layout)

                @pl.when(vote != 0)
                def _():
                    plgpu.wait_smem_to_gmem(0)  # the first pass's rows are written before these
                    if not own_out:  # O took Q's buffer
                        plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(r0, bq), hi], qo, q_bar.at[wg])
                        plgpu.barrier_wait(q_bar.at[wg])
                    attend(True)

                if spec.early_vote:  # the first pass's stores, read out of shared memory before the block ends
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            else:
                attend(guard)

        @pl.when(wg == CONSUMERS)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")
            kvh = lax.div(hi, jnp.int32(group))

            def load(ref, smem, bar, tile, slot):
                plgpu.copy_gmem_to_smem(ref.at[bi, pl.ds(tile * bk, bk), kvh], smem.at[slot], bar.at[slot])
                if spec.segments and ref is k_ref:  # the key tile's segment ids ride with it
                    plgpu.copy_gmem_to_smem(ins["kv_seg"].at[bi, pl.ds(tile * bk, bk)], kseg_smem.at[slot],
                                            kseg_bar.at[slot])

            def stream():
                """The block's key and value tiles, through the ring of `stages` slots."""
                for i in range(stages):
                    tile = lb + i

                    @pl.when(tile < ub)
                    def _(tile=tile):
                        slot = lax.rem(tile, stages)
                        load(k_ref, k_smem, k_bar, tile, slot)
                        load(v_ref, v_smem, v_bar, tile, slot)

                @pl.loop(lb, ub - stages)
                def _(ki):
                    slot = lax.rem(ki, stages)
                    plgpu.barrier_wait(k_free.at[slot])
                    load(k_ref, k_smem, k_bar, ki + stages, slot)
                    plgpu.barrier_wait(v_free.at[slot])
                    load(v_ref, v_smem, v_bar, ki + stages, slot)

            stream()
            if guard and spec.guard_form == "retry":  # the consumers' verdict: stream the tiles again?
                @pl.when(block_any(plgpu) != 0)
                def _():
                    @pl.loop(jnp.maximum(lb, ub - stages), ub)  # the slots' last frees, not waited for yet
                    def _(ki):
                        plgpu.barrier_wait(k_free.at[lax.rem(ki, stages)])
                        plgpu.barrier_wait(v_free.at[lax.rem(ki, stages)])

                    stream()

    # each row's sink logit in log2 units, a row of block_q per head (TMA-loaded like the lse)
    sink_rows = [] if not spec.sinks else [
        jnp.broadcast_to((sinks.astype(jnp.float32) * LOG2E)[:, None], (hq, bq))]
    scratch = {
        "q_o": swizzled(plgpu, (CONSUMERS, bq, d), dtype),  # Q, then O (when dv == d), of each consumer
        "k": swizzled(plgpu, (stages, bk, d), dtype),
        "v": swizzled(plgpu, (stages, bk, dv), dtype),
        "lse": plgpu.SMEM((CONSUMERS, bq), jnp.float32),
        "q_bar": plgpu.Barrier(num_arrivals=1, num_barriers=CONSUMERS),
        "k_bar": plgpu.Barrier(num_arrivals=1, num_barriers=stages),
        "v_bar": plgpu.Barrier(num_arrivals=1, num_barriers=stages),
        "k_free": plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),
        "v_free": plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),
    }
    if own_out:
        scratch["o"] = swizzled(plgpu, (CONSUMERS, bq, dv), dtype)  # O of each consumer
    if guard:
        scratch["cleaned"] = plgpu.SMEM((stages, bk), jnp.float32)  # which keys of a tile were cleaned
    if spec.segments:  # ids of each consumer's rows and of the key tiles
        scratch.update(segment_scratch(plgpu, CONSUMERS, bq, bk, stages))
    out_type = (jax.ShapeDtypeStruct((b, sq, hq, dv), dtype),)
    if spec.lse:
        out_type += (jax.ShapeDtypeStruct((b, hq, sq), jnp.float32),)
    lengths = [x.astype(jnp.int32) for x, on in ((q_lens, spec.q_lengths), (kv_lens, spec.kv_lengths)) if on]
    segments = []
    if spec.segments:
        q_seg, kv_seg = q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)
        segments = [q_seg, kv_seg, segment_tile_ranges(q_seg, kv_seg, rows, bk)]
    # which (batch row, kv head) holds a non-finite value: one read of v, so clean calls skip the guard
    dirty = []
    if guard and spec.guard_form == "flags":
        flags = jnp.any(~jnp.isfinite(v), axis=(1, 3)) if bad_keys is None else jnp.any(bad_keys, axis=1)
        dirty = [flags.reshape(b * hkv).astype(jnp.int32)]
    outs = launch(plgpu, kernel, out_type, scratch, {"b": b, "h": hq, "q": nq})(q, k, v, *sink_rows, *lengths,
                                                                                *segments, *dirty)
    return outs[0], (outs[1] if spec.lse else None)
