"""`merge_attention`: attention over disjoint key sets, merged by lse, equals attention over all."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn.testing import relative_error as rel

TOL = 1e-5



def qkv(seed):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(ks[0], (2, 16, 4, 8)), jax.random.normal(ks[1], (2, 48, 2, 8)),
            jax.random.normal(ks[2], (2, 48, 2, 8)))


def test_three_parts_equal_one_call_with_sinks_free_causal_mask():
    q, k, v = qkv(0)
    want, want_lse = jaxattn.attention(q, k, v, is_causal=True, return_lse=True)
    parts = []
    for lo, hi in ((0, 10), (10, 33), (33, 48)):
        # the bottom-right causal rule, restricted to keys [lo, hi): query i sees j <= i + 32
        mask = jaxattn.CausalMask(32 - lo)
        parts.append(jaxattn.attention(q, k[:, lo:hi], v[:, lo:hi], mask=mask, return_lse=True))
    out, lse = jaxattn.merge_attention([p[0] for p in parts], [p[1] for p in parts])
    assert rel(out, want) < TOL and rel(lse, want_lse) < TOL


def test_empty_parts_contribute_nothing_and_all_empty_rows_stay_zero():
    q, k, v = qkv(1)
    a = jaxattn.attention(q, k, v, return_lse=True)
    empty = jaxattn.attention(q, k, v, mask=jaxattn.CausalMask(-100), return_lse=True)  # every row sees nothing
    assert np.all(np.isneginf(np.asarray(empty[1])))
    out, lse = jaxattn.merge_attention([empty[0], a[0]], [empty[1], a[1]])
    assert rel(out, a[0]) < TOL and rel(lse, a[1]) < TOL
    out, lse = jaxattn.merge_attention([empty[0], empty[0]], [empty[1], empty[1]])
    assert not np.any(np.asarray(out)) and np.all(np.isneginf(np.asarray(lse)))
    grads = jax.grad(lambda o, l: jaxattn.merge_attention([o, empty[0]], [l, empty[1]])[0].sum(), (0, 1))(*a)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def test_gradients_match_a_single_call():
    q, k, v = qkv(2)

    def merged(q, k, v):
        a = jaxattn.attention(q, k[:, :20], v[:, :20], return_lse=True)
        b = jaxattn.attention(q, k[:, 20:], v[:, 20:], return_lse=True)
        return jaxattn.merge_attention([a[0], b[0]], [a[1], b[1]])[0].sum()

    ref = jax.grad(lambda q, k, v: jaxattn.attention(q, k, v).sum(), (0, 1, 2))(q, k, v)
    for g, r in zip(jax.grad(merged, (0, 1, 2))(q, k, v), ref):
        assert rel(g, r) < 1e-4


@pytest.mark.parametrize("outs,lses,match", [
    ([], [], "same number"),
    ([jnp.zeros((2, 4, 3, 8))], [jnp.zeros((2, 3, 4))] * 2, "same number"),
    ([jnp.zeros((4, 3, 8))], [jnp.zeros((3, 4))], r"\[batch, seq, heads, dim\]"),
    ([jnp.zeros((2, 4, 3, 8))] * 2, [jnp.zeros((2, 3, 4)), jnp.zeros((2, 4, 3))], r"lses\[1\]"),
])
def test_bad_arguments_name_what_is_wrong(outs, lses, match):
    with pytest.raises(ValueError, match=match):
        jaxattn.merge_attention(outs, lses)
