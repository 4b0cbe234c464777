"""Non-finite values of masked keys, in the kernels (README "Semantics": masked means the mask).

`p @ v` multiplies: a masked key's probability is 0, but `0 * NaN` is NaN, so a NaN or
inf in the value of a key a row does not see would reach that row. On a tile that
applies the mask, `masked_values` zeroes the values of such keys before the product and
says which rows see one: their output is NaN (a value a row sees propagates). Tiles
without a mask need nothing: every row sees every key, and the product propagates.
The backward passes take values made finite (`finite_values`): the rows that see a
non-finite value carry it in their NaN output, so nothing else needs it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_values(v: jax.Array, vis: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`v [keys, d]` and the tile's mask `vis [rows, keys]` -> (`v` with the keys that hold a
    non-finite value zeroed, float `[rows]`: 1 where the row sees such a key, else 0)."""
    bad = jnp.max(jnp.where(jnp.isfinite(v), 0.0, 1.0), axis=1)  # [keys]
    v = jnp.where(bad[:, None] > 0.0, jnp.zeros_like(v), v)
    seen = jnp.max(jnp.where(vis, bad[None, :], 0.0), axis=1)
    return v, seen


def finite_values(v: jax.Array) -> jax.Array:
    """`v` with its non-finite entries zeroed (XLA, before the backward kernels)."""
    return jnp.where(jnp.isfinite(v), v, jnp.zeros((), v.dtype))
