"""A drop-in for `jax.nn.dot_product_attention`: same signature, same semantics, any backend.

`jaxattn.attention` aligns `is_causal` bottom-right (the last query sees the last key), as
FlashAttention and decoding do; `jax.nn.dot_product_attention` aligns it top-left (query
`i` sees keys `j <= i`), and so does its `local_window_size`. This module keeps jax.nn's
conventions exactly, so that replacing the call changes nothing but which kernel runs:
rank 3 (`[T, N, H]`) or rank 4 (`[B, T, N, H]`) inputs, top-left `is_causal` and
`local_window_size=(left, right)`, sequence lengths (query rows past their length return
zeros), `return_residual` (the log-sum-exp `[B, T, N]`, in the key's dtype, without
gradient), and `implementation=None | "xla" | "cudnn" | any jaxattn backend name`
(None: `auto`).

One difference, by design: a query row that no key may attend to (not a padded query row)
returns zeros in jaxattn, while jax.nn's XLA path returns the mean of all values there
(every logit replaced by one large negative number) and a finite residual; jaxattn's
residual for such a row is −inf.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from .api import attention
from .masks import CausalMask, DenseMask, Mask, SlidingWindowMask
from .metadata import OperationMetadata


def _as_4d(x: Any, name: str) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim > 4 or x.ndim == 0:
        raise ValueError(f"{name}: expected rank 1 to 4 broadcastable to [batch, heads, T, S], got shape {x.shape}")
    return x.reshape((1,) * (4 - x.ndim) + x.shape)


def _window(local_window_size: Any) -> tuple[int, int] | None:
    if local_window_size is None:
        return None
    pair = (local_window_size, local_window_size) if isinstance(local_window_size, int) else local_window_size
    if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(
            isinstance(w, int) and not isinstance(w, bool) and w >= 0 for w in pair):
        raise ValueError(f"local_window_size: expected an int >= 0 or a pair (left, right) of ints >= 0, "
                         f"got {local_window_size!r}")
    return int(pair[0]), int(pair[1])


def dot_product_attention(
    query: Any, key: Any, value: Any, bias: Any = None, mask: Any = None, *, scale: float | None = None,
    is_causal: bool = False, query_seq_lengths: Any = None, key_value_seq_lengths: Any = None,
    local_window_size: int | tuple[int, int] | None = None, implementation: str | Sequence[str] | None = None,
    return_residual: bool = False, metadata: OperationMetadata | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """`jax.nn.dot_product_attention`, computed by a jaxattn backend.

    Arguments and results are those of jax.nn (see the module docstring for the one
    difference). `implementation` picks the backend: None is `auto`, "xla" the built-in
    reference, "cudnn" the cudnn plugin, any other name or mechanism that backend; a
    backend that cannot serve the call raises `BackendUnavailableError` with its reasons,
    as jax.nn raises when cuDNN cannot. `metadata` is jaxattn's `OperationMetadata`.
    """
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    rank = query.ndim
    if rank not in (3, 4) or key.ndim != rank or value.ndim != rank:
        raise ValueError(f"query/key/value: expected all rank 3 [T, N, H] or all rank 4 [B, T, N, H], got shapes "
                         f"{query.shape}, {key.shape}, {value.shape}")
    if rank == 3:
        query, key, value = query[None], key[None], value[None]
    if bias is not None:
        bias = _as_4d(bias, "bias")
    masks: list[Mask] = []
    if is_causal:
        masks.append(CausalMask(0))
    window = _window(local_window_size)
    if window is not None:
        masks.append(SlidingWindowMask(window[0], window[1], offset=0))
    if mask is not None:
        mask = _as_4d(mask, "mask")
        if mask.dtype != jnp.bool_:
            raise ValueError(f"mask: expected a boolean array (True = attend), got dtype {mask.dtype}")
        masks.insert(0, DenseMask(mask))
    combined: Mask | None = None
    for m in masks:
        combined = m if combined is None else combined & m
    result = attention(
        query, key, value, bias, combined, scale=scale, query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths, return_lse=return_residual,
        backend="auto" if implementation is None else implementation, metadata=metadata,
    )
    if not return_residual:
        return result[0] if rank == 3 else result
    out, lse = result
    residual = jax.lax.stop_gradient(jnp.swapaxes(lse, 1, 2).astype(key.dtype))  # [B, H, T] -> [B, T, H]
    if rank == 3:
        return out[0], residual[0]
    return out, residual
