"""Plain-jit sharding of "shard" backends (opaque kernels) through custom_partitioning.

A test backend computes with the xla math but declares `partitioning = "shard"` and records
the shapes it is called with. Under `jax.jit` with batch- and head-sharded inputs (no mesh
given), each device must run it on its own shard, the output must keep the input's
sharding, and values and gradients must equal the unsharded call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxattn
from jaxattn.backends.xla import XlaAttention, XlaPagedAttention
from jaxattn.testing import relative_error as rel

TOL = 1e-5


class _RecordsShapes:
    """The xla math as a "shard" backend that records the query shape of every call (in the
    `shapes` list of its own class)."""

    name = "shard_test"
    aliases = ()
    platforms = ("cpu",)
    partitioning = "shard"
    shapes: list

    def forward_native(self, inputs, metadata):
        type(self).shapes.append(tuple(inputs.query.shape))
        return super().forward_native(inputs, metadata)


class Recording(_RecordsShapes, XlaAttention):
    shapes: list = []


class RecordingPaged(_RecordsShapes, XlaPagedAttention):
    shapes: list = []


class Plugin:
    @jaxattn.hookimpl
    def jaxattn_register_backends(self):
        return [Recording(), RecordingPaged()]


@pytest.fixture(scope="module")
def mesh():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (the root conftest asks XLA for 8 virtual CPU devices)")
    registry = jaxattn.default_registry()
    registry.add_plugin(Plugin(), "shard_test")
    yield Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("dp", "tp"))
    registry.remove_plugin("shard_test")



KEYS = jax.random.split(jax.random.PRNGKey(0), 6)
Q = jax.random.normal(KEYS[0], (4, 16, 8, 8))
K = jax.random.normal(KEYS[1], (4, 16, 4, 8))
V = jax.random.normal(KEYS[2], (4, 16, 4, 8))
SINKS = jax.random.normal(KEYS[3], (8,))
BIAS = jax.random.normal(KEYS[4], (1, 8, 16, 16))  # broadcast over the batch
SEG = jnp.asarray(np.sort(np.random.default_rng(0).integers(0, 3, (4, 16)), axis=1), jnp.int32)


@pytest.mark.parametrize("spec", [P("dp", None, "tp"), P("dp"), P(None, None, "tp")], ids=str)
def test_each_device_runs_its_shard_and_the_output_keeps_the_sharding(mesh, spec):
    sharding = NamedSharding(mesh, spec)
    q, k, v = (jax.device_put(x, sharding) for x in (Q, K, V))
    kwargs = {"is_causal": True, "sinks": SINKS, "segment_ids": SEG, "bias": BIAS,
              "key_value_seq_lengths": jnp.asarray([16, 9, 12, 3])}
    Recording.shapes.clear()
    out = jax.jit(lambda q, k, v: jaxattn.attention(q, k, v, backend="shard_test", **kwargs))(q, k, v)
    batch = 2 if spec[0] else 4
    heads = 2 if len(spec) > 2 and spec[2] else 8
    assert (batch, 16, heads, 8) in Recording.shapes  # the kernel saw one shard
    assert out.sharding.is_equivalent_to(sharding, 4)
    assert rel(out, jaxattn.attention(Q, K, V, backend="xla", **kwargs)) < TOL


def test_gradients_sum_what_the_shards_share(mesh):
    sharding = NamedSharding(mesh, P("dp", None, "tp"))
    q, k, v = (jax.device_put(x, sharding) for x in (Q, K, V))

    def loss(backend):
        def f(q, k, v, sinks, bias):
            out, lse = jaxattn.attention(q, k, v, bias, is_causal=True, sinks=sinks, return_lse=True, backend=backend)
            return jnp.sum(out * jnp.cos(out)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))
        return f

    got = jax.jit(jax.grad(loss("shard_test"), (0, 1, 2, 3, 4)))(q, k, v, SINKS, BIAS)
    ref = jax.grad(loss("xla"), (0, 1, 2, 3, 4))(Q, K, V, SINKS, BIAS)
    for g, r, name in zip(got, ref, ("dq", "dk", "dv", "dsinks", "dbias")):
        assert rel(g, r) < 1e-4, name
    assert got[0].sharding.is_equivalent_to(sharding, 4)


def test_eager_and_vmap_calls(mesh):
    out = jaxattn.attention(Q, K, V, backend="shard_test")  # eager: partitioned, replicated inputs
    assert rel(out, jaxattn.attention(Q, K, V, backend="xla")) < TOL
    batched = jax.vmap(lambda q, k, v: jaxattn.attention(q, k, v, backend="shard_test"))(Q[:, None], K[:, None],
                                                                                        V[:, None])
    assert rel(batched[:, 0], out) < TOL  # under vmap the call runs unpartitioned


def test_paged_decode_shards_sequences_and_heads(mesh):
    num_seqs, page, pages_per_seq, hq, hkv, d = 8, 4, 3, 8, 4, 8
    pages = jax.random.normal(KEYS[5], (num_seqs * pages_per_seq, page, hkv, d))
    table = jnp.arange(num_seqs * pages_per_seq, dtype=jnp.int32).reshape(num_seqs, pages_per_seq)[:, ::-1]
    lengths = jnp.asarray([1, 12, 5, 9, 7, 3, 11, 2], jnp.int32)
    query = jax.random.normal(KEYS[4], (num_seqs, hq, d))
    ref = jaxattn.paged_attention(query, pages, pages, lengths, table, backend="xla")
    rows = NamedSharding(mesh, P("dp"))
    args = (jax.device_put(query, NamedSharding(mesh, P("dp", "tp"))),
            jax.device_put(pages, NamedSharding(mesh, P(None, None, "tp"))), None,
            jax.device_put(lengths, rows), jax.device_put(table, rows))
    RecordingPaged.shapes.clear()
    out = jax.jit(lambda q, p, lens, t: jaxattn.paged_attention(q, p, p, lens, t, backend="shard_test"))(
        args[0], args[1], args[3], args[4])
    assert (4, 2, 8) in RecordingPaged.shapes
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, P("dp", "tp")), 3)
    assert rel(out, ref) < TOL
    # int8 pages: per token and head scales split over heads like their pages; a scalar is replicated
    q8, k_scale = jaxattn.quantize_kv(pages, jnp.int8)
    ref = jaxattn.paged_attention(query, q8, q8, lengths, table, k_scale=k_scale, v_scale=0.5, backend="xla")
    RecordingPaged.shapes.clear()
    out = jax.jit(lambda q, p, s, lens, t: jaxattn.paged_attention(q, p, p, lens, t, k_scale=s, v_scale=0.5,
                                                                   backend="shard_test"))(
        args[0], jax.device_put(q8, NamedSharding(mesh, P(None, None, "tp"))),
        jax.device_put(k_scale, NamedSharding(mesh, P(None, None, "tp"))), args[3], args[4])
    assert (4, 2, 8) in RecordingPaged.shapes
    assert rel(out, ref) < TOL


def test_explicit_mesh_gives_the_same_result(mesh):
    md = jaxattn.OperationMetadata(mesh=mesh)
    a = jax.jit(lambda q, k, v: jaxattn.attention(q, k, v, is_causal=True, backend="shard_test", metadata=md))(Q, K, V)
    b = jax.jit(lambda q, k, v: jaxattn.attention(q, k, v, is_causal=True, backend="shard_test"))(
        *(jax.device_put(x, NamedSharding(mesh, P("dp", None, "tp"))) for x in (Q, K, V)))
    assert rel(a, b) < TOL
