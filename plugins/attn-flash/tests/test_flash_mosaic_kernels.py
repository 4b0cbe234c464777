"""The Mosaic GPU kernels' structure, checked on CPU: the tile ranges and masks every visible pair
falls in, segment tile ranges, what the kernels trace to, and that Pallas's Mosaic GPU lowering
for CUDA accepts every form (`jax.export`), since the kernels cannot run in the interpreter.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from jaxattn_flash import config as flash_config
from jaxattn_flash import gpu_path
from jaxattn_flash._testing import MOSAIC_LOWERINGS, Unbatched, mosaic_lowering
from jaxattn_flash.mosaic_tiles import visible

BANDS = [(None, None), (None, 0), (None, 256), (None, -128), (-255, 0), (-1000, 37), (-64, 300), (5, None)]
# chunked causal (band_lo, band_hi, chunk, chunk_offset): band_hi <= chunk_offset, as the mask makes it
CHUNKED = [(None, -256, 256, -256), (None, 0, 200, 0), (None, 0, 128, 64), (-300, -256, 384, -256)]
MASKS = [(lo, hi, None, 0) for lo, hi in BANDS] + CHUNKED


def _visibility(mask, q_len: int, kv_len: int):
    import numpy as np

    lo, hi, chunk, offset = mask
    i = np.arange(q_len)[:, None]
    j = np.arange(kv_len)[None, :]
    vis = np.ones((q_len, kv_len), bool)
    if lo is not None:
        vis &= j - i >= lo
    if hi is not None:
        vis &= j - i <= hi
    if chunk is not None:
        vis &= j // chunk == (i + offset) // chunk
    return vis


@pytest.mark.parametrize("kv_end", [None, 700, 640])
@pytest.mark.parametrize("mask", MASKS)
def test_mosaic_tile_ranges_and_masks_hold_every_visible_pair(mask, kv_end):
    """The Mosaic kernels visit only the tiles in [lb, ub) and skip the mask on [fs, fe). Brute
    force, for the forward (key tiles of 128-row blocks; [fs, fe) per consumer and, for the value
    guard, per block), the dk/dv kernel (query tiles of its 128 keys) and the dq kernel (key tiles
    of 128 rows): every visible pair is inside the visited range, the unmasked range holds only
    visible pairs, the visited range holds no tile without one; and `visible` on every tile
    equals the mask (bands, chunks: a tile's queries may straddle a chunk boundary; a batch row's
    key length `kv_end`, inside a tile or on its edge)."""
    import numpy as np

    from jaxattn_flash import mosaic_bwd_kernels as mbk
    from jaxattn_flash import mosaic_kernels as mk

    lo, hi, chunk, offset = mask
    spec = mbk.MosaicBwdSpec(scale=1.0, band_lo=lo, band_hi=hi, chunk=chunk, chunk_offset=offset)
    q_len, kv_len, tile = 1024, 768, 64
    vis = _visibility(mask, q_len, kv_len)
    if kv_end is not None:
        vis[:, kv_end:] = False

    def tiles_of(block, size=tile):  # [tiles] any / all visible within `block` (rows x cols of vis)
        t = block.reshape(block.shape[0], -1, size)
        return t.any(axis=(0, 2)), t.all(axis=(0, 2))

    for c0 in range(0, kv_len, mbk.BLOCK_ROWS):  # dk/dv: query tiles of key rows
        lb, ub = (int(x) for x in mbk.q_tile_range(spec, c0, mbk.BLOCK_ROWS, tile, q_len // tile, kv_end))
        any_vis, _ = tiles_of(vis[:, c0:c0 + mbk.BLOCK_ROWS].T)
        assert set(np.flatnonzero(any_vis)) <= set(range(lb, ub)), (c0, lb, ub)
        assert lb == ub or (any_vis[lb] and any_vis[ub - 1]), (c0, lb, ub)
        for c in (c0, c0 + mbk.WG_ROWS):
            fs, fe = (int(x) for x in mbk.q_full_range(spec, c, tile, lb, ub, kv_end))
            _, all_vis = tiles_of(vis[:, c:c + mbk.WG_ROWS].T)
            assert lb <= fs <= fe <= ub and all(all_vis[fs:fe]), (c, fs, fe)
            full = np.flatnonzero(all_vis[lb:ub]) + lb
            assert set(full) <= set(range(fs, fe)), (c, fs, fe, full)
    for r0 in range(0, q_len, mbk.BLOCK_ROWS):  # dq: key tiles of query rows
        lb, ub = (int(x) for x in mbk.kv_tile_range(spec, r0, mbk.BLOCK_ROWS, tile, kv_len // tile, kv_end))
        any_vis, _ = tiles_of(vis[r0:r0 + mbk.BLOCK_ROWS])
        assert set(np.flatnonzero(any_vis)) <= set(range(lb, ub)), (r0, lb, ub)
        for r in (r0, r0 + mbk.WG_ROWS):
            fs, fe = (int(x) for x in mbk.kv_full_range(spec, r, tile, lb, ub, kv_end))
            _, all_vis = tiles_of(vis[r:r + mbk.WG_ROWS])
            assert lb <= fs <= fe <= ub and all(all_vis[fs:fe]), (r, fs, fe)
            assert set(np.flatnonzero(all_vis[lb:ub]) + lb) <= set(range(fs, fe)), (r, fs, fe)

    fwd = mk.MosaicSpec(scale=1.0, band_lo=lo, band_hi=hi, chunk=chunk, chunk_offset=offset)  # 64 x 128 tiles
    bk = fwd.block_kv
    for r0 in range(0, q_len, fwd.rows):  # forward: key tiles of 128-row blocks
        lb, ub = (int(x) for x in mk.block_range(fwd, r0, kv_len // bk, kv_end))
        any_vis, _ = tiles_of(vis[r0:r0 + fwd.rows], bk)
        assert set(np.flatnonzero(any_vis)) <= set(range(lb, ub)), (r0, lb, ub)
        for r, rows in ((r0, fwd.block_q), (r0 + fwd.block_q, fwd.block_q), (r0, fwd.rows)):
            fs, fe = (int(x) for x in mk.full_range(fwd, r, lb, ub, rows, kv_end))
            _, all_vis = tiles_of(vis[r:r + rows], bk)
            assert lb <= fs <= fe <= ub and all(all_vis[fs:fe]), (r, rows, fs, fe)
            assert set(np.flatnonzero(all_vis[lb:ub]) + lb) <= set(range(fs, fe)), (r, rows, fs, fe)

    for q0 in range(0, q_len, fwd.block_q):  # the in-tile mask, on every 64 x 128 tile
        for k0 in range(0, kv_len, bk):
            q_pos = np.arange(q0, q0 + fwd.block_q)[:, None] + np.zeros((1, bk), int)
            k_pos = np.arange(k0, k0 + bk)[None, :] + np.zeros((fwd.block_q, 1), int)
            ok = visible(fwd, jax.numpy.asarray(q_pos), jax.numpy.asarray(k_pos), q0, kv_end)
            want = vis[q0:q0 + fwd.block_q, k0:k0 + bk]
            got = np.ones_like(want) if ok is None else np.asarray(ok)
            assert np.array_equal(got, want), (q0, k0)


def _packed_ids(rng, length: int, docs: int):
    """Segment ids 0..docs-1 of packed documents of random lengths, in order along `length`."""
    cuts = np.sort(rng.choice(np.arange(1, length), docs - 1, replace=False))
    return np.searchsorted(cuts, np.arange(length), side="right").astype(np.int32)


@pytest.mark.parametrize("ids", ["packed", "packed-causal", "one-document", "returning"])
def test_segment_tile_ranges_hold_every_visible_pair(ids):
    """With segment ids the Mosaic kernels visit the tiles `segment_tile_ranges` bounds, cut
    by the band's (`clip_range`, `clip_full`, as the forward's blocks and the dk/dv kernel's key
    blocks do). Brute force over random ids: every pair with equal ids (and inside the causal
    band) is in a visited tile, the unmasked tiles hold only such pairs; packed documents visit
    no tile without one and run their one-document tiles unmasked; ids that come back (0, 1, 0)
    stay correct."""
    from jaxattn_flash import mosaic_kernels as mk
    from jaxattn_flash.mosaic_segments import clip_full, clip_range, segment_tile_ranges

    rng = np.random.default_rng(7)
    n, rows, tile = 1024, 128, 64
    if ids == "returning":
        q_ids = (np.arange(n) // 100 % 2).astype(np.int32)
    elif ids == "one-document":
        q_ids = np.zeros(n, np.int32)
    else:
        q_ids = _packed_ids(rng, n, 5)
    causal = ids == "packed-causal"
    vis = q_ids[:, None] == q_ids[None, :]
    if causal:
        vis &= np.tri(n, dtype=bool)
    spec = mk.MosaicSpec(scale=1.0, band_lo=None, band_hi=0 if causal else None, block_kv=tile)
    for keys_major, v in ((False, vis), (True, vis.T)):  # forward / dq blocks, and dk/dv key blocks
        ranges = segment_tile_ranges(jax.numpy.asarray(q_ids[None]), jax.numpy.asarray(q_ids[None]), rows, tile)
        for blk in range(n // rows):
            block = v[blk * rows:(blk + 1) * rows].reshape(rows, n // tile, tile)
            any_vis, all_vis = block.any(axis=(0, 2)), block.all(axis=(0, 2))
            # in the kernels' order: the band's visited range, cut; its full tiles within, cut
            if keys_major:  # the band seen from keys (not checked here): all tiles visited, none full
                lb, ub = clip_range(ranges, 0, blk, 0, n // tile)
                fs, fe = lb, (lb if causal else ub)
            else:
                lb, ub = clip_range(ranges, 0, blk, *mk.block_range(spec, blk * rows, n // tile))
                fs, fe = mk.full_range(spec, blk * rows, lb, ub, rows)
            fs, fe = clip_full(ranges, 0, blk, ub, fs, fe)
            lb, ub, fs, fe = (int(x) for x in (lb, ub, fs, fe))
            assert lb <= fs <= fe <= ub, (keys_major, blk, lb, fs, fe, ub)
            assert set(np.flatnonzero(any_vis)) <= set(range(lb, ub)), (keys_major, blk, lb, ub)
            assert all(all_vis[fs:fe]), (keys_major, blk, fs, fe)
            if ids != "returning" and not (keys_major and causal):
                assert all(any_vis[lb:ub]), (keys_major, blk, lb, ub)  # tight: no tile without a pair
                assert set(np.flatnonzero(all_vis)) <= set(range(fs, fe)), (keys_major, blk, fs, fe)


@pytest.mark.parametrize("fused, head_dim, chunk", [(None, 128, None), ("split", 128, None), ("own", 128, None),
                                                    ("own", 64, None), (None, 64, 96), ("split", 128, 128)])
def test_mosaic_backward_traces_in_each_dq_form(fused, head_dim, chunk):
    """The Mosaic backward kernels trace (jax.make_jaxpr, no GPU) for each way of making dq, with a
    causal GQA band (chunked causal where `chunk`) and soft-cap, and give dq/dk/dv of the inputs'
    shapes and dtype: two kernels for the dq kernel's form, one writing in place with TMA
    add-reductions for the fused ones."""
    import jax.numpy as jnp

    from jaxattn_flash.mosaic_bwd_kernels import MosaicBwdSpec, mosaic_backward

    b, s, hq, hkv = 1, 256, 4, 2
    q = jax.ShapeDtypeStruct((b, s, hq, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, s, hkv, head_dim), jnp.bfloat16)
    rows = jax.ShapeDtypeStruct((b, hq, s), jnp.float32)
    spec = MosaicBwdSpec(scale=0.1, band_lo=None, band_hi=0, soft_cap=30.0, fused_dq=fused, chunk=chunk)
    traced = jax.make_jaxpr(lambda *a: mosaic_backward(spec, *a))(q, kv, kv, q, rows, rows)
    assert [(o.aval.shape, o.aval.dtype) for o in traced.jaxpr.outvars] == [
        (q.shape, q.dtype), (kv.shape, kv.dtype), (kv.shape, kv.dtype)]
    text = str(traced)
    if fused is None:
        assert text.count("mpmd_map") == 2 and "core_map" not in text and "reduction_op=add" not in text
    else:
        assert text.count("mpmd_map") == 1 and "reduction_op=add" in text


def test_fused_dq_backward_traces_under_vmap():
    """The kernel that closes over the fused form's in-place dq buffer has no batching rule: under
    `vmap` (nested, with an unmapped key) the mapped axes join the batch axis of one kernel call."""
    import jax.numpy as jnp

    from jaxattn_flash.mosaic_bwd_kernels import MosaicBwdSpec, mosaic_backward

    spec = MosaicBwdSpec(scale=0.1, band_lo=None, band_hi=0, fused_dq="split")
    q = jax.ShapeDtypeStruct((3, 2, 1, 256, 4, 128), jnp.bfloat16)
    v = jax.ShapeDtypeStruct((3, 2, 1, 256, 2, 128), jnp.bfloat16)
    k = jax.random.normal(jax.random.PRNGKey(0), (1, 256, 2, 128), jnp.bfloat16)  # shared by every mapped call
    rows = jax.ShapeDtypeStruct((3, 2, 1, 4, 256), jnp.float32)
    inner = jax.vmap(lambda q, v, do, l, dl: mosaic_backward(spec, q, k, v, do, l, dl))
    traced = jax.make_jaxpr(jax.vmap(inner))(q, v, q, rows, rows)
    assert [o.aval.shape for o in traced.jaxpr.outvars] == [q.shape, (3, 2, 1, 256, 2, 128), (3, 2, 1, 256, 2, 128)]
    text = str(traced)
    assert text.count("mpmd_map") == 1 and "bf16[6,256,4,128]" in text  # one call over 3 x 2 x 1 batch rows


@pytest.mark.parametrize("head_dim, band, sinks, chunk", [(128, (None, 0), False, None), (64, (-100, 0), False, None),
                                                          (256, (None, 0), True, None), (128, (None, 0), False, 192)])
def test_guarded_forward_traces_with_its_cleaning_state(head_dim, band, sinks, chunk):
    """`guard_values` (the Mosaic forward's in-kernel value guard) traces (no GPU) for causal,
    a window and head_dim 256 (K/V tiles of 64, column chunks of 128), with the same outputs as
    the unguarded kernel and one more shared-memory buffer: the per-stage marks of the keys
    whose value was non-finite. The GPU tests (`test_gpu_nonfinite.py`) check its numbers."""
    import jax.numpy as jnp

    from jaxattn_flash import mosaic_kernels as mk

    block_kv = 64 if head_dim == 256 else 128
    q = jax.ShapeDtypeStruct((1, 512, 4, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 512, 2, head_dim), jnp.bfloat16)
    extra = (jax.ShapeDtypeStruct((4,), jnp.float32),) if sinks else ()
    traced = {}
    for form in (None, *mk.GUARD_FORMS):
        spec = mk.MosaicSpec(scale=0.1, band_lo=band[0], band_hi=band[1], block_kv=block_kv, sinks=sinks,
                             guard_values=form is not None, guard_form=form or "flags", chunk=chunk)
        jaxpr = jax.make_jaxpr(lambda *a, spec=spec: mk.mosaic_forward(spec, *a))(q, kv, kv, *extra)
        traced[form] = str(jaxpr)
        assert [(o.aval.shape, o.aval.dtype) for o in jaxpr.jaxpr.outvars] == [
            (q.shape, q.dtype), ((1, 4, 512), jnp.float32)]
    marks = f"Ref<smem>{{f32[2,{block_kv}]}}"  # (stages, block_kv)
    for form in mk.GUARD_FORMS:
        assert traced[form].count(marks) > traced[None].count(marks), form
    # "flags" cleans only in the (batch row, kv head) pairs whose values hold a non-finite entry:
    # one flag per pair, read from v before the kernel (the kernel's own test is (x - x) == 0);
    # "retry" and "every block" read v only inside the kernel
    assert "is_finite" in traced["flags"]
    assert all("is_finite" not in traced[form] for form in (None, "retry", "every block"))
    # "retry": the block-wide vote (one inline PTX call per warpgroup kind: consumers and producer)
    # and a second pass of the guarded steps exist only in that form
    assert traced["retry"].count("inline_mgpu") > traced["flags"].count("inline_mgpu")
    spec = mk.MosaicSpec(scale=0.1, band_lo=band[0], band_hi=band[1], block_kv=block_kv, sinks=sinks,
                         guard_values=True, guard_form="flags", chunk=chunk)
    # a differentiated call has the keys' flags already (value_guard.bad_keys, for the backward):
    # the guard takes them and reads v no second time
    bad = jax.ShapeDtypeStruct((1, 512, 2), jnp.bool_)
    with_bad = jax.make_jaxpr(lambda q, k, v, bad, *sink: mk.mosaic_forward(spec, q, k, v, *sink, bad_keys=bad))(
        q, kv, kv, bad, *extra)
    assert "is_finite" not in str(with_bad)


@pytest.mark.parametrize("name", list(MOSAIC_LOWERINGS))
def test_mosaic_kernels_lower_for_cuda_without_a_gpu(name):
    """`jax.export(..., platforms=["cuda"])` runs Pallas's Mosaic GPU lowering on this CPU machine:
    every lowering rule and inline PTX emitter of the forward (named barriers, the value guard's
    cleaning, chunk masks, sinks) and of the dq/dk/dv kernels (launch passes' id arithmetic) must
    accept what we give them. The module that comes out is what a GPU compiles (not run here).
    The backward is the separate dq kernel and the dk/dv kernel: the fused form writes a mutable
    ref, which jax.export does not take."""
    from jax import export

    forward, forward_args, backward, backward_args = mosaic_lowering(MOSAIC_LOWERINGS[name])
    q, k, v = forward_args[:3]
    exported = export.export(forward, platforms=["cuda"])(*forward_args)
    assert "mosaic_gpu" in exported.mlir_module()
    lse = [(1, 4, 512)] if MOSAIC_LOWERINGS[name].get("lse", True) else []
    assert [o.shape for o in exported.out_avals] == [q.shape[:3] + v.shape[3:], *lse]
    if backward is not None:
        exported = export.export(backward, platforms=["cuda"])(*backward_args)
        assert [o.shape for o in exported.out_avals] == [q.shape, k.shape, v.shape]


def test_guard_forms_are_checked_and_match_the_config():
    """`MosaicSpec.guard_form` refuses a name it does not know, naming the field and the choices;
    the forms are the ones the flash config accepts, and the spec's default is the config's."""
    from jaxattn_flash import config as flash_config
    from jaxattn_flash import mosaic_kernels as mk

    with pytest.raises(ValueError, match=r"guard_form must be one of \['every block', 'flags', 'retry'\], got 'sometimes'"):
        mk.MosaicSpec(scale=0.1, band_lo=None, band_hi=0, guard_values=True, guard_form="sometimes")
    assert set(mk.GUARD_FORMS) == set(flash_config.MOSAIC_VALUE_GUARDS)
    assert mk.MosaicSpec(scale=0.1, band_lo=None, band_hi=0).guard_form == flash_config.MOSAIC_VALUE_GUARD == "retry"


def test_bounded_logits_need_a_soft_cap():
    """Without a cap nothing bounds the logits: a spec that skips the running max there is refused,
    and so is the forward's exp2 split without that bound; the backward's split needs none (its
    exponents are at most 0 where a pair is visible); either spec's polynomial is of degree 2 or 3."""
    from jaxattn_flash.mosaic_kernels import MosaicSpec

    with pytest.raises(ValueError, match="bounded_logits=True needs a soft_cap"):
        MosaicSpec(scale=0.1, band_lo=None, band_hi=0, bounded_logits=True)
    assert MosaicSpec(scale=0.1, band_lo=None, band_hi=0, soft_cap=30.0, bounded_logits=True).bounded_logits
    # the exp2 split's 2^z needs the bound too
    with pytest.raises(ValueError, match="poly_exp2 must be 0, or > 0 with bounded_logits, got 2"):
        MosaicSpec(scale=0.1, band_lo=None, band_hi=0, soft_cap=30.0, poly_exp2=2)
    with pytest.raises(ValueError, match="poly_exp2 must be 0, or > 0 with bounded_logits, got -1"):
        MosaicSpec(scale=0.1, band_lo=None, band_hi=0, soft_cap=30.0, bounded_logits=True, poly_exp2=-1)
    with pytest.raises(ValueError, match=r"poly_degree must be one of \[2, 3\], got 4"):
        MosaicSpec(scale=0.1, band_lo=None, band_hi=0, soft_cap=30.0, bounded_logits=True, poly_exp2=2, poly_degree=4)
    # the backward's split needs no bound (its exponents are at most 0 where a pair is visible)
    from jaxattn_flash.mosaic_bwd_kernels import MosaicBwdSpec

    assert MosaicBwdSpec(scale=0.1, band_lo=None, band_hi=0, poly_exp2=2).poly_exp2 == 2
    with pytest.raises(ValueError, match="MosaicBwdSpec: poly_exp2 must be >= 0, got -1"):
        MosaicBwdSpec(scale=0.1, band_lo=None, band_hi=0, poly_exp2=-1)
    with pytest.raises(ValueError, match=r"MosaicBwdSpec: poly_degree must be one of \[2, 3\], got 1"):
        MosaicBwdSpec(scale=0.1, band_lo=None, band_hi=0, poly_exp2=2, poly_degree=1)


@pytest.mark.parametrize("degree", [3, 2])
def test_poly_exp2_is_exp2_within_its_bound(degree):
    """`mosaic_exp2`'s polynomials, step for step as their PTX runs them: the cubic within 7.5e-5
    of 2^z (relative), the quadratic within 1.8e-3 (under bfloat16's half step, 1.95e-3), over
    every z the bounded soft-cap allows (±SOFTCAP_LOG2_BOUND) and beyond to ±125 (integers
    included: the error at 0), NaN kept; at -126 the result's exponent leaves the normal range.
    With a scale (the forward's cap·log2(e) times tanh values in [-1, 1]) the product fused into
    the rounding keeps the bound. The PTX carries the very coefficients and fuses the scale."""
    from jaxattn_flash import mosaic_exp2
    from jaxattn_flash.config import SOFTCAP_LOG2_BOUND

    rng = np.random.default_rng(5)
    z = np.concatenate([rng.uniform(-SOFTCAP_LOG2_BOUND, SOFTCAP_LOG2_BOUND, 200_000),
                        rng.uniform(-125, 125, 20_000), np.arange(-125, 126), [0.5, -0.5, 0.49999997]])
    z = z.astype(np.float32)
    bound = mosaic_exp2.POLY_ERROR[degree]
    assert bound < 2.0 ** -9  # below bfloat16's half step: P stays within one step of exact
    got = mosaic_exp2.poly_exp2_reference(z, degree=degree).astype(np.float64)
    rel = np.abs(got / np.exp2(z.astype(np.float64)) - 1)
    assert bound / 2 < rel.max() < bound, float(rel.max())
    for cap in (1.0, 30.0, 50.0, 66.0):
        scale = cap * math.log2(math.e)
        t = np.concatenate([rng.uniform(-1, 1, 100_000), [-1.0, 1.0, 0.0, 0.5 / scale]]).astype(np.float32)
        got = mosaic_exp2.poly_exp2_reference(t, scale, degree).astype(np.float64)
        exact = np.exp2(t.astype(np.float64) * np.float64(np.float32(scale)))
        assert np.abs(got / exact - 1).max() < bound, (cap, float(np.abs(got / exact - 1).max()))
    nan = np.array([np.nan], np.float32)
    assert np.isnan(mosaic_exp2.poly_exp2_reference(nan, degree=degree))[0]
    assert np.isnan(mosaic_exp2.poly_exp2_reference(nan, 72.0, degree))[0]
    low = mosaic_exp2.poly_exp2_reference(np.array([-126.0], np.float32), degree=degree)[0]
    assert abs(low / 2.0 ** -126 - 1) > 1e-4
    for scale in (1.0, 72.0):
        ptx = mosaic_exp2.poly_exp2_ptx(scale, degree)
        for coef in mosaic_exp2.POLYNOMIALS[degree] + (mosaic_exp2.ROUNDER,):
            assert f"0f{int(np.float32(coef).view(np.uint32)):08X}" in ptx
        fmas = degree + (0 if scale == 1.0 else 2)
        assert ptx.count("fma.rn.f32") == fmas and "ex2" not in ptx and "mul" not in ptx
    assert "0f42900000" in mosaic_exp2.poly_exp2_ptx(72.0) and "0f42900000" in mosaic_exp2.mufu_exp2_ptx(72.0)
    assert mosaic_exp2.mufu_exp2_ptx() == "ex2.approx.ftz.f32 $0, $1;"


@pytest.mark.parametrize("degree", [3, 2])
def test_poly_exp2_flush_gives_zero_below_its_floor(degree):
    """The backward's form (`flush`): exponents below -125, -inf included (rows without keys), give
    exactly 0, as MUFU's flushing exp2 does; from -125 to 0 (where its visible pairs lie) the
    polynomial's bound holds; NaN stays NaN. Its PTX compares and selects; a scale is refused."""
    from jaxattn_flash import mosaic_exp2

    z = np.concatenate([np.random.default_rng(6).uniform(-125, 0, 100_000), [-125.0, 0.0]]).astype(np.float32)
    got = mosaic_exp2.poly_exp2_reference(z, degree=degree, flush=True).astype(np.float64)
    assert np.abs(got / np.exp2(z.astype(np.float64)) - 1).max() < mosaic_exp2.POLY_ERROR[degree]
    low = np.array([-125.5, -126.0, -200.0, -1e30, -np.inf], np.float32)
    with np.errstate(invalid="ignore"):
        assert (mosaic_exp2.poly_exp2_reference(low, degree=degree, flush=True) == 0).all()
        assert np.isnan(mosaic_exp2.poly_exp2_reference(np.array([np.nan], np.float32), flush=True))[0]
    ptx = mosaic_exp2.poly_exp2_ptx(degree=degree, flush=True)
    assert "setp.lt.f32" in ptx and "selp.b32" in ptx and mosaic_exp2._hex(mosaic_exp2.FLUSH_BELOW) in ptx
    assert "setp" not in mosaic_exp2.poly_exp2_ptx(degree=degree)
    with pytest.raises(ValueError, match="flush takes scale 1.0, got 72.0"):
        mosaic_exp2.poly_exp2_ptx(72.0, degree, flush=True)


@pytest.mark.parametrize("dims", [(d, dv) for d in gpu_path.MOSAIC_HEAD_DIMS for dv in gpu_path.MOSAIC_HEAD_DIMS])
def test_mosaic_smem_budget_is_what_the_lowering_allocates(dims):
    """`config.mosaic_smem_bytes` against `SMEM_PER_BLOCK` is how the plugin decides, before
    tracing, whether a Mosaic forward's tiles fit; Mosaic GPU's lowering lays the kernel out again
    (and refuses one over the block's limit with its own message). For each pair of head dims,
    the largest configurable tiles the budget admits take exactly its bytes, with and without the
    inputs that add shared memory (segment ids, the value guard's flags; lengths and sinks add
    none), and the smallest it refuses are refused by the lowering too. 192/256 and 256/192 fit
    no tiles: the plugin says so (`gpu_path.mosaic_reasons`) and the lowering agrees."""
    import jax.numpy as jnp
    from jax import export

    from jaxattn.pallas_compat import SMEM_PER_BLOCK
    from jaxattn.testing.smem import lowered_smem
    from jaxattn_flash import mosaic_kernels as mk

    d, dv = dims
    grid = [(bk, st) for bk in flash_config.MOSAIC_BLOCK_KV for st in (2, 3, 4)]
    size = {t: flash_config.mosaic_smem_bytes(d, *t, value_head_dim=dv, segments=True) for t in grid}
    admitted = [t for t in grid if size[t] <= SMEM_PER_BLOCK]
    refused = [t for t in grid if t not in admitted]
    n = 4096  # enough key tiles for every stage of the ring
    q = jax.ShapeDtypeStruct((1, n, 4, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, n, 2, d), jnp.bfloat16)
    values = jax.ShapeDtypeStruct((1, n, 2, dv), jnp.bfloat16)
    lengths = jax.ShapeDtypeStruct((1,), jnp.int32)
    ids = jax.ShapeDtypeStruct((1, n), jnp.int32)

    def lower(tiles, heavy=True):
        spec = mk.MosaicSpec(scale=0.1, band_lo=-200 if heavy else None, band_hi=0, block_kv=tiles[0],
                             stages=tiles[1], guard_values=heavy, sinks=heavy, q_lengths=heavy, kv_lengths=heavy,
                             segments=heavy)
        return export.export(jax.jit(lambda *a: mk.mosaic_forward(spec, *a)), platforms=["cuda"])(
            q, kv, values, *(jax.ShapeDtypeStruct((4,), jnp.float32), lengths, lengths, ids, ids) if heavy
            else (None,) * 5)

    assert bool(admitted) != (dims in [(192, 256), (256, 192)])
    if admitted:
        largest = max(admitted, key=size.get)
        for heavy in (True, False):
            with lowered_smem() as counted:
                lower(largest, heavy)
            assert counted == [flash_config.mosaic_smem_bytes(d, *largest, value_head_dim=dv, guard=heavy,
                                                              segments=heavy)]
    if refused:
        with pytest.raises(Exception, match="exceeds available shared memory"):
            lower(min(refused, key=size.get))


@pytest.mark.parametrize("case", ["128 split s3", "128 split s3 segments", "128 own s2", "128 own s2 segments",
                                  "64 own s4 segments", "128 separate kv128 s2 segments", "128 separate kv128 s3",
                                  "64 separate s4", "256 separate kv32 s3 segments", "192 dv128 separate kv32 s3",
                                  "256 dv192 separate kv32 s3"])
def test_backward_smem_bytes_are_what_the_lowering_allocates(case, monkeypatch):
    """`dkdv_smem_bytes` (`wide_smem_bytes` where head dims sum past 256) and `dq_smem_bytes`, by
    which `gpu_path` refuses backward configs before tracing, against the shared memory Mosaic GPU's lowering allocates for each kernel (lowered for
    CUDA on this CPU machine): the same bytes where it fits, its own refusal where they exceed the
    block's 227 KB. The fused form's batching wrapper (`custom_vmap`, which this jax cannot
    lower for CUDA around a mutable ref) is bypassed: it changes no shared memory."""
    import jax.numpy as jnp

    from jaxattn.pallas_compat import SMEM_PER_BLOCK
    from jaxattn.testing.smem import lowered_smem
    from jaxattn_flash import mosaic_bwd_kernels as mbk
    from jaxattn_flash.mosaic_bwd_dq import dq_smem_bytes
    from jaxattn_flash.mosaic_bwd_wide import wide_smem_bytes

    monkeypatch.setattr(jax.custom_batching, "custom_vmap", Unbatched)
    words = case.split()
    d = int(words[0])
    fused = next(w for w in words if w in ("split", "own", "separate"))
    fused = None if fused == "separate" else fused
    stages = int(next(w for w in words if w.startswith("s") and w[1:].isdigit())[1:])
    dv = next((int(w[2:]) for w in words if w.startswith("dv")), d)
    segments = "segments" in words
    dq_block_kv = next((int(w[2:]) for w in words if w.startswith("kv")), 64)
    if flash_config.wide_backward(d, dv):
        want = [wide_smem_bytes(d, dv, 64, stages, segments=segments)]
    else:
        want = [mbk.dkdv_smem_bytes(d, dv, stages, fused, segments)]
    if fused is None:
        want.append(dq_smem_bytes(d, dv, dq_block_kv, stages, segments))
    n = 4096
    q = jax.ShapeDtypeStruct((1, n, 4, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, n, 2, d), jnp.bfloat16)
    values = jax.ShapeDtypeStruct((1, n, 2, dv), jnp.bfloat16)
    d_out = jax.ShapeDtypeStruct((1, n, 4, dv), jnp.bfloat16)
    rows = jax.ShapeDtypeStruct((1, 4, n), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, n), jnp.int32)
    spec = mbk.MosaicBwdSpec(scale=0.1, band_lo=None, band_hi=0, stages=stages, segments=segments, fused_dq=fused,
                             dq_block_kv=dq_block_kv)
    traced = jax.jit(lambda *a: mbk.mosaic_backward(spec, *a)).trace(
        q, kv, values, d_out, rows, rows, None, *((ids, ids) if segments else (None, None)))
    if max(want) <= SMEM_PER_BLOCK:
        with lowered_smem() as counted:
            traced.lower(lowering_platforms=("cuda",))
        assert sorted(counted) == sorted(want)
    else:
        over = "|".join(str(size) for size in want if size > SMEM_PER_BLOCK)  # the first kernel lowered fails
        with pytest.raises(Exception, match=f"exceeds available shared memory: smem_bytes=({over}) "):
            traced.lower(lowering_platforms=("cuda",))
