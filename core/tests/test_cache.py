"""`KVCache` and `cached_attention`: ragged appends, and decoding that equals full causal attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import KVCache, cached_attention
from jaxattn.testing import relative_error as rel

B, L, HQ, HKV, D = 2, 40, 4, 2, 8
TOL = 1e-5



def tokens(seed, n=L):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(ks[0], (B, n, HQ, D)), jax.random.normal(ks[1], (B, n, HKV, D)),
            jax.random.normal(ks[2], (B, n, HKV, D)))


def test_create_is_empty_and_typed():
    cache = KVCache.create(B, 16, HKV, D, jnp.bfloat16, value_head_dim=12)
    assert cache.key.shape == (B, 16, HKV, D) and cache.value.shape == (B, 16, HKV, 12)
    assert cache.key.dtype == jnp.bfloat16 and cache.lengths.dtype == jnp.int32
    np.testing.assert_array_equal(cache.lengths, [0, 0])
    leaves = jax.tree_util.tree_leaves(cache)
    assert len(leaves) == 3  # a pytree of its three arrays


def test_append_writes_each_sequence_at_its_own_length():
    _, k, v = tokens(0, 6)
    cache = KVCache.create(B, 12, HKV, D, jnp.float32)
    cache = cache.append(k[:, :4], v[:, :4], num_new=jnp.asarray([4, 2]))
    cache = cache.append(k[:, 4:], v[:, 4:], num_new=jnp.asarray([1, 2]))
    np.testing.assert_array_equal(cache.lengths, [5, 4])
    np.testing.assert_array_equal(cache.key[0, :5], jnp.concatenate([k[0, :4], k[0, 4:5]]))
    np.testing.assert_array_equal(cache.key[1, :4], jnp.concatenate([k[1, :2], k[1, 4:6]]))
    np.testing.assert_array_equal(cache.value[1, :4], jnp.concatenate([v[1, :2], v[1, 4:6]]))
    assert not np.any(np.asarray(cache.key[1, 4:]))  # nothing written past a sequence's length


def test_prefill_then_decode_equals_full_causal_attention():
    q, k, v = tokens(1)
    full = jaxattn.attention(q, k, v, is_causal=True)
    cache = KVCache.create(B, L + 8, HKV, D, jnp.float32)
    out, cache = cached_attention(q[:, :25], k[:, :25], v[:, :25], cache)
    outs = [out]
    step = jax.jit(cached_attention)
    for t in range(25, L):
        out, cache = step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], cache)
        outs.append(out)
    assert rel(jnp.concatenate(outs, axis=1), full) < TOL
    np.testing.assert_array_equal(cache.lengths, [L, L])


def test_ragged_prefill_chunks_and_window_match_full_attention():
    """Rows write different numbers of tokens per call; each matches its own full sequence."""
    q, k, v = tokens(2)
    window = 7
    full = jaxattn.attention(q, k, v, is_causal=True, sliding_window=window)
    cache = KVCache.create(B, L, HKV, D, jnp.float32)
    done = np.zeros(B, int)
    got = np.zeros(q.shape, np.float32)
    for chunk in ([9, 3], [5, 12], [10, 10], [16, 15]):
        n = max(chunk)
        idx = [np.minimum(done[b] + np.arange(n), L - 1) for b in range(B)]
        q_new, k_new, v_new = (jnp.stack([x[b, idx[b]] for b in range(B)]) for x in (q, k, v))
        out, cache = cached_attention(q_new, k_new, v_new, cache, num_new=jnp.asarray(chunk), sliding_window=window)
        for b in range(B):
            got[b, done[b]:done[b] + chunk[b]] = np.asarray(out[b, :chunk[b]])
            assert not np.any(np.asarray(out[b, chunk[b]:]))  # padding rows give zeros
        done += chunk
    np.testing.assert_array_equal(cache.lengths, done)
    assert rel(got, full) < TOL


def test_cached_attention_passes_gradients_and_return_lse():
    q, k, v = tokens(3, 6)
    cache = KVCache.create(B, 10, HKV, D, jnp.float32)

    def f(q, k, v):
        (out, lse), _ = cached_attention(q, k, v, cache, return_lse=True)
        return out.sum() + lse.sum()

    def ref(q, k, v):
        out, lse = jaxattn.attention(q, k, v, is_causal=True, return_lse=True)
        return out.sum() + lse.sum()

    for g, r in zip(jax.grad(f, (0, 1, 2))(q, k, v), jax.grad(ref, (0, 1, 2))(q, k, v)):
        assert rel(g, r) < TOL


def test_overflow_and_bad_arguments_raise():
    _, k, v = tokens(4, 6)
    cache = KVCache.create(B, 8, HKV, D, jnp.float32).append(k[:, :4], v[:, :4])
    with pytest.raises(ValueError, match="overflows max_len=8"):
        cache.append(k, v)
    with pytest.raises(ValueError, match=r"num_new: entries must be in \[0, 6\]"):
        cache.append(k, v, num_new=jnp.asarray([7, 1]))
    with pytest.raises(ValueError, match=r"key: expected shape \[batch, n, kv_heads, dim\]"):
        cache.append(k[:, :, :1], v)
    with pytest.raises(ValueError, match="max_len: expected an int > 0"):
        KVCache.create(B, 0, HKV, D)
    with pytest.raises(ValueError, match="int8 or float8_e4m3fn storage, got int16"):
        KVCache.create(B, 8, HKV, D, jnp.int16)
    with pytest.raises(ValueError, match="cache: expected a jaxattn.KVCache"):
        cached_attention(k, k, v, object())


def test_overflow_under_jit_drops_tokens_and_stops_at_max_len():
    _, k, v = tokens(5, 6)
    cache = KVCache.create(B, 8, HKV, D, jnp.float32).append(k[:, :4], v[:, :4])
    full = jax.jit(KVCache.append)(cache, k, v)
    np.testing.assert_array_equal(full.lengths, [8, 8])
    np.testing.assert_array_equal(full.key[:, 4:], k[:, :4])  # the first 4 fit, the rest are dropped


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.float8_e4m3fn])
def test_quantized_cache_stores_scales_and_attends_like_the_float_cache(dtype):
    q, k, v = tokens(6, 12)
    cache = KVCache.create(B, 16, HKV, D, dtype)
    assert cache.quantized and cache.key.dtype == dtype and cache.key_scale.shape == (B, 16, HKV)
    assert len(jax.tree_util.tree_leaves(cache)) == 5  # values, lengths and the two scales
    out, cache = jax.jit(cached_attention)(q[:, :8], k[:, :8], v[:, :8], cache)
    out2, cache = cached_attention(q[:, 8:], k[:, 8:], v[:, 8:], cache, num_new=jnp.asarray([4, 1]))
    np.testing.assert_array_equal(cache.lengths, [12, 9])
    keys, values = cache.dequantized(jnp.float32)
    want_k, _ = jaxattn.quantize_kv(k[0, :12], dtype)
    np.testing.assert_array_equal(np.asarray(cache.key[0, :12], np.float32), np.asarray(want_k, np.float32))
    bound = 1e-2 if dtype == jnp.int8 else 7e-2  # per token and head: a fraction of the largest |x|
    assert rel(keys[0, :12], k[0, :12]) < bound and rel(values[1, :9], jnp.concatenate([v[1, :8], v[1, 8:9]])) < bound
    full = jaxattn.attention(q, k, v, is_causal=True)
    assert rel(out, full[:, :8]) < 2 * bound  # what the user loses against a float cache
    assert rel(out2[0], full[0, 8:]) < 2 * bound
