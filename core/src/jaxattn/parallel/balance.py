"""Load balancing of causal attention across sequence shards.

Split into `n` contiguous shards, a causal sequence gives the last shard `2n - 1` times the
work of the first. Cut it instead into `2n` chunks and give shard `r` chunks `r` and
`2n - 1 - r`: every shard then holds one early and one late chunk, and the same work.
`load_balance` reorders a sequence that way (once, e.g. on the token ids and positions at
the input of a model), `unload_balance` restores the natural order; with
`OperationMetadata(load_balanced=True)` attention knows its shards hold chunks in this order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def chunk_order(axis_size: int) -> np.ndarray:
    """Natural chunk index of each of the `2 * axis_size` balanced positions: [0, 2n-1, 1, 2n-2, ...]."""
    n = axis_size
    return np.asarray([c for r in range(n) for c in (r, 2 * n - 1 - r)], np.int32)


def chunks_of_shard(shard: int | jax.Array, axis_size: int, balanced: bool) -> list:
    """The natural chunk indices that shard `shard` holds, in its local order (chunks of
    length `seq / axis_size` unbalanced, `seq / (2 * axis_size)` balanced)."""
    if not balanced:
        return [shard]
    return [shard, 2 * axis_size - 1 - shard]


def _check(x: jax.Array, axis_size: int, axis: int) -> int:
    if isinstance(axis_size, bool) or not isinstance(axis_size, (int, np.integer)) or axis_size < 1:
        raise ValueError(f"axis_size: expected an int >= 1, got {axis_size!r}")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis: expected an axis of an array of rank {x.ndim}, got {axis}")
    length = x.shape[axis]
    if length % (2 * axis_size):
        raise ValueError(f"x: the sequence length {length} along axis {axis} must be a multiple of "
                         f"2 * axis_size = {2 * axis_size}")
    return axis % x.ndim


def _permute(x: jax.Array, axis_size: int, axis: int, order: np.ndarray) -> jax.Array:
    axis = _check(x, axis_size, axis)
    shape = x.shape
    chunks = x.reshape(shape[:axis] + (2 * axis_size, shape[axis] // (2 * axis_size)) + shape[axis + 1:])
    return jnp.take(chunks, jnp.asarray(order), axis=axis).reshape(shape)


def load_balance(x: jax.Array, axis_size: int, axis: int = 1) -> jax.Array:
    """`x` with its sequence `axis` reordered for `axis_size` shards: chunks `[0, 2n-1, 1, 2n-2, ...]`."""
    return _permute(x, axis_size, axis, chunk_order(axis_size))


def unload_balance(x: jax.Array, axis_size: int, axis: int = 1) -> jax.Array:
    """The inverse of `load_balance`: the natural order again."""
    return _permute(x, axis_size, axis, np.argsort(chunk_order(axis_size)).astype(np.int32))
