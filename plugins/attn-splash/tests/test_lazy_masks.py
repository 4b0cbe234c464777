"""Mask translation, on CPU without running the kernel: jaxattn masks -> lazy nodes -> splash
mask objects and MaskInfo, checked against the core's `materialize` and jax's `process_mask`."""

from __future__ import annotations

import tracemalloc

import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn import CausalMask, ChunkedCausalMask, DenseMask, FullMask, SegmentMask, SlidingWindowMask
from jaxattn_splash import _compat, lazy
from jaxattn_splash.mask_info import lazy_mask_info
from jaxattn_splash.translate import plan_mask, to_node

EMPTY, PARTIAL, FULL = 0, 1, 2

STRUCTURAL = {
    "full": FullMask(),
    "causal": CausalMask(),
    "causal_offset_pos": CausalMask(offset=37),
    "causal_offset_neg": CausalMask(offset=-45),
    "window": SlidingWindowMask(33, 0),
    "window_asym": SlidingWindowMask(20, 50),
    "window_offset": SlidingWindowMask(16, 16, offset=-30),
    "chunked": ChunkedCausalMask(96),
    "chunked_offset": ChunkedCausalMask(64, offset=21),
    "causal_and_window": CausalMask.bottom_right(200, 256) & SlidingWindowMask(40, 40),
    "chunk_and_window": ChunkedCausalMask(128) & SlidingWindowMask(30, 0),
    "window_or_chunk": SlidingWindowMask(8, 8) | ChunkedCausalMask(64),
    "or_and": (CausalMask() | SlidingWindowMask(0, 5)) & SlidingWindowMask(70, 70),
}
SHAPES = [(256, 256), (200, 256), (256, 130)]


def _numpy_mask(node: lazy.Node, q_len: int, kv_len: int) -> np.ndarray:
    i = np.arange(q_len)[:, None]
    j = np.arange(kv_len)[None, :]
    return np.broadcast_to(node(i, j), (q_len, kv_len))


@pytest.mark.parametrize("name", sorted(STRUCTURAL))
@pytest.mark.parametrize("shape", SHAPES)
def test_lazy_node_matches_core_mask(name, shape):
    q_len, kv_len = shape
    mask = STRUCTURAL[name]
    node = to_node(mask, q_len, kv_len)
    assert node is not None
    want = np.asarray(mask.materialize(q_len, kv_len))[0, 0]
    np.testing.assert_array_equal(_numpy_mask(node, q_len, kv_len), want)
    # splash's own mask object (CausalMask/LocalMask/ChunkedCausalMask/FullMask or ours),
    # evaluated through its numpy __getitem__ as jax's preprocessing does.
    splash_mask = lazy.to_splash_mask(node, (q_len, kv_len))
    np.testing.assert_array_equal(splash_mask[0:q_len, 0:kv_len], want)
    # jax.numpy evaluation (what the kernel does on each partial tile).
    got = node(jnp.arange(q_len)[:, None], jnp.arange(kv_len)[None, :])
    np.testing.assert_array_equal(np.broadcast_to(np.asarray(got), (q_len, kv_len)), want)


