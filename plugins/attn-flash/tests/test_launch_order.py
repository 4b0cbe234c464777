"""The dk/dv kernel's launch passes and the Mosaic kernels' launch clusters: the remaps of the
grid, when flash uses them, and that the gradients do not depend on the passes (kernels in the
Pallas interpreter)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import Hardware, OperationMetadata
from jaxattn_flash import FlashAttention
from jaxattn_flash import config as flash_config
from jaxattn_flash.launch_order import clustered_order, launch_order, ordered, pass_bounds


def test_pass_bounds_halve_what_is_left():
    assert pass_bounds(32, 1) == [0, 32]
    assert pass_bounds(32, 4) == [0, 16, 24, 28, 32]
    assert pass_bounds(4, 4) == [0, 2, 3, 4]
    assert pass_bounds(6, 8) == [0, 3, 4, 5, 6]  # fewer passes when the blocks run out
    assert pass_bounds(1, 4) == [0, 1]


def _remap(n, nb, nh, passes):
    """(block, batch, head) of every program, in launch order (first grid axis fastest)."""
    h, bb, i = np.meshgrid(np.arange(nh), np.arange(nb), np.arange(n), indexing="ij")
    ids = [jnp.asarray(a.ravel(), jnp.int32) for a in (i, bb, h)]
    return np.stack([np.asarray(x) for x in launch_order(*ids, n, nb, nh, passes)], axis=1)


@pytest.mark.parametrize("n,nb,nh,passes", [(32, 2, 3, 4), (6, 1, 5, 3), (4, 3, 2, 8), (7, 2, 2, 2), (1, 2, 2, 4)])
def test_launch_order_is_a_bijection_in_passes(n, nb, nh, passes):
    got = _remap(n, nb, nh, passes)
    every = {(j, b, h) for j, b, h in itertools.product(range(n), range(nb), range(nh))}
    assert {tuple(row) for row in got} == every and len(got) == len(every)
    bounds = pass_bounds(n, passes)
    pass_of = np.searchsorted(bounds, got[:, 0], side="right") - 1
    assert np.all(np.diff(pass_of) >= 0), "passes must launch one after another"
    for k in range(len(bounds) - 1):
        rows = got[pass_of == k]
        group = rows[:, 2] * nb + rows[:, 1]
        assert np.all(np.diff(group) >= 0), "inside a pass, groups launch in order"
        for g in np.unique(group):
            assert list(rows[group == g, 0]) == list(range(bounds[k], bounds[k + 1]))


@pytest.mark.parametrize("n,groups,cluster", [(32, 8, 4), (5, 7, 3), (4, 6, 8), (1, 5, 2), (9, 4, 4)])
def test_clustered_order_is_a_bijection_heavy_blocks_first(n, groups, cluster):
    """Launch position p -> (block, group): a bijection; clusters of `cluster` groups (the last
    one smaller) launch one after another, each block index across the cluster's groups in
    order, so every cluster's block 0 launches before any of its block 1."""
    lin = np.arange(n * groups)
    got = np.stack([np.asarray(x) for x in clustered_order(jnp.asarray(lin % n, jnp.int32),
                                                            jnp.asarray(lin // n, jnp.int32), n, groups, cluster)], 1)
    assert {tuple(row) for row in got} == set(itertools.product(range(n), range(groups)))
    want = [(j, g) for c in range(0, groups, cluster) for j in range(n) for g in range(c, min(groups, c + cluster))]
    assert [tuple(row) for row in got] == want
    assert clustered_order(3, 2, n, groups, 1) == (3, 2)  # 1: the grid's own order, no arithmetic


def test_one_pass_is_the_identity_without_arithmetic():
    assert launch_order(3, 1, 2, 8, 2, 4, 1) == (3, 1, 2)
    index_map = lambda j, b, h: (b, j, h, 0)  # noqa: E731
    assert ordered(index_map, 8, 2, 4, 1) is index_map
    assert ordered(index_map, 8, 2, 4, 2)(0, 1, 0) == tuple(index_map(*launch_order(0, 1, 0, 8, 2, 4, 2)))


def test_default_passes_only_for_grouped_heads_under_a_causal_band():
    grouped = flash_config.DKV_PASSES_GROUPED_CAUSAL

    def passes(group, mask, q_len=256, kv_len=256, config=None):
        return flash_config.dkv_passes(config or {}, group, jaxattn.mask_parts(mask, q_len, kv_len))

    assert passes(4, jaxattn.CausalMask()) == grouped  # GQA, causal
    assert passes(32, jaxattn.CausalMask(), q_len=128) == grouped  # MQA, causal with an offset
    assert passes(4, jaxattn.CausalMask() & jaxattn.SegmentMask(*[jnp.zeros((1, 256), jnp.int32)] * 2)) == grouped
    assert passes(1, jaxattn.CausalMask()) == 1  # MHA: the plain order is faster
    assert passes(4, None) == 1  # no band: every block is as heavy
    assert passes(4, jaxattn.SlidingWindowMask(64, 0)) == 1  # a window bounds the work of every block
    assert passes(4, jaxattn.ChunkedCausalMask(64)) == 1  # so does a chunk
    assert passes(1, None, config={"launch_passes_dkv": 2}) == 2


def test_default_launch_clusters_of_the_mosaic_kernels():
    """The forward clusters its grid under a causal band; the 128-key dk/dv kernel only under causal
    GQA (MHA lost 2-3% on an H200); the wide kernel keeps its launch passes; a config key wins."""
    fwd, dkv = flash_config.MOSAIC_FWD_CLUSTER_CAUSAL, flash_config.MOSAIC_DKV_CLUSTER_GROUPED_CAUSAL

    def clusters(group, mask, d=128, config=None):
        parts = jaxattn.mask_parts(mask, 256, 256)
        return (flash_config.mosaic_fwd_cluster(config or {}, parts),
                flash_config.mosaic_dkv_cluster(config or {}, group, parts, d, d))

    assert clusters(4, jaxattn.CausalMask()) == (fwd, dkv)
    assert clusters(1, jaxattn.CausalMask()) == (fwd, 1)
    assert clusters(4, jaxattn.CausalMask(), d=256) == (fwd, 1)  # the wide kernel: 4 launch passes
    assert clusters(4, None) == (1, 1)  # no band: every block is as heavy
    assert clusters(4, jaxattn.SlidingWindowMask(64, 0)) == (1, 1)
    assert clusters(4, jaxattn.ChunkedCausalMask(64)) == (1, 1)
    assert clusters(4, jaxattn.CausalMask(), config={"launch_passes_dkv": 2}) == (fwd, 1)
    assert clusters(1, None, config={"launch_cluster_fwd": 3, "launch_cluster_dkv": 5}) == (3, 5)
    with pytest.raises(ValueError, match=r"set at most one of launch_passes_dkv=2 and launch_cluster_dkv=8"):
        clusters(4, jaxattn.CausalMask(), config={"launch_passes_dkv": 2, "launch_cluster_dkv": 8})


@pytest.mark.parametrize("bad", [0, 9, True, "4", 2.0])
def test_launch_passes_key_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=r"\['launch_passes_dkv'\] must be an int from 1 to 8"):
        flash_config.dkv_passes({"launch_passes_dkv": bad}, 4, jaxattn.mask_parts(jaxattn.CausalMask(), 64, 64))


def test_gradients_do_not_depend_on_the_launch_order():
    """GQA causal with segment ids and key lengths (every index map of the dk/dv kernel):
    1, 3 and 4 passes give the same gradients, and they match the xla reference."""
    ks = jax.random.split(jax.random.PRNGKey(11), 5)
    b, s, hq, hkv, d = 2, 128, 4, 2, 32
    q = jax.random.normal(ks[0], (b, s, hq, d), jnp.float32)
    k = jax.random.normal(ks[1], (b, s, hkv, d), jnp.float32)
    v = jax.random.normal(ks[2], (b, s, hkv, d), jnp.float32)
    seg = (jnp.arange(s)[None, :] >= jax.random.randint(ks[3], (b, 1), 20, 100)).astype(jnp.int32)
    kv_lens = jnp.array([s, 97], jnp.int32)
    weight = jax.random.normal(ks[4], (b, s, hq, d), jnp.float32)  # a random cotangent
    impl = FlashAttention(interpret=True)

    def grads(passes):
        md = OperationMetadata(operation_configs={"flash": {
            "block_q_dkv": 32, "block_kv_dkv": 16, "block_q_dq": 32, "block_kv_dq": 32, "launch_passes_dkv": passes}})

        def loss(q, k, v):
            inputs = jaxattn.validation.build_attention_inputs(
                q, k, v, None, None, metadata=md, scale=None, is_causal=True, sliding_window=None,
                segment_ids=seg, query_seq_lengths=None, key_value_seq_lengths=kv_lens, logits_soft_cap=None,
                sinks=None, dropout_rate=0.0, dropout_rng=None, return_lse=False)
            return jnp.sum(impl(inputs, md, Hardware.cpu())[0] * weight)

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    plain = grads(1)
    for passes in (3, 4):
        for a, p in zip(grads(passes), plain):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(p))

    def ref_loss(q, k, v):
        out = jaxattn.attention(q, k, v, is_causal=True, segment_ids=seg, key_value_seq_lengths=kv_lens,
                                backend="xla")
        return jnp.sum(out * weight)

    for a, r in zip(plain, jax.grad(ref_loss, argnums=(0, 1, 2))(q, k, v)):
        assert float(jnp.linalg.norm(a - r) / jnp.linalg.norm(r)) < 1e-5
