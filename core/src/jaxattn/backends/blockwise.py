"""Blockwise attention in plain `jax.numpy`: the math of the `xla` reference backend.

Keys are processed one block at a time with an online softmax (a `lax.scan`), queries
one block at a time (`lax.map`), so memory grows with the block size, never with
q_len × kv_len: 32k tokens run on a CPU. The backward pass is a `custom_vjp` that
recomputes each tile from the saved log-sum-exp (as FlashAttention does) and uses
`jax.vjp` of the tile's logits, so scale, bias and soft-cap gradients come out right
without hand-written derivatives.

Tiles are laid out `[batch, kv_heads, group, q_block, kv_block]`; grouped-query
attention never repeats K/V.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from .._compat import vary_like
from ..inputs import AttentionInputs
from ..masks import Mask

NEG_INF = -jnp.inf
# The reference must be exact in float32 on every platform (GPUs default to TF32 dots).
PRECISION = lax.Precision.HIGHEST


@dataclass(frozen=True)
class TileConfig:
    """Static settings of one blockwise attention (hashable: a custom_vjp static arg)."""

    q_len: int
    kv_len: int
    block_q: int
    block_kv: int
    scale: float
    soft_cap: float | None
    dropout_rate: float
    softmax_dtype: Any

    @property
    def num_q_blocks(self) -> int:
        return -(-self.q_len // self.block_q)

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.kv_len // self.block_kv)


def tile_logits(cfg: TileConfig, q: jax.Array, k: jax.Array, bias: jax.Array | None) -> jax.Array:
    """`scale·q·kᵀ (+bias)`, soft-capped: q `[B,bq,Hkv,G,D]`, k `[B,bk,Hkv,D]` -> `[B,Hkv,G,bq,bk]`."""
    s = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=jnp.float32, precision=PRECISION)
    s = s.astype(cfg.softmax_dtype) * jnp.asarray(cfg.scale, cfg.softmax_dtype)
    if bias is not None:
        s = s + bias.astype(cfg.softmax_dtype)
    if cfg.soft_cap is not None:
        cap = jnp.asarray(cfg.soft_cap, cfg.softmax_dtype)
        s = cap * jnp.tanh(s / cap)
    return s


def _keep(rng: jax.Array, i: jax.Array, j: jax.Array, rate: float, shape: tuple[int, ...]) -> jax.Array:
    """Dropout's keep-mask for tile (i, j), the same in the forward and backward pass."""
    key = jax.random.fold_in(jax.random.fold_in(rng, i), j)
    return jax.random.bernoulli(key, 1.0 - rate, shape)


# -- per-tile gathering of the dense inputs --------------------------------------------


