"""FlashAttention-2's backward pass in Pallas (Triton lowering): the dq and dk/dv kernels,
and the `custom_vjp` that joins them to the forward of `triton_kernels.py`.

The dk/dv kernel of one K/V head loops over the `group` query heads that share it and
accumulates their gradients in registers, so no K/V head is ever copied and no reduction
over heads is needed afterwards. Its grid may launch in passes (`launch_order.py`).

Rows without a visible key get an lse of +inf, which makes every probability of the row
0, so they need no mask of their own; a row whose lse is NaN (a non-finite logit) keeps
it, and its gradients are NaN. Values are made finite before the kernels
(`nonfinite.finite_values`): a row that sees a non-finite value carries it in `delta`
(from its NaN output), so the kernels' masked tiles zero the probabilities and dS of the
pairs the mask removes, and nothing reaches a key or a row that does not see it.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ._compat import multiple_of, triton_params
from .config import padded_dim
from .launch_order import launch_order, ordered
from .lse_grads import live_rows, sinks_grad
from .nonfinite import finite_values
from .padding import pad_axis
from .triton_kernels import (
    LOG2E,
    KernelSpec,
    _common_specs,
    _dot,
    _logits,
    _loop3,
    _loop3_heads,
    _query_ranges,
    _visible,
    forward,
    kernel_refs,
    q_block_index,
    row_block,
    valid_end,
)

# -- dq -------------------------------------------------------------------------------------


def _dq_kernel(*refs, spec: KernelSpec):
    named = kernel_refs(refs, spec, fixed=6)
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), (dq_ref,) = named.fixed, named.outputs
    q_seg_ref, kv_seg_ref = named.q_seg, named.kv_seg

    bq, bk = spec.dq.block_q, spec.dq.block_kv
    r0, kv_end, ranges = row_block(spec, bq, bk, named.kv_len)

    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    q_pos = r0 + jnp.arange(bq, dtype=jnp.int32)
    q_seg = q_seg_ref[...] if q_seg_ref is not None else None

    def body(jb, dq, *, masked):
        start = multiple_of(jb * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        s, t = _logits(_dot(q, k, spec, trans_b=True), spec)
        if masked:
            k_pos = start + jnp.arange(bk, dtype=jnp.int32)
            kv_seg = kv_seg_ref[pl.ds(start, bk)] if kv_seg_ref is not None else None
            s = jnp.where(_visible(spec, q_pos, k_pos, kv_end, q_seg, kv_seg), s, -jnp.inf)
        p = jnp.exp2(s - lse[:, None])
        dp = _dot(do, v, spec, trans_b=True)
        ds = p * (dp - delta[:, None])
        if t is not None:
            ds = ds * (1.0 - t * t)
        return dq + _dot(ds.astype(k.dtype), k, spec)

    dq = _loop3(ranges, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * spec.scale).astype(dq_ref.dtype)


def backward_dq(spec: KernelSpec, q, k, v, do, lse2, delta, q_seg, kv_seg, q_lens, kv_lens):
    b, _, hq, d = q.shape
    dv = v.shape[-1]
    t = spec.dq
    nq = spec.q_pad // t.block_q
    g = spec.group
    qi = functools.partial(q_block_index, spec, t.block_q)

    q_rows = pl.BlockSpec((None, t.block_q, None, d), lambda i, bb, h: (bb, qi(i), h, 0))
    in_specs = [
        q_rows,
        pl.BlockSpec((None, spec.kv_pad, None, d), lambda i, bb, h: (bb, 0, lax.div(h, g), 0)),
        pl.BlockSpec((None, spec.kv_pad, None, dv), lambda i, bb, h: (bb, 0, lax.div(h, g), 0)),
        pl.BlockSpec((None, t.block_q, None, dv), lambda i, bb, h: (bb, qi(i), h, 0)),
        pl.BlockSpec((None, None, t.block_q), lambda i, bb, h: (bb, h, qi(i))),
        pl.BlockSpec((None, None, t.block_q), lambda i, bb, h: (bb, h, qi(i))),
    ]
    arrays = [q, k, v, do, lse2, delta]
    extra_specs, extra = _common_specs(
        spec, q_seg, kv_seg, q_lens, kv_lens,
        rows=pl.BlockSpec((None, t.block_q), lambda i, bb, h: (bb, qi(i))),
        batch_of=lambda i, bb, h: bb)
    return pl.pallas_call(
        functools.partial(_dq_kernel, spec=spec),
        grid=(nq, b, hq),
        in_specs=in_specs + extra_specs,
        out_specs=q_rows,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=triton_params(t.num_warps, t.num_stages),
        interpret=spec.interpret,
        name="flash_bwd_dq",
    )(*arrays, *extra)


# -- dk, dv -------------------------------------------------------------------------------


def _dkdv_kernel(*refs, spec: KernelSpec):
    named = kernel_refs(refs, spec, fixed=6)
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), (dk_ref, dv_ref) = named.fixed, named.outputs
    q_seg_ref, kv_seg_ref = named.q_seg, named.kv_seg

    bq, bk = spec.dkdv.block_q, spec.dkdv.block_kv
    j, _, _ = launch_order(pl.program_id(0), pl.program_id(1), pl.program_id(2), spec.kv_pad // bk,
                           pl.num_programs(1), pl.num_programs(2), spec.dkdv_passes)
    c0 = j * bk
    kv_end = valid_end(named.kv_len, spec.kv_len)
    q_end = valid_end(named.q_len, spec.q_len)
    ranges = _query_ranges(spec, c0, bq, bk, q_end, kv_end)

    k = k_ref[...]
    v = v_ref[...]
    k_pos = c0 + jnp.arange(bk, dtype=jnp.int32)
    kv_seg = kv_seg_ref[...] if kv_seg_ref is not None else None

    def body(gi, ib, carry, *, masked):
        dk, dv = carry
        start = multiple_of(ib * bq, bq)
        q = q_ref[pl.ds(start, bq), gi, :]
        do = do_ref[pl.ds(start, bq), gi, :]
        lse = lse_ref[gi, pl.ds(start, bq)]
        delta = delta_ref[gi, pl.ds(start, bq)]
        s, t = _logits(_dot(q, k, spec, trans_b=True), spec)
        vis = None
        if masked:
            q_pos = start + jnp.arange(bq, dtype=jnp.int32)
            q_seg = q_seg_ref[pl.ds(start, bq)] if q_seg_ref is not None else None
            vis = _visible(spec, q_pos, k_pos, kv_end, q_seg, kv_seg)
            s = jnp.where(vis, s, -jnp.inf)
        p = jnp.exp2(s - lse[:, None])
        if vis is not None:  # a NaN row (NaN lse) gives NaN for every key: keep it to the ones it sees
            p = jnp.where(vis, p, 0.0)
        dv = dv + _dot(p.astype(do.dtype), do, spec, trans_a=True)
        dp = _dot(do, v, spec, trans_b=True)
        ds = p * (dp - delta[:, None])
        if vis is not None:
            ds = jnp.where(vis, ds, 0.0)
        if t is not None:
            ds = ds * (1.0 - t * t)
        dk = dk + _dot(ds.astype(q.dtype), q, spec, trans_a=True)
        return dk, dv

    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = _loop3_heads(ranges, body, init, spec.group)
    dk_ref[...] = (dk * spec.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward_dkdv(spec: KernelSpec, q, k, v, do, lse2, delta, q_seg, kv_seg, q_lens, kv_lens):
    b, _, hq, d = q.shape
    _, _, hkv, dv = v.shape
    t = spec.dkdv
    nk = spec.kv_pad // t.block_kv
    g = spec.group

    def block(shape, index_map):
        return pl.BlockSpec(shape, ordered(index_map, nk, b, hkv, spec.dkdv_passes))

    kv_block = lambda dim: block((None, t.block_kv, None, dim), lambda j, bb, h: (bb, j, h, 0))  # noqa: E731
    in_specs = [
        block((None, spec.q_pad, g, d), lambda j, bb, h: (bb, 0, h, 0)),
        kv_block(d),
        kv_block(dv),
        block((None, spec.q_pad, g, dv), lambda j, bb, h: (bb, 0, h, 0)),
        block((None, g, spec.q_pad), lambda j, bb, h: (bb, h, 0)),
        block((None, g, spec.q_pad), lambda j, bb, h: (bb, h, 0)),
    ]
    arrays = [q, k, v, do, lse2, delta]
    extra_specs, extra = [], []
    if spec.segments:
        extra_specs += [block((None, spec.q_pad), lambda j, bb, h: (bb, 0)),
                        block((None, t.block_kv), lambda j, bb, h: (bb, j))]
        extra += [q_seg, kv_seg]
    if spec.q_lens:
        extra_specs.append(block((1,), lambda j, bb, h: (bb,)))
        extra.append(q_lens)
    if spec.kv_lens:
        extra_specs.append(block((1,), lambda j, bb, h: (bb,)))
        extra.append(kv_lens)
    return pl.pallas_call(
        functools.partial(_dkdv_kernel, spec=spec),
        grid=(nk, b, hkv),
        in_specs=in_specs + extra_specs,
        out_specs=[kv_block(d), kv_block(dv)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=triton_params(t.num_warps, t.num_stages),
        interpret=spec.interpret,
        name="flash_bwd_dkdv",
    )(*arrays, *extra)


# -- custom_vjp -------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def flash(spec: KernelSpec, q, k, v, sinks, q_seg, kv_seg, q_lens, kv_lens):
    """Padded attention: (out, lse) with lse natural-log `[B, Hq, Sq']`, -inf on empty rows."""
    return forward(spec, q, k, v, sinks, q_seg, kv_seg, q_lens, kv_lens)


class Residuals(NamedTuple):
    """What the backward (Triton or Mosaic GPU) reads, by name, after either forward: the forward's
    inputs and its out and lse (padded alike; the Mosaic forward's are unpadded, as it takes no
    padding). Built with keywords: the kernels take the optional inputs in different orders."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    out: jax.Array
    lse: jax.Array
    sinks: jax.Array | None = None
    q_seg: jax.Array | None = None
    kv_seg: jax.Array | None = None
    q_lens: jax.Array | None = None
    kv_lens: jax.Array | None = None


