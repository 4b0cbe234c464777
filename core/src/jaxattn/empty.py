"""Calls with nothing to compute are answered by the core, never by a backend.

A batch, query length or head count of 0 gives an empty output. No key at all (kv_len 0;
a paged cache without sequences, pages or page slots) makes every query row a row that
sees no key: zeros, and an lse of -inf, as the README's "Semantics" says of fully masked rows. Kernels
tile by block sizes and divide by lengths; none of them is asked to handle these shapes,
so none fails on them. Symbolic dimensions (`jax.export`) are taken as non-zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .inputs import AttentionInputs, PagedAttentionInputs

Output = tuple[jax.Array, jax.Array | None]


def _zero(*dims: object) -> bool:
    return any(isinstance(d, int) and d == 0 for d in dims)


def attention_result(inputs: AttentionInputs) -> Output | None:
    """`(out, lse)` of a call with nothing to compute, or None when there is something."""
    b, q_len, hq, _ = inputs.query.shape
    kv_len = inputs.key.shape[1]
    if not _zero(b, q_len, hq, kv_len):
        return None
    out = jnp.zeros((b, q_len, hq, inputs.value.shape[-1]), inputs.value.dtype)
    return out, jnp.full((b, hq, q_len), -jnp.inf, jnp.float32)


def paged_result(inputs: PagedAttentionInputs) -> Output | None:
    """`(out, lse)` of a paged call with nothing to compute, or None when there is something."""
    tokens, hq, _ = inputs.query.shape
    num_pages, page_size = inputs.key_pages.shape[:2]
    num_seqs, pages_per_seq = inputs.page_indices.shape
    if not _zero(tokens, hq, num_pages, page_size, num_seqs, pages_per_seq):
        return None
    out = jnp.zeros((tokens, hq, inputs.value_pages.shape[-1]), inputs.value_pages.dtype)
    return out, jnp.full((hq, tokens), -jnp.inf, jnp.float32)
