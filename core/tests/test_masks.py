"""Mask objects: their rules, block structure, combination and the kernel form."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy_reference import Rules, allowed

import jaxattn
from jaxattn import EMPTY, FULL, PARTIAL
from jaxattn.masks import (
    CausalMask,
    ChunkedCausalMask,
    DenseMask,
    FullMask,
    QueryPositionMask,
    SegmentMask,
    SlidingWindowMask,
    mask_parts,
)

SHAPES = [(16, 16), (12, 20), (20, 12), (1, 33)]


def dense(mask, q_len, kv_len):
    return np.asarray(mask.materialize(q_len, kv_len))


@pytest.mark.parametrize("q_len,kv_len", SHAPES)
def test_structural_masks_follow_design_rules(q_len, kv_len):
    shift = kv_len - q_len
    for mask, rules in [
        (CausalMask(), Rules(causal_offset=0)),
        (CausalMask(3), Rules(causal_offset=3)),
        (CausalMask.bottom_right(q_len, kv_len), Rules(causal_offset=shift)),
        (SlidingWindowMask(3, 1), Rules(window=(3, 1))),
        (ChunkedCausalMask(5), Rules(chunk=5)),
    ]:
        want = allowed(rules, 0, 0, q_len, kv_len)
        np.testing.assert_array_equal(dense(mask, q_len, kv_len)[0, 0], want, err_msg=repr(mask))
    assert dense(FullMask(), q_len, kv_len).all()


def test_explicit_offsets_for_window_and_chunk():
    np.testing.assert_array_equal(
        dense(SlidingWindowMask(2, 0, offset=0), 6, 10)[0, 0],
        allowed(Rules(causal_offset=0), 0, 0, 6, 10) & ~allowed(Rules(causal_offset=-3), 0, 0, 6, 10),
    )
    chunk = dense(ChunkedCausalMask(4, offset=0), 8, 8)[0, 0]
    np.testing.assert_array_equal(chunk, allowed(Rules(chunk=4), 0, 0, 8, 8))


def random_masks(rng):
    q_ids = jnp.asarray(np.sort(rng.integers(0, 3, (2, 24)), axis=1))
    kv_ids = jnp.asarray(np.sort(rng.integers(0, 3, (2, 40)), axis=1))
    return [
        CausalMask(16),
        CausalMask(-4),
        SlidingWindowMask(5, 2),
        ChunkedCausalMask(7),
        SegmentMask(q_ids, kv_ids),
        DenseMask(jnp.asarray(rng.random((2, 1, 24, 40)) < 0.5)),
        DenseMask(jnp.asarray(np.triu(np.ones((24, 40), bool), 10))),
        CausalMask(16) & SlidingWindowMask(8, 0),
        CausalMask(16) | ChunkedCausalMask(6),
        (SlidingWindowMask(3, 3) | SegmentMask(q_ids, kv_ids)) & CausalMask(20),
        QueryPositionMask(POSITIONS),
        QueryPositionMask(POSITIONS, left=4, right=2),
        QueryPositionMask(POSITIONS[:, ::-1].copy(), left=9) & CausalMask(30),
    ]


POSITIONS = jnp.asarray(np.stack([np.arange(24) + 3, np.arange(24) + 14]), jnp.int32)


def test_query_positions_follow_their_rule():
    """Query i of row b sees key j iff p - left <= j <= p + right, p = positions[b, i]."""
    for left, right in ((None, 0), (4, 2), (0, 0)):
        got = dense(QueryPositionMask(POSITIONS, left=left, right=right), 24, 40)
        for b in range(2):
            rules = Rules(positions=np.asarray(POSITIONS), positions_window=(left, right))
            np.testing.assert_array_equal(got[b, 0], allowed(rules, b, 0, 24, 40))
    grid = QueryPositionMask(POSITIONS).block_structure(24, 40, 8, 8)
    assert (grid == EMPTY).any() and (grid == FULL).any()  # the tiles of a cache prefill are skipped


@pytest.mark.parametrize("block", [(8, 8), (5, 7), (24, 40), (1, 1)])
def test_block_structure_is_sound(block):
    """EMPTY tiles have no allowed entry, FULL tiles only allowed entries."""
    q_len, kv_len = 24, 40
    for mask in random_masks(np.random.default_rng(0)):
        m = np.broadcast_to(dense(mask, q_len, kv_len), (2, 4, q_len, kv_len))
        grid = mask.block_structure(q_len, kv_len, *block)
        assert grid.shape == (-(-q_len // block[0]), -(-kv_len // block[1]))
        for (i, j), tile_class in np.ndenumerate(grid):
            tile = m[:, :, i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]]
            if tile_class == EMPTY:
                assert not tile.any(), (mask, i, j)
            elif tile_class == FULL:
                assert tile.all(), (mask, i, j)


def test_block_structure_is_tight_for_band_masks():
    """For causal and window masks every tile is classified exactly (no needless PARTIAL)."""
    for mask in (CausalMask(0), CausalMask(5), SlidingWindowMask(9, 0), ChunkedCausalMask(8)):
        grid = mask.block_structure(32, 32, 4, 4)
        m = dense(mask, 32, 32)[0, 0]
        for (i, j), tile_class in np.ndenumerate(grid):
            tile = m[i * 4:(i + 1) * 4, j * 4:(j + 1) * 4]
            exact = EMPTY if not tile.any() else FULL if tile.all() else PARTIAL
            assert tile_class == exact, (mask, i, j)


def test_window_skips_most_tiles_at_long_lengths():
    grid = (CausalMask.bottom_right(16384, 16384) & SlidingWindowMask(1024, 0)).block_structure(16384, 16384, 128, 128)
    assert (grid != EMPTY).mean() < 0.07
    causal = CausalMask(0).block_structure(16384, 16384, 128, 128)
    assert (causal != EMPTY).sum() > 7 * (grid != EMPTY).sum()


def test_traced_arrays_give_partial_tiles():
    ids = jnp.zeros((1, 16), jnp.int32) + jnp.arange(16) // 8

    @jax.jit
    def f(ids):
        grid = SegmentMask(ids, ids).block_structure(16, 16, 8, 8)
        assert (grid == PARTIAL).all()
        return ids

    f(ids)
    concrete = SegmentMask(ids, ids).block_structure(16, 16, 8, 8)
    np.testing.assert_array_equal(concrete, [[FULL, EMPTY], [EMPTY, FULL]])


def test_combination_kinds_and_conjuncts():
    m = CausalMask() & SlidingWindowMask(4, 0) & ChunkedCausalMask(8)
    assert m.kinds() == {"causal", "sliding_window", "chunked_causal"}
    assert len(m.conjuncts()) == 3
    o = CausalMask() | FullMask()
    assert "or" in o.kinds() and o.conjuncts() == (o,)
    np.testing.assert_array_equal(dense(o, 4, 4), np.ones((1, 1, 4, 4), bool))
    with pytest.raises(TypeError):
        CausalMask() & np.ones((4, 4), bool)  # arrays must be wrapped in DenseMask


def test_mask_parts_reduces_a_conjunction_to_a_band():
    parts = mask_parts(CausalMask.bottom_right(8, 16) & SlidingWindowMask(3, 5), 8, 16)
    assert (parts.band_lo, parts.band_hi) == (8 - 3, 8)
    parts = mask_parts(ChunkedCausalMask(4), 8, 8)
    assert (parts.band_hi, parts.chunk_size, parts.chunk_offset) == (0, 4, 0)
    ids = jnp.zeros((1, 8), jnp.int32)
    parts = mask_parts(SegmentMask(ids, ids) & DenseMask(jnp.ones((8, 8), bool)), 8, 8)
    assert parts.q_segment_ids is ids and parts.dense.shape == (1, 1, 8, 8)
    assert parts.band_lo is None and parts.band_hi is None
    assert mask_parts(CausalMask(-3) & SlidingWindowMask(0, 0, offset=2), 4, 4).is_empty_band
    with pytest.raises(ValueError, match="'or'"):
        mask_parts(CausalMask() | FullMask(), 8, 8)
    with pytest.raises(ValueError, match="segment"):
        mask_parts(SegmentMask(ids, ids) & SegmentMask(ids, ids), 8, 8)


@pytest.mark.parametrize("bad,match", [
    (lambda: SlidingWindowMask(-1, 0), "left must be an int >= 0"),
    (lambda: SlidingWindowMask(1, 2.5), "right must be an int >= 0"),
    (lambda: ChunkedCausalMask(0), "chunk_size must be an int > 0"),
    (lambda: CausalMask(1.5), "offset must be an int"),
    (lambda: QueryPositionMask(POSITIONS, left=-1), "left must be an int >= 0 or None"),
    (lambda: QueryPositionMask(POSITIONS, right=-2), "right must be an int >= 0"),
    (lambda: DenseMask(jnp.ones((4, 4), jnp.float32)), "must be boolean"),
    (lambda: DenseMask(jnp.ones((4,), bool)), "rank 2 to 4"),
])
def test_bad_mask_arguments_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_masks_are_pytrees_and_structural_ones_hashable():
    ids = jnp.arange(8)[None]
    m = SegmentMask(ids, ids) & CausalMask(2)
    leaves, tree = jax.tree_util.tree_flatten(m)
    assert len(leaves) == 2
    rebuilt = jax.tree_util.tree_unflatten(tree, leaves)
    np.testing.assert_array_equal(dense(rebuilt, 8, 8), dense(m, 8, 8))
    assert hash(CausalMask(2)) == hash(CausalMask(2)) and CausalMask(2) == CausalMask(2)
    assert {SlidingWindowMask(1, 2), SlidingWindowMask(1, 2)} == {SlidingWindowMask(1, 2)}


def test_mask_validate_checks_fit():
    ids = jnp.zeros((2, 8), jnp.int32)
    with pytest.raises(ValueError, match=r"segment_ids: kv_segment_ids must have shape \[batch, seq\]"):
        SegmentMask(ids, ids).validate(2, 4, 8, 10)
    with pytest.raises(ValueError, match="not broadcastable"):
        DenseMask(jnp.ones((3, 8, 8), bool)).validate(2, 4, 8, 8)
    DenseMask(jnp.ones((1, 4, 8, 1), bool)).validate(2, 4, 8, 8)
    with pytest.raises(ValueError, match=r"positions must have shape \[batch, q_len\] = \(2, 8\)"):
        QueryPositionMask(jnp.zeros((2, 9), jnp.int32)).validate(2, 4, 8, 8)
    with pytest.raises(ValueError, match="positions must be integers"):
        QueryPositionMask(jnp.zeros((2, 8))).validate(2, 4, 8, 8)


def test_every_kind_is_exposed_at_top_level():
    for name in ("CausalMask", "FullMask", "SlidingWindowMask", "ChunkedCausalMask", "SegmentMask", "DenseMask",
                 "QueryPositionMask"):
        assert issubclass(getattr(jaxattn, name), jaxattn.Mask)
