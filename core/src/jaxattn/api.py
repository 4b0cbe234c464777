"""The public entry points: `attention`, `paged_attention`, `select`, `explain`.

Each call validates its arguments, builds an `AttentionRequest` from shapes alone,
selects a backend (cached; free under `jax.jit`), and runs it (`dispatch.py`: under
`shard_map` when `metadata.mesh` is set; with a forward-only choice and a differentiated
one when `auto` made two; a call with nothing to compute, a zero-size dimension, is
answered by the core, `empty.py`). When the backend `auto` chose raises while it runs (other than a
`ValueError`, which says the input or a config is bad), the call raises
`BackendFailedError` naming it and how to run without it (no silent fallback: the
user's choice of backend must not change behind their back); a backend the user forced
raises its own error unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
from jax.ad_checkpoint import checkpoint_name

from . import dispatch, parallel
from . import hardware as _hardware
from .hardware import Hardware
from .inputs import AttentionInputs, PagedAttentionInputs
from .mechanisms import context_parallel_of
from .metadata import OperationMetadata
from .request import AttentionRequest
from .selector import Selection, forced_names
from .selector import select as _select
from .validation import build_attention_inputs, build_paged_inputs

Backend = str | Sequence[str]
CONTEXT_NAME = "context"
"""`attention`'s output carries this `checkpoint_name`, for remat policies that save or drop it."""


def _metadata(metadata: Any) -> OperationMetadata:
    if metadata is None:
        return OperationMetadata()
    if not isinstance(metadata, OperationMetadata):
        raise ValueError(f"metadata: expected a jaxattn.OperationMetadata or None, got {type(metadata).__name__}")
    return metadata


def _prepare_attention(
    query: Any, key: Any, value: Any, bias: Any = None, mask: Any = None, *, scale: Any = None,
    is_causal: bool = False, sliding_window: Any = None, segment_ids: Any = None,
    query_seq_lengths: Any = None, key_value_seq_lengths: Any = None, logits_soft_cap: Any = None,
    sinks: Any = None, dropout_rate: float = 0.0, dropout_rng: Any = None, return_lse: bool = False,
    backend: Backend = "auto", metadata: Any = None, hardware: Hardware | None = None,
) -> tuple[Selection, AttentionInputs, OperationMetadata]:
    metadata = _metadata(metadata)
    scheme = context_parallel_of(forced_names(backend))
    if scheme is not None and metadata.context_parallel == "auto":
        metadata = dataclasses.replace(metadata, context_parallel=scheme)  # e.g. EasyDeL's "ring"
    inputs = build_attention_inputs(
        query, key, value, bias, mask, scale=scale, is_causal=is_causal,
        sliding_window=sliding_window, segment_ids=segment_ids,
        query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
        logits_soft_cap=logits_soft_cap, sinks=sinks, dropout_rate=dropout_rate,
        dropout_rng=dropout_rng, return_lse=return_lse, metadata=metadata,
    )
    request = AttentionRequest.from_inputs(inputs, mode=metadata.mode, needs_grad=metadata.needs_grad)
    selection = _select(request, hardware or _hardware.current(), backend)
    return selection, inputs, metadata


def _prepare_paged(
    query: Any, key_pages: Any, value_pages: Any, kv_lengths: Any, page_indices: Any, *,
    cu_q_lens: Any = None, scale: Any = None, sliding_window: Any = None, logits_soft_cap: Any = None,
    sinks: Any = None, k_scale: Any = None, v_scale: Any = None, backend: Backend = "auto", metadata: Any = None,
    hardware: Hardware | None = None,
) -> tuple[Selection, PagedAttentionInputs, OperationMetadata]:
    metadata = _metadata(metadata)
    inputs = build_paged_inputs(
        query, key_pages, value_pages, kv_lengths, page_indices, cu_q_lens=cu_q_lens, scale=scale,
        sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, sinks=sinks, metadata=metadata,
        k_scale=k_scale, v_scale=v_scale,
    )
    request = AttentionRequest.from_paged_inputs(inputs, mode=metadata.mode)
    selection = _select(request, hardware or _hardware.current(), backend)
    return selection, inputs, metadata


