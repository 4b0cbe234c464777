"""Writing new key/value tokens into a paged KV cache (the page-table conventions of docs/paged.md).

Pages are `[num_pages, page_size, kv_heads, head_dim]`; token `t` of sequence `s` lives
in page `page_indices[s, t // page_size]`, slot `t % page_size`.

`update_paged_kv_cache` takes the same `kv_lengths` and `cu_q_lens` as the
`paged_attention` call that follows it: lengths *after* the new tokens are appended, and
the new tokens of sequence `s` are its last `cu_q_lens[s+1] - cu_q_lens[s]` positions
(decode, `cu_q_lens=None`: one new token per sequence, at position `kv_lengths[s] - 1`;
sequences with `kv_lengths[s] == 0` write nothing). Padding tokens past `cu_q_lens[-1]`
write nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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


@jax.jit
def update_paged_kv_cache(key_pages: jax.Array, value_pages: jax.Array, key: jax.Array, value: jax.Array,
                          kv_lengths: jax.Array, page_indices: jax.Array,
                          cu_q_lens: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Scatter new tokens' keys/values `[tokens, kv_heads, head_dim]` into their pages.

    Returns the updated `(key_pages, value_pages)`. Under a `jax.jit` that donates the
    page arrays the update happens in place (no copy of the cache).
    """
    num_pages, page_size = key_pages.shape[:2]
    if key.shape[1:] != key_pages.shape[2:] or value.shape[1:] != value_pages.shape[2:]:
        raise ValueError(f"key/value: expected [tokens, {key_pages.shape[2]}, {key_pages.shape[3]}] and "
                         f"[tokens, {value_pages.shape[2]}, {value_pages.shape[3]}], got {key.shape} and {value.shape}")
    if key.shape[0] != value.shape[0]:
        raise ValueError(f"key/value: token counts differ ({key.shape[0]} vs {value.shape[0]})")
    page, slot = token_slots(kv_lengths, page_indices, key.shape[0], page_size, num_pages, cu_q_lens)
    key_pages = key_pages.at[page, slot].set(key.astype(key_pages.dtype), mode="drop")
    value_pages = value_pages.at[page, slot].set(value.astype(value_pages.dtype), mode="drop")
    return key_pages, value_pages
