"""`KVCache`: a dense key/value cache for autoregressive decoding, and attention over it.

The cache holds `key`/`value` `[batch, max_len, kv_heads, head_dim]` and `lengths`
`[batch]`, the number of tokens written per sequence. `append` writes each sequence's new
tokens at its own length, so prefill chunks and decode steps of different lengths share one
cache (ragged batches). `cached_attention` appends and attends in one call: the query
written at position `p` of sequence `b` sees exactly the keys `j <= p` (causal; windows
measured from `p`), never an unwritten slot. It does so with a `QueryPositionMask` of each
query's position; a single decode step without a window needs only the sequence lengths,
which every backend with `key_value_seq_lengths` serves.

It is a JAX pytree (a frozen dataclass), so it passes through `jax.jit`, `lax.scan` and
Flax's transforms, and each `append` returns a new cache (donate the old one under jit to
update it in place).

int8/float8_e4m3fn storage (`KVCache.create(..., dtype=jnp.int8)`) keeps a float32 scale
per token and head beside the values (`key_scale`/`value_scale` `[B, max_len, Hkv]`,
written by `append` through `jaxattn.quantize_kv`): half the memory of bf16. Attention over
it (`cached_attention`) runs on a dequantized copy of the cache in the query's dtype, so
it saves memory where the cache is kept, not the bandwidth of attention itself: for decode
speed use the paged cache, whose kernels read the int8/fp8 pages directly
(`paged_attention(..., k_scale=, v_scale=)`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._compat import is_tracer
from .api import Backend, attention
from .masks import QueryPositionMask
from .metadata import OperationMetadata
from .quant import QUANT_DTYPES, dequantize_kv, quantize_kv
from .validation import window_pair


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name}: expected an int > 0, got {value!r}")
    return int(value)


@dataclass(frozen=True, eq=False)
class KVCache:
    """Dense KV cache: `key` `[B, max_len, Hkv, D]`, `value` `[B, max_len, Hkv, Dv]`, `lengths` `[B]`.

    Slots at or past `lengths[b]` are unwritten: attention through `cached_attention`
    never reads them. A quantized cache (int8/float8_e4m3fn `key`/`value`) also holds
    `key_scale`/`value_scale` `[B, max_len, Hkv]` float32 (None otherwise): the keys are
    `key * key_scale[..., None]` (`dequantized`).
    """

    key: jax.Array
    value: jax.Array
    lengths: jax.Array
    key_scale: jax.Array | None = None
    value_scale: jax.Array | None = None

    @classmethod
    def create(cls, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype: Any = jnp.bfloat16, *,
               value_head_dim: int | None = None) -> KVCache:
        """An empty cache (every length 0) of `max_len` slots per sequence.

        `dtype`: float16, bfloat16 or float32, or int8/float8_e4m3fn (with per token and head
        scales beside the values)."""
        batch = _positive_int(batch, "batch")
        max_len = _positive_int(max_len, "max_len")
        kv_heads = _positive_int(kv_heads, "kv_heads")
        head_dim = _positive_int(head_dim, "head_dim")
        value_head_dim = head_dim if value_head_dim is None else _positive_int(value_head_dim, "value_head_dim")
        forms = "float16, bfloat16, float32, int8 or float8_e4m3fn"
        try:
            dtype = jnp.dtype(dtype)
        except TypeError as err:
            raise ValueError(f"dtype: expected {forms}, got {dtype!r}") from err
        quantized = dtype.name in QUANT_DTYPES
        if not quantized and (not jnp.issubdtype(dtype, jnp.floating) or dtype.itemsize < 2):
            raise ValueError(f"dtype: expected {forms} storage, got {dtype}")
        scales = jnp.ones((batch, max_len, kv_heads), jnp.float32) if quantized else None
        return cls(
            key=jnp.zeros((batch, max_len, kv_heads, head_dim), dtype),
            value=jnp.zeros((batch, max_len, kv_heads, value_head_dim), dtype),
            lengths=jnp.zeros((batch,), jnp.int32),
            key_scale=scales,
            value_scale=scales,
        )

    @property
    def quantized(self) -> bool:
        """True when the values are int8/float8_e4m3fn with scales."""
        return self.key_scale is not None

    def dequantized(self, dtype: Any) -> tuple[jax.Array, jax.Array]:
        """`(key, value)` in `dtype`: the scaled values of a quantized cache (a copy of the
        whole cache), or the stored arrays cast to `dtype`."""
        if not self.quantized:
            return self.key.astype(dtype), self.value.astype(dtype)
        return dequantize_kv(self.key, self.key_scale, dtype), dequantize_kv(self.value, self.value_scale, dtype)

    @property
    def batch(self) -> int:
        return int(self.key.shape[0])

    @property
    def max_len(self) -> int:
        return int(self.key.shape[1])

    def append(self, key: jax.Array, value: jax.Array, num_new: jax.Array | None = None) -> KVCache:
        """Write `key`/value `[B, n, Hkv, D]` after each sequence's last token.

        `num_new` `[B]` (default: `n` for every sequence) says how many of the `n` rows of
        each sequence are real: sequence `b` writes its first `num_new[b]` tokens at
        positions `lengths[b], lengths[b] + 1, ...`. New values are cast to the cache's
        dtype (quantized, with their scales, in an int8/fp8 cache). Writing past `max_len`
        is an error when the lengths are concrete; under `jax.jit` the tokens past the end
        are dropped and the length stops at `max_len`.
        """
        n = self._check_new(key, "key", self.key)
        if self._check_new(value, "value", self.value) != n:
            raise ValueError(f"value: expected {n} new tokens (as key), got shape {tuple(value.shape)}")
        counts = self._counts(num_new, n)
        if not (is_tracer(self.lengths) or is_tracer(counts)):
            end = np.asarray(self.lengths) + np.asarray(counts)
            if end.max(initial=0) > self.max_len:
                raise ValueError(f"key: appending {np.asarray(counts).tolist()} tokens to lengths "
                                 f"{np.asarray(self.lengths).tolist()} overflows max_len={self.max_len}")
        step = jnp.arange(n, dtype=jnp.int32)[None, :]
        slot = self.lengths[:, None] + step
        slot = jnp.where(step < counts[:, None], slot, self.max_len)  # padding rows: out of range, dropped
        rows = jnp.arange(self.batch, dtype=jnp.int32)[:, None]

        def write(stored: jax.Array, scales: jax.Array | None, new: jax.Array) -> tuple[jax.Array, Any]:
            if scales is None:
                return stored.at[rows, slot].set(new.astype(stored.dtype), mode="drop"), None
            values, new_scales = quantize_kv(new, stored.dtype)
            return (stored.at[rows, slot].set(values, mode="drop"),
                    scales.at[rows, slot].set(new_scales, mode="drop"))

        key_values, key_scale = write(self.key, self.key_scale, key)
        value_values, value_scale = write(self.value, self.value_scale, value)
        return KVCache(key=key_values, value=value_values, lengths=jnp.minimum(self.lengths + counts, self.max_len),
                       key_scale=key_scale, value_scale=value_scale)

    def _check_new(self, x: Any, name: str, stored: jax.Array) -> int:
        shape = tuple(getattr(x, "shape", ()))
        want = (self.batch, "n", *stored.shape[2:])
        if len(shape) != 4 or shape[0] != self.batch or shape[2:] != stored.shape[2:]:
            raise ValueError(f"{name}: expected shape [batch, n, kv_heads, dim] = {want}, got {shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name}: expected a floating-point array, got {x.dtype}")
        return int(shape[1])

    def _counts(self, num_new: Any, n: int) -> jax.Array:
        if num_new is None:
            return jnp.full((self.batch,), n, jnp.int32)
        if tuple(getattr(num_new, "shape", ())) != (self.batch,) or not jnp.issubdtype(num_new.dtype, jnp.integer):
            raise ValueError(f"num_new: expected an int array [batch] = ({self.batch},), got {num_new!r}")
        if not is_tracer(num_new):
            values = np.asarray(num_new)
            if values.min(initial=0) < 0 or values.max(initial=0) > n:
                raise ValueError(f"num_new: entries must be in [0, {n}] (the new rows given), got {values.tolist()}")
        return jnp.asarray(num_new, jnp.int32)

    def replace(self, **changes: Any) -> KVCache:
        return dataclasses.replace(self, **changes)


jax.tree_util.register_dataclass(KVCache, data_fields=["key", "value", "lengths", "key_scale", "value_scale"],
                                 meta_fields=[])


def cached_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, cache: KVCache, *, num_new: jax.Array | None = None,
    sliding_window: int | tuple[int, int] | None = None, bias: jax.Array | None = None,
    scale: float | None = None, logits_soft_cap: float | None = None, sinks: jax.Array | None = None,
    dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None, return_lse: bool = False,
    backend: Backend = "auto", metadata: OperationMetadata | None = None,
) -> tuple[Any, KVCache]:
    """Append `key`/`value` to `cache`, then attend with `query` over everything it holds.

    `query` `[B, n, Hq, D]` holds the same `n` new tokens as `key`/`value` (`num_new[b]` of
    them real in sequence `b`; the other rows return zeros). The query at position `p`
    sees the keys `j <= p`; `sliding_window=w` (or `(left, right)`, right capped at 0)
    limits that to `p - left <= j`. The other keywords are those of `jaxattn.attention`
    (`bias` is `[B|1, Hq|1, n, max_len]`). Returns `(out, new_cache)`, or
    `((out, lse), new_cache)` with `return_lse`. An int8/fp8 cache is attended through a
    dequantized copy in the query's dtype (`KVCache.dequantized`; see the module docstring).
    """
    if not isinstance(cache, KVCache):
        raise ValueError(f"cache: expected a jaxattn.KVCache, got {type(cache).__name__}")
    n = int(query.shape[1]) if getattr(query, "ndim", 0) == 4 else -1
    if n != key.shape[1]:
        raise ValueError(f"query: expected [batch, n, q_heads, head_dim] with the n={key.shape[1]} new tokens "
                         f"of key, got shape {tuple(getattr(query, 'shape', ()))}")
    window = window_pair(sliding_window)
    new_cache = cache.append(key, value, num_new)
    mask = None
    if n > 1 or window is not None:
        positions = cache.lengths[:, None] + jnp.arange(n, dtype=jnp.int32)[None, :]
        mask = QueryPositionMask(positions, left=None if window is None else window[0], right=0)
    keys, values = (new_cache.key, new_cache.value) if not new_cache.quantized else new_cache.dequantized(query.dtype)
    out = attention(
        query, keys, values, bias, mask, scale=scale,
        query_seq_lengths=None if num_new is None else jnp.asarray(num_new, jnp.int32),
        key_value_seq_lengths=new_cache.lengths, logits_soft_cap=logits_soft_cap, sinks=sinks,
        dropout_rate=dropout_rate, dropout_rng=dropout_rng, return_lse=return_lse,
        backend=backend, metadata=metadata,
    )
    return out, new_cache
