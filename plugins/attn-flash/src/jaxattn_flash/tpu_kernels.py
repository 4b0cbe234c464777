"""FlashAttention-2 as Pallas TPU (Mosaic) kernels: forward, dq and dk/dv.

Layout `[batch, heads, seq, head_dim]` (the glue in `tpu.py` transposes and pads). The
grid of every kernel is `(batch, kv_head, outer block, step)`; the last axis is
"arbitrary" (sequential) and walks a static tile table, the others are "parallel".

* Native GQA: one block holds the `group` query heads of one K/V head
  (`(group, block_q, head_dim)`), so a K/V tile is fetched once per group and K/V are
  never repeated in memory; the dk/dv kernel sums the group's gradients in its VMEM
  accumulators, so nothing is reduced over heads afterwards.
* Empty tiles are never visited: the table (built from the core mask's
  `block_structure`) lists, for each outer block, only its non-empty inner blocks with
  a bit saying whether the tile is partial. The table and per-(batch, block) counts are
  scalar-prefetched into SMEM; the K/V (or Q) index_map reads the table, and steps past
  an outer block's count re-point to the block already in VMEM, so no DMA happens. The
  mask (band, chunk ids, segment ids, key end) is evaluated only on partial tiles.
* Sequence lengths shorten the counts at run time (computed in XLA before the call).
* Running max / sum live in VMEM scratch replicated over 128 lanes; the accumulators
  in float32; `pl.when` initialises them at step 0 and writes the outputs at the last
  step. Masked logits are -inf against a finite running-max floor, so no `inf - inf`.
* A row with no visible key gives out 0 and lse -inf; the backward gives such rows
  (and padding rows) an lse of +inf, so every probability of the row is 0 and its
  gradients are exactly zero. The sink gradient is a reduction done in XLA.
* Non-finite inputs (README "Semantics"): a NaN running sum (a non-finite logit a row
  sees) propagates; partial tiles zero the values of keys holding a non-finite value
  before `p @ v` and mark the rows that see one, whose output is NaN
  (`_masked_values`); the backward takes finite values (`nonfinite.finite_values`) and
  keeps probabilities and dS to the pairs the mask allows.
* Matrix products follow the forms jax's own TPU kernels use: `A·Bᵀ` (NT) and `A·B`
  (NN). The dk/dv kernel works on transposed tiles `[block_kv, block_q]` so that
  per-query-row values (lse, delta, query segment ids) are lane-dense rows.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from ._compat import tpu_compiler_params, tpu_prefetch_grid_spec, tpu_smem, tpu_vmem
from .lse_grads import live_rows, sinks_grad
from .nonfinite import finite_values

LANES = 128
M_FLOOR = -1e30  # initial running max: finite, below any real logit
NT = (((1,), (1,)), ((), ()))  # a · bᵀ
NN = (((1,), (0,)), ((), ()))  # a · b
SEMANTICS = ("parallel", "parallel", "parallel", "arbitrary")


@dataclass(frozen=True)
class Plan:
    """One kernel's tiling. `table[o * steps + t]` = `(inner block << 1) | partial` for
    the t-th non-empty inner block of outer block `o` (padded with the last entry);
    `counts[o]` is how many there are. Outer = q blocks (forward, dq) or kv blocks (dk/dv)."""

    block_q: int
    block_kv: int
    table: tuple[int, ...]
    counts: tuple[int, ...]
    steps: int


@dataclass(frozen=True)
class TpuSpec:
    """Everything static about one call (hashable: a custom_vjp static argument)."""

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
    kv_lens: bool  # per-example key ends at run time (else the static kv_len)
    sinks: bool
    exact: bool  # float32 inputs: full-precision dots
    fwd: Plan
    dq: Plan
    dkv: Plan
    interpret: Any = False

    @property
    def precision(self):
        return lax.Precision.HIGHEST if self.exact else None


def _dot(a, b, dims, spec: TpuSpec):
    return lax.dot_general(a, b, dims, precision=spec.precision, preferred_element_type=jnp.float32)


def _logits(a, b, vis, spec: TpuSpec):
    """a·bᵀ (float32) -> (logits, tanh term of the soft-cap or None); logits -inf where the
    boolean tile `vis` is False (`vis` None: a tile without masked entries)."""
    raw = _dot(a, b, NT, spec)
    t = None
    if spec.soft_cap is None:
        x = raw * spec.scale
    else:
        t = jnp.tanh(raw * (spec.scale / spec.soft_cap))
        x = t * spec.soft_cap
    if vis is not None:
        x = jnp.where(vis, x, -jnp.inf)
    return x, t


def _visible(spec: TpuSpec, q_pos, k_pos, kv_end, id_pairs):
    """Boolean tile: band, key end, and equal ids for each (query ids, key ids) pair."""
    ok = k_pos < kv_end
    d = k_pos - q_pos
    if spec.band_lo is not None:
        ok = ok & (d >= spec.band_lo)
    if spec.band_hi is not None:
        ok = ok & (d <= spec.band_hi)
    for q_ids, k_ids in id_pairs:
        ok = ok & (q_ids == k_ids)
    return ok


def _column(row_ref_value):
    """A lane-dense row `(n,)` as a column `(n, 1)` (as jax's splash kernels read lse)."""
    return jnp.expand_dims(row_ref_value, -1)


def _as_row(col, n: int):
    """A column `(n, 1)` as a lane-dense row `(1, n)`: broadcast over 128 lanes, transpose."""
    return jnp.transpose(jnp.broadcast_to(col, (n, LANES)))[:1]


def _masked_values(v, vis):
    """`v [bk, dv]`, `vis [bq, bk]` -> (`v` with the keys holding a non-finite value zeroed,
    `[bq, 1]` float: 1 where the row sees such a key). As `nonfinite.masked_values`, in
    the layouts of these kernels."""
    bad = jnp.max(jnp.where(jnp.isfinite(v), 0.0, 1.0), axis=1, keepdims=True)  # [bk, 1]
    v = jnp.where(bad > 0.0, jnp.zeros_like(v), v)
    seen = jnp.max(jnp.where(vis, _as_row(bad, v.shape[0]), 0.0), axis=1, keepdims=True)
    return v, seen


def _for_heads(group: int, body) -> None:
    """Run `body(gi)` for the query heads of the group (unrolled when few)."""
    if group <= 8:
        for gi in range(group):
            body(gi)
    else:
        lax.fori_loop(0, group, lambda gi, c: (body(gi), c)[1], 0)


def _table_entry(tab, cnt, plan: Plan, n_outer: int, b, o, t):
    """(table entry, count) of step `t` of outer block `o` of example `b`; steps past the
    count repeat the last visited entry (its block is already in VMEM: no DMA)."""
    n = cnt[b * n_outer + o]
    return tab[o * plan.steps + jnp.maximum(jnp.minimum(t, n - 1), 0)], n


def _step_tile(spec: TpuSpec, plan: Plan, tab_ref, cnt_ref, kv_end_ref, n_outer: int, b, o, t, *,
               outer_kv: bool = False):
    """(inner block, partial flag, count, key end) of step `t` of outer block `o`; with
    sequence lengths a key block reaching past the example's key end is partial too."""
    e, n = _table_entry(tab_ref, cnt_ref, plan, n_outer, b, o, t)
    blk, partial = jnp.right_shift(e, 1), jnp.bitwise_and(e, 1) == 1
    kv_end = kv_end_ref[b]
    if spec.kv_lens:
        partial = partial | (((o if outer_kv else blk) + 1) * plan.block_kv > kv_end)
    return blk, partial, n, kv_end


def _tile_visible(spec: TpuSpec, q_block, kv_block, bq: int, bk: int, kv_end, ids, *, keys_major: bool = False):
    """Visibility of one (query block, key block) tile: rows are queries, or keys when
    `keys_major` (the dk/dv kernel's transposed tile)."""
    shape, q_axis = ((bk, bq), 1) if keys_major else ((bq, bk), 0)
    q_pos = q_block * bq + lax.broadcasted_iota(jnp.int32, shape, q_axis)
    k_pos = kv_block * bk + lax.broadcasted_iota(jnp.int32, shape, 1 - q_axis)
    if keys_major:
        pairs = [(q_ids[...], _column(kv_ids[0])) for q_ids, kv_ids in ids]
    else:
        pairs = [(_column(q_ids[0]), kv_ids[...]) for q_ids, kv_ids in ids]
    return _visible(spec, q_pos, k_pos, kv_end, pairs)


def _run_steps(t, n, partial, step) -> None:
    """Run `step(masked)` on the live steps, with the mask on partial tiles only."""
    run = t < n
    pl.when(run & partial)(functools.partial(step, True))
    pl.when(run & jnp.logical_not(partial))(functools.partial(step, False))


def _inner_block(plan: Plan, n_outer: int):
    """index_map helper: the inner block of step `t`."""

    def inner(b, h, o, t, tab, cnt, q_end, kv_end):
        return jnp.right_shift(_table_entry(tab, cnt, plan, n_outer, b, o, t)[0], 1)

    return inner


def _id_inputs(spec: TpuSpec, q_ids, kv_ids, *, q_index, kv_index, bq: int, bk: int):
    """Block specs and arrays of the id rows: segment ids `[B, 1, S]`, chunk ids `[1, 1, S]`."""
    specs, arrays = [], []
    if spec.segments:
        specs += [pl.BlockSpec((None, 1, bq), lambda b, h, o, t, *p: (b, 0, q_index(b, h, o, t, *p))),
                  pl.BlockSpec((None, 1, bk), lambda b, h, o, t, *p: (b, 0, kv_index(b, h, o, t, *p)))]
        arrays += [q_ids, kv_ids]
    if spec.chunk_size is not None:
        c, off = spec.chunk_size, spec.chunk_offset
        qc = np.floor_divide(np.arange(spec.q_pad) + off, c).astype(np.int32).reshape(1, 1, -1)
        kc = np.floor_divide(np.arange(spec.kv_pad), c).astype(np.int32).reshape(1, 1, -1)
        specs += [pl.BlockSpec((None, 1, bq), lambda b, h, o, t, *p: (0, 0, q_index(b, h, o, t, *p))),
                  pl.BlockSpec((None, 1, bk), lambda b, h, o, t, *p: (0, 0, kv_index(b, h, o, t, *p)))]
        arrays += [jnp.asarray(qc), jnp.asarray(kc)]
    return specs, arrays


def _take_ids(spec: TpuSpec, refs):
    """Split the id refs off `refs`: [(q ids ref, kv ids ref), ...], rest."""
    pairs = []
    n = int(spec.segments) + int(spec.chunk_size is not None)
    for _ in range(n):
        pairs.append((refs[0], refs[1]))
        refs = refs[2:]
    return pairs, refs


def counts(plan: Plan, n_outer: int, outer_block: int, inner_block: int, outer_end, inner_end):
    """`int32 [B * n_outer]`: the table entries each (example, outer block) visits, given
    the per-example ends of the outer and inner sequences (the table is sorted, so the
    blocks starting before the inner end are a prefix)."""
    tab = np.asarray(plan.table, np.int64).reshape(n_outer, plan.steps) >> 1
    slot = np.arange(plan.steps)[None, :] < np.asarray(plan.counts)[:, None]
    starts = jnp.asarray(tab * inner_block, jnp.int32)
    live = jnp.asarray(slot)[None] & (starts[None] < inner_end[:, None, None])
    cnt = jnp.sum(live.astype(jnp.int32), axis=-1)
    outer_live = jnp.arange(n_outer, dtype=jnp.int32)[None, :] * outer_block < outer_end[:, None]
    return jnp.where(outer_live, cnt, 0).reshape(-1).astype(jnp.int32)


def _prefetch(plan: Plan, cnt, q_end, kv_end):
    return [jnp.asarray(np.asarray(plan.table, np.int32)), cnt, q_end, kv_end]


# -- forward ---------------------------------------------------------------------------


def _fwd_kernel(tab_ref, cnt_ref, q_end_ref, kv_end_ref, q_ref, k_ref, v_ref, *refs, spec: TpuSpec):
    ids, refs = _take_ids(spec, list(refs))
    sink_ref = None
    if spec.sinks:
        sink_ref, *refs = refs
    o_ref, lse_ref, m_ref, l_ref, acc_ref, bad_ref = refs
    plan, g = spec.fwd, spec.group
    bq, bk = plan.block_q, plan.block_kv
    nq = spec.q_pad // bq
    b, h, i, t = (pl.program_id(a) for a in range(4))
    blk, partial, n, kv_end = _step_tile(spec, plan, tab_ref, cnt_ref, kv_end_ref, nq, b, i, t)

    @pl.when(t == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, M_FLOOR, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
        bad_ref[...] = jnp.zeros(bad_ref.shape, jnp.float32)

    def step(masked: bool):
        k = k_ref[...]
        v = v_ref[...]
        vis = _tile_visible(spec, i, blk, bq, bk, kv_end, ids) if masked else None
        if masked:
            v, seen = _masked_values(v, vis)
            bad_ref[...] = jnp.maximum(bad_ref[...], seen)

        def head(gi):
            x, _ = _logits(q_ref[gi], k, vis, spec)
            m_prev = m_ref[gi]
            m_next = jnp.maximum(m_prev, jnp.max(x, axis=1, keepdims=True))
            alpha = jnp.exp(m_prev - m_next)
            p = jnp.exp(x - m_next[:, :1])
            l_ref[gi] = alpha * l_ref[gi] + jnp.sum(p, axis=1, keepdims=True)
            m_ref[gi] = m_next
            acc_ref[gi] = acc_ref[gi] * alpha[:, :1] + _dot(p.astype(v.dtype), v, NN, spec)

        _for_heads(g, head)

    _run_steps(t, n, partial, step)

    @pl.when(t == plan.steps - 1)
    def _finish():
        q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
        q_end = q_end_ref[b]

        def head(gi):
            m = m_ref[gi][:, :1]
            l = l_ref[gi][:, :1]
            acc = acc_ref[gi]
            real = q_pos < q_end
            has = (l != 0.0) & real  # a NaN sum (a non-finite logit) counts: it propagates
            if sink_ref is not None:
                sink = sink_ref[0, h * g + gi]
                m_all = jnp.maximum(m, sink)
                corr = jnp.exp(m - m_all)
                l = l * corr + jnp.exp(sink - m_all)
                acc = acc * corr
                m = m_all
            l_safe = jnp.where(has, l, 1.0)
            out = jnp.where(has, acc / l_safe, 0.0)
            out = jnp.where((bad_ref[...][:, :1] > 0.0) & real, jnp.nan, out)
            o_ref[gi] = out.astype(o_ref.dtype)
            lse_ref[gi] = _as_row(jnp.where(has, m + jnp.log(l_safe), -jnp.inf), bq)

        _for_heads(g, head)


def forward(spec: TpuSpec, q, k, v, sinks, q_seg, kv_seg, q_end, kv_end):
    """`q [B, Hq, Sq', D']`, `k/v [B, Hkv, Skv', D'/Dv']` -> (out `[B, Hq, Sq', Dv']`,
    lse `[B, Hq, 1, Sq']` float32, natural log, -inf on rows without keys)."""
    bsz, hq, _, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    plan, g = spec.fwd, spec.group
    bq, bk = plan.block_q, plan.block_kv
    nq = spec.q_pad // bq
    kv_block = _inner_block(plan, nq)
    q_block = lambda b, h, i, t, *p: i  # noqa: E731
    cnt = counts(plan, nq, bq, bk, q_end, kv_end)
    in_specs = [
        pl.BlockSpec((None, g, bq, d), lambda b, h, i, t, *p: (b, h, i, 0)),
        pl.BlockSpec((None, None, bk, d), lambda b, h, i, t, *p: (b, h, kv_block(b, h, i, t, *p), 0)),
        pl.BlockSpec((None, None, bk, dv), lambda b, h, i, t, *p: (b, h, kv_block(b, h, i, t, *p), 0)),
    ]
    arrays = [q, k, v]
    id_specs, id_arrays = _id_inputs(spec, q_seg, kv_seg, q_index=q_block, kv_index=kv_block, bq=bq, bk=bk)
    in_specs += id_specs
    arrays += id_arrays
    if spec.sinks:
        in_specs.append(pl.BlockSpec((8, hq), lambda *_: (0, 0), memory_space=tpu_smem()))
        arrays.append(jnp.broadcast_to(sinks.astype(jnp.float32)[None, :], (8, hq)))
    out_specs = [
        pl.BlockSpec((None, g, bq, dv), lambda b, h, i, t, *p: (b, h, i, 0)),
        pl.BlockSpec((None, g, 1, bq), lambda b, h, i, t, *p: (b, h, 0, i)),
    ]
    scratch = [tpu_vmem((g, bq, LANES)), tpu_vmem((g, bq, LANES)), tpu_vmem((g, bq, dv)), tpu_vmem((bq, LANES))]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, spec=spec),
        grid_spec=tpu_prefetch_grid_spec(4, (bsz, hkv, nq, plan.steps), in_specs, out_specs, scratch),
        out_shape=[jax.ShapeDtypeStruct((bsz, hq, spec.q_pad, dv), q.dtype),
                   jax.ShapeDtypeStruct((bsz, hq, 1, spec.q_pad), jnp.float32)],
        compiler_params=tpu_compiler_params(SEMANTICS),
        interpret=spec.interpret,
        name="flash_tpu_fwd",
    )(*_prefetch(plan, cnt, q_end, kv_end), *arrays)


