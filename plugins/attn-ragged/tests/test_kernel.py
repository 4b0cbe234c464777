"""The Pallas kernel (interpret mode) against the core's xla paged reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn.backends.paged import paged_attention_reference
from jaxattn.validation import build_paged_inputs
from jaxattn_ragged import KernelConfig, RaggedPagedAttention, paged_attention_kernel
from jaxattn_ragged._testing import assert_close, paged_problem, reference, run_impl

B16 = KernelConfig(block_q=4, block_kv=16)


def run(args, config=B16, **kw):
    return run_impl(RaggedPagedAttention(interpret=True, config=config), args, **kw)[0]


@pytest.mark.parametrize("page_size,block_kv", [(8, 32), (16, 16), (32, 8)], ids=["gather", "one-page", "sub-page"])
def test_decode_page_layouts(page_size, block_kv):
    # shuffled pages, lengths not multiples of the page size, an empty sequence
    args = paged_problem(1, [45, 0, 3 * page_size + 1, page_size], page_size=page_size)
    out = run(args, KernelConfig(block_q=1, block_kv=block_kv))
    assert_close(out, reference(args), jnp.float32)
    assert np.all(np.asarray(out[1]) == 0.0)  # the empty sequence gives zeros


def test_ragged_prefill_and_decode_bf16():
    # whole prefill, a chunk, decodes, an empty sequence, a sequence with no queries, padding
    args = paged_problem(2, [37, 70, 40, 0, 21, 9], [37, 13, 1, 0, 0, 1], dtype=jnp.bfloat16, pad_tokens=5)
    out = run(args)
    assert_close(out, reference(args), jnp.bfloat16)
    assert np.all(np.asarray(out[-5:], np.float32) == 0.0)  # padding tokens


@pytest.mark.parametrize("splits", [1, 3])
def test_window_soft_cap_sinks_and_lse(splits):
    args = paged_problem(3, [50, 33, 17], [20, 1, 17], pad_tokens=2)
    sinks = jax.random.normal(jax.random.PRNGKey(9), (4,), jnp.float32)
    inputs = build_paged_inputs(
        args["query"], args["key_pages"], args["value_pages"], args["kv_lengths"], args["page_indices"],
        cu_q_lens=args["cu_q_lens"], scale=None, sliding_window=(11, 0), logits_soft_cap=2.5, sinks=sinks,
        metadata=jaxattn.OperationMetadata())
    ref_out, ref_lse = paged_attention_reference(inputs)
    out, lse = paged_attention_kernel(
        inputs.query, inputs.key_pages, inputs.value_pages, inputs.kv_lengths, inputs.page_indices,
        inputs.cu_q_lens, scale=inputs.scale, window_left=11, soft_cap=2.5, sinks=sinks,
        config=KernelConfig(block_q=4, block_kv=8, num_splits=splits), interpret=True)
    assert_close(out, ref_out, jnp.float32)
    fin = np.isfinite(np.asarray(ref_lse))
    assert np.array_equal(np.isfinite(np.asarray(lse)), fin)
    np.testing.assert_allclose(np.asarray(lse)[fin], np.asarray(ref_lse)[fin], rtol=1e-5, atol=1e-5)


def test_head_groups_and_value_dim():
    # G = 3 query heads per kv head (padded to 4 in the kernel), value head_dim != head_dim
    args = paged_problem(4, [30, 5], [7, 1], hq=6, hkv=2, d=32, dv=16)
    assert_close(run(args), reference(args), jnp.float32)
    # MQA (one kv head) in decode
    args = paged_problem(5, [19, 40], hq=4, hkv=1)
    assert_close(run(args, KernelConfig(block_q=1, block_kv=16)), reference(args), jnp.float32)


def test_random_tables_many_splits_under_jit():
    rng = np.random.default_rng(6)
    lengths = [int(x) for x in rng.integers(0, 90, size=5)]
    counts = [int(min(c, n)) for c, n in zip(rng.integers(0, 6, size=5), lengths)]
    args = paged_problem(6, lengths, counts, dtype=jnp.float16, pad_tokens=3)
    out = run(args, KernelConfig(block_q=2, block_kv=16, num_splits=4))
    assert_close(out, reference(args), jnp.float16)


def test_split_choice_and_settings():
    from jaxattn_ragged.kernel import DECODE_CONFIG, choose_splits
    cfg = DECODE_CONFIG.replace(target_programs=528)
    assert choose_splits(32, 8, 64, cfg) == 3  # 256 programs -> 3 splits
    assert choose_splits(1, 8, 1024, cfg) == 32  # one long sequence: >= 32 steps per split
    assert choose_splits(600, 8, 64, cfg) == 1  # the grid fills the GPU
    assert choose_splits(1, 8, 2, cfg) == 2  # never more splits than steps
    assert choose_splits(1, 8, 64, cfg.replace(num_splits=5)) == 5
    args = paged_problem(12, [9, 3])
    bad = jaxattn.OperationMetadata(operation_configs={"ragged_paged": {"block_k": 64}})
    inputs = build_paged_inputs(*(args[k] for k in ("query", "key_pages", "value_pages", "kv_lengths",
                                                    "page_indices")), cu_q_lens=None, scale=None, sinks=None,
                                sliding_window=None, logits_soft_cap=None, metadata=bad)
    with pytest.raises(ValueError, match="block_k"):
        RaggedPagedAttention(interpret=True)(inputs, bad, jaxattn.Hardware.cpu())


def test_typed_settings_name_the_backend_and_key():
    from jaxattn_ragged import DecodeAttention, DecodeConfig, RaggedConfig

    assert RaggedConfig.from_mapping({"block_kv": 64, "num_splits": 0}).to_dict() == {"block_kv": 64, "num_splits": 0}
    with pytest.raises(ValueError, match=r"\['ragged_paged'\]\['num_warps'\] must be an int >= 1, got 0"):
        RaggedConfig(num_warps=0)
    with pytest.raises(ValueError, match=r"\['decode'\]\['block_kv'\] must be a power of two >= 16, got 48"):
        DecodeAttention().validate_config(jaxattn.OperationMetadata(operation_configs={"decode": {"block_kv": 48}}))
    assert DecodeConfig(block_kv=32).backend == "decode"


def test_unwritten_slots_holding_nan_do_not_leak():
    lengths = [21, 9]
    args = paged_problem(13, lengths, [5, 1], page_size=8, pad_tokens=1)
    kp, vp = np.array(args["key_pages"]), np.array(args["value_pages"])
    table = np.asarray(args["page_indices"])
    clean_k, clean_v = kp.copy(), vp.copy()
    for s, n in enumerate(lengths):  # poison every slot past each sequence's end, and the spare pages
        for pos in range(n, table.shape[1] * 8):
            kp[table[s, pos // 8], pos % 8] = np.nan
            vp[table[s, pos // 8], pos % 8] = np.nan
            clean_k[table[s, pos // 8], pos % 8] = 0.0
            clean_v[table[s, pos // 8], pos % 8] = 0.0
    out = run({**args, "key_pages": jnp.asarray(kp), "value_pages": jnp.asarray(vp)})
    ref = reference({**args, "key_pages": jnp.asarray(clean_k), "value_pages": jnp.asarray(clean_v)})
    assert np.isfinite(np.asarray(out)).all()
    assert_close(out, ref, jnp.float32)


def _quantized(args, dtype):
    """`args` with int8/fp8 pages, and the per token and head scales (kwargs of paged_attention)."""
    kq, ks = jaxattn.quantize_kv(args["key_pages"], dtype)
    vq, vs = jaxattn.quantize_kv(args["value_pages"], dtype)
    return {**args, "key_pages": kq, "value_pages": vq}, {"k_scale": ks, "v_scale": vs}


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.float8_e4m3fn], ids=["int8", "fp8"])
def test_quantized_decode_page_layouts(dtype):
    """Every way a step loads pages (2-D gather, 3-D gather, a slice of one page) loads the scales alike;
    the result equals the reference on the dequantized cache."""
    for page_size, cfg in ((8, KernelConfig(block_q=1, block_kv=16)), (8, KernelConfig(block_q=1, block_kv=16,
                                                                                         gather2d=0)),
                           (16, KernelConfig(block_q=1, block_kv=8, num_splits=2))):
        args, scales = _quantized(paged_problem(14, [45, 0, 17], page_size=page_size), dtype)
        assert_close(run(args, cfg, **scales), reference(args, **scales), jnp.float32)


def test_quantized_ragged_with_window_soft_cap_sinks_and_bf16_queries():
    args = paged_problem(15, [50, 33, 17], [20, 1, 17], pad_tokens=2, hq=6, hkv=2, dtype=jnp.bfloat16)
    args, scales = _quantized(args, jnp.int8)
    sinks = jax.random.normal(jax.random.PRNGKey(16), (6,), jnp.float32)
    kw = dict(sliding_window=11, logits_soft_cap=2.5, sinks=sinks, **scales)
    out = run(args, KernelConfig(block_q=4, block_kv=8, num_splits=2), **kw)
    assert out.dtype == jnp.bfloat16  # the query's dtype, not the cache's
    assert_close(out, reference(args, **kw), jnp.bfloat16)
    # a scalar scale and a per-kv-head scale (broadcast to [num_pages, page_size, kv_heads])
    kw = dict(k_scale=jnp.asarray([0.02, 0.03]), v_scale=0.05)
    assert_close(run(args, **kw), reference(args, **kw), jnp.bfloat16)


@pytest.mark.parametrize("dots,tol", [(1, 1e-2), (2, 2e-2)], ids=["qk", "qk+pv"])
def test_int8_dots_decode_and_ragged_match_the_dequantized_cache(dots, tol):
    """`int8_dots`: Q·Kᵀ (1) or both products (2) on int8 tensor cores, the queries (and the scaled
    probabilities) quantized per row in the kernel. One more rounding per product than widening
    the pages: the output stays within `tol` of the reference on the dequantized cache (widening:
    within 1e-4), decode and a ragged batch with a window, soft-cap and sinks, split or not."""
    from jaxattn.testing.conformance import relative_error

    args, scales = _quantized(paged_problem(21, [45, 0, 100, 64], page_size=16), jnp.int8)
    for splits in (1, 3):
        cfg = KernelConfig(block_q=1, block_kv=32, num_splits=splits, int8_dots=dots)
        err = relative_error(run(args, cfg, **scales), reference(args, **scales))
        assert 1e-5 < err <= tol, err  # not the widened path's figure: the int8 products ran
    args = paged_problem(22, [50, 70, 33], [20, 1, 33], pad_tokens=2, hq=6, hkv=2, d=64, dtype=jnp.bfloat16)
    args, scales = _quantized(args, jnp.int8)
    sinks = jax.random.normal(jax.random.PRNGKey(23), (6,), jnp.float32)
    kw = dict(sliding_window=40, logits_soft_cap=2.5, sinks=sinks, **scales)
    out = run(args, KernelConfig(block_q=4, block_kv=32, num_splits=2, int8_dots=dots), **kw)
    assert out.dtype == jnp.bfloat16
    assert relative_error(out, reference(args, **kw)) <= tol
    assert np.all(np.asarray(out[-2:], np.float32) == 0.0)  # padding tokens


def test_int8_dots_says_what_it_takes():
    args = paged_problem(24, [40], page_size=16)
    fp8, scales = _quantized(args, jnp.float8_e4m3fn)
    with pytest.raises(ValueError, match="int8_dots=1 takes int8 key and value pages, got float8_e4m3fn"):
        run(fp8, KernelConfig(block_q=1, block_kv=32, int8_dots=1), **scales)
    with pytest.raises(ValueError, match=r"fp8_dots=1 runs on the Mosaic decode kernel only \(mosaic=1 or 2"):
        run(fp8, KernelConfig(block_q=1, block_kv=32, fp8_dots=1), **scales)
    i8, scales = _quantized(args, jnp.int8)
    with pytest.raises(ValueError, match="block_kv >= 32"):
        run(i8, KernelConfig(block_q=1, block_kv=16, int8_dots=2), **scales)
    from jaxattn_ragged.plugin import RaggedConfig

    with pytest.raises(ValueError, match="int8_dots"):
        RaggedConfig(int8_dots=3)


@pytest.mark.parametrize("dots", [1, 2])
def test_int8_dots_keep_a_nan_query_in_its_row(dots):
    """A NaN query makes its own row NaN with int8 products too (its row scale is NaN, not the
    int8 of NaN, which is 0 on a GPU); the other rows stay finite."""
    args, scales = _quantized(paged_problem(25, [60, 40], page_size=16), jnp.int8)
    query = np.array(args["query"])
    query[1, 2, 5] = np.nan  # sequence 1, query head 2
    out = np.asarray(run({**args, "query": jnp.asarray(query)}, KernelConfig(block_q=1, block_kv=32, int8_dots=dots),
                         **scales))
    assert np.isnan(out[1, 2]).all()
    nan_rows = np.isnan(out).any(-1)
    nan_rows[1, 2] = False
    assert not nan_rows.any()


def test_int8_rows_scales_and_non_finite_rows():
    """`_int8_rows` (the int8 products' row quantizer, in the kernels and before the Mosaic decode
    kernel): rows round to nearest at max|row| / 127, an all-zero row gets scale 1, and a row
    holding a NaN, +inf or -inf gets a NaN scale, so its products stay NaN."""
    from jaxattn_ragged.kernel import _int8_rows

    x = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (6, 32), jnp.float32)) * 5.0
    x[1] = 0.0
    x[2, 7], x[3, 0], x[4, 31] = np.nan, np.inf, -np.inf
    q, scale = (np.asarray(a) for a in _int8_rows(jnp.asarray(x)))
    assert q.dtype == np.int8 and scale.dtype == np.float32
    for r in (0, 5):
        np.testing.assert_allclose(scale[r], np.abs(x[r]).max() / 127.0, rtol=1e-6)
        np.testing.assert_array_equal(q[r], np.round(x[r] / scale[r]).astype(np.int8))
        assert np.abs(q[r]).max() == 127
    assert scale[1] == 1.0 and not q[1].any()
    assert np.isnan(scale[2:5]).all()
