"""The feature cases of the conformance suite: small random problems, one feature each.

A case builds the arguments of one `jaxattn.attention` / `jaxattn.paged_attention` call
from a PRNG key, a dtype and a base shape. Inputs are fresh random normals (never
zeros); masks are chosen so that every case has partial tiles, and some cases have rows
that see no key at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..masks import CausalMask, ChunkedCausalMask, QueryPositionMask, SlidingWindowMask
from ..quant import QUANT_DTYPES, quantize_kv

UNQUANTIZED = "unquantized_pages"
"""Key of a quantized case's arguments holding the float `(key_pages, value_pages)` it was
quantized from (not an argument of the call: the suite pops it to measure what is lost)."""


@dataclass(frozen=True)
class Shape:
    """The base problem size; cases derive their shapes from it."""

    batch: int = 2
    seq: int = 128
    num_heads: int = 4
    head_dim: int = 32
    page_size: int = 16


@dataclass(frozen=True)
class Case:
    """One conformance case: `build(key, dtype, shape) -> kwargs` of the call."""

    name: str
    op: str
    build: Callable[[jax.Array, Any, Shape], dict[str, Any]]
    grad: bool = True  # check gradients when the backend declares a backward pass
    description: str = ""


def _normal(key: jax.Array, shape: tuple[int, ...], dtype: Any, scale: float = 1.0) -> jax.Array:
    return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _qkv(key: jax.Array, dtype: Any, s: Shape, *, q_len: int | None = None, kv_len: int | None = None,
         kv_heads: int | None = None, value_dim: int | None = None, scale: float = 1.0) -> dict[str, Any]:
    kq, kk, kv = jax.random.split(key, 3)
    q_len = q_len or s.seq
    kv_len = kv_len or s.seq
    hkv = kv_heads or s.num_heads
    return {
        "query": _normal(kq, (s.batch, q_len, s.num_heads, s.head_dim), dtype, scale),
        "key": _normal(kk, (s.batch, kv_len, hkv, s.head_dim), dtype, scale),
        "value": _normal(kv, (s.batch, kv_len, hkv, value_dim or s.head_dim), dtype),
    }


def _packed_segments(key: jax.Array, batch: int, length: int, count: int = 3) -> jax.Array:
    """Sorted segment ids `[batch, length]`: `count` packed sequences per row."""
    rows = []
    for b in range(batch):
        cuts = np.sort(np.asarray(jax.random.choice(jax.random.fold_in(key, b), np.arange(1, length),
                                                    (count - 1,), replace=False)))
        ids = np.zeros(length, np.int32)
        for c in cuts:
            ids[c:] += 1
        rows.append(ids)
    return jnp.asarray(np.stack(rows))


def _alternate(batch: int, even: int, odd: int) -> jax.Array:
    return jnp.asarray([even if b % 2 == 0 else odd for b in range(batch)], jnp.int32)


def _sub(key: jax.Array, i: int) -> jax.Array:
    return jax.random.fold_in(key, 1000 + i)


def _cache_positions(key: jax.Array, dtype: Any, s: Shape) -> dict[str, Any]:
    """Half a base length of new tokens per row, written after 0, 5, ... tokens already cached."""
    q_len = s.seq // 2
    starts = jnp.asarray([(b * 5 + (s.seq // 3) * (b % 2)) % (s.seq - q_len + 1) for b in range(s.batch)], jnp.int32)
    positions = starts[:, None] + jnp.arange(q_len, dtype=jnp.int32)[None, :]
    return {**_qkv(key, dtype, s, q_len=q_len), "mask": QueryPositionMask(positions),
            "key_value_seq_lengths": starts + q_len}


def attention_cases() -> list[Case]:
    """Every feature of `jaxattn.attention`, one case each (plus combinations that matter)."""

    def case(name: str, description: str, grad: bool = True):
        def register(fn: Callable[[jax.Array, Any, Shape], dict[str, Any]]) -> Case:
            return Case(name, "attention", fn, grad, description)
        return register

    cases: list[Case] = []

    cases.append(case("full", "no mask")(lambda k, d, s: _qkv(k, d, s)))
    cases.append(case("causal", "is_causal, q_len == kv_len")(
        lambda k, d, s: {**_qkv(k, d, s), "is_causal": True}))
    cases.append(case("causal_q_lt_kv", "is_causal, bottom-right aligned, q_len < kv_len")(
        lambda k, d, s: {**_qkv(k, d, s, q_len=s.seq // 2), "is_causal": True}))
    cases.append(case("causal_top_left", "CausalMask(offset=0) with q_len < kv_len")(
        lambda k, d, s: {**_qkv(k, d, s, q_len=s.seq // 2), "mask": CausalMask(0)}))
    cases.append(case("gqa", "grouped-query: half as many K/V heads, causal")(
        lambda k, d, s: {**_qkv(k, d, s, kv_heads=max(1, s.num_heads // 2)), "is_causal": True}))
    cases.append(case("mqa", "multi-query: one K/V head")(
        lambda k, d, s: {**_qkv(k, d, s, kv_heads=1)}))
    cases.append(case("sliding_window", "causal with sliding_window=seq/4")(
        lambda k, d, s: {**_qkv(k, d, s), "is_causal": True, "sliding_window": s.seq // 4}))
    cases.append(case("sliding_window_asym", "sliding_window=(seq/4, seq/8), not causal")(
        lambda k, d, s: {**_qkv(k, d, s), "sliding_window": (s.seq // 4, s.seq // 8)}))
    cases.append(case("chunked_causal", "ChunkedCausalMask(seq/4)")(
        lambda k, d, s: {**_qkv(k, d, s), "mask": ChunkedCausalMask(max(1, s.seq // 4))}))
    cases.append(case("segment_ids", "packed sequences (3 per row), causal")(
        lambda k, d, s: {**_qkv(k, d, s), "is_causal": True,
                         "segment_ids": _packed_segments(_sub(k, 1), s.batch, s.seq)}))
    cases.append(case("seq_lengths", "query and key/value sequence lengths (padding)")(
        lambda k, d, s: {**_qkv(k, d, s),
                         "query_seq_lengths": _alternate(s.batch, s.seq, s.seq // 2 + 3),
                         "key_value_seq_lengths": _alternate(s.batch, s.seq // 2 + 5, s.seq)}))
    cases.append(case("bias", "additive bias [B, H, q, kv]")(
        lambda k, d, s: {**_qkv(k, d, s),
                         "bias": _normal(_sub(k, 2), (s.batch, s.num_heads, s.seq, s.seq), d)}))
    cases.append(case("bool_mask", "random boolean mask [B, 1, q, kv] (True = attend), causal")(
        lambda k, d, s: {**_qkv(k, d, s), "is_causal": True,
                         "mask": jax.random.bernoulli(_sub(k, 3), 0.7, (s.batch, 1, s.seq, s.seq))}))
    cases.append(case("soft_cap", "logits_soft_cap=5 on large logits, causal")(
        lambda k, d, s: {**_qkv(k, d, s, scale=2.0), "is_causal": True, "logits_soft_cap": 5.0}))
    cases.append(case("sinks", "one learned sink logit per query head, causal")(
        lambda k, d, s: {**_qkv(k, d, s), "is_causal": True,
                         "sinks": _normal(_sub(k, 4), (s.num_heads,), jnp.float32)}))
    cases.append(case("fully_masked_rows", "CausalMask(offset=-seq/8): the first rows see no key")(
        lambda k, d, s: {**_qkv(k, d, s), "mask": CausalMask(-(s.seq // 8)), "return_lse": True}))
    cases.append(case("return_lse", "causal, out and lse (gradient through both)")(
        lambda k, d, s: {**_qkv(k, d, s), "is_causal": True, "return_lse": True}))
    cases.append(case("value_head_dim", "value head_dim twice the query/key head_dim")(
        lambda k, d, s: {**_qkv(k, d, s, value_dim=2 * s.head_dim), "is_causal": True}))
    cases.append(case("or_mask", "SlidingWindowMask(8, 8) | ChunkedCausalMask(seq/4)")(
        lambda k, d, s: {**_qkv(k, d, s),
                         "mask": SlidingWindowMask(8, 8) | ChunkedCausalMask(max(1, s.seq // 4))}))
    cases.append(case("query_positions", "QueryPositionMask: a ragged KV cache (each row written from its own "
                      "position), with key/value lengths")(_cache_positions))
    cases.append(case("decode", "one query over a cache twice the base length, causal", grad=False)(
        lambda k, d, s: {**_qkv(k, d, s, q_len=1, kv_len=2 * s.seq), "is_causal": True}))
    cases.append(case("dropout", "dropout_rate=0.25: deterministic per key, differs from no dropout")(
        lambda k, d, s: {**_qkv(k, d, s), "is_causal": True, "dropout_rate": 0.25,
                         "dropout_rng": jax.random.PRNGKey(7)}))
    return cases


def _page_table(key: jax.Array, num_seqs: int, pages_per_seq: int) -> tuple[jax.Array, int]:
    """Shuffled, non-overlapping pages (plus spare pages nobody owns)."""
    num_pages = num_seqs * pages_per_seq + 3
    perm = np.asarray(jax.random.permutation(key, num_pages))
    return jnp.asarray(perm[: num_seqs * pages_per_seq].reshape(num_seqs, pages_per_seq), jnp.int32), num_pages


def _paged_base(key: jax.Array, dtype: Any, s: Shape, kv_lengths: list[int], tokens: int,
                group: int | None = None) -> dict[str, Any]:
    """A paged problem; slots past each sequence's end hold NaN (never written, never read)."""
    num_seqs = len(kv_lengths)
    pages_per_seq = -(-max(kv_lengths + [1]) // s.page_size) + 1
    kq, kk, kv, kp = jax.random.split(key, 4)
    table, num_pages = _page_table(kp, num_seqs, pages_per_seq)
    hkv = max(1, s.num_heads // 2)
    hq = hkv * group if group else s.num_heads
    key_pages = np.array(_normal(kk, (num_pages, s.page_size, hkv, s.head_dim), dtype))
    value_pages = np.array(_normal(kv, (num_pages, s.page_size, hkv, s.head_dim), dtype))
    written = np.zeros((num_pages, s.page_size), bool)
    for seq, length in enumerate(kv_lengths):
        for t in range(length):
            written[int(table[seq, t // s.page_size]), t % s.page_size] = True
    key_pages[~written] = np.nan
    value_pages[~written] = np.nan
    return {
        "query": _normal(kq, (tokens, hq, s.head_dim), dtype),
        "key_pages": jnp.asarray(key_pages, dtype),
        "value_pages": jnp.asarray(value_pages, dtype),
        "kv_lengths": jnp.asarray(kv_lengths, jnp.int32),
        "page_indices": table,
    }


def _decode(key: jax.Array, dtype: Any, s: Shape) -> dict[str, Any]:
    lengths = [3 * s.page_size + 5, 0, 7 * s.page_size - 1, s.page_size]
    return _paged_base(key, dtype, s, lengths, tokens=len(lengths))


def _ragged(key: jax.Array, dtype: Any, s: Shape, group: int | None = None) -> dict[str, Any]:
    lengths = [2 * s.page_size + 9, 5 * s.page_size + 3, 40, 0, s.page_size + 1]
    q_counts = [2 * s.page_size + 9, 17, 1, 0, 1]  # a whole prefill, a chunk, decodes, empty
    cu = np.concatenate([[0], np.cumsum(q_counts)]).astype(np.int32)
    args = _paged_base(key, dtype, s, lengths, tokens=int(cu[-1]) + 6, group=group)  # 6 padding tokens
    return {**args, "cu_q_lens": jnp.asarray(cu)}


def _quantized(args: dict[str, Any], dtype: str, per_tensor: bool = False) -> dict[str, Any]:
    """`args` with its pages quantized to `dtype` (per token and head, or one scale per tensor),
    the float pages kept under `UNQUANTIZED`. Never-written slots (NaN) get NaN scales."""
    out = {**args, UNQUANTIZED: (args["key_pages"], args["value_pages"])}
    for pages, scale in (("key_pages", "k_scale"), ("value_pages", "v_scale")):
        x = args[pages].astype(jnp.float32)
        if per_tensor:
            s = jnp.nanmax(jnp.abs(x)) / QUANT_DTYPES[dtype]
            y = jnp.clip(jnp.nan_to_num(x) / s, -QUANT_DTYPES[dtype], QUANT_DTYPES[dtype])
            out[pages], out[scale] = (jnp.round(y) if dtype == "int8" else y).astype(dtype), s
        else:
            out[pages], out[scale] = quantize_kv(x, dtype)
    return out


def paged_cases() -> list[Case]:
    """Every feature of `jaxattn.paged_attention`."""
    return [
        Case("paged_decode", "paged_attention", _decode, False,
             "decode over shuffled pages, lengths not multiples of the page size, an empty sequence"),
        Case("paged_ragged", "paged_attention", _ragged, False,
             "ragged batch: a whole prefill, a prefill chunk, decodes, an empty sequence, padding"),
        Case("paged_window", "paged_attention",
             lambda k, d, s: {**_ragged(k, d, s), "sliding_window": s.page_size + 3}, False,
             "ragged batch with a sliding window"),
        Case("paged_soft_cap", "paged_attention",
             lambda k, d, s: {**_decode(k, d, s), "logits_soft_cap": 3.0}, False,
             "decode with logits_soft_cap=3"),
        Case("paged_group3", "paged_attention", lambda k, d, s: _ragged(k, d, s, group=3), False,
             "ragged batch with 3 query heads per kv head (not a power of two)"),
        Case("paged_long", "paged_attention",
             lambda k, d, s: _paged_base(k, d, s, [40 * s.page_size + 3, 7, 33 * s.page_size], tokens=3), False,
             "decode over long sequences (tens of pages: split-KV territory) beside a short one"),
        Case("paged_sinks", "paged_attention",
             lambda k, d, s: {**_ragged(k, d, s),
                              "sinks": _normal(_sub(k, 5), (s.num_heads,), jnp.float32)}, False,
             "ragged batch with sinks"),
        Case("paged_int8", "paged_attention",
             lambda k, d, s: {**_quantized(_ragged(k, d, s), "int8"), "sliding_window": s.page_size + 3,
                              "sinks": _normal(_sub(k, 6), (s.num_heads,), jnp.float32)}, False,
             "int8 pages, per token and head scales: ragged batch with a window and sinks"),
        Case("paged_fp8", "paged_attention",
             lambda k, d, s: {**_quantized(_decode(k, d, s), "float8_e4m3fn"), "logits_soft_cap": 3.0}, False,
             "float8_e4m3fn pages, per token and head scales: decode with logits_soft_cap=3"),
        Case("paged_fp8_per_tensor", "paged_attention",
             lambda k, d, s: _quantized(_ragged(k, d, s, group=3), "float8_e4m3fn", per_tensor=True), False,
             "float8_e4m3fn pages with one scalar scale each for K and V: ragged batch, 3 heads per kv head"),
    ]


def all_cases(op: str = "attention") -> list[Case]:
    return attention_cases() if op == "attention" else paged_cases()
