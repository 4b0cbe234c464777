"""The `xla` backend against an independent float64 NumPy reference, forward and backward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy_reference import Rules, attention, backward, paged

import jaxattn

B, SQ, SKV, HQ, D = 2, 24, 40, 4, 8
FWD_TOL = 1e-5
GRAD_TOL = 1e-4


def rel(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    assert np.all(np.isfinite(x)), "non-finite values"
    return np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30)


def make(seed, q_len=SQ, kv_len=SKV, hkv=HQ, dv=D):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(ks[0], (B, q_len, HQ, D))
    k = jax.random.normal(ks[1], (B, kv_len, hkv, D))
    v = jax.random.normal(ks[2], (B, kv_len, hkv, dv))
    return q, k, v


def segments(rng, length, cuts):
    ids = np.zeros((B, length), np.int32)
    for b in range(B):
        for c in cuts[b]:
            ids[b, c:] += 1
    return ids


RNG = np.random.default_rng(0)
SEG_Q = segments(RNG, SQ, [[5, 13], [9]])
SEG_KV = segments(RNG, SKV, [[11, 30], [20]])
DENSE = RNG.random((B, 1, SQ, SKV)) < 0.6
BIAS = RNG.standard_normal((B, HQ, SQ, SKV)).astype(np.float32)
SINKS = RNG.standard_normal(HQ).astype(np.float32)
POSITIONS = np.stack([np.arange(SQ) + 3, np.arange(SQ) + SKV - SQ - 2]).astype(np.int32)  # a ragged KV cache

# name: (shape overrides, jaxattn kwargs, numpy rules, numpy extras)
CASES = {
    "full": ({}, {}, Rules(), {}),
    "causal_square": ({"q_len": SKV}, {"is_causal": True}, Rules(causal_offset=0), {}),
    "causal_q_lt_kv": ({}, {"is_causal": True}, Rules(causal_offset=SKV - SQ), {}),
    "causal_top_left_object": ({}, {"mask": jaxattn.CausalMask(0)}, Rules(causal_offset=0), {}),
    "gqa": ({"hkv": 2}, {"is_causal": True}, Rules(causal_offset=SKV - SQ), {}),
    "mqa": ({"hkv": 1}, {}, Rules(), {}),
    "window_int": ({}, {"sliding_window": 6}, Rules(window=(6, 6)), {}),
    "window_asym_causal": ({}, {"sliding_window": (7, 3), "is_causal": True},
                           Rules(causal_offset=SKV - SQ, window=(7, 0)), {}),
    "window_asym": ({}, {"sliding_window": (2, 9)}, Rules(window=(2, 9)), {}),
    "chunked_causal": ({}, {"mask": jaxattn.ChunkedCausalMask(8)}, Rules(chunk=8), {}),
    "segment_ids": ({}, {"segment_ids": (jnp.asarray(SEG_Q), jnp.asarray(SEG_KV))},
                    Rules(q_segments=SEG_Q, kv_segments=SEG_KV), {}),
    "seq_lengths": ({}, {"query_seq_lengths": jnp.asarray([SQ, 11]), "key_value_seq_lengths": jnp.asarray([17, SKV])},
                    Rules(q_lengths=np.array([SQ, 11]), kv_lengths=np.array([17, SKV])), {}),
    "bias": ({}, {"bias": jnp.asarray(BIAS)}, Rules(), {"bias": BIAS}),
    "bool_mask": ({}, {"mask": jnp.asarray(DENSE)}, Rules(dense=DENSE), {}),
    "soft_cap": ({}, {"logits_soft_cap": 0.7, "is_causal": True}, Rules(causal_offset=SKV - SQ), {"soft_cap": 0.7}),
    "sinks": ({}, {"sinks": jnp.asarray(SINKS), "is_causal": True}, Rules(causal_offset=SKV - SQ), {"sinks": SINKS}),
    "fully_masked_rows": ({}, {"mask": jaxattn.CausalMask(-5), "sinks": jnp.asarray(SINKS)},
                          Rules(causal_offset=-5), {"sinks": SINKS}),
    "everything": ({"hkv": 2}, {"is_causal": True, "sliding_window": 9, "bias": jnp.asarray(BIAS),
                                "logits_soft_cap": 1.5, "sinks": jnp.asarray(SINKS),
                                "key_value_seq_lengths": jnp.asarray([33, 20])},
                   Rules(causal_offset=SKV - SQ, window=(9, 0), kv_lengths=np.array([33, 20])),
                   {"bias": BIAS, "soft_cap": 1.5, "sinks": SINKS}),
    "query_positions": ({}, {"mask": jaxattn.QueryPositionMask(jnp.asarray(POSITIONS)),
                             "key_value_seq_lengths": jnp.asarray(POSITIONS[:, -1] + 1)},
                        Rules(positions=POSITIONS, kv_lengths=POSITIONS[:, -1] + 1), {}),
    "query_positions_window": ({}, {"mask": jaxattn.QueryPositionMask(jnp.asarray(POSITIONS), left=6, right=1)},
                               Rules(positions=POSITIONS, positions_window=(6, 1)), {}),
    "value_head_dim": ({"dv": 2 * D}, {"is_causal": True}, Rules(causal_offset=SKV - SQ), {}),
    "scale": ({}, {"scale": 0.05}, Rules(), {"scale": 0.05}),
}

# Small blocks force several q and kv blocks (and padding) through the blockwise code.
SMALL_BLOCKS = jaxattn.OperationMetadata(operation_configs={"xla": {"block_q": 16, "block_kv": 16}})


@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_lse_match_numpy(name):
    shape, kwargs, rules, extras = CASES[name]
    q, k, v = make(1, **shape)
    out, lse = jaxattn.attention(q, k, v, return_lse=True, backend="xla", metadata=SMALL_BLOCKS, **kwargs)
    ref_out, ref_lse, _ = attention(q, k, v, rules, **extras)
    assert rel(out, ref_out) < FWD_TOL
    finite = np.isfinite(ref_lse)
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
    assert rel(np.asarray(lse)[finite], ref_lse[finite]) < FWD_TOL


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_match_numpy(name):
    shape, kwargs, rules, extras = CASES[name]
    q, k, v = make(2, **shape)
    bias = kwargs.pop("bias", None) if "bias" in kwargs else None
    sinks = kwargs.pop("sinks", None) if "sinks" in kwargs else None
    kwargs = dict(kwargs)

    def f(q, k, v, bias, sinks):
        return jaxattn.attention(q, k, v, bias=bias, sinks=sinks, return_lse=True, backend="xla",
                                 metadata=SMALL_BLOCKS, **kwargs)

    (out, lse), vjp = jax.vjp(f, q, k, v, bias, sinks)
    d_out = jax.random.normal(jax.random.PRNGKey(3), out.shape)
    d_lse = jnp.where(jnp.isfinite(lse), jax.random.normal(jax.random.PRNGKey(4), lse.shape), 0.0)
    dq, dk, dv, dbias, dsinks = vjp((d_out, d_lse))
    if bias is not None:
        kwargs["bias"] = bias
    if sinks is not None:
        kwargs["sinks"] = sinks
    r_dq, r_dk, r_dv, r_dbias, r_dsinks = backward(q, k, v, rules, d_out, d_lse, **extras)
    assert rel(dq, r_dq) < GRAD_TOL
    assert rel(dk, r_dk) < GRAD_TOL
    assert rel(dv, r_dv) < GRAD_TOL
    if bias is not None:
        assert rel(dbias, r_dbias) < GRAD_TOL
    if sinks is not None:
        assert rel(dsinks, r_dsinks) < GRAD_TOL


def test_fully_masked_rows_are_zero_with_zero_gradient():
    q, k, v = make(5)
    mask = jaxattn.CausalMask(-5)  # query rows 0..4 see no key

    def loss(q, k, v):
        out = jaxattn.attention(q, k, v, mask=mask, backend="xla")
        return (out ** 2).sum(), out

    (_, out), (dq, _, _) = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    assert np.all(np.asarray(out[:, :5]) == 0.0)
    assert np.all(np.asarray(dq[:, :5]) == 0.0)
    assert np.all(np.isfinite(np.asarray(dq)))


def test_broadcast_bias_gradient_sums_over_broadcast_axes():
    q, k, v = make(6)
    bias = jax.random.normal(jax.random.PRNGKey(8), (1, HQ, 1, SKV))

    def loss(bias):
        return jaxattn.attention(q, k, v, bias=bias, backend="xla", metadata=SMALL_BLOCKS).sum()

    full = jnp.broadcast_to(bias, (B, HQ, SQ, SKV))
    want = jax.grad(lambda b: jaxattn.attention(q, k, v, bias=b, backend="xla").sum())(full)
    got = jax.grad(loss)(bias)
    assert got.shape == bias.shape
    assert rel(got, want.sum(axis=(0, 2), keepdims=True)) < GRAD_TOL


def test_dropout_is_deterministic_and_unbiased_in_expectation():
    q, k, v = make(7)
    run = jax.jit(lambda rng: jaxattn.attention(q, k, v, dropout_rate=0.3, dropout_rng=rng, backend="xla"))
    a, b = run(jax.random.PRNGKey(0)), run(jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    plain = jaxattn.attention(q, k, v, backend="xla")
    mean = jnp.mean(jnp.stack([run(jax.random.PRNGKey(i)) for i in range(200)]), axis=0)
    assert rel(a, plain) > 0.1
    assert rel(mean, plain) < 0.1  # inverted dropout keeps the expectation


def test_bf16_inputs_stay_close_to_float32():
    q, k, v = make(9)
    out32 = jaxattn.attention(q, k, v, is_causal=True, backend="xla")
    out16 = jaxattn.attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), is_causal=True, backend="xla")
    assert out16.dtype == jnp.bfloat16
    assert rel(out16.astype(jnp.float32), out32) < 1e-2


@pytest.mark.slow
def test_32k_tokens_run_blockwise_on_cpu():
    # 32k x 32k float32 logits would be 4 GiB per head; blockwise needs a few MiB. One head of
    # dimension 8 keeps the run short (the xla backend visits every key block).
    s = 32768
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(key, (1, s, 1, 8), jnp.float32) for key in ks)
    f = jax.jit(lambda q, k, v: jaxattn.attention(q, k, v, sliding_window=64, is_causal=True, backend="xla"))
    compiled = f.lower(q, k, v).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 2**30, f"temporary buffers of {temp / 2**20:.0f} MiB"
    out = compiled(q, k, v)
    # spot-check the last rows against a direct computation over their window
    rows = slice(s - 4, s)
    logits = jnp.einsum("qhd,khd->hqk", q[0, rows], k[0, s - 68:], precision="highest") / np.sqrt(8.0)
    pos = jnp.arange(s - 4, s)[:, None]
    keys = jnp.arange(s - 68, s)[None, :]
    logits = jnp.where((keys <= pos) & (keys >= pos - 64), logits, -jnp.inf)
    want = jnp.einsum("hqk,khd->qhd", jax.nn.softmax(logits, -1), v[0, s - 68:], precision="highest")
    assert rel(out[0, rows], want) < 1e-5


PAGE = 4


def paged_problem(seed, lengths, q_counts=None, window=None, soft_cap=None, sinks=None, pad_tokens=0):
    rng = np.random.default_rng(seed)
    pages_per_seq = max(lengths) // PAGE + 2
    num_pages = len(lengths) * pages_per_seq + 2
    table = rng.permutation(num_pages)[: len(lengths) * pages_per_seq].reshape(len(lengths), pages_per_seq)
    hkv = 2
    kp = rng.standard_normal((num_pages, PAGE, hkv, D)).astype(np.float32)
    vp = rng.standard_normal((num_pages, PAGE, hkv, D)).astype(np.float32)
    cu = None if q_counts is None else np.concatenate([[0], np.cumsum(q_counts)]).astype(np.int32)
    tokens = len(lengths) if cu is None else int(cu[-1]) + pad_tokens
    q = rng.standard_normal((tokens, HQ, D)).astype(np.float32)
    got = jaxattn.paged_attention(
        jnp.asarray(q), jnp.asarray(kp), jnp.asarray(vp), jnp.asarray(lengths, jnp.int32),
        jnp.asarray(table, jnp.int32), cu_q_lens=None if cu is None else jnp.asarray(cu),
        sliding_window=window, logits_soft_cap=soft_cap, sinks=None if sinks is None else jnp.asarray(sinks),
        backend="xla", metadata=jaxattn.OperationMetadata(operation_configs={"xla": {"block_kv": 8, "block_tokens": 4}}),
    )
    want = paged(q, kp, vp, lengths, table, cu, window=None if window is None else (window, window),
                 soft_cap=soft_cap, sinks=sinks)
    return got, want


def test_paged_decode_matches_numpy():
    got, want = paged_problem(0, [13, 0, 22, 4])
    assert rel(got, want) < FWD_TOL
    assert np.all(np.asarray(got[1]) == 0.0)  # the empty sequence


def test_paged_ragged_prefill_and_decode_match_numpy():
    got, want = paged_problem(1, [13, 21, 9, 0, 5], q_counts=[13, 6, 1, 0, 1], pad_tokens=3)
    assert rel(got, want) < FWD_TOL
    assert np.all(np.asarray(got[-3:]) == 0.0)  # padding tokens


def test_paged_window_soft_cap_sinks_match_numpy():
    got, want = paged_problem(2, [17, 30, 6], q_counts=[5, 1, 6], window=5, soft_cap=2.0, sinks=SINKS)
    assert rel(got, want) < FWD_TOL
