"""2**x on the FMA and integer units, for the Mosaic forward's soft-capped logits.

Why: under a logit soft-cap each logit costs the SM's special-function unit two operations, a
tanh and an exp2, where a plain logit costs one, and that unit runs 16 of them per clock per SM
against the tensor cores' 8 logits' worth of products (head_dim 128): soft-cap makes it the
bound (on an H200 the capped forward ran at 0.91x of plain causal). Computing part of a tile's
exp2 here moves that work to the units that are not the bound, as FlashAttention-4 does.

How: x is rounded to an integer n by adding 1.5 * 2**23 (the sum's low mantissa bits then hold
n), 2**(x - n) with x - n in [-0.5, 0.5] comes from a degree-3 polynomial (relative error
1.03e-4, below bfloat16's and float16's rounding of the probabilities), and n is added to its
exponent bits: the sum's bit pattern shifted left by 23 is n << 23, since 1.5 * 2**23's own low
9 bits are zero. x below -127 (-inf: a masked key) gives exactly +0.0, NaN stays NaN; x must not
exceed 127 (the capped logits stay within ±cap·log2(e)). For kernel code only: XLA's algebraic
simplifier folds `(x + c) - c` into `x`, which removes the rounding (the Mosaic GPU lowering
keeps IEEE addition)."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

_ROUNDER = 12582912.0  # 1.5 * 2**23
# 2**f ~ 1 + f * (C1 + f * (C2 + f * C3)) on [-0.5, 0.5] (relative minimax, fitted with p(0) = 1)
C1, C2, C3 = 0.6932792, 0.24221599, 0.05503049


def exp2_fma(x):
    """2**x for float32 `x` <= 127 without the ex2 instruction (see the module docstring)."""
    x = jnp.maximum(x, jnp.float32(-127.0))
    j = x + jnp.float32(_ROUNDER)
    f = x - (j - jnp.float32(_ROUNDER))
    p = ((jnp.float32(C3) * f + jnp.float32(C2)) * f + jnp.float32(C1)) * f + jnp.float32(1.0)
    bits = lax.bitcast_convert_type(p, jnp.int32) + lax.shift_left(lax.bitcast_convert_type(j, jnp.int32),
                                                                   jnp.int32(23))
    return jnp.where(x == x, lax.bitcast_convert_type(bits, jnp.float32), x)
