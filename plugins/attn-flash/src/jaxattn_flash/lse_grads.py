"""Backward-pass pieces that follow from the lse alone, shared by the Triton and TPU VJPs.

Both kernels' lse carries the query head on axis 1 (Triton `[B, Hq, Sq]`, TPU
`[B, Hq, 1, Sq]`); rows with no visible key have lse -inf and get no gradient; a row
whose lse is NaN (a non-finite logit) is live: its gradients are NaN, not hidden.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def live_rows(lse: jax.Array, d_lse: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(rows with keys, the lse's cotangent in float32 with dead rows zeroed)."""
    live = lse != -jnp.inf
    return live, jnp.where(live, d_lse.astype(jnp.float32), 0.0)


def sinks_grad(sinks: jax.Array, lse: jax.Array, live: jax.Array, delta: jax.Array) -> jax.Array:
    """d sinks: each sink's probability `exp(s_h - lse)` times `-delta` (delta = dO·O - dlse),
    summed over every row of its head."""
    sink = sinks.astype(jnp.float32).reshape((1, -1) + (1,) * (lse.ndim - 2))
    p_sink = jnp.where(live, jnp.exp(sink - jnp.where(live, lse, 0.0)), 0.0)
    others = tuple(a for a in range(lse.ndim) if a != 1)
    return jnp.sum(p_sink * -delta, axis=others).astype(sinks.dtype)