# -- backward: dq ------------------------------------------------------------------------


def _dq_kernel(tab_ref, cnt_ref, q_end_ref, kv_end_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               *refs, spec: TpuSpec):
    ids, refs = _take_ids(spec, list(refs))
    dq_ref, acc_ref = refs
    plan, g = spec.dq, spec.group
    bq, bk = plan.block_q, plan.block_kv
    nq = spec.q_pad // bq
    b, _, i, t = (pl.program_id(a) for a in range(4))
    blk, partial, n, kv_end = _step_tile(spec, plan, tab_ref, cnt_ref, kv_end_ref, nq, b, i, t)

    @pl.when(t == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def step(masked: bool):
        k = k_ref[...]
        v = v_ref[...]
        vis = _tile_visible(spec, i, blk, bq, bk, kv_end, ids) if masked else None

        def head(gi):
            x, tanh = _logits(q_ref[gi], k, vis, spec)
            p = jnp.exp(x - _column(lse_ref[gi, 0]))
            dp = _dot(do_ref[gi], v, NT, spec)
            ds = p * (dp - _column(delta_ref[gi, 0]))
            if tanh is not None:
                ds = ds * (1.0 - tanh * tanh)
            acc_ref[gi] = acc_ref[gi] + _dot(ds.astype(k.dtype), k, NN, spec)

        _for_heads(g, head)

    _run_steps(t, n, partial, step)

    @pl.when(t == plan.steps - 1)
    def _finish():
        dq_ref[...] = (acc_ref[...] * spec.scale).astype(dq_ref.dtype)


def backward_dq(spec: TpuSpec, q, k, v, do, lse, delta, q_seg, kv_seg, q_end, kv_end):
    bsz, hq, _, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    plan, g = spec.dq, spec.group
    bq, bk = plan.block_q, plan.block_kv
    nq = spec.q_pad // bq
    kv_block = _inner_block(plan, nq)
    q_block = lambda b, h, i, t, *p: i  # noqa: E731
    cnt = counts(plan, nq, bq, bk, q_end, kv_end)
    rows = lambda width: pl.BlockSpec((None, g, bq, width), lambda b, h, i, t, *p: (b, h, i, 0))  # noqa: E731
    per_row = pl.BlockSpec((None, g, 1, bq), lambda b, h, i, t, *p: (b, h, 0, i))
    in_specs = [
        rows(d),
        pl.BlockSpec((None, None, bk, d), lambda b, h, i, t, *p: (b, h, kv_block(b, h, i, t, *p), 0)),
        pl.BlockSpec((None, None, bk, dv), lambda b, h, i, t, *p: (b, h, kv_block(b, h, i, t, *p), 0)),
        rows(dv), per_row, per_row,
    ]
    id_specs, id_arrays = _id_inputs(spec, q_seg, kv_seg, q_index=q_block, kv_index=kv_block, bq=bq, bk=bk)
    return pl.pallas_call(
        functools.partial(_dq_kernel, spec=spec),
        grid_spec=tpu_prefetch_grid_spec(4, (bsz, hkv, nq, plan.steps), in_specs + id_specs, rows(d),
                                         [tpu_vmem((g, bq, d))]),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=tpu_compiler_params(SEMANTICS),
        interpret=spec.interpret,
        name="flash_tpu_bwd_dq",
    )(*_prefetch(plan, cnt, q_end, kv_end), q, k, v, do, lse, delta, *id_arrays)


# -- backward: dk, dv ----------------------------------------------------------------------


def _dkv_kernel(tab_ref, cnt_ref, q_end_ref, kv_end_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                *refs, spec: TpuSpec):
    ids, refs = _take_ids(spec, list(refs))
    dk_ref, dv_ref, dk_acc, dv_acc = refs
    plan, g = spec.dkv, spec.group
    bq, bk = plan.block_q, plan.block_kv
    nk = spec.kv_pad // bk
    b, _, j, t = (pl.program_id(a) for a in range(4))
    blk, partial, n, kv_end = _step_tile(spec, plan, tab_ref, cnt_ref, kv_end_ref, nk, b, j, t, outer_kv=True)

    @pl.when(t == 0)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    def step(masked: bool):
        k = k_ref[...]
        v = v_ref[...]
        vis = _tile_visible(spec, blk, j, bq, bk, kv_end, ids, keys_major=True) if masked else None

        def head(gi):
            q = q_ref[gi]
            do = do_ref[gi]
            x, tanh = _logits(k, q, vis, spec)
            p = jnp.exp(x - lse_ref[gi])
            if vis is not None:  # a NaN row (NaN lse) gives NaN for every key: keep it to the ones it sees
                p = jnp.where(vis, p, 0.0)
            dv_acc[...] += _dot(p.astype(do.dtype), do, NN, spec)
            ds = p * (_dot(v, do, NT, spec) - delta_ref[gi])
            if vis is not None:
                ds = jnp.where(vis, ds, 0.0)
            if tanh is not None:
                ds = ds * (1.0 - tanh * tanh)
            dk_acc[...] += _dot(ds.astype(q.dtype), q, NN, spec)

        _for_heads(g, head)

    _run_steps(t, n, partial, step)

    @pl.when(t == plan.steps - 1)
    def _finish():
        dk_ref[...] = (dk_acc[...] * spec.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def backward_dkv(spec: TpuSpec, q, k, v, do, lse, delta, q_seg, kv_seg, q_end, kv_end):
    bsz, hq, _, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    plan, g = spec.dkv, spec.group
    bq, bk = plan.block_q, plan.block_kv
    nk = spec.kv_pad // bk
    q_block = _inner_block(plan, nk)
    kv_block = lambda b, h, j, t, *p: j  # noqa: E731
    cnt = counts(plan, nk, bk, bq, kv_end, q_end)
    rows = lambda width: pl.BlockSpec(  # noqa: E731
        (None, g, bq, width), lambda b, h, j, t, *p: (b, h, q_block(b, h, j, t, *p), 0))
    per_row = pl.BlockSpec((None, g, 1, bq), lambda b, h, j, t, *p: (b, h, 0, q_block(b, h, j, t, *p)))
    keys = lambda width: pl.BlockSpec((None, None, bk, width), lambda b, h, j, t, *p: (b, h, j, 0))  # noqa: E731
    in_specs = [rows(d), keys(d), keys(dv), rows(dv), per_row, per_row]
    id_specs, id_arrays = _id_inputs(spec, q_seg, kv_seg, q_index=q_block, kv_index=kv_block, bq=bq, bk=bk)
    return pl.pallas_call(
        functools.partial(_dkv_kernel, spec=spec),
        grid_spec=tpu_prefetch_grid_spec(4, (bsz, hkv, nk, plan.steps), in_specs + id_specs,
                                         [keys(d), keys(dv)], [tpu_vmem((bk, d)), tpu_vmem((bk, dv))]),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=tpu_compiler_params(SEMANTICS),
        interpret=spec.interpret,
        name="flash_tpu_bwd_dkv",
    )(*_prefetch(plan, cnt, q_end, kv_end), q, k, v, do, lse, delta, *id_arrays)


# -- custom_vjp -------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def attend(spec: TpuSpec, q, k, v, sinks, q_seg, kv_seg, q_end, kv_end):
    """Padded, transposed attention: (out `[B, Hq, Sq', Dv']`, lse `[B, Hq, 1, Sq']`)."""
    return forward(spec, q, k, v, sinks, q_seg, kv_seg, q_end, kv_end)


def _attend_fwd(spec, q, k, v, sinks, q_seg, kv_seg, q_end, kv_end):
    out, lse = forward(spec, q, k, v, sinks, q_seg, kv_seg, q_end, kv_end)
    return (out, lse), (q, k, v, sinks, q_seg, kv_seg, q_end, kv_end, out, lse)


def _attend_bwd(spec, residuals, cotangents):
    q, k, v, sinks, q_seg, kv_seg, q_end, kv_end, out, lse = residuals
    d_out, d_lse = cotangents
    live, d_lse = live_rows(lse, d_lse)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)[:, :, None, :]
    delta = jnp.where(live, delta - d_lse, 0.0)  # the lse's cotangent enters dS like -delta
    lse_b = jnp.where(live, lse, jnp.inf)  # dead rows: every probability is 0
    do = d_out.astype(q.dtype)
    v = finite_values(v)
    dq = backward_dq(spec, q, k, v, do, lse_b, delta, q_seg, kv_seg, q_end, kv_end)
    dk, dv = backward_dkv(spec, q, k, v, do, lse_b, delta, q_seg, kv_seg, q_end, kv_end)
    d_sinks = None if sinks is None else sinks_grad(sinks, lse, live, delta)
    return dq, dk, dv, d_sinks, None, None, None, None


attend.defvjp(_attend_fwd, _attend_bwd)
