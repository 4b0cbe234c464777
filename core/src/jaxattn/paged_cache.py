"""Writing new key/value tokens into a paged KV cache: `update_paged_cache`.

Pages are `[num_pages, page_size, kv_heads, head_dim]`; token `t` of sequence `s` lives
in page `page_indices[s, t // page_size]`, slot `t % page_size` (docs/paged.md). The writer
lives in the core, beside `paged_attention`, because it is half of the same contract and
every paged backend reads what it writes (jaxattn-ragged keeps `update_paged_kv_cache`
as an alias).

It takes the same `kv_lengths` and `cu_q_lens` as the `paged_attention` call that
follows it: lengths *after* the new tokens are appended, and the new tokens of sequence
`s` are its last `cu_q_lens[s+1] - cu_q_lens[s]` positions (decode, `cu_q_lens=None`: one
new token per sequence, at position `kv_lengths[s] - 1`; sequences with
`kv_lengths[s] == 0` write nothing). Padding tokens past `cu_q_lens[-1]` write nothing.

Quantized pages (int8, float8_e4m3fn) come with their scales: per token and head scales
`[num_pages, page_size, kv_heads]` get each new token's own scale (`quantize_kv`); a
scalar scale is a fixed per-tensor scale that new tokens are quantized with.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from .quant import is_quantized, quant_dtype, quantize_kv, quantize_with


def token_slots(kv_lengths: jax.Array, page_indices: jax.Array, tokens: int, page_size: int,
                num_pages: int, cu_q_lens: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """For each new token: (page id, slot). Tokens that write nothing get page id `num_pages`."""
    lens = kv_lengths.astype(jnp.int32)
    num_seqs = lens.shape[0]
    t = jnp.arange(tokens, dtype=jnp.int32)
    if cu_q_lens is None:
        seq = jnp.minimum(t, num_seqs - 1)
        pos = lens[seq] - 1
        valid = (t < num_seqs) & (pos >= 0)
    else:
        cu = cu_q_lens.astype(jnp.int32)
        seq = jnp.clip(jnp.searchsorted(cu, t, side="right") - 1, 0, num_seqs - 1).astype(jnp.int32)
        pos = lens[seq] - (cu[seq + 1] - t)
        valid = (t < cu[-1]) & (pos >= 0)
    safe_pos = jnp.maximum(pos, 0)
    page = page_indices.astype(jnp.int32)[seq, safe_pos // page_size]
    page = jnp.where(valid, page, num_pages)
    return page, safe_pos % page_size


def _check(pages: Any, new: Any, scale: Any, name: str, scale_name: str) -> None:
    for label, x in ((f"{name}_pages", pages), (name, new)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise ValueError(f"{label}: expected an array, got {type(x).__name__}")
    if pages.ndim != 4:
        raise ValueError(f"{name}_pages: expected [num_pages, page_size, kv_heads, head_dim], got {pages.shape}")
    if new.shape[1:] != pages.shape[2:] or new.ndim != 3:
        raise ValueError(f"{name}: expected [tokens, {pages.shape[2]}, {pages.shape[3]}], got {tuple(new.shape)}")
    if not jnp.issubdtype(new.dtype, jnp.floating):
        raise ValueError(f"{name}: expected a floating-point array, got {new.dtype}")
    if is_quantized(pages.dtype):
        quant_dtype(pages.dtype, f"{name}_pages")
        if scale is None:
            raise ValueError(f"{scale_name}: {name}_pages are {pages.dtype}: pass their scales "
                             f"({scale_name}, [num_pages, page_size, kv_heads] or a scalar)")
    if scale is not None:
        shape = tuple(getattr(scale, "shape", (None,)))
        if shape not in ((), tuple(pages.shape[:3])) or not jnp.issubdtype(scale.dtype, jnp.floating):
            raise ValueError(f"{scale_name}: expected a float array [num_pages, page_size, kv_heads] = "
                             f"{tuple(pages.shape[:3])} or a scalar array, got {shape}")


def _write(pages: jax.Array, scale: jax.Array | None, new: jax.Array, page: jax.Array,
           slot: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    if scale is None:
        return pages.at[page, slot].set(new.astype(pages.dtype), mode="drop"), None
    if scale.ndim == 0:  # a fixed per-tensor scale: quantize with it (float pages: divide by it)
        values = quantize_with(new, scale, pages.dtype) if is_quantized(pages.dtype) else new / scale
        return pages.at[page, slot].set(values.astype(pages.dtype), mode="drop"), scale
    if is_quantized(pages.dtype):
        values, scales = quantize_kv(new, pages.dtype)
    else:  # float pages with per-token scales: store the value as is, with scale 1
        values, scales = new, jnp.ones(new.shape[:-1], jnp.float32)
    pages = pages.at[page, slot].set(values.astype(pages.dtype), mode="drop")
    return pages, scale.at[page, slot].set(scales.astype(scale.dtype), mode="drop")


@jax.jit
def update_paged_cache(key_pages: jax.Array, value_pages: jax.Array, key: jax.Array, value: jax.Array,
                       kv_lengths: jax.Array, page_indices: jax.Array, cu_q_lens: jax.Array | None = None, *,
                       k_scale: jax.Array | None = None, v_scale: jax.Array | None = None) -> tuple[jax.Array, ...]:
    """Scatter new tokens' keys/values `[tokens, kv_heads, head_dim]` into their pages.

    Returns `(key_pages, value_pages)`, or `(key_pages, value_pages, k_scale, v_scale)`
    when scales are given (they must be, for int8/float8_e4m3fn pages): per token and
    head scales `[num_pages, page_size, kv_heads]` receive each new token's scale; a
    scalar scale array is fixed and returned as is. Under a `jax.jit` that donates the
    page (and scale) arrays the update happens in place (no copy of the cache).
    """
    _check(key_pages, key, k_scale, "key", "k_scale")
    _check(value_pages, value, v_scale, "value", "v_scale")
    if key.shape[0] != value.shape[0]:
        raise ValueError(f"key/value: token counts differ ({key.shape[0]} vs {value.shape[0]})")
    if (k_scale is None) != (v_scale is None):
        raise ValueError("k_scale/v_scale: pass both or neither (the return value holds both)")
    num_pages, page_size = key_pages.shape[:2]
    page, slot = token_slots(kv_lengths, page_indices, key.shape[0], page_size, num_pages, cu_q_lens)
    key_pages, k_scale = _write(key_pages, k_scale, key, page, slot)
    value_pages, v_scale = _write(value_pages, v_scale, value, page, slot)
    if k_scale is None:
        return key_pages, value_pages
    return key_pages, value_pages, k_scale, v_scale
