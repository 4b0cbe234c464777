"""Quantized KV storage: int8 and float8_e4m3fn values with one scale per token and head.

Decode reads the whole cache for every token it produces, so its speed is the cache's
bytes per token. Storing keys and values in one byte each, with a float32 scale per
token and head (4 bytes per `head_dim` values: 3% at head_dim 128), halves those bytes
against bf16. The scheme is symmetric and per token and head, as MaxText and vLLM do:
`x ≈ values * scale[..., None]`, `scale = max|x| / qmax` over the head_dim axis, so one
outlier token or head never costs the others their precision, and a token's scale is
written once, with the token, never revised.

The same pair (values, scales) is what `paged_attention` takes (`k_scale`/`v_scale`),
what `update_paged_cache` writes and what `KVCache` stores. Kernels never dequantize the
cache into a copy: they convert each loaded tile and fold the scale into the logits (K)
or the probabilities (V).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

QUANT_DTYPES: dict[str, float] = {"int8": 127.0, "float8_e4m3fn": 448.0}
"""The quantized storage dtypes and the largest magnitude each holds (qmax)."""


def is_quantized(dtype: Any) -> bool:
    """True for one-byte storage (int8, fp8), which needs scales to mean anything."""
    return jnp.dtype(dtype).itemsize == 1


def quant_dtype(dtype: Any, name: str = "dtype") -> jnp.dtype:
    """`dtype` as a supported quantized dtype, or a ValueError naming `name`."""
    try:
        dt = jnp.dtype(dtype)
    except TypeError as err:
        raise ValueError(f"{name}: expected int8 or float8_e4m3fn, got {dtype!r}") from err
    if dt.name not in QUANT_DTYPES:
        raise ValueError(f"{name}: expected int8 or float8_e4m3fn, got {dt.name}")
    return dt


def quantize_kv(x: jax.Array, dtype: Any = jnp.int8) -> tuple[jax.Array, jax.Array]:
    """Symmetric per token and head quantization of keys or values `[..., head_dim]`.

    Returns `(values, scales)`: `values` in `dtype` (int8 or float8_e4m3fn) of `x`'s shape,
    `scales` float32 of shape `x.shape[:-1]` (e.g. `[num_pages, page_size, kv_heads]` for
    pages, `[tokens, kv_heads]` for new tokens), such that `x ≈ values * scales[..., None]`.
    A token whose values are all zero gets scale 1 (and zeros).
    """
    dt = quant_dtype(dtype)
    if not hasattr(x, "shape") or getattr(x, "ndim", 0) < 1 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x: expected a floating-point array [..., head_dim], got {getattr(x, 'dtype', type(x))}")
    qmax = QUANT_DTYPES[dt.name]
    xf = jnp.asarray(x).astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=-1)
    scales = jnp.where(amax > 0, amax / qmax, 1.0).astype(jnp.float32)
    y = jnp.clip(xf / scales[..., None], -qmax, qmax)
    if dt == jnp.int8:
        y = jnp.round(y)
    return y.astype(dt), scales


def dequantize_kv(values: jax.Array, scales: Any, dtype: Any = jnp.float32) -> jax.Array:
    """`values * scales[..., None]` in `dtype`: the inverse of `quantize_kv` (up to rounding).

    `scales` may also be a scalar (one scale for the whole tensor)."""
    scales = jnp.asarray(scales, jnp.float32)
    if scales.ndim:
        scales = scales[..., None]
    return (values.astype(jnp.float32) * scales).astype(dtype)


def quantize_with(x: jax.Array, scales: jax.Array, dtype: Any) -> jax.Array:
    """`x / scales` rounded into `dtype` (a given scale: scalar, or one per row of `x[..., :]`)."""
    dt = jnp.dtype(dtype)
    qmax = QUANT_DTYPES[dt.name]
    s = jnp.asarray(scales, jnp.float32)
    y = jnp.clip(x.astype(jnp.float32) / (s[..., None] if s.ndim else s), -qmax, qmax)
    return (jnp.round(y) if dt == jnp.int8 else y).astype(dt)


def check_scale(scale: Any, name: str, shape: tuple[int, ...], pages: str) -> jax.Array | None:
    """A scale argument as an array: None, a scalar (shape `()`), or exactly `shape`.

    Anything broadcastable to `shape` is accepted and broadcast (a copy of `shape`'s
    size: pass full scales to avoid it). Raises ValueError naming `name`.
    """
    if scale is None:
        return None
    if isinstance(scale, bool):
        raise ValueError(f"{name}: expected a number or a float array broadcastable to {pages} = {shape}, "
                         f"got {scale!r}")
    if isinstance(scale, (int, float, np.integer, np.floating)):
        return jnp.asarray(scale, jnp.float32)
    if not hasattr(scale, "shape") or not hasattr(scale, "dtype"):
        raise ValueError(f"{name}: expected a number or a float array broadcastable to {pages} = {shape}, "
                         f"got {type(scale).__name__}")
    if not jnp.issubdtype(scale.dtype, jnp.floating):
        raise ValueError(f"{name}: expected a floating-point array, got {scale.dtype}")
    got = tuple(scale.shape)
    if got in ((), (1,)):
        return jnp.asarray(scale).reshape(())
    padded = (1,) * (len(shape) - len(got)) + got
    if len(got) > len(shape) or any(g not in (1, w) for g, w in zip(padded, shape)):
        raise ValueError(f"{name}: expected a scalar or an array broadcastable to {pages} = {shape}, got shape {got}")
    scale = jnp.asarray(scale)
    return scale if got == shape else jnp.broadcast_to(scale.reshape(padded), shape)
