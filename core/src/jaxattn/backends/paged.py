"""Paged attention in plain `jax.numpy`: the `xla` backend's `paged_attention`.

Each query token attends to the keys of its own sequence, gathered page by page from
the cache in blocks of keys with the same online softmax as dense attention, so no
sequence is ever copied out of the cache whole. Decode is the ragged case with one
query per sequence. A quantized cache (int8/fp8 pages with `k_scale`/`v_scale`) is
dequantized the same way, one gathered block at a time, in float32.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ..inputs import PagedAttentionInputs
from ..quant import is_quantized
from .blockwise import TileConfig, finish, online_softmax, tile_logits


def token_positions(inputs: PagedAttentionInputs) -> tuple[jax.Array, jax.Array, jax.Array]:
    """For each query token: its sequence, its position in that sequence, and whether it is real.

    Decode: token s is the last position of sequence s. Ragged: the queries of sequence
    s are the last `cu_q_lens[s+1] - cu_q_lens[s]` positions of it; tokens past
    `cu_q_lens[-1]` are padding.
    """
    tokens = inputs.query.shape[0]
    kv_lengths = inputs.kv_lengths.astype(jnp.int32)
    if inputs.cu_q_lens is None:
        seq = jnp.arange(tokens, dtype=jnp.int32)
        return seq, kv_lengths - 1, kv_lengths > 0
    cu = inputs.cu_q_lens.astype(jnp.int32)
    t = jnp.arange(tokens, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(cu, t, side="right") - 1, 0, kv_lengths.shape[0] - 1)
    pos = kv_lengths[seq] - (cu[seq + 1] - t)
    valid = (t < cu[-1]) & (pos >= 0)
    return seq, pos, valid


def paged_attention_reference(
    inputs: PagedAttentionInputs,
    *,
    softmax_dtype: Any = jnp.float32,
    block_kv: int = 512,
    block_tokens: int = 128,
) -> tuple[jax.Array, jax.Array]:
    """`out [tokens, Hq, Dv]` and `lse [Hq, tokens]` of a (ragged or decode) paged call."""
    q = inputs.query
    tokens, hq, d = q.shape
    _, page_size, hkv, _ = inputs.key_pages.shape
    dv = inputs.value_pages.shape[-1]
    g = hq // hkv
    pages_per_block = max(1, block_kv // page_size)
    num_seqs, pages_per_seq = inputs.page_indices.shape
    num_blocks = -(-pages_per_seq // pages_per_block)
    page_table = jnp.pad(inputs.page_indices.astype(jnp.int32),
                         ((0, 0), (0, num_blocks * pages_per_block - pages_per_seq)))
    bk = pages_per_block * page_size
    cfg = TileConfig(q_len=1, kv_len=bk, block_q=1, block_kv=bk, scale=float(inputs.scale),
                     soft_cap=inputs.logits_soft_cap, dropout_rate=0.0,
                     softmax_dtype=jnp.dtype(softmax_dtype))
    seq, pos, valid = token_positions(inputs)
    kv_len_of = inputs.kv_lengths.astype(jnp.int32)[seq]
    window = inputs.sliding_window
    sink_rows = None if inputs.sinks is None else inputs.sinks.reshape(1, hkv, g, 1)

    bt = max(1, min(tokens, block_tokens))
    pad_t = -tokens % bt

    def padded(x):
        return jnp.pad(x, [(0, pad_t)] + [(0, 0)] * (x.ndim - 1))

    qs, seqs, poss, valids, lens = (padded(x) for x in (q, seq, pos, valid, kv_len_of))

    def token_block(t0):
        q_t = lax.dynamic_slice_in_dim(qs, t0, bt).reshape(bt, 1, hkv, g, d)
        seq_t, pos_t, valid_t, len_t = (lax.dynamic_slice_in_dim(x, t0, bt) for x in (seqs, poss, valids, lens))

        def tile(j):
            pages = lax.dynamic_slice_in_dim(page_table[seq_t], j * pages_per_block, pages_per_block, axis=1)
            k_j = _dequantize(inputs.key_pages, inputs.k_scale, pages).reshape(bt, bk, hkv, d)
            v_j = _dequantize(inputs.value_pages, inputs.v_scale, pages).reshape(bt, bk, hkv, dv)
            k_pos = j * bk + jnp.arange(bk)
            written = k_pos[None, :] < len_t[:, None]
            ok = (k_pos[None, :] <= pos_t[:, None]) & written & valid_t[:, None]
            if window is not None:
                ok &= k_pos[None, :] >= pos_t[:, None] - window[0]
            # Slots past a sequence's end were never written and may hold anything, NaN
            # included: online_softmax zeroes non-finite values, so 0 * NaN reaches no row.
            return tile_logits(cfg, q_t, k_j, None), ok[:, None, None, None, :], v_j, None

        acc, m, l, poisoned = online_softmax(num_blocks, tile, (bt, hkv, g, 1, dv), cfg.softmax_dtype, like=q_t)
        return finish(acc, m, l, poisoned, sink_rows)

    out, lse = lax.map(token_block, jnp.arange(0, tokens + pad_t, bt))  # [nb, bt, Hkv, G, 1, ...]
    out_dtype = q.dtype if is_quantized(inputs.value_pages.dtype) else inputs.value_pages.dtype
    out = out.reshape(-1, hq, dv)[:tokens].astype(out_dtype)
    lse = lse.reshape(-1, hq)[:tokens].T
    return out, lse


def _dequantize(pages: jax.Array, scale: jax.Array | None, index: jax.Array) -> jax.Array:
    """The gathered pages `pages[index]`, times their scales (float32) when there are scales."""
    tile = pages[index]
    if scale is None:
        return tile
    s = scale.astype(jnp.float32)
    return tile.astype(jnp.float32) * (s[index][..., None] if s.ndim else s)
