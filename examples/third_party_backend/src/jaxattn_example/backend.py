"""`example_dense`: attention with the whole score matrix in memory, in plain `jax.numpy`.

It is the shortest honest backend: it builds the `[batch, heads, q_len, kv_len]` logits,
masks them with `inputs.mask.materialize(...)` (one call covers every mask the core can
express: causal, windows, chunks, segments, query positions, dense arrays and their `&`
and `|`), and normalizes with the sinks in the denominator. Gradients come from JAX's
autodiff of the same code. What it cannot do it says in `supports()`, with a reason per
limit, so that `auto` passes it over and `jaxattn explain` tells the user why:

* dropout (it has none);
* more than `MAX_LOGITS` scores per head: the score matrix would not fit in memory the way
  a blockwise kernel's tiles do.

It declares priority -1 everywhere, below the built-in `xla` backend, so `auto` never
prefers it: it is never faster than `xla`. Ask for it by name (`backend="example_dense"`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

import jaxattn

MAX_LOGITS = 4096 * 4096  # q_len * kv_len per (batch, head)


@dataclass(frozen=True)
class ExampleConfig(jaxattn.BackendConfig):
    """Settings of `example_dense`: `operation_configs={"example_dense": {...}}`."""

    backend: ClassVar[str] = "example_dense"
    precision: str | None = None  # "highest" (default: exact float32 dots) or "default" (TF32 on GPUs)

    def __post_init__(self) -> None:
        self.check_choice("precision", ("highest", "default"))


class DenseAttention(jaxattn.OperationImpl):
    """Dense attention for short sequences: every feature of `jaxattn.attention` but dropout."""

    name: ClassVar[str] = "example_dense"
    aliases: ClassVar[tuple[str, ...]] = ("dense_example",)
    op: ClassVar[str] = "attention"
    platforms: ClassVar[tuple[str, ...]] = ("cpu", "gpu", "tpu")
    priority: ClassVar[dict[str, int]] = {"cpu": -1, "gpu": -1, "tpu": -1}
    config_class: ClassVar[type[jaxattn.BackendConfig] | None] = ExampleConfig

    def supports(self, request: jaxattn.AttentionRequest, hardware: jaxattn.Hardware) -> jaxattn.Support:
        reasons = []
        if request.dropout:
            reasons.append("example_dense has no dropout")
        if request.q_len * request.kv_len > MAX_LOGITS:
            reasons.append(f"example_dense holds q_len x kv_len scores per head in memory: at most {MAX_LOGITS}, "
                           f"got {request.q_len} x {request.kv_len}")
        return jaxattn.Support.from_reasons(reasons)

    def forward_native(self, inputs: jaxattn.AttentionInputs,
                       metadata: jaxattn.OperationMetadata) -> tuple[jax.Array, jax.Array | None]:
        precision = metadata.operation_config(self.name, ExampleConfig).precision or "highest"
        out, lse = dense_attention(inputs, precision)
        return out, (lse if inputs.return_lse else None)


def _visible(inputs: jaxattn.AttentionInputs, q_len: int, kv_len: int) -> jax.Array:
    """`[B|1, H|1, q_len, kv_len]`: which key each query may see (mask and sequence lengths)."""
    visible = jnp.ones((1, 1, q_len, kv_len), bool)
    if inputs.mask is not None:
        visible = visible & inputs.mask.materialize(q_len, kv_len)
    if inputs.kv_seq_lengths is not None:
        visible = visible & (jnp.arange(kv_len) < inputs.kv_seq_lengths[:, None, None, None])
    if inputs.q_seq_lengths is not None:
        visible = visible & (jnp.arange(q_len)[:, None] < inputs.q_seq_lengths[:, None, None, None])
    return visible


def dense_attention(inputs: jaxattn.AttentionInputs, precision: Any = "highest") -> tuple[jax.Array, jax.Array]:
    """`(out [B, q, Hq, Dv], lse [B, Hq, q])`; rows that see no key give zeros and lse -inf."""
    q, k, v = inputs.query, inputs.key, inputs.value
    q_len, q_heads, kv_len, kv_heads = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    k = jnp.repeat(k, q_heads // kv_heads, axis=2)  # grouped-query attention: share each K/V head
    v = jnp.repeat(v, q_heads // kv_heads, axis=2)
    f32 = jnp.float32
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(f32), k.astype(f32), precision=precision) * inputs.scale
    if inputs.bias is not None:
        logits = logits + inputs.bias.astype(f32)
    if inputs.logits_soft_cap is not None:
        logits = inputs.logits_soft_cap * jnp.tanh(logits / inputs.logits_soft_cap)
    visible = jnp.broadcast_to(_visible(inputs, q_len, kv_len), logits.shape)
    logits = jnp.where(visible, logits, -jnp.inf)

    has_key = jnp.any(visible, axis=-1)  # [B, H, q]
    # The softmax is the same for any shift m; m only keeps exp() in range, so it carries no gradient.
    m = jnp.where(has_key, jnp.max(logits, axis=-1), 0.0)
    sinks = None if inputs.sinks is None else inputs.sinks.astype(f32)[None, :, None]
    if sinks is not None:
        m = jnp.maximum(m, jnp.where(has_key, sinks, 0.0))
    m = jax.lax.stop_gradient(m)
    weights = jnp.exp(logits - m[..., None])  # 0 where masked
    denom = weights.sum(axis=-1)
    if sinks is not None:
        denom = denom + jnp.exp(sinks - m)  # the sink joins the denominator and carries no value
    safe = jnp.where(has_key, denom, 1.0)  # no 0/0 and no log(0) on rows without keys (nor in their gradients)
    probs = jnp.where(has_key[..., None], weights / safe[..., None], 0.0)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(f32), precision=precision)
    lse = jnp.where(has_key, jnp.log(safe) + m, -jnp.inf)
    return out.astype(v.dtype), lse
