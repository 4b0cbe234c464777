"""Context parallelism on 8 virtual CPU devices: every scheme and mask against one device.

A (dp=2, sp=2, tp=2) mesh shards batch, sequence and heads; the result of each scheme (ring,
all_gather, ulysses), contiguous or load balanced, must equal the unsharded call, forward
(out and lse) and backward, and keep the sequence sharded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxattn
from jaxattn import OperationMetadata
from jaxattn.testing import relative_error as rel

B, S, HQ, HKV, D, SP = 2, 32, 4, 2, 8, 2
TOL = 1e-5


@pytest.fixture(scope="module")
def mesh():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (the root conftest asks XLA for 8 virtual CPU devices)")
    return Mesh(np.array(jax.devices()[:8]).reshape(2, SP, 2), ("dp", "sp", "tp"))



KEYS = jax.random.split(jax.random.PRNGKey(0), 6)
Q = jax.random.normal(KEYS[0], (B, S, HQ, D))
K = jax.random.normal(KEYS[1], (B, S, HKV, D))
V = jax.random.normal(KEYS[2], (B, S, HKV, D))
SEG = jnp.asarray(np.sort(np.random.default_rng(0).integers(0, 3, (B, S)), axis=1), jnp.int32)
POS = jnp.asarray(np.stack([np.arange(S) + 4, np.arange(S) + 9]), jnp.int32)

CASES = {
    "full": {},
    "causal": {"is_causal": True},
    "window": {"is_causal": True, "sliding_window": 6},
    "window_asym": {"sliding_window": (5, 3)},
    "chunked": {"mask": jaxattn.ChunkedCausalMask(4)},
    "segments": {"is_causal": True, "segment_ids": SEG},
    "lengths": {"is_causal": True, "query_seq_lengths": jnp.asarray([S, 21]),
                "key_value_seq_lengths": jnp.asarray([13, S])},
    "sinks": {"is_causal": True, "sinks": jax.random.normal(KEYS[3], (HQ,))},
    "positions": {"mask": jaxattn.QueryPositionMask(POS, left=7)},
}


def balanced(kwargs, on):
    """The call's arguments, with every sequence array in load_balance order when `on`."""
    if not on:
        return dict(kwargs)
    out = dict(kwargs)
    if "segment_ids" in out:
        out["segment_ids"] = jaxattn.load_balance(out["segment_ids"], SP)
    if isinstance(out.get("mask"), jaxattn.QueryPositionMask):
        out["mask"] = jaxattn.QueryPositionMask(jaxattn.load_balance(POS, SP), left=7)
    return out


def sharded_call(mesh, scheme, on, kwargs):
    md = OperationMetadata(mesh=mesh, context_parallel=scheme, load_balanced=on)
    kwargs = balanced(kwargs, on)

    @jax.jit
    def f(q, k, v):
        return jaxattn.attention(q, k, v, return_lse=True, metadata=md, **kwargs)

    def run(q, k, v):
        args = [jaxattn.load_balance(a, SP) if on else a for a in (q, k, v)]
        out, lse = f(*args)
        if on:
            out, lse = jaxattn.unload_balance(out, SP), jaxattn.unload_balance(lse, SP, axis=2)
        return out, lse, f(*args)[0]

    return run


