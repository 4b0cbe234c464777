"""One example's splash attention with a VJP for both the output and the log-sum-exp.

`splash_attention(static, fwd_info, dq_info, dkv_info, q, k, v, segment_ids, sinks)`
runs jax's splash forward kernel (`q [Hq, S, D]`, `k/v [Hkv, S, D]`, or `[S, D]` for
MQA) and returns `(out [Hq, Sq, Dv], lse [Hq, Sq])`. Its backward runs jax's dK/dV and
dQ kernels. Two things differ from jax's own `custom_vjp`:

* the lse is differentiable: its cotangent `g` enters as `di - g` (with
  `di = rowsum(out * d_out)`), since `d lse_i / d logit_ij = p_ij`;
* rows that saw no key (lse at the kernel's mask value, or -inf when every tile of the
  row was skipped) are made harmless for the backward: their lse is replaced by 0 (so
  every masked `p = exp(mask_value - 0)` is 0) and their `d_out`, `out` and `g` by 0.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from . import _compat

MASK_VALUE = _compat.DEFAULT_MASK_VALUE
DEAD_ROW_LSE = 0.5 * MASK_VALUE  # an lse at or below this means "no visible key"


@dataclass(frozen=True)
class Static:
    """Hashable settings of one kernel call (a `custom_vjp` non-differentiable argument)."""

    block_sizes: Any
    is_mqa: bool
    mask_function: Any  # a lazy.Node, or None (dense masks and unmasked attention)
    soft_cap: float | None
    interpret: Any = False


def _collapse(info: Any) -> Any:
    """Dynamic (dense) mask info carries `[H, nq, nk, bq, bk]` tiles; the kernels want them flat."""
    if info is None:
        return None
    blocks = info.partial_mask_blocks
    if blocks is not None and blocks.ndim > 3:
        info = info._replace(partial_mask_blocks=blocks.reshape(-1, *blocks.shape[-2:]))
    return info


def dead_rows(lse: jax.Array) -> jax.Array:
    """Rows whose lse says they saw no key. A NaN lse (a non-finite logit the row sees) is
    not dead: it propagates (README "Semantics")."""
    return lse <= DEAD_ROW_LSE


def _forward(st: Static, fwd_info: Any, q: jax.Array, k: jax.Array, v: jax.Array,
             segment_ids: Any, sinks: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    out, (lse,) = _compat.splash_forward(
        _collapse(fwd_info), q, k, v, segment_ids, sinks,
        mask_value=MASK_VALUE,
        is_mqa=st.is_mqa,
        block_sizes=st.block_sizes,
        residual_checkpoint_name=None,
        save_residuals=True,
        mask_function=st.mask_function,
        attn_logits_soft_cap=st.soft_cap,
        interpret=st.interpret,
    )
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def splash_attention(st: Static, fwd_info: Any, dq_info: Any, dkv_info: Any, q: jax.Array, k: jax.Array,
                     v: jax.Array, segment_ids: Any, sinks: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    return _forward(st, fwd_info, q, k, v, segment_ids, sinks)


def _fwd(st, fwd_info, dq_info, dkv_info, q, k, v, segment_ids, sinks):
    out, lse = _forward(st, fwd_info, q, k, v, segment_ids, sinks)
    return (out, lse), (dq_info, dkv_info, q, k, v, segment_ids, sinks, out, lse)


def _bwd(st, residuals, cotangents):
    dq_info, dkv_info, q, k, v, segment_ids, sinks, out, lse = residuals
    d_out, d_lse = cotangents
    bs = st.block_sizes
    dead = dead_rows(lse)
    lse = jnp.where(dead, 0.0, lse)
    d_out = jnp.where(dead[..., None], 0, d_out).astype(out.dtype)
    d_lse = jnp.where(dead, 0.0, d_lse.astype(jnp.float32))
    o = jnp.where(dead[..., None], 0, out)
    di = jnp.einsum("hsd,hsd->hs", o.astype(jnp.float32), d_out.astype(jnp.float32)) - d_lse
    common = dict(
        is_mqa=st.is_mqa, mask_value=MASK_VALUE, attn_logits_soft_cap=st.soft_cap,
        q_layout=bs.q_layout, k_layout=bs.k_layout, v_layout=bs.v_layout,
        mask_function=st.mask_function, interpret=st.interpret,
    )
    dq, dk, dv = _compat.splash_bwd_dkv(
        q, k, v, segment_ids, sinks, lse, d_out, di,
        bq=bs.block_q_dkv, bkv=bs.block_kv_dkv, bkv_compute=bs.block_kv_dkv_compute,
        mask_info=_collapse(dkv_info), use_fused_bwd_kernel=bs.use_fused_bwd_kernel, **common,
    )
    if not bs.use_fused_bwd_kernel:
        dq = _compat.splash_bwd_dq(
            q, k, v, segment_ids, sinks, lse, d_out, di,
            bq=bs.block_q_dq, bkv=bs.block_kv_dq, mask_info=_collapse(dq_info), **common,
        )
    d_sinks = None
    if sinks is not None:
        # d/ds of out and lse: -sum_i exp(s - lse_i) * (di_i - g_i); dead rows have di = 0.
        weight = jnp.exp(sinks.astype(jnp.float32)[:, None] - lse)
        d_sinks = -jnp.sum(jnp.where(dead, 0.0, weight) * di, axis=-1).astype(sinks.dtype)
    return None, None, None, dq, dk, dv, None, d_sinks


splash_attention.defvjp(_fwd, _bwd)