def _split_heads(x: jax.Array, num_kv_heads: int) -> jax.Array:
    """`[B|1, Hq|1, ...]` -> `[B|1, Hkv|1, G|1, ...]`."""
    if x.shape[1] == 1:
        return x[:, :, None]
    return x.reshape(x.shape[0], num_kv_heads, x.shape[1] // num_kv_heads, *x.shape[2:])


def _bias_tile(bias: jax.Array | None, cfg: TileConfig, i: jax.Array, j: jax.Array,
               num_kv_heads: int) -> jax.Array | None:
    if bias is None:
        return None
    if bias.shape[2] != 1:
        bias = lax.dynamic_slice_in_dim(bias, i * cfg.block_q, cfg.block_q, axis=2)
    if bias.shape[3] != 1:
        bias = lax.dynamic_slice_in_dim(bias, j * cfg.block_kv, cfg.block_kv, axis=3)
    return _split_heads(bias, num_kv_heads)


def _allowed_tile(mask: Mask | None, q_lens: jax.Array | None, kv_lens: jax.Array | None,
                  cfg: TileConfig, i: jax.Array, j: jax.Array, num_kv_heads: int) -> jax.Array:
    """Boolean `[B|1, Hkv|1, G|1, bq, bk]`: the mask, sequence ends and lengths of tile (i, j)."""
    q_pos = i * cfg.block_q + jnp.arange(cfg.block_q)
    k_pos = j * cfg.block_kv + jnp.arange(cfg.block_kv)
    ok = ((q_pos[:, None] < cfg.q_len) & (k_pos[None, :] < cfg.kv_len))[None, None]
    if mask is not None:
        ok = ok & mask.allowed(q_pos, k_pos, cfg.q_len, cfg.kv_len)
    if q_lens is not None:
        ok = ok & (q_pos[None, :, None] < q_lens[:, None, None])[:, None]
    if kv_lens is not None:
        ok = ok & (k_pos[None, None, :] < kv_lens[:, None, None])[:, None]
    return _split_heads(ok, num_kv_heads)


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    n = x.shape[axis]
    if _is_static(n) and (n % multiple == 0 or n == 1):
        return x
    pad = (n + multiple - 1) // multiple * multiple - n  # symbolic-friendly: provably >= multiple
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


# -- forward ----------------------------------------------------------------------------


def online_softmax(
    num_kv_blocks: int,
    tile: Callable[[jax.Array], tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]],
    acc_shape: tuple[int, ...],
    dtype: Any,
    like: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Scan key blocks; `tile(j)` gives `(logits, allowed, v, keep)` of block j.

    `like`: an input whose `shard_map` variance the carries take (see `vary_like`).

    Returns the unnormalized output `acc` (float32, `acc_shape`), the running max `m`
    and the running sum `l` (both `acc_shape[:-1]`), with masked entries excluded, and
    `poisoned` (bool, `acc_shape[:-1]`): the rows whose mask allows a key with a
    non-finite value. Such values are zeroed before `p @ v`, so that `0 * NaN` cannot
    reach the rows that do not see them; `finish` makes the poisoned rows NaN.
    """
    rows = acc_shape[:-1]

    def step(carry, j):
        acc, m, l, poisoned = carry
        s, allowed, v, keep = tile(j)
        s = jnp.where(allowed, s, NEG_INF)
        m_new = jnp.maximum(m, s.max(axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])
        alpha = jnp.exp(m - m_safe)
        l = alpha * l + p.sum(axis=-1)
        if keep is not None:
            p = p * keep
        bad = ~jnp.all(jnp.isfinite(v), axis=-1)  # [B, bk, Hkv]: keys with a non-finite value
        v = jnp.where(bad[..., None], jnp.zeros((), v.dtype), v)
        poisoned = poisoned | jnp.any(allowed & jnp.moveaxis(bad, 1, 2)[:, :, None, None, :], axis=-1)
        pv = jnp.einsum("bhgqk,bkhd->bhgqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32,
                        precision=PRECISION)
        acc = alpha[..., None] * acc + pv
        return (acc, m_new, l, poisoned), None

    init = (
        jnp.zeros(acc_shape, jnp.float32),
        jnp.full(rows, NEG_INF, dtype),
        jnp.zeros(rows, dtype),
        jnp.zeros(rows, bool),
    )
    if like is not None:
        init = tuple(vary_like(x, like) for x in init)
    (acc, m, l, poisoned), _ = lax.scan(step, init, jnp.arange(num_kv_blocks))
    return acc, m, l, poisoned


def finish(acc: jax.Array, m: jax.Array, l: jax.Array, poisoned: jax.Array,
           sinks: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Normalize: `(out, lse)`.

    A row whose running sum is 0 saw no key (every key masked, or every allowed logit
    -inf): out 0, lse -inf. A NaN or +inf logit among the allowed ones makes the sum NaN
    or inf and propagates (out NaN, lse NaN or +inf; the sum, not the max, decides: XLA's
    max may drop NaN); so does a poisoned row's value (out NaN).
    """
    has_key = l != 0
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    if sinks is not None:
        sink = sinks.astype(m.dtype)
        m_all = jnp.where(has_key, jnp.maximum(m_safe, sink), 0.0)
        l = l * jnp.exp(m_safe - m_all) + jnp.exp(sink - m_all)
        acc = acc * jnp.exp(m_safe - m_all)[..., None]
        m_safe = m_all
    l_safe = jnp.where(has_key, l, 1.0)
    out = jnp.where(has_key[..., None], acc / l_safe[..., None].astype(acc.dtype), 0.0)
    out = jnp.where(poisoned[..., None], jnp.nan, out)
    lse = jnp.where(has_key, m_safe + jnp.log(l_safe), NEG_INF).astype(jnp.float32)
    return out, lse


def _sink_rows(sinks: jax.Array | None, num_kv_heads: int) -> jax.Array | None:
    """`[Hq]` -> `[1, Hkv, G, 1]`, to broadcast against per-row statistics."""
    if sinks is None:
        return None
    return sinks.reshape(1, num_kv_heads, -1, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg, q, k, v, bias, sinks, mask, q_lens, kv_lens, rng):
    out, lse = _forward(cfg, q, k, v, bias, sinks, mask, q_lens, kv_lens, rng)
    return out, lse


def _forward(cfg, q, k, v, bias, sinks, mask, q_lens, kv_lens, rng):
    """q `[B,Sq',Hkv,G,D]` (padded), k/v `[B,Skv',Hkv,D]` -> out `[B,Hkv,G,Sq',Dv]`, lse."""
    b, _, hkv, g, _ = q.shape
    dv = v.shape[-1]
    sink_rows = _sink_rows(sinks, hkv)

    def q_block(i):
        q_i = lax.dynamic_slice_in_dim(q, i * cfg.block_q, cfg.block_q, axis=1)

        def tile(j):
            k_j = lax.dynamic_slice_in_dim(k, j * cfg.block_kv, cfg.block_kv, axis=1)
            v_j = lax.dynamic_slice_in_dim(v, j * cfg.block_kv, cfg.block_kv, axis=1)
            s = tile_logits(cfg, q_i, k_j, _bias_tile(bias, cfg, i, j, hkv))
            allowed = _allowed_tile(mask, q_lens, kv_lens, cfg, i, j, hkv)
            keep = None
            if cfg.dropout_rate > 0.0:
                keep = _keep(rng, i, j, cfg.dropout_rate, s.shape) / (1.0 - cfg.dropout_rate)
            return s, allowed, v_j, keep

        acc, m, l, poisoned = online_softmax(cfg.num_kv_blocks, tile, (b, hkv, g, cfg.block_q, dv),
                                             cfg.softmax_dtype, like=q_i)
        return finish(acc, m, l, poisoned, sink_rows)

    out, lse = lax.map(q_block, jnp.arange(cfg.num_q_blocks))  # [nq, B, Hkv, G, bq, ...]
    out = jnp.moveaxis(out, 0, 3).reshape(b, hkv, g, -1, dv)
    lse = jnp.moveaxis(lse, 0, 3).reshape(b, hkv, g, -1)
    return out.astype(v.dtype), lse


def _attention_fwd(cfg, q, k, v, bias, sinks, mask, q_lens, kv_lens, rng):
    out, lse = _forward(cfg, q, k, v, bias, sinks, mask, q_lens, kv_lens, rng)
    return (out, lse), (q, k, v, bias, sinks, mask, q_lens, kv_lens, rng, out, lse)


def _attention_bwd(cfg, residuals, cotangents):
    q, k, v, bias, sinks, mask, q_lens, kv_lens, rng, out, lse = residuals
    d_out, d_lse = cotangents
    b, _, hkv, g, _ = q.shape
    d_out = d_out.astype(jnp.float32)
    has_key = lse != NEG_INF  # NaN (a non-finite logit) propagates into the gradients
    d_lse = jnp.where(has_key, d_lse.astype(jnp.float32), 0.0)
    delta = jnp.sum(d_out * out.astype(jnp.float32), axis=-1)  # [B,Hkv,G,Sq']
    lse_safe = jnp.where(has_key, lse, 0.0)
    bias_tile_shape = None
    if bias is not None:
        bias_tile_shape = _bias_tile(bias, cfg, jnp.int32(0), jnp.int32(0), hkv).shape

    def q_block(carry, i):
        dk_acc, dv_acc, dbias_acc = carry
        rows = lambda x: lax.dynamic_slice_in_dim(x, i * cfg.block_q, cfg.block_q, axis=3)  # noqa: E731
        q_i = lax.dynamic_slice_in_dim(q, i * cfg.block_q, cfg.block_q, axis=1)
        do_i, lse_i, delta_i, dlse_i = rows(d_out), rows(lse_safe), rows(delta), rows(d_lse)
        live_i = rows(has_key)

        def kv_block(dq_i, j):
            k_j = lax.dynamic_slice_in_dim(k, j * cfg.block_kv, cfg.block_kv, axis=1)
            v_j = lax.dynamic_slice_in_dim(v, j * cfg.block_kv, cfg.block_kv, axis=1)
            bias_ij = _bias_tile(bias, cfg, i, j, hkv)
            # float32 operands give the same logits (bf16 products are exact in float32)
            # and keep the per-tile gradients from rounding to the input dtype.
            s, tile_vjp = jax.vjp(functools.partial(tile_logits, cfg), q_i.astype(jnp.float32),
                                  k_j.astype(jnp.float32), bias_ij)
            allowed = _allowed_tile(mask, q_lens, kv_lens, cfg, i, j, hkv) & live_i[..., None]
            p = jnp.where(allowed, jnp.exp(s - lse_i[..., None]), 0.0)
            # as in the forward: a non-finite value reaches no row through dP (its rows
            # carry it in delta, from their NaN output)
            v_j = jnp.where(jnp.isfinite(v_j), v_j, jnp.zeros((), v_j.dtype))
            dp = jnp.einsum("bhgqd,bkhd->bhgqk", do_i, v_j.astype(jnp.float32), precision=PRECISION)
            p_dropped = p
            if cfg.dropout_rate > 0.0:
                keep = _keep(rng, i, j, cfg.dropout_rate, s.shape) / (1.0 - cfg.dropout_rate)
                p_dropped, dp = p * keep, dp * keep
            dv_j = jnp.einsum("bhgqk,bhgqd->bkhd", p_dropped, do_i, precision=PRECISION)
            ds = jnp.where(allowed, p * (dp - delta_i[..., None] + dlse_i[..., None]), 0.0)
            dq_t, dk_j, dbias_ij = tile_vjp(ds.astype(s.dtype))
            return dq_i + dq_t, (dk_j, dv_j, dbias_ij)

        dq_i, (dk_i, dv_i, dbias_i) = lax.scan(
            kv_block, vary_like(jnp.zeros(q_i.shape, jnp.float32), q_i), jnp.arange(cfg.num_kv_blocks))
        dk_acc = dk_acc + _unblock(dk_i, 1)
        dv_acc = dv_acc + _unblock(dv_i, 1)
        row_grad = None
        if bias is not None:
            # kv-blocks: concatenate along kv when bias has a kv axis, else sum.
            dbias_i = _unblock(dbias_i, 4) if bias_tile_shape[4] != 1 else dbias_i.sum(axis=0)
            if bias_tile_shape[3] != 1:
                row_grad = dbias_i
            else:
                dbias_acc = dbias_acc + dbias_i
        return (dk_acc, dv_acc, dbias_acc), (dq_i, row_grad)

    dbias_init = None
    if bias is not None and bias_tile_shape[3] == 1:
        kv_extent = bias.shape[3]
        dbias_init = jnp.zeros(bias_tile_shape[:4] + (kv_extent,), jnp.float32)
    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32), dbias_init)
    init = jax.tree_util.tree_map(lambda x: vary_like(x, d_out), init)
    (dk, dv, dbias_acc), (dq, dbias_rows) = lax.scan(q_block, init, jnp.arange(cfg.num_q_blocks))
    dq = _unblock(dq, 1)
    dbias = None
    if bias is not None:
        dbias = _unblock(dbias_rows, 3) if bias_tile_shape[3] != 1 else dbias_acc
        dbias = dbias.reshape(bias.shape).astype(bias.dtype)
    dsinks = None
    if sinks is not None:
        p_sink = jnp.where(has_key, jnp.exp(_sink_rows(sinks, hkv).astype(lse.dtype) - lse_safe), 0.0)
        dsinks = jnp.sum(p_sink * (d_lse - delta), axis=(0, 3)).reshape(sinks.shape).astype(sinks.dtype)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias, dsinks,
            None, None, None, None)