def attention(
    query: jax.Array, key: jax.Array, value: jax.Array, bias: jax.Array | None = None,
    mask: Any = None, *, scale: float | None = None, is_causal: bool = False,
    sliding_window: int | tuple[int, int] | None = None, segment_ids: Any = None,
    query_seq_lengths: jax.Array | None = None, key_value_seq_lengths: jax.Array | None = None,
    logits_soft_cap: float | None = None, sinks: jax.Array | None = None, dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None, return_lse: bool = False, backend: Backend = "auto",
    metadata: OperationMetadata | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Scaled dot-product attention, `[batch, seq, heads, head_dim]` in and out.

    Semantics (docs/semantics.md): `scale·q·kᵀ (+bias)`, soft-cap, masks (bool array or mask
    object, `is_causal` bottom-right aligned, `sliding_window`, `segment_ids`, sequence
    lengths), softmax in float32 with optional `sinks`, dropout. Grouped-query attention
    by fewer key/value heads. A query row with nothing to attend to returns zeros.
    With `return_lse`, returns `(out, lse)`, lse `[batch, q_heads, q_len]` float32.
    `backend` is "auto", a name or alias, an EasyDeL mechanism name (`AttentionMechanisms`),
    or a list of names in order of preference. Under "auto", a call that is differentiated
    and one that is not may run different backends, each the one measured (or declared)
    best for its kind of call. `out` is named "context" for remat policies
    (`jax.checkpoint_policies.save_only_these_names("context")`).
    """
    selection, inputs, metadata = _prepare_attention(
        query, key, value, bias, mask, scale=scale, is_causal=is_causal,
        sliding_window=sliding_window, segment_ids=segment_ids, query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths, logits_soft_cap=logits_soft_cap, sinks=sinks,
        dropout_rate=dropout_rate, dropout_rng=dropout_rng, return_lse=return_lse,
        backend=backend, metadata=metadata,
    )
    out, lse = dispatch.run(selection, inputs, metadata, backend)
    out = checkpoint_name(out, CONTEXT_NAME)
    if return_lse:
        if lse is None:
            raise RuntimeError(f"backend {selection.name!r} returned no lse although return_lse=True")
        return out, lse
    return out


def paged_attention(
    query: jax.Array, key_pages: jax.Array, value_pages: jax.Array, kv_lengths: jax.Array,
    page_indices: jax.Array, *, cu_q_lens: jax.Array | None = None, scale: float | None = None,
    sliding_window: int | tuple[int, int] | None = None, logits_soft_cap: float | None = None,
    sinks: jax.Array | None = None, k_scale: jax.Array | float | None = None,
    v_scale: jax.Array | float | None = None, backend: Backend = "auto", metadata: OperationMetadata | None = None,
) -> jax.Array:
    """Attention over a paged KV cache: decode, or a ragged mix of prefill and decode.

    Pages are `[num_pages, page_size, kv_heads, head_dim]`; token `t` of sequence `s`
    lives in page `page_indices[s, t // page_size]`, slot `t % page_size`. Without
    `cu_q_lens`, `query` is `[num_seqs, q_heads, head_dim]`, one decode token per
    sequence; with it, `query` is `[total_tokens, q_heads, head_dim]` and the queries of
    sequence `s` are its last `cu_q_lens[s+1] - cu_q_lens[s]` positions, causal.

    Quantized cache: `key_pages`/`value_pages` may be int8 or float8_e4m3fn, with
    `k_scale`/`v_scale` (required then) broadcastable to `[num_pages, page_size, kv_heads]`
    (per token and head, as `jaxattn.quantize_kv` makes them) or a scalar: the keys are
    `key_pages * k_scale[..., None]`, likewise the values. Kernels dequantize tile by tile,
    never the whole cache. Scales given with float pages are applied the same way (as
    multipliers). The output has the query's dtype.
    """
    selection, inputs, metadata = _prepare_paged(
        query, key_pages, value_pages, kv_lengths, page_indices, cu_q_lens=cu_q_lens, scale=scale,
        sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, sinks=sinks,
        k_scale=k_scale, v_scale=v_scale, backend=backend, metadata=metadata,
    )
    out, _ = dispatch.run(selection, inputs, metadata)
    return out


def select(*args: Any, op: str = "attention", hardware: Hardware | None = None, **kwargs: Any) -> Selection:
    """The `Selection` that `attention(*args, **kwargs)` (or `paged_attention`, with
    `op="paged_attention"`) would make. `hardware` asks "what if I ran on this?"."""
    if op == "attention":
        selection, inputs, metadata = _prepare_attention(*args, hardware=hardware, **kwargs)
    elif op == "paged_attention":
        selection, inputs, metadata = _prepare_paged(*args, hardware=hardware, **kwargs)
    else:
        raise ValueError(f"op: expected 'attention' or 'paged_attention', got {op!r}")
    return dataclasses.replace(selection, split=_split(selection, inputs, metadata))


def _split(selection: Selection, inputs: Any, metadata: OperationMetadata) -> str:
    """How a call is split over devices, for `explain`."""
    if metadata.mesh is None:
        return ""
    if isinstance(inputs, AttentionInputs) and parallel.sequence_shards(metadata) > 1:
        return parallel.describe(selection.request, inputs, metadata)
    request = selection.request
    rules = metadata.get_shardings(request.mode, "paged" if request.paged else "bshd",
                                   batch=None if request.paged else request.batch,
                                   num_q_heads=request.num_q_heads, num_kv_heads=request.num_kv_heads)
    batch = rules.query[0] if not request.paged else None
    heads = rules.query[1 if request.paged else 2]
    parts = [f"batch over {batch!r}" if batch else "batch replicated",
             f"heads over {heads!r}" if heads else "heads replicated"]
    if rules.kv_repeat > 1:
        parts.append(f"K/V heads repeated {rules.kv_repeat}x to match the head shards")
    return f"shard_map over metadata.mesh: {', '.join(parts)}; the backend runs on each shard"


def explain(*args: Any, op: str = "attention", hardware: Hardware | None = None, **kwargs: Any) -> str:
    """Human-readable: the backend(s) that would be chosen (for differentiated and forward-only
    calls), how (measured, and by how much, or declared priority), and why each other was not."""
    return select(*args, op=op, hardware=hardware, **kwargs).explain()


def select_request(request: AttentionRequest, *, backend: Backend = "auto",
                   hardware: Hardware | None = None) -> Selection:
    """Select for a request built by hand (shapes and features, no arrays)."""
    return _select(request, hardware or _hardware.current(), backend)
