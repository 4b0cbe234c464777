"""Quantized KV storage: `quantize_kv` round trips, `update_paged_cache` with quantized pages, and
`paged_attention` on them (xla) against the dequantized and the unquantized cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn.testing.conformance import relative_error

DTYPES = [jnp.int8, jnp.float8_e4m3fn]
# Worst error of one value, relative to the largest |x| of its token and head (which maps to
# qmax): half a step, i.e. 0.5/127 for int8, and 16/448 for e4m3 (steps of 32 in [256, 448]).
BOUND = {"int8": 0.5 / 127 + 1e-6, "float8_e4m3fn": 16 / 448 + 1e-6}


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_per_token_and_head(dtype):
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 16, 3, 32)) * jnp.linspace(0.01, 100, 3)[:, None]
    x = x.at[0, 0, 0].set(0.0)  # an all-zero token: scale 1, values 0
    values, scales = jaxattn.quantize_kv(x, dtype)
    assert values.dtype == dtype and values.shape == x.shape
    assert scales.dtype == jnp.float32 and scales.shape == (5, 16, 3)
    assert float(scales[0, 0, 0]) == 1.0 and not np.any(np.asarray(values[0, 0, 0], np.float32))
    back = jaxattn.dequantize_kv(values, scales)
    amax = np.max(np.abs(np.asarray(x)), axis=-1, keepdims=True)
    worst = np.max(np.abs(np.asarray(back) - np.asarray(x)) / np.maximum(amax, 1e-30))
    assert worst <= BOUND[jnp.dtype(dtype).name], worst
    # the largest value of each token and head is exact: it maps to qmax
    idx = np.argmax(np.abs(np.asarray(x)), axis=-1)[..., None]
    np.testing.assert_allclose(np.take_along_axis(np.asarray(back), idx, -1),
                               np.take_along_axis(np.asarray(x), idx, -1), rtol=1e-6)


def test_quantize_rejects_other_dtypes():
    with pytest.raises(ValueError, match="dtype: expected int8 or float8_e4m3fn, got float8_e5m2"):
        jaxattn.quantize_kv(jnp.ones((2, 4)), jnp.float8_e5m2)
    with pytest.raises(ValueError, match="x: expected a floating-point array"):
        jaxattn.quantize_kv(jnp.ones((2, 4), jnp.int32), jnp.int8)


def _problem(seed, lengths, page_size=4, hkv=2, d=16, spare=2):
    rng = np.random.default_rng(seed)
    pps = -(-max(lengths) // page_size) + 1
    num_pages = len(lengths) * pps + spare
    table = jnp.asarray(rng.permutation(num_pages)[: len(lengths) * pps].reshape(len(lengths), pps), jnp.int32)
    return num_pages, table


@pytest.mark.parametrize("dtype", DTYPES)
def test_update_paged_cache_writes_values_and_scales_then_attends(dtype):
    """Prefill chunks then a decode step into int8/fp8 pages; attention over them equals attention over
    the dequantized cache, and stays close to attention over the float cache written the same way."""
    page_size, hkv, d, hq = 4, 2, 16, 4
    lengths = [9, 3, 6]
    num_pages, table = _problem(1, lengths, page_size, hkv, d)
    keys = jax.random.split(jax.random.PRNGKey(2), 4)
    total = sum(lengths)
    k_all = jax.random.normal(keys[0], (total, hkv, d))
    v_all = jax.random.normal(keys[1], (total, hkv, d))
    kp = jnp.zeros((num_pages, page_size, hkv, d), dtype)
    ks = jnp.ones((num_pages, page_size, hkv), jnp.float32)
    fp = jnp.zeros((num_pages, page_size, hkv, d), jnp.float32)
    # ragged prefill of all but the last token of each sequence, then one decode token each
    pre = [n - 1 for n in lengths]
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(pre)]), jnp.int32)
    starts = np.concatenate([[0], np.cumsum(lengths)])[:-1]
    idx_pre = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, pre)])
    idx_dec = starts + np.asarray(pre)
    lens_pre = jnp.asarray(pre, jnp.int32)
    kp, vp, ks, vs = jaxattn.update_paged_cache(kp, kp, k_all[idx_pre], v_all[idx_pre], lens_pre, table, cu,
                                                k_scale=ks, v_scale=ks)
    fk, fv = jaxattn.update_paged_cache(fp, fp, k_all[idx_pre], v_all[idx_pre], lens_pre, table, cu)
    lens = jnp.asarray(lengths, jnp.int32)
    kp, vp, ks, vs = jaxattn.update_paged_cache(kp, vp, k_all[idx_dec], v_all[idx_dec], lens, table,
                                                k_scale=ks, v_scale=vs)
    fk, fv = jaxattn.update_paged_cache(fk, fv, k_all[idx_dec], v_all[idx_dec], lens, table)
    assert kp.dtype == dtype and ks.dtype == jnp.float32
    # each written slot holds quantize_kv of its token
    s, t = 0, 5  # sequence 0, position 5
    page, slot = int(table[s, t // page_size]), t % page_size
    want_v, want_s = jaxattn.quantize_kv(k_all[starts[s] + t], dtype)
    np.testing.assert_array_equal(np.asarray(kp[page, slot], np.float32), np.asarray(want_v, np.float32))
    np.testing.assert_array_equal(np.asarray(ks[page, slot]), np.asarray(want_s))

    q = jax.random.normal(keys[2], (len(lengths), hq, d))
    out = jaxattn.paged_attention(q, kp, vp, lens, table, k_scale=ks, v_scale=vs, backend="xla")
    deq = jaxattn.paged_attention(q, jaxattn.dequantize_kv(kp, ks), jaxattn.dequantize_kv(vp, vs), lens, table,
                                  backend="xla")
    plain = jaxattn.paged_attention(q, fk, fv, lens, table, backend="xla")
    assert relative_error(out, deq) < 1e-5
    assert relative_error(out, plain) < (2e-2 if dtype == jnp.int8 else 6e-2)


def test_update_paged_cache_scalar_scales_float_pages_and_errors():
    num_pages, table = _problem(3, [5, 2])
    new = jax.random.normal(jax.random.PRNGKey(4), (2, 2, 16))
    lens = jnp.asarray([5, 2], jnp.int32)
    f8 = jnp.zeros((num_pages, 4, 2, 16), jnp.float8_e4m3fn)
    kp, vp, ks, vs = jaxattn.update_paged_cache(f8, f8, new, new, lens, table, k_scale=jnp.float32(0.01),
                                                v_scale=jnp.float32(0.02))
    assert ks.shape == () and float(vs) == pytest.approx(0.02)  # a fixed per-tensor scale comes back as is
    page = int(table[0, 1])
    np.testing.assert_allclose(np.asarray(kp[page, 0], np.float32) * 0.01, np.asarray(new[0]), rtol=7e-2, atol=1e-3)
    # float pages with per token scales: the value is stored as is, with scale 1
    fp = jnp.zeros((num_pages, 4, 2, 16))
    ones = jnp.full((num_pages, 4, 2), 7.0)
    kp, _, ks, _ = jaxattn.update_paged_cache(fp, fp, new, new, lens, table, k_scale=ones, v_scale=ones)
    np.testing.assert_array_equal(np.asarray(kp[page, 0]), np.asarray(new[0]))
    assert float(ks[page, 0, 0]) == 1.0 and float(ks[page, 1, 0]) == 7.0
    i8 = f8.astype(jnp.int8)
    with pytest.raises(ValueError, match=r"k_scale: key_pages are int8: pass their scales"):
        jaxattn.update_paged_cache(i8, i8, new, new, lens, table)
    with pytest.raises(ValueError, match=r"v_scale: expected a float array \[num_pages, page_size, kv_heads\]"):
        jaxattn.update_paged_cache(i8, i8, new, new, lens, table, k_scale=ones, v_scale=jnp.ones((3,)))
    with pytest.raises(ValueError, match="k_scale/v_scale: pass both or neither"):
        jaxattn.update_paged_cache(fp, fp, new, new, lens, table, k_scale=ones)