def _flash_fwd(spec, q, k, v, sinks, q_seg, kv_seg, q_lens, kv_lens):
    out, lse = forward(spec, q, k, v, sinks, q_seg, kv_seg, q_lens, kv_lens)
    return (out, lse), Residuals(q=q, k=k, v=v, out=out, lse=lse, sinks=sinks, q_seg=q_seg, kv_seg=kv_seg,
                                 q_lens=q_lens, kv_lens=kv_lens)


def _flash_bwd(spec, residuals: Residuals, cotangents):
    q, k, v, out, lse, sinks, q_seg, kv_seg, q_lens, kv_lens = residuals
    d_out, d_lse = cotangents
    live, d_lse = live_rows(lse, d_lse)
    # delta_i = sum_d dO·O  (minus dlse: the lse's own cotangent enters dS the same way)
    delta = jnp.einsum("bshd,bshd->bhs", d_out.astype(jnp.float32), out.astype(jnp.float32))
    delta_eff = delta - d_lse
    lse2 = jnp.where(live, lse * LOG2E, jnp.inf)  # dead rows: every probability is 0
    do = d_out.astype(q.dtype)
    v = finite_values(v)
    if spec.mosaic_bwd is not None:  # the Hopper kernels (gpu_path.choose_backward)
        from .mosaic_bwd_kernels import mosaic_backward

        dq, dk, dv = mosaic_backward(spec.mosaic_bwd, q, k, v, do, lse2, delta_eff, kv_lens, q_seg, kv_seg)
    else:
        dq, dk, dv = _triton_grads(spec, q, k, v, do, lse2, delta_eff, q_seg, kv_seg, q_lens, kv_lens)
    d_sinks = None if sinks is None else sinks_grad(sinks, lse, live, delta_eff)
    return dq, dk, dv, d_sinks, None, None, None, None


def _triton_grads(spec, q, k, v, do, lse2, delta, q_seg, kv_seg, q_lens, kv_lens):
    """(dq, dk, dv) from the Triton kernels, which tile head dims of powers of two: the Triton
    path pads them itself, a Mosaic forward of head_dim 192 (MLA) hands them as they are, so
    they are zero-padded here (the products do not change) and the gradients cut back."""
    d, d_v = q.shape[-1], v.shape[-1]
    dp, dvp = padded_dim(d), padded_dim(d_v)
    if (dp, dvp) != (d, d_v):
        q, k, v, do = pad_axis(q, 3, dp), pad_axis(k, 3, dp), pad_axis(v, 3, dvp), pad_axis(do, 3, dvp)
    dq = backward_dq(spec, q, k, v, do, lse2, delta, q_seg, kv_seg, q_lens, kv_lens)
    dk, dv = backward_dkdv(spec, q, k, v, do, lse2, delta, q_seg, kv_seg, q_lens, kv_lens)
    if (dp, dvp) != (d, d_v):
        dq, dk, dv = dq[..., :d], dk[..., :d], dv[..., :d_v]
    return dq, dk, dv


flash.defvjp(_flash_fwd, _flash_bwd)