@pytest.mark.parametrize("scheme", ["ring", "all_gather", "ulysses"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_one_device(mesh, scheme, case):
    kwargs = CASES[case]
    ref_out, ref_lse = jaxattn.attention(Q, K, V, return_lse=True, **kwargs)
    finite = np.isfinite(np.asarray(ref_lse))
    for on in (False, True) if case in ("causal", "window", "positions") else (False,):
        out, lse, raw = sharded_call(mesh, scheme, on, kwargs)(Q, K, V)
        assert rel(out, ref_out) < TOL, on
        np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
        assert rel(np.asarray(lse)[finite], np.asarray(ref_lse)[finite]) < TOL
        assert raw.sharding.is_equivalent_to(NamedSharding(mesh, P("dp", "sp", "tp", None)), 4)


@pytest.mark.parametrize("scheme,case,on", [
    ("ring", "causal", True), ("ring", "window", False), ("ring", "sinks", False),
    ("all_gather", "segments", True), ("ulysses", "lengths", True),
])
def test_gradients_match_one_device(mesh, scheme, case, on):
    kwargs = dict(CASES[case])
    sinks = kwargs.pop("sinks", None)
    cot = jax.random.normal(KEYS[4], Q.shape)
    md = OperationMetadata(mesh=mesh, context_parallel=scheme, load_balanced=on)
    sharded_kwargs = balanced(kwargs, on)
    lb = (lambda a: jaxattn.load_balance(a, SP)) if on else (lambda a: a)

    def ref_loss(q, k, v, s):
        return jnp.sum(jaxattn.attention(q, k, v, sinks=s, **kwargs) * cot)

    @jax.jit
    def loss(q, k, v, s):
        return jnp.sum(jaxattn.attention(q, k, v, sinks=s, metadata=md, **sharded_kwargs) * lb(cot))

    argnums = (0, 1, 2, 3) if sinks is not None else (0, 1, 2)
    ref = jax.grad(ref_loss, argnums)(Q, K, V, sinks)
    got = jax.grad(loss, argnums)(lb(Q), lb(K), lb(V), sinks)
    for g, r, name in zip(got, ref, "qkvs"):
        g = jaxattn.unload_balance(g, SP) if on and name != "s" else g
        assert rel(g, r) < 1e-4, name


def test_ulysses_takes_a_bias_and_a_dense_mask(mesh):
    bias = jax.random.normal(KEYS[5], (B, HQ, S, S))
    dense = jax.random.bernoulli(KEYS[4], 0.8, (B, 1, S, S))
    md = OperationMetadata(mesh=mesh, context_parallel="auto")
    ref = jaxattn.attention(Q, K, V, bias, dense, is_causal=True)
    got = jax.jit(lambda q, k, v: jaxattn.attention(q, k, v, bias, dense, is_causal=True, metadata=md))(Q, K, V)
    assert rel(got, ref) < TOL
    assert "by ulysses (chosen by auto)" in jaxattn.explain(Q, K, V, bias, dense, is_causal=True, metadata=md)


def test_explain_says_how_the_call_is_split(mesh):
    md = OperationMetadata(mesh=mesh, load_balanced=True)
    text = jaxattn.explain(Q, K, V, is_causal=True, metadata=md)
    assert "split:    context parallel: the sequence is split over mesh axis 'sp' (2 shards, load balanced)" in text
    assert "by ulysses (chosen by auto)" in text  # the heads divide
    text = jaxattn.explain(jnp.ones((B, S, 2, D)), K[:, :, :1], V[:, :, :1], is_causal=True, metadata=md)
    assert "by ring (chosen by auto)" in text  # one head per tensor shard: ulysses cannot split it
    text = jaxattn.explain(Q, K, V, is_causal=True, backend="ring", metadata=OperationMetadata(mesh=mesh))
    assert "by ring (metadata.context_parallel)" in text  # EasyDeL's "ring" mechanism
    flat = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("dp", "tp"))
    text = jaxattn.explain(Q, K, V, metadata=OperationMetadata(mesh=flat))
    assert "split:    shard_map over metadata.mesh: batch over 'dp', heads over 'tp', K/V heads repeated 2x" in text


def test_what_cannot_be_split_says_so(mesh):
    md = lambda scheme, on=False: OperationMetadata(mesh=mesh, context_parallel=scheme, load_balanced=on)  # noqa: E731
    with pytest.raises(ValueError, match="bias: ring context parallelism splits the keys"):
        jaxattn.attention(Q, K, V, jnp.ones((1, 1, S, S)), metadata=md("ring"))
    with pytest.raises(ValueError, match="mask: masks combined with | cannot be split by all_gather"):
        jaxattn.attention(Q, K, V, mask=jaxattn.CausalMask(0) | jaxattn.SlidingWindowMask(2, 2),
                          metadata=md("all_gather"))
    odd = jnp.ones((B, 34, HKV, D))
    with pytest.raises(ValueError, match="sequence length 34 must be a multiple of 2 \\* 2"):
        jaxattn.attention(jnp.ones((B, 34, HQ, D)), odd, odd, metadata=md("ring", True))
    with pytest.raises(ValueError, match="chunked-causal mask of chunk 6"):
        jaxattn.attention(Q, K, V, mask=jaxattn.ChunkedCausalMask(6), metadata=md("ring"))
    with pytest.raises(ValueError, match="ulysses context parallelism needs the query heads"):
        jaxattn.attention(jnp.ones((B, S, 2, D)), jnp.ones((B, S, 1, D)), jnp.ones((B, S, 1, D)),
                          metadata=md("ulysses"))
    with pytest.raises(ValueError, match="metadata.context_parallel must be one of"):
        OperationMetadata(context_parallel="tree")


def test_load_balance_round_trip_and_order():
    x = jnp.arange(2 * 16).reshape(2, 16)
    y = jaxattn.load_balance(x, 4)
    np.testing.assert_array_equal(y[0], [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9])
    np.testing.assert_array_equal(jaxattn.unload_balance(y, 4), x)
    with pytest.raises(ValueError, match="multiple of 2 \\* axis_size = 8"):
        jaxattn.load_balance(jnp.ones((1, 12)), 4)
    with pytest.raises(ValueError, match="axis_size: expected an int >= 1"):
        jaxattn.load_balance(x, 0)
