"""`jaxattn.compat.dot_product_attention` against `jax.nn.dot_product_attention` itself.

The cases follow those of jax's own tests of that function (GQA groups with and without
vmap; bias, causal, padding, custom masks and their combinations; causal with a local
window; the bias gradient under a broadcast mask), written again here in float32, where
the two must agree to rounding: outputs and every gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn.compat import dot_product_attention
from jaxattn.testing import relative_error as rel

B, T, S, N, H = 2, 32, 32, 4, 16
TOL = 1e-5



def qkv(seed, groups=1, t=T, s=S):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (B, t, N, H))
    k = jax.random.normal(ks[1], (B, s, N // groups, H))
    v = jax.random.normal(ks[2], (B, s, N // groups, H))
    return q, k, v, jax.random.normal(ks[3], (B, t, N, H))


def both(fn_kwargs, *args, argnums=(0, 1, 2)):
    """(out, grads) of jax.nn and of compat for the same call."""
    results = []
    for f in (jax.nn.dot_product_attention, dot_product_attention):
        def call(*a, f=f):
            return f(*a, **fn_kwargs)
        out, vjp = jax.vjp(call, *args)
        grads = vjp(jax.random.normal(jax.random.PRNGKey(9), out.shape))
        results.append((out, [grads[i] for i in argnums]))
    return results


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("use_vmap", [False, True])
def test_grouped_query_attention_matches_jax_nn(groups, use_vmap):
    q, k, v, _ = qkv(0, groups)
    fns = [jax.nn.dot_product_attention, dot_product_attention]
    if use_vmap:
        fns = [jax.vmap(f) for f in fns]  # rank-3 calls, batched by vmap
    outs = []
    for f in fns:
        out, vjp = jax.vjp(f, q, k, v)
        outs.append((out, vjp(jax.random.normal(jax.random.PRNGKey(5), out.shape))))
    (ref, ref_grads), (got, got_grads) = outs
    assert rel(got, ref) < TOL
    for g, r in zip(got_grads, ref_grads):
        assert rel(g, r) < TOL


MASK_MODES = ["bias", "causal", "padding", "custom", ("causal", "padding"), ("custom", "padding"),
              ("bias", "causal"), ("causal", "sliding_window")]


@pytest.mark.parametrize("mode", MASK_MODES, ids=str)
def test_masks_match_jax_nn(mode):
    mode = (mode,) if isinstance(mode, str) else mode
    q, k, v, _ = qkv(1)
    bias = mask = None
    kwargs = {"is_causal": "causal" in mode}
    if "padding" in mode:
        kwargs["query_seq_lengths"] = jnp.asarray([T // 2, T // 4], jnp.int32)
        kwargs["key_value_seq_lengths"] = jnp.asarray([S // 4, S // 2], jnp.int32)
    if "custom" in mode:
        mask = jnp.tril(jnp.ones((T, S), bool))[None, None]
    if "bias" in mode:
        bias = jax.random.normal(jax.random.PRNGKey(2), (1, N, T, S))
    if "sliding_window" in mode:
        kwargs["local_window_size"] = (3, 2)
    (ref, ref_grads), (got, got_grads) = both(
        kwargs, q, k, v, bias, mask, argnums=(0, 1, 2, 3) if bias is not None else (0, 1, 2))
    assert rel(got, ref) < TOL
    for g, r in zip(got_grads, ref_grads):
        assert rel(g, r) < TOL


@pytest.mark.parametrize("use_vmap", [False, True])
def test_bias_gradient_under_a_broadcast_mask(use_vmap):
    x = jax.random.normal(jax.random.PRNGKey(3), (B, S, N, H))
    bias = jax.random.normal(jax.random.PRNGKey(4), (B, N, S, S))
    mask = jnp.ones((1, 1, S), bool)  # rank 3: broadcast over batch, heads and queries

    def loss(f, x, bias):
        g = (lambda x, b: f(x, x, x, b, mask)) if not use_vmap else jax.vmap(lambda x, b: f(x, x, x, b, mask))
        return jnp.sum(g(x, bias) * jnp.cos(jnp.arange(H)))

    ref = jax.grad(lambda x, b: loss(jax.nn.dot_product_attention, x, b), argnums=(0, 1))(x, bias)
    got = jax.grad(lambda x, b: loss(dot_product_attention, x, b), argnums=(0, 1))(x, bias)
    for g, r in zip(got, ref):
        assert rel(g, r) < TOL


def test_top_left_causal_and_window_when_q_len_differs():
    q, k, v, _ = qkv(4, t=12, s=S)
    for kwargs in ({"is_causal": True}, {"local_window_size": 5}, {"local_window_size": (0, 7)}):
        ref = jax.nn.dot_product_attention(q, k, v, **kwargs)
        assert rel(dot_product_attention(q, k, v, **kwargs), ref) < TOL
    # jaxattn.attention's own is_causal is bottom-right: a different answer on purpose
    assert rel(jaxattn.attention(q, k, v, is_causal=True), jax.nn.dot_product_attention(q, k, v, is_causal=True)) > 0.1


def test_rank3_scale_and_residual():
    q, k, v, _ = qkv(5, groups=2)
    ref, ref_res = jax.nn.dot_product_attention(q[0], k[0], v[0], scale=0.3, is_causal=True, return_residual=True)
    got, got_res = dot_product_attention(q[0], k[0], v[0], scale=0.3, is_causal=True, return_residual=True)
    assert got.shape == ref.shape == (T, N, H) and got_res.shape == ref_res.shape == (T, N)
    assert got_res.dtype == ref_res.dtype
    assert rel(got, ref) < TOL and rel(got_res, ref_res) < TOL
    # the residual carries no gradient, in jax.nn and here
    g = jax.grad(lambda q: dot_product_attention(q, k[0], v[0], return_residual=True)[1].sum())(q[0])
    assert not np.any(np.asarray(g))


def test_implementation_names_backends():
    q, k, v, _ = qkv(6)
    ref = jax.nn.dot_product_attention(q, k, v, implementation="xla")
    assert rel(dot_product_attention(q, k, v, implementation="xla"), ref) < TOL
    assert rel(dot_product_attention(q, k, v, implementation="vanilla"), ref) < TOL
    if jax.default_backend() == "cpu":
        with pytest.raises(jaxattn.BackendUnavailableError, match="cudnn"):
            dot_product_attention(q, k, v, implementation="cudnn")
    with pytest.raises(ValueError, match="no attention backend named 'nope'"):
        dot_product_attention(q, k, v, implementation="nope")


def test_a_row_with_no_key_is_zeros_not_the_mean():
    """The documented difference: jax.nn's XLA path averages every value on such a row."""
    q, k, v, _ = qkv(7)
    mask = jnp.ones((B, 1, T, S), bool).at[:, :, 3, :].set(False)
    got = dot_product_attention(q, k, v, mask=mask)
    ref = jax.nn.dot_product_attention(q, k, v, mask=mask)
    np.testing.assert_array_equal(np.asarray(got[:, 3]), 0.0)
    np.testing.assert_allclose(np.asarray(ref[:, 3]), np.asarray(v.mean(axis=1)), rtol=1e-5, atol=1e-6)
    others = np.r_[0:3, 4:T]
    assert rel(got[:, others], ref[:, others]) < TOL


@pytest.mark.parametrize("call,match", [
    (lambda q, k, v: dot_product_attention(q[None], k[None], v[None]), "rank 3"),
    (lambda q, k, v: dot_product_attention(q, k, v, mask=jnp.ones((T, S))), "boolean"),
    (lambda q, k, v: dot_product_attention(q, k, v, local_window_size=(1, -1)), "local_window_size"),
    (lambda q, k, v: dot_product_attention(q, k, v, bias=jnp.ones((1, 1, 1, T, S))), "bias"),
])
def test_bad_arguments_raise_value_errors(call, match):
    q, k, v, _ = qkv(8)
    with pytest.raises(ValueError, match=match):
        call(q, k, v)
