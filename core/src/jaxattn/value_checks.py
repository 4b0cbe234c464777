"""Checks of array values: sequence lengths, page tables, query offsets.

Shapes and dtypes are known at trace time and always checked (`validation.py`); values
are known only when the arrays are concrete. So, for each array argument whose values
matter:

* concrete (eager call): a bad value raises `ValueError` naming the argument;
* traced (under `jax.jit`): the value is made safe, never trusted. Lengths are clamped
  into range; a page-table entry outside `[0, num_pages)` is replaced by page 0 and the
  tokens it would hold are masked out (the sequence's `kv_lengths` is cut at the first
  such page), so a call never reads a page that is not its own; `cu_q_lens` is clamped
  to `[0, tokens]` and made non-decreasing;
* traced with `OperationMetadata(checked=True)`: the same repairs, plus a
  `jax.experimental.checkify.check` per argument, so that a caller who wraps the jitted
  function in `checkify.checkify` is told what was wrong (`err.throw()`).

Entries of `page_indices` past a sequence's `kv_lengths` are never read: they may hold
anything (-1 as padding, say) and are not errors.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import checkify

from ._compat import is_tracer


def _check(checked: bool, ok: jax.Array, message: str, **values: jax.Array) -> None:
    if checked:
        checkify.check(ok, message + " (jaxattn checked mode)", **values)


_I32 = np.iinfo(np.int32)


def _min(x: jax.Array) -> jax.Array:
    return jnp.min(x, initial=_I32.max)


def _max(x: jax.Array) -> jax.Array:
    return jnp.max(x, initial=_I32.min)


def lengths(x: jax.Array, name: str, limit: int, what: str, *, checked: bool) -> jax.Array:
    """Sequence lengths in `[0, limit]`: ValueError when concrete, clamped when traced."""
    if not is_tracer(x):
        values = np.asarray(x)
        if values.size and (values.min() < 0 or values.max() > limit):
            raise ValueError(f"{name}: entries must be in [0, {what}={limit}], "
                             f"got range [{values.min()}, {values.max()}]")
        return jnp.asarray(x)
    x = jnp.asarray(x)
    _check(checked, jnp.all((x >= 0) & (x <= limit)),
           f"{name}: entries must be in [0, {what}={limit}], got range [{{lo}}, {{hi}}]",
           lo=_min(x), hi=_max(x))
    return jnp.clip(x, 0, limit)


def _used_pages(kv_lengths: Any, pages_per_seq: int, page_size: int) -> Any:
    """Bool `[num_seqs, pages_per_seq]`: the entries that hold tokens below `kv_lengths`."""
    return np.arange(pages_per_seq)[None, :] * page_size < np.asarray(kv_lengths)[:, None]


def _check_concrete(page_indices: Any, kv_lengths: Any, cu_q_lens: Any, num_pages: int,
                    page_size: int, tokens: int) -> None:
    """ValueErrors for the values that are concrete."""
    num_seqs, pages_per_seq = page_indices.shape
    capacity = pages_per_seq * page_size
    if is_tracer(kv_lengths):
        return
    lens = np.asarray(kv_lengths)
    if lens.size and (lens.min() < 0 or lens.max() > capacity):
        raise ValueError(f"kv_lengths: entries must be in [0, pages_per_seq * page_size = {capacity}], "
                         f"got range [{lens.min()}, {lens.max()}]")
    if not is_tracer(page_indices):
        idx = np.asarray(page_indices)
        used = idx[_used_pages(lens, pages_per_seq, page_size)]
        if used.size and (used.min() < 0 or used.max() >= num_pages):
            raise ValueError(f"page_indices: entries must be in [0, num_pages={num_pages}) (those holding "
                             f"tokens below kv_lengths), got range [{used.min()}, {used.max()}]")
    if cu_q_lens is not None and not is_tracer(cu_q_lens):
        cu = np.asarray(cu_q_lens)
        counts = np.diff(cu)
        if cu[0] != 0 or (counts < 0).any() or cu[-1] > tokens:
            raise ValueError(f"cu_q_lens: expected 0 = cu[0] <= cu[1] <= ... <= cu[-1] <= tokens ({tokens}), "
                             f"got {cu.tolist()}")
        if (counts > lens).any():
            raise ValueError("cu_q_lens: a sequence has more queries than kv_lengths (its queries are "
                             "the last positions of its cache)")


def page_table(page_indices: Any, kv_lengths: Any, cu_q_lens: Any, *, num_pages: int, page_size: int,
               tokens: int, checked: bool) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """`(page_indices, kv_lengths, cu_q_lens)` checked (concrete) and made safe (always).

    After this, every entry of `page_indices` is a page of the cache, every length fits
    the sequence's pages, and `cu_q_lens` stays inside the query tokens.
    """
    _check_concrete(page_indices, kv_lengths, cu_q_lens, num_pages, page_size, tokens)
    num_seqs, pages_per_seq = page_indices.shape
    capacity = pages_per_seq * page_size
    idx = jnp.asarray(page_indices)
    lens = jnp.asarray(kv_lengths)
    bad = (idx < 0) | (idx >= num_pages)
    # the first bad entry of each row (pages_per_seq: none), as a min over positions
    first_bad = jnp.min(jnp.where(bad, jnp.arange(pages_per_seq)[None, :], pages_per_seq), axis=1,
                        initial=pages_per_seq)
    if checked and (is_tracer(idx) or is_tracer(lens)):
        used_bad = bad & (jnp.arange(pages_per_seq)[None, :] * page_size < lens[:, None])
        _check(True, ~jnp.any(used_bad),
               f"page_indices: entries must be in [0, num_pages={num_pages}) (those holding tokens below "
               "kv_lengths), got range [{lo}, {hi}]",
               lo=_min(jnp.where(used_bad, idx, _I32.max)), hi=_max(jnp.where(used_bad, idx, _I32.min)))
        _check(True, jnp.all((lens >= 0) & (lens <= capacity)),
               f"kv_lengths: entries must be in [0, pages_per_seq * page_size = {capacity}], "
               "got range [{lo}, {hi}]",
               lo=_min(lens), hi=_max(lens))
    limit = jnp.minimum(capacity, first_bad * page_size).astype(lens.dtype)
    lens = jnp.clip(lens, 0, limit)
    idx = jnp.where(bad, jnp.zeros((), idx.dtype), idx)
    if cu_q_lens is not None:
        cu = jnp.asarray(cu_q_lens)
        if checked and is_tracer(cu):
            counts = cu[1:] - cu[:-1]
            _check(True, (cu[0] == 0) & jnp.all(counts >= 0) & (cu[-1] <= tokens) & jnp.all(counts <= lens),
                   f"cu_q_lens: expected 0 = cu[0] <= cu[1] <= ... <= cu[-1] <= tokens ({tokens}), each sequence "
                   "with at most kv_lengths queries")
        cu = lax.cummax(jnp.clip(cu, 0, tokens).at[0].set(0), axis=0)
        cu_q_lens = cu
    return idx, lens, cu_q_lens
