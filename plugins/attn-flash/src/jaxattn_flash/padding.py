"""Padding sequences and head dims up to what the kernels tile (GPU and TPU paths alike)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def round_up(n: int, m: int) -> int:
    """The smallest multiple of `m` that is >= `n`."""
    return -(-n // m) * m


def pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    """`x` zero-padded at the end of `axis` to `size` (unchanged when already that long)."""
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)
