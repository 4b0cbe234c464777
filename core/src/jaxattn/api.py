"""The public entry points: `attention`, `paged_attention`, `select`, `explain`.

Each call validates its arguments, builds an `AttentionRequest` from shapes alone,
selects a backend (cached; free under `jax.jit`), and runs it, under `shard_map` when
`metadata.mesh` is set; a call with nothing to compute (a zero-size dimension) is answered
by the core (`empty.py`). When the backend `auto` chose raises while it runs (other than a
`ValueError`, which says the input or a config is bad), the call raises
`BackendFailedError` naming it and how to run without it (no silent fallback: the
user's choice of backend must not change behind their back); a backend the user forced
raises its own error unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from jax.ad_checkpoint import checkpoint_name

from . import empty as _empty
from . import hardware as _hardware
from ._compat import is_forward_mode_error
from .hardware import Hardware
from .inputs import AttentionInputs, PagedAttentionInputs
from .metadata import OperationMetadata
from .operation import Output
from .request import AttentionRequest
from .selector import Selection
from .selector import select as _select
from .sharding import run_sharded
from .validation import build_attention_inputs, build_paged_inputs

Backend = str | Sequence[str]
FORWARD_MODE = (
    "jaxattn: forward-mode autodiff (jax.jvp, jax.jacfwd) is not supported: backends define "
    "reverse-mode gradients only (jax.custom_vjp); use jax.grad, jax.vjp or jax.jacrev"
)
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
    sinks: Any = None, backend: Backend = "auto", metadata: Any = None, hardware: Hardware | None = None,
) -> tuple[Selection, PagedAttentionInputs, OperationMetadata]:
    metadata = _metadata(metadata)
    inputs = build_paged_inputs(
        query, key_pages, value_pages, kv_lengths, page_indices, cu_q_lens=cu_q_lens, scale=scale,
        sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, sinks=sinks, metadata=metadata,
    )
    request = AttentionRequest.from_paged_inputs(inputs, mode=metadata.mode)
    selection = _select(request, hardware or _hardware.current(), backend)
    return selection, inputs, metadata


def _run(selection: Selection, inputs: Any, metadata: OperationMetadata) -> tuple[jax.Array, jax.Array | None]:
    empty = _empty.paged_result(inputs) if isinstance(inputs, PagedAttentionInputs) else \
        _empty.attention_result(inputs)
    if empty is not None:
        return empty
    def backend(inputs: Any, metadata: OperationMetadata, hardware: Hardware) -> Output:
        try:
            return selection.backend(inputs, metadata, hardware)
        except (jax.errors.JaxRuntimeError, ValueError):
            raise  # the device failed (out of memory, ...), or the input or config is bad: not a fault
        except Exception as err:
            if is_forward_mode_error(err):
                raise TypeError(FORWARD_MODE) from err
            if selection.source != "auto":
                raise
            raise selection.failed(err) from err

    if metadata.mesh is not None:
        return run_sharded(backend, inputs, selection.request, metadata, selection.hardware)
    return backend(inputs, metadata, selection.hardware)


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

    Semantics in DESIGN.md: `scale·q·kᵀ (+bias)`, soft-cap, masks (bool array or mask
    object, `is_causal` bottom-right aligned, `sliding_window`, `segment_ids`, sequence
    lengths), softmax in float32 with optional `sinks`, dropout. Grouped-query attention
    by fewer key/value heads. A query row with nothing to attend to returns zeros.
    With `return_lse`, returns `(out, lse)`, lse `[batch, q_heads, q_len]` float32.
    `backend` is "auto", a name or alias, an EasyDeL mechanism name (`AttentionMechanisms`),
    or a list of names in order of preference. `out` is named "context" for remat
    policies (`jax.checkpoint_policies.save_only_these_names("context")`).
    """
    selection, inputs, metadata = _prepare_attention(
        query, key, value, bias, mask, scale=scale, is_causal=is_causal,
        sliding_window=sliding_window, segment_ids=segment_ids, query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths, logits_soft_cap=logits_soft_cap, sinks=sinks,
        dropout_rate=dropout_rate, dropout_rng=dropout_rng, return_lse=return_lse,
        backend=backend, metadata=metadata,
    )
    out, lse = _run(selection, inputs, metadata)
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
    sinks: jax.Array | None = None, backend: Backend = "auto", metadata: OperationMetadata | None = None,
) -> jax.Array:
    """Attention over a paged KV cache: decode, or a ragged mix of prefill and decode.

    Pages are `[num_pages, page_size, kv_heads, head_dim]`; token `t` of sequence `s`
    lives in page `page_indices[s, t // page_size]`, slot `t % page_size`. Without
    `cu_q_lens`, `query` is `[num_seqs, q_heads, head_dim]`, one decode token per
    sequence; with it, `query` is `[total_tokens, q_heads, head_dim]` and the queries of
    sequence `s` are its last `cu_q_lens[s+1] - cu_q_lens[s]` positions, causal.
    """
    selection, inputs, metadata = _prepare_paged(
        query, key_pages, value_pages, kv_lengths, page_indices, cu_q_lens=cu_q_lens, scale=scale,
        sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, sinks=sinks,
        backend=backend, metadata=metadata,
    )
    out, _ = _run(selection, inputs, metadata)
    return out


def select(*args: Any, op: str = "attention", hardware: Hardware | None = None, **kwargs: Any) -> Selection:
    """The `Selection` that `attention(*args, **kwargs)` (or `paged_attention`, with
    `op="paged_attention"`) would make. `hardware` asks "what if I ran on this?"."""
    if op == "attention":
        return _prepare_attention(*args, hardware=hardware, **kwargs)[0]
    if op == "paged_attention":
        return _prepare_paged(*args, hardware=hardware, **kwargs)[0]
    raise ValueError(f"op: expected 'attention' or 'paged_attention', got {op!r}")


def explain(*args: Any, op: str = "attention", hardware: Hardware | None = None, **kwargs: Any) -> str:
    """Human-readable: the backend that would be chosen, and why each other was not."""
    return select(*args, op=op, hardware=hardware, **kwargs).explain()


def select_request(request: AttentionRequest, *, backend: Backend = "auto",
                   hardware: Hardware | None = None) -> Selection:
    """Select for a request built by hand (shapes and features, no arrays)."""
    return _select(request, hardware or _hardware.current(), backend)
