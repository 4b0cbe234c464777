"""flash under plain jit with sharded inputs: each device runs the kernels on its shard,
and the backward pass comes from `FlashAttention.backward` (no second forward).

Runs the Pallas kernels in the interpreter on 8 virtual CPU devices, tiny shapes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxattn
from jaxattn import Hardware, OperationMetadata
from jaxattn.testing import relative_error as rel
from jaxattn_flash import FlashAttention
from jaxattn_flash._testing import tiles

BLOCKS = OperationMetadata(operation_configs=tiles(32))


class CpuFlash(FlashAttention):
    """The interpreted kernels, registered under their own name for the CPU."""

    name = "flash_cpu"
    aliases = ()
    platforms = ("cpu",)
    priority = {"cpu": 0}
    calls: list = []

    def __init__(self):
        super().__init__(interpret=True)

    def _run(self, inputs, metadata, hardware=None):
        type(self).calls.append(tuple(inputs.query.shape))
        return super()._run(inputs, metadata, hardware)


class Plugin:
    @jaxattn.hookimpl
    def jaxattn_register_backends(self):
        return [CpuFlash()]



def qkv(seed, b, sq, skv, hq, hkv, d):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    return (jax.random.normal(ks[0], (b, sq, hq, d)), jax.random.normal(ks[1], (b, skv, hkv, d)),
            jax.random.normal(ks[2], (b, skv, hkv, d)), jax.random.normal(ks[3], (hq,)))


def test_backward_from_out_and_lse_equals_the_custom_vjp():
    """Odd lengths and head_dim 40 (both padded), GQA, sinks, segments and lengths."""
    q, k, v, sinks = qkv(0, 2, 50, 70, 4, 2, 40)
    seg = (jnp.asarray(np.repeat([[0, 1]], 2, 0).repeat(25, 1)), jnp.asarray(np.repeat([[0, 1]], 2, 0).repeat(35, 1)))
    impl = FlashAttention(interpret=True)
    inputs = jaxattn.validation.build_attention_inputs(
        q, k, v, None, None, metadata=BLOCKS, scale=None, is_causal=True, sliding_window=None, segment_ids=seg,
        query_seq_lengths=jnp.asarray([50, 31]), key_value_seq_lengths=jnp.asarray([70, 44]), logits_soft_cap=None,
        sinks=sinks, dropout_rate=0.0, dropout_rng=None, return_lse=True)

    def f(q, k, v, s):
        return impl(inputs.replace(query=q, key=k, value=v, sinks=s), BLOCKS, Hardware.cpu())

    (out, lse), vjp = jax.vjp(f, q, k, v, sinks)
    d_out = jax.random.normal(jax.random.PRNGKey(5), out.shape)
    d_lse = jnp.where(jnp.isfinite(lse), jax.random.normal(jax.random.PRNGKey(6), lse.shape), 0.0)
    want = vjp((d_out, d_lse))
    got = impl.backward(inputs, out, lse, d_out, d_lse, BLOCKS, Hardware.cpu())
    for name, w in zip(("query", "key", "value", "sinks"), want):
        assert got[name].shape == w.shape and rel(got[name], w) < 1e-5, name


def test_plain_jit_shards_batch_and_heads():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    registry = jaxattn.default_registry()
    registry.add_plugin(Plugin(), "flash_cpu")
    try:
        mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("dp", "tp"))
        q, k, v, sinks = qkv(1, 2, 64, 64, 4, 2, 32)
        sharding = NamedSharding(mesh, P("dp", None, "tp"))

        def loss(backend):
            def f(q, k, v, s):
                out = jaxattn.attention(q, k, v, is_causal=True, sinks=s, backend=backend, metadata=BLOCKS)
                return jnp.sum(out * jnp.sin(out)), out
            return f

        CpuFlash.calls.clear()
        (_, out), grads = jax.jit(jax.value_and_grad(loss("flash_cpu"), (0, 1, 2, 3), has_aux=True))(
            *(jax.device_put(x, sharding) for x in (q, k, v)), sinks)
        (_, ref), ref_grads = jax.value_and_grad(loss("xla"), (0, 1, 2, 3), has_aux=True)(q, k, v, sinks)
        assert (1, 64, 2, 32) in CpuFlash.calls  # one batch row, half the heads: a shard
        assert out.sharding.is_equivalent_to(sharding, 4)
        assert rel(out, ref) < 1e-5
        for g, r in zip(grads, ref_grads):
            assert rel(g, r) < 1e-4
    finally:
        registry.remove_plugin("flash_cpu")
