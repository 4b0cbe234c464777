"""jax's TPU ragged paged attention kernel behind the `paged_attention` contract.

`jax.experimental.pallas.ops.tpu.ragged_paged_attention` wants K and V interleaved in
one cache `[num_pages, page_size, 2 * kv_heads, head_dim]` (K heads at even, V heads at
odd positions), a window given as a count of visible keys, and `num_seqs`. This module
converts from jaxattn's paged layout (separate K and V pages), which costs one pass over
the cache per call: engines that run on TPU should keep the combined layout themselves
(`combine_kv_pages`) and call the kernel directly.

Limits of jax's kernel: no sinks, no value head_dim different from head_dim, no lse.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ._compat import tpu_ragged_paged_attention


def combine_kv_pages(key_pages: jax.Array, value_pages: jax.Array) -> jax.Array:
    """`[P, S, Hkv, D]` x 2 -> `[P, S, 2 * Hkv, D]` with K at even and V at odd heads."""
    p, s, h, d = key_pages.shape
    return jnp.stack([key_pages, value_pages], axis=3).reshape(p, s, 2 * h, d)


def tpu_paged_attention(query: jax.Array, key_pages: jax.Array, value_pages: jax.Array,
                        kv_lengths: jax.Array, page_indices: jax.Array, cu_q_lens: jax.Array | None, *,
                        scale: float, window_left: int | None, soft_cap: float | None,
                        kernel: Any = None, **block_sizes: Any) -> jax.Array:
    """`out [tokens, Hq, D]`; `kernel` defaults to jax's TPU kernel (tests pass its reference)."""
    kernel = kernel or tpu_ragged_paged_attention()
    if kernel is None:
        raise NotImplementedError("this JAX has no jax.experimental.pallas.ops.tpu.ragged_paged_attention")
    tokens = query.shape[0]
    num_seqs = page_indices.shape[0]
    lens = kv_lengths.astype(jnp.int32)
    if cu_q_lens is None:  # decode: one query per sequence, token s belongs to sequence s
        cu = jnp.arange(num_seqs + 1, dtype=jnp.int32)
        valid = lens > 0
    else:
        cu = cu_q_lens.astype(jnp.int32)
        valid = jnp.arange(tokens, dtype=jnp.int32) < cu[-1]
    kv = combine_kv_pages(key_pages, value_pages)
    out = kernel(query, kv, lens, page_indices.astype(jnp.int32), cu, jnp.array([num_seqs], jnp.int32),
                 sm_scale=float(scale), sliding_window=None if window_left is None else window_left + 1,
                 soft_cap=soft_cap, **block_sizes)
    if out.shape[0] < tokens:  # jax's reference implementation returns only the real tokens
        out = jnp.pad(out, ((0, tokens - out.shape[0]), (0, 0), (0, 0)))
    return jnp.where(valid[:, None, None], out, 0).astype(query.dtype)
