"""Checks of the non-finite semantics (README "Semantics"), for any backend's tests.

`nonfinite_problem(seed)` draws query/key/value with NaN and inf in random places;
`assert_same_nonfinite(out, lse, ref_out, ref_lse)` says whether a backend's result
agrees with the `xla` reference's on them: the same rows non-finite, the finite rows
equal within tolerance, the rows without keys zeros with an lse of -inf.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF_LIMIT = -1e20  # an lse at or below this counts as -inf (kernels may use a finite floor)


def nonfinite_problem(seed: int, shape: tuple[int, int, int, int, int] = (2, 48, 4, 2, 32), *,
                      bad_keys: bool = True, dtype: Any = jnp.float32) -> dict[str, jax.Array]:
    """`{"query", "key", "value"}` of `shape` = (batch, seq, q_heads, kv_heads, head_dim):
    NaN/inf in the values of two keys (one in the middle third of the sequence, where
    partial tiles are), a NaN query row when `seed` is odd, an inf in a key when
    `seed % 3 == 2` and `bad_keys`."""
    b, s, hq, hkv, d = shape
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, s, hq, d)).astype(np.float32)
    k = rng.standard_normal((b, s, hkv, d)).astype(np.float32)
    v = rng.standard_normal((b, s, hkv, d)).astype(np.float32)
    for lo, hi in ((s // 3, 2 * s // 3), (0, s)):
        v[rng.integers(b), rng.integers(lo, hi), rng.integers(hkv), rng.integers(d)] = rng.choice([np.nan, np.inf])
    if seed % 2:
        q[rng.integers(b), rng.integers(s), rng.integers(hq)] = np.nan
    if seed % 3 == 2 and bad_keys:
        k[rng.integers(b), rng.integers(s), rng.integers(hkv), 0] = np.inf
    return {name: jnp.asarray(x, dtype) for name, x in (("query", q), ("key", k), ("value", v))}


def assert_same_nonfinite(out: Any, lse: Any, ref_out: Any, ref_lse: Any, what: str = "", *,
                          rtol: float = 2e-4, atol: float = 2e-5) -> None:
    """`out [B, S, H, D]`/`lse [B, H, S]` (lse may be None) agree with the reference's."""
    out, ref_out = np.asarray(out, np.float64), np.asarray(ref_out, np.float64)
    finite, ref_finite = np.isfinite(out).all(-1), np.isfinite(ref_out).all(-1)  # rows [B, S, H]
    assert np.array_equal(finite, ref_finite), f"{what}: non-finite rows differ: {np.argwhere(finite != ref_finite)}"
    np.testing.assert_allclose(out[ref_finite], ref_out[ref_finite], rtol=rtol, atol=atol, err_msg=what)
    if lse is None:
        return
    lse, ref_lse = np.asarray(lse, np.float64), np.asarray(ref_lse, np.float64)
    empty = ref_lse == -np.inf
    assert np.all(lse[empty] <= NEG_INF_LIMIT), f"{what}: rows without keys must have lse -inf"
    assert np.all(out[np.swapaxes(empty, 1, 2)] == 0), f"{what}: rows without keys must be zeros"
    poisoned = np.isnan(lse) | (lse == np.inf)  # NaN or +inf: which one is not specified
    assert np.array_equal(poisoned, np.isnan(ref_lse) | (ref_lse == np.inf)), f"{what}: non-finite lse rows differ"