@pytest.mark.parametrize("name", sorted(STRUCTURAL))
def test_tiles_are_sound(name):
    """EMPTY/FULL tiles must really be empty/full (PARTIAL may be conservative)."""
    q_len, kv_len, bq, bk = 384, 512, 64, 128
    node = to_node(STRUCTURAL[name], q_len, kv_len)
    dense = _numpy_mask(node, q_len, kv_len).reshape(q_len // bq, bq, kv_len // bk, bk)
    tiles = node.tiles(q_len, kv_len, bq, bk)
    assert not dense.any(axis=(1, 3))[tiles == EMPTY].any()
    assert dense.all(axis=(1, 3))[tiles == FULL].all()


def test_splash_classes_used_where_they_fit():
    ml = _compat.mask_lib
    shape = (256, 256)
    assert isinstance(lazy.to_splash_mask(to_node(CausalMask(3), *shape), shape), ml.CausalMask)
    assert isinstance(lazy.to_splash_mask(to_node(SlidingWindowMask(4, 0), *shape), shape), ml.LocalMask)
    assert isinstance(lazy.to_splash_mask(to_node(ChunkedCausalMask(64, offset=0), *shape), shape),
                      ml.ChunkedCausalMask)
    assert isinstance(lazy.to_splash_mask(to_node(FullMask(), *shape), shape), ml.FullMask)
    other = lazy.to_splash_mask(to_node(ChunkedCausalMask(64, offset=5), *shape), shape)
    assert isinstance(other, lazy.ComputableMask) and isinstance(other, ml.Mask)


NODES_FOR_INFO = [
    lazy.Band(None, 0), lazy.Band(None, 100), lazy.Band(-200, 0), lazy.Band(-100, 60), lazy.Band(-50, None),
    lazy.Chunk(128), lazy.Chunk(96, 40), lazy.Full(),
    lazy.conjoin([lazy.Band(None, 0), lazy.KeyBelow(300)]),
    lazy.disjoin([lazy.Band(-8, 8), lazy.Chunk(96)]),
]


@pytest.mark.parametrize("node", NODES_FOR_INFO, ids=repr)
@pytest.mark.parametrize("dims", [(512, 512, 128, 128), (256, 512, 128, 256), (512, 384, 64, 128)])
@pytest.mark.parametrize("dkv", [False, True])
def test_mask_info_equals_jax_process_mask(node, dims, dkv):
    q_len, kv_len, bq, bk = dims
    splash_mask = _compat.mask_lib.MultiHeadMask([lazy.to_splash_mask(node, (q_len, kv_len))])
    process = _compat.process_mask_dkv if dkv else _compat.process_mask
    want, _ = process(splash_mask, (bq, bk))
    got = lazy_mask_info(node, q_len, kv_len, bq, bk, dkv=dkv)
    for field in want._fields:
        a, b = getattr(want, field), getattr(got, field)
        if field == "is_dynamic_mask":
            continue
        assert (a is None) == (b is None), field
        if a is not None:
            assert a.dtype == b.dtype, field
            np.testing.assert_array_equal(a, b, err_msg=field)


def test_mask_info_of_an_empty_mask_has_a_grid():
    info = lazy_mask_info(lazy.Band(None, -10_000), 256, 256, 128, 128)
    assert info.block_mask.shape == (1, 2, 1) and not info.block_mask.any()


def test_32k_causal_window_mask_info_never_builds_the_full_mask():
    """32k tokens, causal + 1024 window: the MaskInfo of all three kernels is a few KB, and
    building it allocates nowhere near a 32k x 32k array (1 GiB of bools)."""
    n = 32768
    mask = CausalMask.bottom_right(n, n) & SlidingWindowMask(1024, 0)
    plan = plan_mask(mask, n, n)
    assert not plan.dense and plan.segments is None
    lazy_mask_info.cache_clear()
    tracemalloc.start()
    try:
        infos = [lazy_mask_info(plan.node, n, n, 512, 512, dkv=dkv) for dkv in (False, True)]
        infos.append(lazy_mask_info(plan.node, n, n, 128, 128))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.1f} MiB"
    fwd = infos[0]
    assert fwd.partial_mask_blocks is None and fwd.mask_next is None  # computed in the kernel
    assert fwd.block_mask.shape == (1, 64, 3)  # grid shrunk to the window: 3 kv tiles per q row
    assert sum(a.nbytes for info in infos for a in (info.block_mask, info.data_next)) < 2**20
    assert fwd.q_sequence.shape == (n,)


def test_mask_info_is_cached():
    lazy_mask_info.cache_clear()
    node = to_node(CausalMask(), 1024, 1024)
    first = lazy_mask_info(node, 1024, 1024, 256, 256)
    again = lazy_mask_info(to_node(CausalMask(), 1024, 1024), 1024, 1024, 256, 256)  # equal, not identical
    assert again is first and lazy_mask_info.cache_info().hits == 1
    assert not first.block_mask.flags.writeable


def test_plan_splits_lazy_segments_and_dense():
    ids = jnp.zeros((2, 256), jnp.int32)
    seg = SegmentMask(ids, ids)
    plan = plan_mask(CausalMask() & SlidingWindowMask(8, 0) & seg, 256, 256)
    assert plan.segments is seg and not plan.dense
    assert plan.node == lazy.Band(-8, 0)
    dense = DenseMask(jnp.ones((256, 256), bool))
    plan = plan_mask(CausalMask() & dense, 256, 256)
    assert plan.dense == [dense] and plan.node == lazy.Band(None, 0)
    # A second segment mask, and an `|` involving arrays, are materialized (the last resort).
    plan = plan_mask(seg & SegmentMask(ids, ids), 256, 256)
    assert plan.segments is seg and len(plan.dense) == 1
    plan = plan_mask(seg | CausalMask(), 256, 256)
    assert plan.segments is None and len(plan.dense) == 1


def test_rows_with_keys_is_exact():
    for mask in (CausalMask(-45), ChunkedCausalMask(64, offset=-30) & SlidingWindowMask(10, 0),
                 SlidingWindowMask(5, 5, offset=300), CausalMask() & SlidingWindowMask(0, 0, offset=-3)):
        node = to_node(mask, 256, 256)
        want = np.asarray(mask.materialize(256, 256))[0, 0].any(axis=1)
        np.testing.assert_array_equal(lazy.rows_with_keys(node, 256, 256), want)
    assert lazy.rows_with_keys(to_node(SlidingWindowMask(1, 1) | CausalMask(), 64, 64), 64, 64) is None