def _unblock(stacked: jax.Array, axis: int) -> jax.Array:
    """Blocks stacked on axis 0 -> concatenated along `axis` (of the unstacked shape)."""
    moved = jnp.moveaxis(stacked, 0, axis)
    shape = moved.shape[:axis] + (moved.shape[axis] * moved.shape[axis + 1],) + moved.shape[axis + 2:]
    return moved.reshape(shape)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _is_static(dim: Any) -> bool:
    """A known size, as opposed to a symbolic one (`jax.export` with shape polymorphism)."""
    return isinstance(dim, int)


def _block(length: Any, preferred: int) -> int:
    """The block size for `length`: `preferred`, or the whole length when it is shorter.
    A symbolic length takes `preferred` (it cannot be compared), and is padded to it."""
    return max(1, min(length, preferred)) if _is_static(length) else preferred


def blockwise_attention(
    inputs: AttentionInputs,
    *,
    softmax_dtype: Any = jnp.float32,
    block_q: int = 512,
    block_kv: int = 512,
) -> tuple[jax.Array, jax.Array]:
    """Attention of `inputs` as docs/semantics.md defines it: `out [B,Sq,Hq,Dv]`, `lse [B,Hq,Sq]` (float32)."""
    q, k, v = inputs.query, inputs.key, inputs.value
    b, sq, hq, d = q.shape
    _, skv, hkv, _ = k.shape
    g = hq // hkv
    cfg = TileConfig(
        q_len=sq,
        kv_len=skv,
        block_q=_block(sq, block_q),
        block_kv=_block(skv, block_kv),
        scale=float(inputs.scale),
        soft_cap=None if inputs.logits_soft_cap is None else float(inputs.logits_soft_cap),
        dropout_rate=float(inputs.dropout_rate),
        softmax_dtype=jnp.dtype(softmax_dtype),
    )
    q5 = _pad_to(q.reshape(b, sq, hkv, g, d), 1, cfg.block_q)
    k4 = _pad_to(k, 1, cfg.block_kv)
    v4 = _pad_to(v, 1, cfg.block_kv)
    bias = inputs.bias
    if bias is not None:
        bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
        bias = _pad_to(_pad_to(bias, 2, cfg.block_q), 3, cfg.block_kv)
    rng = inputs.dropout_rng if cfg.dropout_rate > 0.0 else None
    out, lse = _attention(cfg, q5, k4, v4, bias, inputs.sinks, inputs.mask,
                          inputs.q_seq_lengths, inputs.kv_seq_lengths, rng)
    dv = v.shape[-1]
    out = jnp.moveaxis(out, 3, 1)[:, :sq].reshape(b, sq, hq, dv)
    lse = lse.reshape(b, hq, -1)[:, :, :sq]
    return out, lse


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
