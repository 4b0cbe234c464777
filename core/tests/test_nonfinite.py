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


def _guard_problem(bad: bool, **mask):
    from jaxattn.testing import nonfinite_problem
    from jaxattn.validation import build_attention_inputs

    args = nonfinite_problem(0, (2, 32, 4, 2, 16))
    if not bad:
        args["value"] = jax.random.normal(jax.random.key(3), args["value"].shape)
    return build_attention_inputs(
        args["query"], args["key"], args["value"], None, None, metadata=jaxattn.OperationMetadata(), scale=None,
        is_causal=mask.get("is_causal", False), sliding_window=None, segment_ids=None, query_seq_lengths=None,
        key_value_seq_lengths=mask.get("kv_lengths"), logits_soft_cap=None, sinks=None, dropout_rate=0.0,
        dropout_rng=None, return_lse=True)


def _unguarded_kernel(inputs):
    """What cuDNN does with a masked key: p = 0 times its value (0 * NaN is NaN)."""
    q, k, v = (x.astype(jnp.float32) for x in (inputs.query, inputs.key, inputs.value))
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * inputs.scale
    sq, skv = s.shape[-2:]
    ok = jnp.ones((sq, skv), bool)
    if inputs.mask is not None:
        ok = jnp.tril(ok)
    s = jnp.where(ok, s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)
    p = jnp.exp(s - lse[..., None])
    return jnp.einsum("bhqk,bkhd->bqhd", p, v), lse


@pytest.mark.parametrize("branchless", [True, False], ids=["small call", "large call"])
@pytest.mark.parametrize("bad", [True, False], ids=["non-finite value", "finite values"])
def test_value_guard_gives_the_same_output_and_gradients_with_and_without_differentiation(bad, branchless,
                                                                                           monkeypatch):
    """`value_guard.guarded`: its not-differentiated form (below `BRANCHLESS_BYTES` the guard run
    always, else a `lax.cond` that skips it when every value is finite) and its differentiated
    form (always guarded) agree, and agree with the xla reference on which rows are non-finite."""
    from jaxattn import value_guard

    inputs = _guard_problem(bad, is_causal=True)
    # make the problem the small or the large kind of call (0: every call keeps the cond)
    monkeypatch.setattr(value_guard, "BRANCHLESS_BYTES", value_guard.moved_bytes(inputs) + (1 if branchless else 0))
    jaxpr = str(jax.make_jaxpr(lambda x: value_guard.guarded(_unguarded_kernel, x))(inputs))
    assert ("cond[" in jaxpr) != branchless
    kept = str(jax.make_jaxpr(lambda x: value_guard.guarded(_unguarded_kernel, x, branchless_bytes=0))(inputs))
    assert "cond[" in kept
    run = jax.jit(lambda x: value_guard.guarded(_unguarded_kernel, x))
    out, lse = run(inputs)
    ref_out, ref_lse = jaxattn.attention(inputs.query, inputs.key, inputs.value, is_causal=True, return_lse=True,
                                         backend="xla")
    finite = np.isfinite(np.asarray(out)).all(-1)
    assert np.array_equal(finite, np.isfinite(np.asarray(ref_out)).all(-1))
    assert bad == (not finite.all())
    np.testing.assert_allclose(np.asarray(out)[finite], np.asarray(ref_out)[finite], rtol=1e-5, atol=1e-5)

    weight = jnp.asarray(finite, jnp.float32)[..., None]

    def loss(v):
        got, _ = value_guard.guarded(_unguarded_kernel, inputs.replace(value=v))
        return jnp.sum(jnp.where(weight > 0, got, 0.0) * weight), got

    (_, out_diff), dv = jax.jit(jax.value_and_grad(loss, has_aux=True))(inputs.value)
    np.testing.assert_array_equal(np.asarray(out_diff), np.asarray(out))
    assert np.isfinite(np.asarray(dv)).all()  # the backward saw cleaned values
    bad_keys = np.asarray(value_guard.bad_keys(inputs.value))
    assert (np.asarray(dv)[bad_keys] == 0).all()


def test_value_guard_leaves_calls_without_a_mask_alone():
    """No mask and no lengths: every row sees every key, so `guarded` hands the inputs to the
    kernel untouched (no cleaned copy, no pass over the output)."""
    from jaxattn import value_guard

    inputs = _guard_problem(True)
    seen = []
    value_guard.guarded(lambda x: seen.append(x) or (x.query, None), inputs)
    assert seen == [inputs]
    assert not value_guard.hides_keys(inputs)
    assert value_guard.hides_keys(_guard_problem(True, kv_lengths=jnp.array([20, 32])))
