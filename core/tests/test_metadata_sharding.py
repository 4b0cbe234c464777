"""OperationMetadata, AttnShardingRules, and running backends under shard_map."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxattn
from jaxattn import OperationMetadata, PartitionAxis

needs8 = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices (on CPU: see conftest.py)")


def mesh(shape, names):
    devices = np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape)
    return Mesh(devices, names)


def test_from_config_accepts_dicts_objects_and_aliases():
    meta = OperationMetadata.from_config({"attn_dtype": jnp.bfloat16, "softmax_scale": 0.1,
                                          "attn_configs": {"flash": {"block_q": 64}}})
    assert meta.runtime_dtype == jnp.bfloat16 and meta.softmax_scale == 0.1
    assert meta.get_operation_config("flash") == {"block_q": 64}
    assert meta.get_operation_config("other") == {}
    cfg = SimpleNamespace(runtime_softmax_dtype=jnp.float32, mode="decode")
    assert OperationMetadata.from_config(cfg, softmax_scale=2.0).mode == "decode"
    with pytest.raises(ValueError, match=r"unknown keys \['nonsense'\]"):
        OperationMetadata.from_config({}, nonsense=1)
    with pytest.raises(ValueError, match="metadata.mode must be one of"):
        OperationMetadata(mode="serve")


def test_softmax_scale_from_metadata_is_used():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 8, 2, 16)), jnp.float32) for _ in range(3))
    a = jaxattn.attention(q, k, v, metadata=OperationMetadata(softmax_scale=0.3))
    b = jaxattn.attention(q, k, v, scale=0.3)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


@needs8
def test_get_shardings_is_gqa_aware():
    m = mesh((2, 4), ("dp", "tp"))
    meta = OperationMetadata(mesh=m)
    rules = meta.get_shardings("train", batch=4, num_q_heads=8, num_kv_heads=8)
    assert rules.query == P("dp", None, "tp", None) and rules.kv_repeat == 1
    assert rules.bias == P("dp", "tp", None, None) and rules.lse == P("dp", "tp", None)
    assert rules.q_segment_ids == P("dp", None) and rules.softmax_aux == P("tp")
    gqa = meta.get_shardings("train", batch=4, num_q_heads=8, num_kv_heads=2)
    assert gqa.key == P("dp", None, "tp", None) and gqa.kv_repeat == 2
    odd = meta.get_shardings("train", batch=3, num_q_heads=6, num_kv_heads=6)
    assert odd.query == P(None, None, None, None)  # neither divides: replicated, not an error
    paged = meta.get_shardings("decode", "paged", num_q_heads=8, num_kv_heads=2)
    assert paged.key == P(None, None, None, None) and paged.kv_repeat == 1  # never copy a cache
    fsdp = OperationMetadata(mesh=mesh((2, 2, 2), ("dp", "fsdp", "tp"))).get_shardings("train", batch=4)
    assert fsdp.query == P(("dp", "fsdp"), None, "tp", None)
    custom = OperationMetadata(mesh=m, partition_axis=PartitionAxis(batch_axis="tp", head_axis=None))
    assert custom.get_shardings().query == P("tp", None, None, None)
    with pytest.raises(ValueError, match="layout must be"):
        meta.get_shardings("train", "bhsd")


def problem(seed, b=4, s=32, hq=8, hkv=2, d=16):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, s, hq, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, s, hkv, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, s, hkv, d)), jnp.float32)
    return q, k, v


@needs8
@pytest.mark.parametrize("hkv", [8, 2, 1])
def test_sharded_equals_unsharded_and_carries_the_declared_sharding(hkv):
    m = mesh((2, 4), ("dp", "tp"))
    meta = OperationMetadata(mesh=m)
    q, k, v = problem(0, hkv=hkv)
    rng = np.random.default_rng(1)
    ids = jnp.asarray(np.sort(rng.integers(0, 3, (4, 32)), axis=1), jnp.int32)
    bias = jnp.asarray(rng.standard_normal((4, 8, 32, 32)), jnp.float32)
    sinks = jnp.asarray(rng.standard_normal(8), jnp.float32)
    lengths = jnp.asarray([32, 20, 9, 32], jnp.int32)
    kwargs = dict(is_causal=True, segment_ids=ids, bias=bias, sinks=sinks, key_value_seq_lengths=lengths,
                  mask=jnp.asarray(rng.random((4, 1, 32, 32)) < 0.8), return_lse=True)
    want_out, want_lse = jaxattn.attention(q, k, v, **kwargs)
    f = jax.jit(lambda q, k, v: jaxattn.attention(q, k, v, metadata=meta, **kwargs))
    out, lse = f(q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), rtol=1e-5, atol=1e-5)
    rules = meta.get_shardings("train", batch=4, num_q_heads=8, num_kv_heads=hkv)
    assert out.sharding.is_equivalent_to(NamedSharding(m, rules.output), out.ndim)
    assert lse.sharding.is_equivalent_to(NamedSharding(m, rules.lse), lse.ndim)

    def loss(q, k, v, metadata):
        return jaxattn.attention(q, k, v, is_causal=True, metadata=metadata).sum()

    g_sharded = jax.jit(jax.grad(lambda q, k, v: loss(q, k, v, meta), argnums=(0, 1, 2)))(q, k, v)
    g_plain = jax.grad(lambda q, k, v: loss(q, k, v, None), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_sharded, g_plain):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@needs8
def test_sharded_paged_attention_matches():
    m = mesh((1, 4), ("dp", "tp"))
    rng = np.random.default_rng(3)
    pages = jnp.asarray(rng.standard_normal((10, 4, 4, 16)), jnp.float32)
    q = jnp.asarray(rng.standard_normal((3, 8, 16)), jnp.float32)
    table = jnp.asarray(rng.permutation(10)[:9].reshape(3, 3), jnp.int32)
    lens = jnp.asarray([5, 12, 1], jnp.int32)
    want = jaxattn.paged_attention(q, pages, pages, lens, table)
    got = jaxattn.paged_attention(q, pages, pages, lens, table, metadata=OperationMetadata(mesh=m))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    f8, scale = jaxattn.quantize_kv(pages, jnp.float8_e4m3fn)  # scales follow their pages' head shards
    want = jaxattn.paged_attention(q, f8, f8, lens, table, k_scale=scale, v_scale=scale)
    got = jaxattn.paged_attention(q, f8, f8, lens, table, k_scale=scale, v_scale=scale,
                                  metadata=OperationMetadata(mesh=m))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


@needs8
def test_dropout_under_a_mesh_differs_between_shards():
    m = mesh((2, 4), ("dp", "tp"))
    q, k, v = problem(4, b=2, hq=4, hkv=4)
    q = q.at[1].set(q[0])
    k = k.at[1].set(k[0])
    v = v.at[1].set(v[0])
    out = jaxattn.attention(q, k, v, dropout_rate=0.5, dropout_rng=jax.random.PRNGKey(0),
                            metadata=OperationMetadata(mesh=m))
    assert not np.allclose(np.asarray(out[0]), np.asarray(out[1]))
