"""The normalized arguments a backend receives, after validation.

`jaxattn.attention` turns its many keyword arguments (is_causal, sliding_window,
segment_ids, a bool mask, ...) into one `AttentionInputs`: all masking is a single
`Mask` object, the scale is resolved, shapes are checked. Backends read these fields;
new fields may be added with defaults without breaking third-party backends.
Both classes are JAX pytrees (arrays are leaves), so they pass through `shard_map`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax

from .masks import Mask


@dataclass(frozen=True, eq=False)
class AttentionInputs:
    """Inputs of one `attention` call. Layout `[batch, seq, heads, head_dim]`.

    `mask` holds every masking rule (causal, window, segments, dense...) or None.
    `q_seq_lengths`/`kv_seq_lengths` are `[batch]` int arrays or None.
    `sinks` is `[q_heads]` or None. `scale` is already resolved to a float.
    """

    query: jax.Array
    key: jax.Array
    value: jax.Array
    bias: jax.Array | None = None
    mask: Mask | None = None
    sinks: jax.Array | None = None
    q_seq_lengths: jax.Array | None = None
    kv_seq_lengths: jax.Array | None = None
    dropout_rng: jax.Array | None = None
    scale: float = 1.0
    logits_soft_cap: float | None = None
    dropout_rate: float = 0.0
    return_lse: bool = False

    def replace(self, **changes: object) -> AttentionInputs:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True, eq=False)
class PagedAttentionInputs:
    """Inputs of one `paged_attention` call (layout: docs/paged.md).

    `cu_q_lens` is None for decode (one query per sequence, `query` `[num_seqs, H, D]`),
    or `[num_seqs + 1]` cumulative query counts for a ragged batch (`query`
    `[total_tokens, H, D]`). `sliding_window` is None or `(left, right)`.
    `k_scale`/`v_scale` are None, a scalar array (one scale for the whole cache) or
    `[num_pages, page_size, kv_heads]` (per token and head): the keys are
    `key_pages * k_scale[..., None]` (int8/float8_e4m3fn pages always have them; float pages may).
    """

    query: jax.Array
    key_pages: jax.Array
    value_pages: jax.Array
    kv_lengths: jax.Array
    page_indices: jax.Array
    cu_q_lens: jax.Array | None = None
    sinks: jax.Array | None = None
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None
    scale: float = 1.0
    sliding_window: tuple[int, int] | None = None
    logits_soft_cap: float | None = None

    def replace(self, **changes: object) -> PagedAttentionInputs:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


jax.tree_util.register_dataclass(
    AttentionInputs,
    data_fields=[
        "query", "key", "value", "bias", "mask", "sinks",
        "q_seq_lengths", "kv_seq_lengths", "dropout_rng",
    ],
    meta_fields=["scale", "logits_soft_cap", "dropout_rate", "return_lse"],
)
jax.tree_util.register_dataclass(
    PagedAttentionInputs,
    data_fields=[
        "query", "key_pages", "value_pages", "kv_lengths", "page_indices", "cu_q_lens", "sinks",
        "k_scale", "v_scale",
    ],
    meta_fields=["scale", "sliding_window", "logits_soft_cap"],
)
