"""Everything this plugin takes from JAX's cuDNN attention, and every version difference.

JAX exposes cuDNN fused attention twice:

* publicly, `jax.nn.dot_product_attention(..., implementation="cudnn")`: causal, a left
  sliding window, sequence lengths, bias and bool mask, and the softmax statistics
  (`return_residual`, but transposed and cast to the output dtype);
* privately, `jax._src.cudnn.fused_attention_stablehlo.dot_product_attention`, which the
  public one calls: the same, plus the statistics in float32 `[B, H, T]`, packed
  sequences (`q_offsets`) and dropout with a compile-time seed.

Both have the same signature in jax 0.10.2 and 0.11.2. We call the private one (it is
exactly what the public one lowers to, so it costs nothing more) and fall back to the
public one if a JAX release moves it; `HAS_PRIVATE_API` says which is in use.

The mask conventions below are what JAX's lowering asks of cuDNN (mask types
NO_MASK / PADDING / CAUSAL / PADDING_CAUSAL, and `sliding_window_length`):
* CAUSAL is aligned top-left: query `i` sees key `j` iff `j <= i`, whatever the lengths
  (the same as `jax.nn.dot_product_attention(implementation="xla", is_causal=True)`);
* `sliding_window_length = w` (only together with CAUSAL) adds `j > i - w`.
`CAUSAL_ALIGNMENT` records that; the GPU tests check it against the reference.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

try:  # private: the entry point under jax.nn.dot_product_attention(implementation="cudnn")
    from jax._src.cudnn import fused_attention_stablehlo as _fa

    _PRIVATE_FN = _fa.dot_product_attention
    _MaskType = _fa.MaskType
    HAS_PRIVATE_API = True
except (ImportError, AttributeError):  # pragma: no cover - a future JAX that moved it
    _fa = None
    _PRIVATE_FN = None
    _MaskType = None
    HAS_PRIVATE_API = False

CAUSAL_ALIGNMENT = "top_left"
"""How cuDNN's CAUSAL mask is aligned when q_len != kv_len: "top_left" (j <= i)."""

# The additive mask value JAX's cuDNN path uses for a bool mask (cuDNN mishandles the
# difference of two very large negative numbers, so not the dtype's minimum).
_MASK_VALUE = {"bfloat16": -float(2 << 40), "float16": -float(2 << 14)}


def mask_value(dtype: Any) -> float:
    """The finite value added to logits a bool mask removes, for inputs of `dtype`."""
    return _MASK_VALUE.get(jnp.dtype(dtype).name, -float(2 << 40))


def fused_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, bias: jax.Array | None,
    q_seqlen: jax.Array | None, kv_seqlen: jax.Array | None, *, scale: float, causal: bool,
    window: int | None, return_lse: bool,
) -> tuple[jax.Array, jax.Array | None]:
    """One cuDNN fused-attention call, `[B, T, N, H]` layout.

    `q_seqlen`/`kv_seqlen` (int32 `[B]`, both or neither) select cuDNN's padding mask;
    `causal` its top-left causal mask; `window` (needs `causal`) its sliding window.
    Returns `(out, lse)`, lse float32 `[B, N, T]` or None.
    """
    padding = q_seqlen is not None
    if _PRIVATE_FN is not None:
        mask_type = _MaskType.NO_MASK
        if padding and causal:
            mask_type = _MaskType.PADDING_CAUSAL
        elif causal:
            mask_type = _MaskType.CAUSAL
        elif padding:
            mask_type = _MaskType.PADDING
        result = _PRIVATE_FN(
            query, key, value, bias, None, q_seqlen, kv_seqlen,
            scale=float(scale), mask_type=mask_type, sliding_window_length=window,
            return_residual=return_lse,
        )
        if return_lse:
            out, lse = result
            return out, lse.astype(jnp.float32)
        return result, None
    result = jax.nn.dot_product_attention(  # pragma: no cover - fallback for a future JAX
        query, key, value, bias, None, scale=float(scale), is_causal=causal,
        query_seq_lengths=q_seqlen, key_value_seq_lengths=kv_seqlen,
        local_window_size=None if window is None else (window - 1, 0),
        implementation="cudnn", return_residual=return_lse,
    )
    if return_lse:  # pragma: no cover
        out, lse = result  # [B, T, N] in the output dtype
        return out, jnp.transpose(lse, (0, 2, 1)).astype(jnp.float32)
    return result, None  # pragma: no cover


def public_cudnn_attention(query: jax.Array, key: jax.Array, value: jax.Array, *, is_causal: bool) -> jax.Array:
    """`jax.nn.dot_product_attention(implementation="cudnn")`: the benchmark's baseline."""
    return jax.nn.dot_product_attention(query, key, value, is_causal=is_causal, implementation="cudnn")


__all__ = [
    "CAUSAL_ALIGNMENT", "HAS_PRIVATE_API", "fused_attention",
    "mask_value", "public_cudnn_attention",
]
