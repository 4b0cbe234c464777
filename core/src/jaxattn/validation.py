"""Checking and normalizing the arguments of `attention` and `paged_attention`.

Every check raises ValueError naming the argument and the expected form, before any
backend runs. Array values (lengths, page tables) are checked where they are concrete and
made safe where they are traced (`value_checks.py`). The result is one
`AttentionInputs`/`PagedAttentionInputs` in which all masking rules are a single `Mask`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import value_checks
from .inputs import AttentionInputs, PagedAttentionInputs
from .masks import CausalMask, DenseMask, Mask, SegmentMask, SlidingWindowMask
from .metadata import OperationMetadata
from .quant import QUANT_DTYPES, check_scale, is_quantized


def _shape(x: Any, name: str) -> tuple[int, ...]:
    shape = getattr(x, "shape", None)
    if shape is None or not hasattr(x, "dtype"):
        raise ValueError(f"{name}: expected an array, got {type(x).__name__}")
    return tuple(shape)


def _rank(x: Any, name: str, rank: int, form: str) -> tuple[int, ...]:
    shape = _shape(x, name)
    if len(shape) != rank:
        raise ValueError(f"{name}: expected rank {rank} {form}, got shape {shape}")
    return shape


def _floating(x: Any, name: str) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name}: expected a floating-point array, got {x.dtype}")


def _integer(x: Any, name: str) -> None:
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name}: expected an integer array, got {x.dtype}")


def _is_number(value: Any) -> bool:
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, float, np.floating, np.integer))


def _positive_or_none(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a finite number > 0 or None, got {value!r}")
    return float(value)


def resolve_scale(scale: Any, head_dim: int, metadata: OperationMetadata) -> float:
    """`scale`, else `metadata.softmax_scale` (checked by `OperationMetadata`), else 1/sqrt(head_dim)."""
    if scale is None:
        scale = metadata.softmax_scale
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not _is_number(scale) or not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite Python number or None, got {scale!r}")
    return float(scale)


def window_pair(sliding_window: Any, name: str = "sliding_window") -> tuple[int, int] | None:
    """`w` -> `(w, w)`; `(left, right)` checked; None stays None."""
    if sliding_window is None:
        return None
    pair = (sliding_window, sliding_window) if not isinstance(sliding_window, (tuple, list)) else sliding_window
    if len(pair) != 2 or not all(
        isinstance(w, (int, np.integer)) and not isinstance(w, bool) and w >= 0 for w in pair
    ):
        raise ValueError(f"{name}: expected an int >= 0 or a pair (left, right) of ints >= 0, "
                         f"got {sliding_window!r}")
    return int(pair[0]), int(pair[1])


def _head_dims(d: int, dv: int, query: str, value: str) -> None:
    """A head_dim of 0 has no meaning (the default scale is 1/sqrt(head_dim)): rejected."""
    if d == 0:
        raise ValueError(f"{query}: head_dim must be > 0, got shape with head_dim 0")
    if dv == 0:
        raise ValueError(f"{value}: head_dim must be > 0, got shape with head_dim 0")


def _lengths(x: Any, name: str, batch: int, limit: int, what: str, metadata: OperationMetadata) -> jax.Array | None:
    """Sequence lengths `[batch]` in `[0, limit]` (values: `value_checks.lengths`)."""
    if x is None:
        return None
    shape = _shape(x, name)
    if shape != (batch,):
        raise ValueError(f"{name}: expected shape [batch] = ({batch},), got {shape}")
    _integer(x, name)
    return value_checks.lengths(x, name, limit, what, checked=metadata.checked)


def _segments(segment_ids: Any, batch: int, q_len: int, kv_len: int) -> SegmentMask | None:
    if segment_ids is None:
        return None
    if isinstance(segment_ids, (tuple, list)):
        if len(segment_ids) != 2:
            raise ValueError("segment_ids: expected one [batch, seq] array or a pair "
                             f"(q_segment_ids, kv_segment_ids), got {len(segment_ids)} items")
        q_ids, kv_ids = segment_ids
    else:
        if q_len != kv_len:
            raise ValueError(f"segment_ids: one array needs q_len == kv_len (got {q_len} and {kv_len}); "
                             "pass (q_segment_ids, kv_segment_ids)")
        q_ids = kv_ids = segment_ids
    for name, ids, length in (("q_segment_ids", q_ids, q_len), ("kv_segment_ids", kv_ids, kv_len)):
        if _shape(ids, f"segment_ids ({name})") != (batch, length):
            raise ValueError(f"segment_ids: {name} must have shape [batch, seq] = {(batch, length)}, "
                             f"got {tuple(ids.shape)}")
        _integer(ids, f"segment_ids ({name})")
    return SegmentMask(jnp.asarray(q_ids), jnp.asarray(kv_ids))


def _user_mask(mask: Any) -> Mask | None:
    if mask is None or isinstance(mask, Mask):
        return mask
    if hasattr(mask, "shape") and hasattr(mask, "dtype"):
        if mask.dtype != jnp.bool_:
            raise ValueError(f"mask: expected a boolean array (True = attend) or a jaxattn mask object, "
                             f"got dtype {mask.dtype}")
        return DenseMask(jnp.asarray(mask))
    raise ValueError(f"mask: expected a boolean array or a jaxattn mask object, got {type(mask).__name__}")


def _and(masks: Sequence[Mask | None]) -> Mask | None:
    result: Mask | None = None
    for m in masks:
        if m is not None:
            result = m if result is None else result & m
    return result


def build_attention_inputs(
    query: Any, key: Any, value: Any, bias: Any, mask: Any, *, scale: Any, is_causal: bool,
    sliding_window: Any, segment_ids: Any, query_seq_lengths: Any, key_value_seq_lengths: Any,
    logits_soft_cap: Any, sinks: Any, dropout_rate: Any, dropout_rng: Any, return_lse: bool,
    metadata: OperationMetadata,
) -> AttentionInputs:
    """Check every argument of `jaxattn.attention` and normalize them."""
    form = "[batch, seq, heads, head_dim]"
    b, q_len, hq, d = _rank(query, "query", 4, form)
    kb, kv_len, hkv, kd = _rank(key, "key", 4, form)
    vb, v_len, vh, dv = _rank(value, "value", 4, form)
    for name, x in (("query", query), ("key", key), ("value", value)):
        _floating(x, name)
    if kb != b or vb != b:
        raise ValueError(f"key/value: batch must equal query's ({b}), got key {kb} and value {vb}")
    if v_len != kv_len:
        raise ValueError(f"value: sequence length must equal key's ({kv_len}), got {v_len}")
    if vh != hkv:
        raise ValueError(f"value: heads must equal key's ({hkv}), got {vh}")
    if kd != d:
        raise ValueError(f"key: head_dim must equal query's ({d}), got {kd}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"key: query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    _head_dims(d, dv, "query", "value")
    if metadata.runtime_dtype is not None:
        dtype = jnp.dtype(metadata.runtime_dtype)
        query, key, value = (jnp.asarray(x).astype(dtype) for x in (query, key, value))
    elif not (query.dtype == key.dtype == value.dtype):
        raise ValueError(f"query/key/value: dtypes must match, got {query.dtype}, {key.dtype}, {value.dtype} "
                         "(cast them, or set metadata.runtime_dtype)")
    if bias is not None:
        shape = _shape(bias, "bias")
        full = (b, hq, q_len, kv_len)
        padded = (1,) * (4 - len(shape)) + shape
        if not 2 <= len(shape) <= 4 or any(g not in (1, w) for g, w in zip(padded, full)):
            raise ValueError(f"bias: expected an array broadcastable to [batch, heads, q_len, kv_len] = "
                             f"{full}, got shape {shape}")
        _floating(bias, "bias")
        bias = jnp.asarray(bias).reshape(padded)
    if not isinstance(is_causal, (bool, np.bool_)):
        raise ValueError(f"is_causal: expected a bool, got {is_causal!r}")
    window = window_pair(sliding_window)
    user_mask = _user_mask(mask)
    if user_mask is not None:
        user_mask.validate(b, hq, q_len, kv_len)
    combined = _and([
        user_mask,
        CausalMask.bottom_right(q_len, kv_len) if is_causal else None,
        SlidingWindowMask(window[0], min(window[1], 0) if is_causal else window[1]) if window else None,
        _segments(segment_ids, b, q_len, kv_len),
    ])
    if sinks is not None:
        if _shape(sinks, "sinks") != (hq,):
            raise ValueError(f"sinks: expected shape [q_heads] = ({hq},), got {tuple(sinks.shape)}")
        _floating(sinks, "sinks")
        sinks = jnp.asarray(sinks)
    if not _is_number(dropout_rate) or not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate: expected a number in [0, 1), got {dropout_rate!r}")
    if dropout_rate > 0.0 and dropout_rng is None:
        raise ValueError("dropout_rng: a PRNG key is required when dropout_rate > 0")
    return AttentionInputs(
        query=query, key=key, value=value, bias=bias, mask=combined, sinks=sinks,
        q_seq_lengths=_lengths(query_seq_lengths, "query_seq_lengths", b, q_len, "q_len", metadata),
        kv_seq_lengths=_lengths(key_value_seq_lengths, "key_value_seq_lengths", b, kv_len, "kv_len", metadata),
        dropout_rng=dropout_rng if dropout_rate > 0.0 else None,
        scale=resolve_scale(scale, d, metadata),
        logits_soft_cap=_positive_or_none(logits_soft_cap, "logits_soft_cap"),
        dropout_rate=float(dropout_rate),
        return_lse=bool(return_lse),
    )


def build_paged_inputs(
    query: Any, key_pages: Any, value_pages: Any, kv_lengths: Any, page_indices: Any, *,
    cu_q_lens: Any, scale: Any, sliding_window: Any, logits_soft_cap: Any, sinks: Any,
    metadata: OperationMetadata, k_scale: Any = None, v_scale: Any = None,
) -> PagedAttentionInputs:
    """Check every argument of `jaxattn.paged_attention` and normalize them."""
    tokens, hq, d = _rank(query, "query", 3, "[tokens, q_heads, head_dim]")
    pages_form = "[num_pages, page_size, kv_heads, head_dim]"
    num_pages, page_size, hkv, kd = _rank(key_pages, "key_pages", 4, pages_form)
    vshape = _rank(value_pages, "value_pages", 4, pages_form)
    if vshape[:3] != (num_pages, page_size, hkv):
        raise ValueError(f"value_pages: expected the first three dims of key_pages {(num_pages, page_size, hkv)}, "
                         f"got {vshape}")
    if kd != d:
        raise ValueError(f"key_pages: head_dim must equal query's ({d}), got {kd}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"key_pages: query heads ({hq}) must be a multiple of kv heads ({hkv})")
    _head_dims(d, vshape[3], "query", "value_pages")
    _floating(query, "query")
    if metadata.runtime_dtype is not None:
        query = jnp.asarray(query).astype(metadata.runtime_dtype)
    if key_pages.dtype != value_pages.dtype:
        raise ValueError(f"key_pages/value_pages: dtypes must match, got {key_pages.dtype} and {value_pages.dtype}")
    k_scale, v_scale = _page_scales(key_pages, k_scale, v_scale, (num_pages, page_size, hkv))
    num_seqs, pages_per_seq = _rank(page_indices, "page_indices", 2, "[num_seqs, pages_per_seq]")
    _integer(page_indices, "page_indices")
    if _shape(kv_lengths, "kv_lengths") != (num_seqs,):
        raise ValueError(f"kv_lengths: expected shape [num_seqs] = ({num_seqs},), got {tuple(kv_lengths.shape)}")
    _integer(kv_lengths, "kv_lengths")
    if cu_q_lens is None:
        if tokens != num_seqs:
            raise ValueError(f"query: decode takes one query per sequence, [num_seqs={num_seqs}, heads, dim]; "
                             f"got {tokens} rows (pass cu_q_lens for a ragged batch)")
    else:
        if _shape(cu_q_lens, "cu_q_lens") != (num_seqs + 1,):
            raise ValueError(f"cu_q_lens: expected shape [num_seqs + 1] = ({num_seqs + 1},), "
                             f"got {tuple(cu_q_lens.shape)}")
        _integer(cu_q_lens, "cu_q_lens")
    page_indices, kv_lengths, cu_q_lens = value_checks.page_table(
        page_indices, kv_lengths, cu_q_lens, num_pages=num_pages, page_size=page_size, tokens=tokens,
        checked=metadata.checked)
    if sinks is not None:
        if _shape(sinks, "sinks") != (hq,):
            raise ValueError(f"sinks: expected shape [q_heads] = ({hq},), got {tuple(sinks.shape)}")
        _floating(sinks, "sinks")
    return PagedAttentionInputs(
        query=query, key_pages=key_pages, value_pages=value_pages,
        kv_lengths=kv_lengths, page_indices=page_indices, cu_q_lens=cu_q_lens,
        sinks=None if sinks is None else jnp.asarray(sinks),
        k_scale=k_scale, v_scale=v_scale,
        scale=resolve_scale(scale, d, metadata),
        sliding_window=_paged_window(sliding_window, pages_per_seq * page_size),
        logits_soft_cap=_positive_or_none(logits_soft_cap, "logits_soft_cap"),
    )


def _page_scales(key_pages: Any, k_scale: Any, v_scale: Any,
                 shape: tuple[int, int, int]) -> tuple[jax.Array | None, jax.Array | None]:
    """Page dtypes and their scales: one-byte pages (int8, float8_e4m3fn) need both scales;
    float pages take them as multipliers."""
    dtype = key_pages.dtype
    if is_quantized(dtype):
        if dtype.name not in QUANT_DTYPES:
            raise ValueError(f"key_pages/value_pages: one-byte pages must be int8 or float8_e4m3fn, got {dtype}")
        missing = [n for n, s in (("k_scale", k_scale), ("v_scale", v_scale)) if s is None]
        if missing:
            raise ValueError(f"{'/'.join(missing)}: key_pages/value_pages are {dtype}, so their scales are "
                             "required: a scalar or an array broadcastable to [num_pages, page_size, kv_heads] "
                             f"= {shape} (jaxattn.quantize_kv returns them)")
    elif not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"key_pages: expected floating-point, int8 or float8_e4m3fn pages, got {dtype}")
    form = "[num_pages, page_size, kv_heads]"
    return check_scale(k_scale, "k_scale", shape, form), check_scale(v_scale, "v_scale", shape, form)


def _paged_window(sliding_window: Any, capacity: int) -> tuple[int, int] | None:
    """`window_pair`, each side clipped to the cache's capacity: a wider window is the same
    window (unbounded), and stays inside int32 where kernels compute with it."""
    window = window_pair(sliding_window)
    return None if window is None else (min(window[0], capacity), min(window[1], capacity))
