"""`FlexibleAttention` (nnx) and `LinenFlexibleAttention` (linen): attention as a module.

A model names its attention once, where it builds the layer (a backend name, a
preference list, or an EasyDeL `attention_mechanism`, plus `OperationMetadata`, dropout
and default keywords such as `is_causal=True` or `logits_soft_cap`), and calls it with
`query, key, value` `[batch, seq, heads, head_dim]` and per-call keywords. With a
`cache=KVCache`, the call appends the new keys/values and attends over the whole cache,
returning `(out, new_cache)` (`jaxattn.cached_attention`).

The modules hold no parameters (projections belong to the model) and only static
configuration, plus an RNG stream when they apply dropout, so they work under `nnx.jit`,
`nnx.remat`, `nnx.scan` over stacked layers and inside `shard_map`. Arrays that vary per
call (sinks, segment ids, lengths, bias) are call arguments, never module defaults.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
from flax import nnx

from ..api import Backend, attention
from ..cache import KVCache, cached_attention
from ..metadata import OperationMetadata
from .functional import attention_keywords, check_attention_kwargs

MODULE_KEYWORDS = attention_keywords("dropout_rate", "dropout_rng", "backend", "metadata")
"""Keywords of `jaxattn.attention` a module takes as defaults or per call (dropout is the module's)."""
_CACHE_KEYWORDS = ("num_new", "sliding_window", "bias", "scale", "logits_soft_cap", "sinks", "return_lse")


@dataclass(frozen=True, eq=False)
class _Static:
    """Holds a value Flax keeps as static module data, hashed by identity (an
    `OperationMetadata` holds dicts and a mesh, which do not hash)."""

    value: Any


def _backend(backend: Backend | None, attention_mechanism: Any) -> str | tuple[str, ...]:
    if backend is not None and str(attention_mechanism) != "auto":
        raise ValueError(f"backend/attention_mechanism: give one of them, got backend={backend!r} and "
                         f"attention_mechanism={attention_mechanism!r}")
    chosen = attention_mechanism if backend is None else backend
    if isinstance(chosen, str):
        return str(chosen.value if hasattr(chosen, "value") else chosen)
    if isinstance(chosen, Sequence) and chosen and all(isinstance(n, str) for n in chosen):
        return tuple(str(n) for n in chosen)
    raise ValueError(f"attention_mechanism: expected a backend or mechanism name, or a list of names, got {chosen!r}")


def _metadata(metadata: Any) -> OperationMetadata | None:
    if metadata is not None and not isinstance(metadata, OperationMetadata):
        raise ValueError(f"metadata: expected a jaxattn.OperationMetadata or None, got {type(metadata).__name__}")
    return metadata


def _defaults(kwargs: Mapping[str, Any], where: str) -> dict[str, Any]:
    kwargs = dict(kwargs)
    check_attention_kwargs(kwargs, where, MODULE_KEYWORDS)
    arrays = sorted(k for k, v in kwargs.items() if isinstance(v, jax.Array) or hasattr(v, "__array__"))
    if arrays:
        raise ValueError(f"{where}: {arrays} hold arrays; pass per-call arrays to __call__, not to the module")
    return kwargs


def _dropout_rate(rate: Any) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout_rate: expected a number in [0, 1), got {rate!r}")
    return float(rate)


def run(backend: Backend, metadata: OperationMetadata | None, defaults: Mapping[str, Any], query: jax.Array,
        key: jax.Array, value: jax.Array, cache: KVCache | None, dropout_rate: float,
        dropout_rng: jax.Array | None, kwargs: dict[str, Any]) -> Any:
    """The call both modules make: `attention`, or `cached_attention` when a cache is given."""
    check_attention_kwargs(kwargs, "__call__", MODULE_KEYWORDS + ("num_new",))
    merged = {**defaults, **kwargs}
    dropout = {"dropout_rate": dropout_rate, "dropout_rng": dropout_rng} if dropout_rate > 0.0 else {}
    if cache is None:
        merged.pop("num_new", None)
        return attention(query, key, value, backend=backend, metadata=metadata, **dropout, **merged)
    if not merged.pop("is_causal", True):
        raise ValueError("is_causal: attention over a KVCache is causal by construction (is_causal=False with cache)")
    check_attention_kwargs(merged, "__call__ with cache", _CACHE_KEYWORDS)
    return cached_attention(query, key, value, cache, backend=backend, metadata=metadata, **dropout, **merged)


class FlexibleAttention(nnx.Module):
    """Attention layer of an nnx model, over any jaxattn backend.

        attn = FlexibleAttention("flash_attn2", is_causal=True, dropout_rate=0.1, rngs=rngs)
        out = attn(q, k, v)                              # training / prefill without a cache
        out, cache = attn(q, k, v, cache=cache)          # append to a KVCache and attend over it

    `attention_mechanism` (or `backend=`) is a jaxattn backend name, an EasyDeL mechanism
    name (`jaxattn.AttentionMechanisms`), a preference list, or "auto". Keywords of
    `jaxattn.attention` given here are defaults for every call; `__call__` takes them too.
    Dropout needs `rngs` (its `dropout` stream) unless `deterministic=True`.
    """

    def __init__(self, attention_mechanism: Any = "auto", *, backend: Backend | None = None,
                 metadata: OperationMetadata | None = None, dropout_rate: float = 0.0, deterministic: bool = False,
                 rngs: nnx.Rngs | None = None, **attention_kwargs: Any) -> None:
        self.backend = _backend(backend, attention_mechanism)
        self.metadata = _Static(_metadata(metadata))
        self.dropout_rate = _dropout_rate(dropout_rate)
        self.deterministic = bool(deterministic)
        self.attention_kwargs = _Static(_defaults(attention_kwargs, "FlexibleAttention"))
        self.rngs = rngs.dropout.fork() if rngs is not None and self.dropout_rate > 0.0 else None

    def __call__(self, query: jax.Array, key: jax.Array, value: jax.Array, *, cache: KVCache | None = None,
                 deterministic: bool | None = None, rngs: nnx.Rngs | None = None, **kwargs: Any) -> Any:
        deterministic = self.deterministic if deterministic is None else deterministic
        dropout_rng = None
        if self.dropout_rate > 0.0 and not deterministic:
            stream = rngs.dropout if rngs is not None else self.rngs
            if stream is None:
                raise ValueError("rngs: dropout needs an RNG stream: pass rngs= to FlexibleAttention or to the call, "
                                 "or deterministic=True")
            dropout_rng = stream()
        rate = self.dropout_rate if dropout_rng is not None else 0.0
        return run(self.backend, self.metadata.value, self.attention_kwargs.value, query, key, value, cache,
                   rate, dropout_rng, kwargs)


class LinenFlexibleAttention(nn.Module):
    """`FlexibleAttention` for linen models. Dropout draws from the "dropout" RNG collection."""

    attention_mechanism: Any = "auto"
    backend: Backend | None = None
    metadata: OperationMetadata | None = None
    dropout_rate: float = 0.0
    deterministic: bool | None = None
    attention_kwargs: Mapping[str, Any] | None = None

    @nn.compact
    def __call__(self, query: jax.Array, key: jax.Array, value: jax.Array, *, cache: KVCache | None = None,
                 deterministic: bool | None = None, **kwargs: Any) -> Any:
        backend = _backend(self.backend, self.attention_mechanism)
        defaults = _defaults(self.attention_kwargs or {}, "LinenFlexibleAttention")
        rate = _dropout_rate(self.dropout_rate)
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic) if rate > 0.0 else True
        dropout_rng = self.make_rng("dropout") if not deterministic else None
        return run(backend, _metadata(self.metadata), defaults, query, key, value, cache,
                   rate if dropout_rng is not None else 0.0, dropout_rng, kwargs)
