"""`attention_fn`: Flax's `dot_product_attention` signature, computed by a jaxattn backend.

Flax's attention modules (`nnx.MultiHeadAttention`, `linen.MultiHeadDotProductAttention`)
call `attention_fn(query, key, value, mask=..., dropout_rng=..., dropout_rate=...,
broadcast_dropout=..., deterministic=..., dtype=..., precision=..., module=...,
is_causal=...)` with `[batch..., length, heads, depth]` arrays and masks broadcastable to
`[batch..., heads, q_length, kv_length]` (nonzero = attend, float or bool, as
`make_causal_mask` / `make_attention_mask` build them). This module keeps those
conventions: `is_causal` is top-left (query `i` sees keys `j <= i`), as in Flax, and the
decode cache path works unchanged (it passes a mask of the written slots).

What differs from Flax's default, by design:
* a query row whose keys are all masked returns zeros (Flax returns the mean of the values);
* dropout draws its own random keep-mask per (batch, head) from `dropout_rng`, so the
  dropped positions differ from Flax's, and `broadcast_dropout` is not applied (the
  expected output is the same; the bits are not);
* `precision` is not used: each backend chooses its own (the `xla` reference computes in
  float32 at the highest precision);
* `module` (Flax's `sow_weights=True`) is rejected: no backend forms the attention weights.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from ..api import Backend, attention
from ..masks import CausalMask, DenseMask, Mask
from ..metadata import OperationMetadata


def attention_keywords(*exclude: str) -> tuple[str, ...]:
    """The keyword arguments of `jaxattn.attention`, less `exclude` and the arrays q/k/v."""
    skip = {"query", "key", "value", *exclude}
    return tuple(p for p in inspect.signature(attention).parameters if p not in skip)


FN_KEYWORDS = attention_keywords("bias", "mask", "is_causal", "dropout_rate", "dropout_rng", "backend", "metadata",
                                 "return_lse")
"""What `attention_fn` passes through (its own arguments aside; no lse: Flax expects one array)."""


def check_attention_kwargs(kwargs: Mapping[str, Any], where: str, allowed: tuple[str, ...]) -> None:
    """ValueError naming any keyword that `jaxattn.attention` would not take here."""
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown keyword(s) {unknown}; expected keywords of jaxattn.attention: "
                         f"{', '.join(allowed)}")


def _promote(query: Any, key: Any, value: Any, dtype: Any, promote_dtype: Callable[..., Any] | None) -> tuple:
    if promote_dtype is not None:
        return tuple(promote_dtype((query, key, value), dtype=dtype))
    dtype = jnp.result_type(query, key, value) if dtype is None else dtype
    return tuple(jnp.asarray(x, dtype) for x in (query, key, value))


def _batch_flat(x: jax.Array, batch_shape: tuple[int, ...]) -> jax.Array:
    """`[batch..., L, H, D]` -> `[prod(batch), L, H, D]`."""
    return x.reshape((math.prod(batch_shape),) + x.shape[-3:])


def _pairwise_flat(x: Any, batch_shape: tuple[int, ...], name: str) -> jax.Array:
    """A mask or bias broadcastable to `[batch..., H, T, S]` -> `[prod(batch) | 1, H|1, T|1, S|1]`."""
    x = jnp.asarray(x)
    rank = len(batch_shape) + 3
    if x.ndim > rank:
        raise ValueError(f"{name}: expected an array broadcastable to [batch..., heads, q_length, kv_length] "
                         f"(rank <= {rank}), got shape {x.shape}")
    x = x.reshape((1,) * (rank - x.ndim) + x.shape)
    lead = x.shape[: len(batch_shape)]
    if all(d == 1 for d in lead):
        return x.reshape((1,) + x.shape[len(batch_shape):])
    return jnp.broadcast_to(x, batch_shape + x.shape[len(batch_shape):]).reshape((-1,) + x.shape[len(batch_shape):])


def attention_fn(
    query: jax.Array, key: jax.Array, value: jax.Array, bias: jax.Array | None = None,
    mask: jax.Array | None = None, broadcast_dropout: bool = True, dropout_rng: jax.Array | None = None,
    dropout_rate: float = 0.0, deterministic: bool = False, dtype: Any = None, precision: Any = None,
    module: Any = None, promote_dtype: Callable[..., Any] | None = None, is_causal: bool = False, *,
    backend: Backend = "auto", metadata: OperationMetadata | None = None, **attention_kwargs: Any,
) -> jax.Array:
    """Drop-in `attention_fn` for Flax's attention modules (see the module docstring).

    `backend`, `metadata` and any keyword of `jaxattn.attention` (`logits_soft_cap`,
    `sinks`, `scale`, `segment_ids`...) are jaxattn's; bind them with `make_attention_fn`.
    """
    del precision, broadcast_dropout  # documented above: not used
    if module is not None:
        raise ValueError("module: jaxattn never forms the attention weights, so sow_weights=True cannot sow them; "
                         "use Flax's default attention_fn where the weights are needed")
    check_attention_kwargs(attention_kwargs, "attention_fn", FN_KEYWORDS)
    query, key, value = _promote(query, key, value, dtype, promote_dtype)
    if query.ndim < 3 or key.ndim != query.ndim or value.ndim != query.ndim:
        raise ValueError(f"query/key/value: expected [batch..., length, heads, depth] of one rank, got shapes "
                         f"{query.shape}, {key.shape}, {value.shape}")
    batch_shape = tuple(query.shape[:-3])
    if key.shape[:-3] != batch_shape or value.shape[:-3] != batch_shape:
        raise ValueError(f"key/value: batch dims must match query's {batch_shape}, got {key.shape} and {value.shape}")
    masks: list[Mask] = []
    if mask is not None:
        masks.append(DenseMask(_pairwise_flat(mask, batch_shape, "mask").astype(jnp.bool_)))
    if is_causal:
        masks.append(CausalMask(0))  # Flax's is_causal: top-left, query i sees keys j <= i
    combined = functools.reduce(lambda a, b: a & b, masks) if masks else None
    if bias is not None:
        bias = _pairwise_flat(bias, batch_shape, "bias")
    rate = 0.0 if deterministic else float(dropout_rate)
    out = attention(
        _batch_flat(query, batch_shape), _batch_flat(key, batch_shape), _batch_flat(value, batch_shape),
        bias, combined, dropout_rate=rate, dropout_rng=dropout_rng if rate > 0.0 else None,
        backend=backend, metadata=metadata, **attention_kwargs,
    )
    return out.reshape(batch_shape + out.shape[1:])


def make_attention_fn(backend: Backend = "auto", metadata: OperationMetadata | None = None,
                      **attention_kwargs: Any) -> Callable[..., jax.Array]:
    """`attention_fn` with jaxattn's options bound, for `attention_fn=` of Flax's modules:

        nnx.MultiHeadAttention(..., attention_fn=make_attention_fn(backend="flash", logits_soft_cap=50.0))
    """
    check_attention_kwargs(attention_kwargs, "make_attention_fn", FN_KEYWORDS)
    return functools.partial(attention_fn, backend=backend, metadata=metadata, **attention_kwargs)
