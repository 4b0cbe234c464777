"""Merging attention results computed over disjoint sets of keys.

Attention over keys `K1 ∪ K2` is a weighted mean of the attention over `K1` and over `K2`,
weighted by each part's softmax mass `exp(lse)`. This is what split-KV decoding, a prefix
cache beside fresh tokens and ring attention all need: run `attention(..., return_lse=True)`
on each part, then merge. A part whose rows saw no key (lse −inf) contributes nothing, and
a row that saw no key in any part stays zeros with lse −inf, as `attention` itself gives;
a NaN lse or output of a part that saw keys propagates.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def merge_attention(outs: Sequence[jax.Array], lses: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Merge partial attention outputs `[batch, seq, heads, dim]` with their lse `[batch, heads, seq]`.

    Returns `(out, lse)`: `out` in the dtype of `outs[0]`, `lse` float32 (natural log), exactly
    what one `attention` call over the union of the keys returns (up to rounding). The
    merge is differentiable with respect to every part's output and lse.
    """
    if not isinstance(outs, Sequence) or not isinstance(lses, Sequence) or isinstance(outs, str):
        raise ValueError("outs/lses: expected two sequences of arrays (one entry per part)")
    if len(outs) != len(lses) or not outs:
        raise ValueError(f"outs/lses: expected the same number (>= 1) of outputs and lses, "
                         f"got {len(outs)} and {len(lses)}")
    shape = tuple(outs[0].shape)
    if len(shape) != 4:
        raise ValueError(f"outs: expected arrays [batch, seq, heads, dim], got shape {shape}")
    want_lse = (shape[0], shape[2], shape[1])
    for i, (out, lse) in enumerate(zip(outs, lses)):
        if tuple(out.shape) != shape:
            raise ValueError(f"outs[{i}]: expected shape {shape} (as outs[0]), got {tuple(out.shape)}")
        if tuple(lse.shape) != want_lse:
            raise ValueError(f"lses[{i}]: expected shape [batch, heads, seq] = {want_lse}, got {tuple(lse.shape)}")
    lse = jnp.stack([jnp.asarray(x, jnp.float32) for x in lses])  # [n, B, H, S]
    peak = jnp.max(lse, axis=0)
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    seen = lse != -jnp.inf  # a NaN lse (a non-finite logit) propagates
    weight = jnp.where(seen, jnp.exp(jnp.where(seen, lse, 0.0) - peak), 0.0)
    total = jnp.sum(weight, axis=0)
    any_key = total != 0
    merged_lse = jnp.where(any_key, peak + jnp.log(jnp.where(any_key, total, 1.0)), -jnp.inf)
    share = weight / jnp.where(any_key, total, 1.0)  # [n, B, H, S]
    share = jnp.swapaxes(share, 2, 3)[..., None]  # [n, B, S, H, 1]
    parts = jnp.stack([jnp.asarray(x, jnp.float32) for x in outs])
    parts = jnp.where(jnp.swapaxes(seen, 2, 3)[..., None], parts, 0.0)  # a part without keys adds nothing
    out = jnp.sum(share * parts, axis=0)
    return out.astype(outs[0].dtype), merged_lse
