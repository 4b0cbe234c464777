"""`fma_exp2.exp2_fma`: 2**x without the MUFU's ex2, as the Mosaic forward's soft-capped tiles
take it (`mosaic_fma_exp2`); its contract on the values a softmax feeds it. Run op by op: XLA's
algebraic simplifier folds `(x + c) - c` into `x`, so under `jax.jit` the rounding step vanishes
(the Mosaic GPU lowering, where the function runs, does not fold it; its GPU test checks)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn_flash.fma_exp2 import exp2_fma


def test_relative_error_over_the_normal_range_is_below_bf16_and_fp16_rounding():
    x = jax.random.uniform(jax.random.PRNGKey(0), (200_000,), jnp.float32, -125.0, 127.0)
    y = np.asarray(exp2_fma(x), np.float64)
    ref = np.exp2(np.asarray(x, np.float64))
    assert np.max(np.abs(y / ref - 1)) < 1.1e-4  # bf16 rounds at 3.9e-3, fp16 at 4.9e-4


def test_masked_logits_give_exact_zeros_and_nan_propagates():
    x = jnp.asarray([-jnp.inf, -1e30, -200.0, -127.6, jnp.nan, 0.0, 1.0, -1.0, 127.0], jnp.float32)
    y = np.asarray(exp2_fma(x))
    assert (y[:4] == 0.0).all() and not np.signbit(y[:4]).any()  # +0.0: a masked key weighs nothing
    assert np.isnan(y[4])
    np.testing.assert_array_equal(y[5:8], [1.0, 2.0, 0.5])  # exact at integers
    assert y[8] == np.float32(2.0 ** 127)
