"""Non-finite inputs (README "Semantics"): masked means the mask. A non-finite value of a
key that a row does not see never reaches that row; non-finite logits of keys a row sees
propagate (NaN), they are not read as "fully masked"; -inf logits alone give zeros."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn

B, S, HQ, HKV, D = 2, 12, 4, 2, 8
KEYS = jax.random.split(jax.random.PRNGKey(3), 3)
Q = jax.random.normal(KEYS[0], (B, S, HQ, D))
K = jax.random.normal(KEYS[1], (B, S, HKV, D))
V = jax.random.normal(KEYS[2], (B, S, HKV, D))
SEGMENTS = jnp.asarray(np.repeat([[0] * 5 + [1] * 7], B, axis=0), jnp.int32)
SMALL = jaxattn.OperationMetadata(operation_configs={"xla": {"block_q": 4, "block_kv": 4}})  # several tiles


def rows_finite(x):
    """`[B, S]`: rows whose output is finite across heads and features."""
    return np.all(np.isfinite(np.asarray(x)), axis=(2, 3))


@pytest.mark.parametrize("where,kwargs,seen_by", [
    # a NaN value at key 9: rows that see key 9 become NaN, the others are untouched
    (9, {"is_causal": True}, np.arange(S) >= 9),
    (9, {"segment_ids": SEGMENTS}, np.arange(S) >= 5),
    (9, {"key_value_seq_lengths": jnp.array([9, 9])}, np.zeros(S, bool)),
    (9, {"mask": jaxattn.CausalMask(-4)}, np.arange(S) >= 13),
])
def test_masked_non_finite_values_reach_no_row(where, kwargs, seen_by):
    """Under jit, in tiles of 4 (rows and keys across several tiles)."""
    run = jax.jit(lambda v: jaxattn.attention(Q, K, v, metadata=SMALL, **kwargs))
    clean = run(V.at[:, where].set(0.0))
    for bad in (jnp.nan, jnp.inf):
        got = run(V.at[:, where].set(bad))
        finite = rows_finite(got)
        assert np.array_equal(finite, np.broadcast_to(~seen_by, finite.shape)), finite
        np.testing.assert_array_equal(np.asarray(got)[finite], np.asarray(clean)[finite])


def test_gradients_of_rows_that_do_not_see_a_nan_value_stay_finite():
    poisoned = V.at[:, 9].set(jnp.nan)

    def loss(q, k, v):
        return jaxattn.attention(q, k, v, segment_ids=SEGMENTS)[:, :5].sum()  # segment 0 only

    dq, dk, dv = jax.grad(loss, argnums=(0, 1, 2))(Q, K, poisoned)
    assert np.all(np.isfinite(dq[:, :5])) and np.all(np.isfinite(dk[:, :5])) and np.all(np.isfinite(dv[:, :5]))
    clean = jax.grad(loss, argnums=(0, 1, 2))(Q, K, V)
    np.testing.assert_allclose(dq[:, :5], clean[0][:, :5], rtol=1e-6, atol=1e-7)
    # a cache slot past the length: nothing sees it, every gradient is finite
    lens = jnp.array([9, 9])
    grads = jax.grad(lambda q, k, v: jaxattn.attention(q, k, v, key_value_seq_lengths=lens).sum(),
                     argnums=(0, 1, 2))(Q, K, poisoned)
    assert all(np.all(np.isfinite(g)) for g in grads)


def test_non_finite_logits_propagate():
    nan_row = Q.at[:, 3].set(jnp.nan)
    out, lse = jaxattn.attention(nan_row, K, V, return_lse=True)
    assert np.all(np.isnan(out[:, 3])) and np.all(np.isnan(lse[:, :, 3]))
    np.testing.assert_array_equal(np.delete(np.asarray(out), 3, axis=1), np.delete(np.asarray(jaxattn.attention(Q, K, V)), 3, axis=1))
    dq = jax.grad(lambda q: jaxattn.attention(q, K, V).sum())(nan_row)
    assert np.all(np.isnan(dq[:, 3])), "a NaN row's gradient is NaN, not zero"
    inf_key = K.at[:, 6].set(jnp.inf)
    out = jaxattn.attention(Q, inf_key, V, is_causal=True)
    finite = rows_finite(out)
    assert np.array_equal(finite, np.broadcast_to(np.arange(S) < 6, finite.shape))
    # a NaN logit that the mask removes changes nothing
    out = jaxattn.attention(Q, K.at[:, 11].set(jnp.nan), V, is_causal=True)
    assert np.array_equal(rows_finite(out), np.broadcast_to(np.arange(S) < 11, (B, S)))


def test_minus_inf_logits_alone_read_as_no_key():
    bias = jnp.zeros((B, HQ, S, S)).at[:, :, 2].set(-jnp.inf)
    out, lse = jaxattn.attention(Q, K, V, bias=bias, return_lse=True)
    assert np.all(out[:, 2] == 0) and np.all(lse[:, :, 2] == -np.inf)
    assert np.all(np.isfinite(out))
