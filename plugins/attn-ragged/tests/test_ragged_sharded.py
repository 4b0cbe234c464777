"""The paged kernels under plain jit with sharded inputs: each device decodes its own
sequences (data axis) and heads (tensor axis); the output keeps that sharding.

Runs the Pallas kernels in the interpreter on 4 virtual CPU devices, tiny shapes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxattn
from jaxattn_ragged import DecodeAttention


class CpuDecode(DecodeAttention):
    """The interpreted decode kernel, registered under its own name for the CPU."""

    name = "decode_cpu"
    aliases = ()
    platforms = ("cpu",)
    priority = {"cpu": 0}
    shapes: list = []

    def __init__(self):
        super().__init__(interpret=True)
        self.platforms = ("cpu",)

    def forward_cpu(self, inputs, metadata):
        type(self).shapes.append(tuple(inputs.query.shape))
        return super().forward_cpu(inputs, metadata)


class Plugin:
    @jaxattn.hookimpl
    def jaxattn_register_backends(self):
        return [CpuDecode()]


def test_decode_shards_sequences_and_heads_under_plain_jit():
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices")
    registry = jaxattn.default_registry()
    registry.add_plugin(Plugin(), "decode_cpu")
    try:
        num_seqs, page, pages_per_seq, hq, hkv, d = 4, 16, 4, 8, 2, 64
        ks = jax.random.split(jax.random.PRNGKey(0), 3)
        pages = jax.random.normal(ks[0], (num_seqs * pages_per_seq, page, hkv, d))
        values = jax.random.normal(ks[1], pages.shape)
        table = jnp.asarray(np.random.default_rng(0).permutation(num_seqs * pages_per_seq).reshape(num_seqs, -1),
                            jnp.int32)
        lengths = jnp.asarray([5, 64, 33, 17], jnp.int32)
        query = jax.random.normal(ks[2], (num_seqs, hq, d))
        ref = jaxattn.paged_attention(query, pages, values, lengths, table, backend="xla")
        mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("dp", "tp"))
        rows, heads = NamedSharding(mesh, P("dp")), NamedSharding(mesh, P(None, None, "tp"))
        CpuDecode.shapes.clear()
        out = jax.jit(lambda q, k, v, lens, t: jaxattn.paged_attention(q, k, v, lens, t, backend="decode_cpu"))(
            jax.device_put(query, NamedSharding(mesh, P("dp", "tp"))), jax.device_put(pages, heads),
            jax.device_put(values, heads), jax.device_put(lengths, rows), jax.device_put(table, rows))
        assert (2, 4, d) in CpuDecode.shapes  # two sequences, four query heads: one shard
        assert out.sharding.is_equivalent_to(NamedSharding(mesh, P("dp", "tp")), 3)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5)
    finally:
        registry.remove_plugin("decode_cpu")
