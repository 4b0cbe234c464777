"""Values, not only shapes: bad numbers and lengths raise (eager), are made safe (jit), and
are reported under jit in checked mode; page tables never read a page that is not the
call's own; zero-size calls answer with correctly shaped results."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import jaxattn
from jaxattn import CausalMask, ChunkedCausalMask, OperationMetadata, QueryPositionMask

KEYS = jax.random.split(jax.random.PRNGKey(0), 3)
Q = jax.random.normal(KEYS[0], (2, 8, 4, 16))
K = jax.random.normal(KEYS[1], (2, 8, 2, 16))
V = jax.random.normal(KEYS[2], (2, 8, 2, 16))
NAN, INF = float("nan"), float("inf")
POSITIONS = jnp.tile(jnp.arange(8), (2, 1))


@pytest.mark.parametrize("kwargs,match", [
    ({"scale": NAN}, r"scale: expected a finite Python number or None, got nan"),
    ({"scale": -INF}, r"scale: expected a finite"),
    ({"logits_soft_cap": NAN}, r"logits_soft_cap: expected a finite number > 0"),
    ({"logits_soft_cap": INF}, r"logits_soft_cap: expected a finite number > 0"),
    ({"query_seq_lengths": jnp.array([-1, 3])}, r"query_seq_lengths: entries must be in \[0, q_len=8\], got range \[-1, 3\]"),
    ({"key_value_seq_lengths": jnp.array([2**31 - 1, 3])}, r"key_value_seq_lengths: entries must be in \[0, kv_len=8\]"),
    ({"query": Q[..., :0], "key": K[..., :0]}, r"query: head_dim must be > 0"),
    ({"value": V[..., :0]}, r"value: head_dim must be > 0"),
    ({"metadata": OperationMetadata(operation_configs={"xla": {"block_q": 0}})},
     r"metadata.operation_configs\['xla'\]\['block_q'\] must be an int >= 1, got 0"),
    ({"metadata": OperationMetadata(operation_configs={"xla": {"block_kv": "abc"}})},
     r"\['xla'\]\['block_kv'\] must be an int >= 1, got 'abc'"),
])
def test_bad_values_raise_naming_the_argument(kwargs, match):
    args = {"query": Q, "key": K, "value": V, **kwargs}
    with pytest.raises(ValueError, match=match):
        jaxattn.attention(args.pop("query"), args.pop("key"), args.pop("value"), **args)


@pytest.mark.parametrize("fields,match", [
    ({"softmax_scale": NAN}, r"metadata.softmax_scale: expected a finite number or None, got nan"),
    ({"runtime_dtype": jnp.int32}, r"metadata.runtime_dtype: expected a floating-point dtype or None, got int32"),
    ({"runtime_softmax_dtype": "int8"}, r"metadata.runtime_softmax_dtype: expected a floating-point dtype"),
    ({"operation_configs": {"xla": 4}}, r"metadata.operation_configs\['xla'\]: expected a dict or a BackendConfig, got int"),
    ({"checked": "yes"}, r"metadata.checked: expected a bool"),
])
def test_bad_metadata_is_rejected_where_it_is_made(fields, match):
    with pytest.raises(ValueError, match=match):
        OperationMetadata(**fields)


def test_numpy_scalars_are_numbers():
    out = jaxattn.attention(Q, K, V, dropout_rate=np.float32(0.1), dropout_rng=jax.random.PRNGKey(1),
                            scale=np.float32(0.2), logits_soft_cap=np.float64(30.0))
    assert out.shape == Q.shape and np.all(np.isfinite(out))


def test_lengths_are_clamped_under_jit():
    f = jax.jit(lambda ql, kl: jaxattn.attention(Q, K, V, query_seq_lengths=ql, key_value_seq_lengths=kl))
    got = f(jnp.array([-3, 99]), jnp.array([2**31 - 1, -5]))
    want = jaxattn.attention(Q, K, V, query_seq_lengths=jnp.array([0, 8]), key_value_seq_lengths=jnp.array([8, 0]))
    np.testing.assert_array_equal(got, want)


def test_checked_mode_reports_lengths_under_jit():
    meta = OperationMetadata(checked=True)
    f = jax.jit(checkify.checkify(lambda ql: jaxattn.attention(Q, K, V, query_seq_lengths=ql, metadata=meta)))
    err, _ = f(jnp.array([2, 3]))
    assert err.get() is None
    err, _ = f(jnp.array([2, 9]))
    assert "query_seq_lengths: entries must be in [0, q_len=8], got range [2, 9]" in err.get()
    with pytest.raises(ValueError, match="checkify"):  # checked mode needs checkify around the jit
        jax.jit(lambda ql: jaxattn.attention(Q, K, V, query_seq_lengths=ql, metadata=meta))(jnp.array([2, 3]))


@pytest.mark.parametrize("huge,plain", [
    ({"sliding_window": 2**31}, {}),
    ({"sliding_window": (2**40, 2**40), "is_causal": True}, {"is_causal": True}),
    ({"mask": CausalMask(2**40)}, {}),
    ({"mask": CausalMask(-2**40)}, {"mask": CausalMask(-8)}),
    ({"mask": ChunkedCausalMask(2**40)}, {"mask": CausalMask(0)}),
    ({"mask": QueryPositionMask(POSITIONS, left=2**40, right=2**40)}, {"mask": QueryPositionMask(POSITIONS, right=8)}),
])
def test_huge_windows_and_offsets_mean_unbounded(huge, plain):
    np.testing.assert_array_equal(jaxattn.attention(Q, K, V, **huge), jaxattn.attention(Q, K, V, **plain))


# -- paged tables ------------------------------------------------------------------------

PAGES_K = jax.random.normal(KEYS[0], (6, 4, 2, 16))
PAGES_V = jax.random.normal(KEYS[1], (6, 4, 2, 16))
TABLE = jnp.array([[0, 1], [2, 3]], jnp.int32)
LENS = jnp.array([5, 7], jnp.int32)
PQ = jax.random.normal(KEYS[2], (2, 4, 16))


def paged(table, lens, **kw):
    return jaxattn.paged_attention(PQ, PAGES_K, PAGES_V, lens, table, **kw)


def test_unused_page_entries_may_hold_anything():
    padded = jnp.array([[0, 1, -1], [2, 3, 99]], jnp.int32)
    np.testing.assert_array_equal(paged(padded, LENS), paged(TABLE, LENS))


@pytest.mark.parametrize("table,lens,safe_lens", [
    ([[0, -1], [2, 3]], [5, 7], [4, 7]),  # page -1 holds tokens 4..7 of sequence 0: they are masked
    ([[0, 1], [9, 3]], [5, 7], [5, 0]),  # a bad first page masks the whole sequence
    ([[0, 1], [2, 3]], [5, 99], [5, 8]),  # kv_lengths past the capacity are clamped
    ([[0, 1], [2, 3]], [-4, 7], [0, 7]),
])
def test_out_of_range_pages_are_masked_under_jit(table, lens, safe_lens):
    got = jax.jit(paged)(jnp.array(table, jnp.int32), jnp.array(lens, jnp.int32))
    safe_table = jnp.where((jnp.array(table) < 0) | (jnp.array(table) >= 6), 0, jnp.array(table, jnp.int32))
    want = paged(safe_table, jnp.array(safe_lens, jnp.int32))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_other_sequences_pages_are_never_read():
    """Page -1 would read the last page (5), another sequence's: poisoning it changes nothing."""
    table = jnp.array([[0, -1], [5, 3]], jnp.int32)
    poisoned = PAGES_V.at[5].set(jnp.nan)
    f = jax.jit(lambda t, l, v: jaxattn.paged_attention(PQ, PAGES_K, v, l, t))
    row0 = f(table, LENS, poisoned)[0]
    assert np.all(np.isfinite(row0))
    np.testing.assert_allclose(row0, f(table, LENS, PAGES_V)[0], rtol=1e-6)


def test_checked_mode_reports_page_tables_under_jit():
    meta = OperationMetadata(checked=True)
    f = jax.jit(checkify.checkify(lambda t, l: paged(t, l, metadata=meta)))
    assert f(TABLE, LENS)[0].get() is None
    assert f(jnp.array([[0, 1, -1], [2, 3, 7]]), LENS)[0].get() is None  # unused entries are fine
    err = f(jnp.array([[0, -1], [2, 3]]), LENS)[0].get()
    assert "page_indices: entries must be in [0, num_pages=6)" in err and "[-1, -1]" in err
    err = f(TABLE, jnp.array([5, 9]))[0].get()
    assert "kv_lengths: entries must be in [0, pages_per_seq * page_size = 8], got range [5, 9]" in err
    cu = jax.jit(checkify.checkify(lambda c: jaxattn.paged_attention(
        jnp.ones((4, 4, 16)), PAGES_K, PAGES_V, LENS, TABLE, cu_q_lens=c, metadata=meta)))
    assert cu(jnp.array([0, 2, 4]))[0].get() is None
    assert "cu_q_lens" in cu(jnp.array([0, 3, 2]))[0].get()


# -- zero-size calls ---------------------------------------------------------------------


@pytest.mark.parametrize("q_shape,kv_shape", [
    ((0, 8, 4, 16), (0, 8, 2, 16)),  # batch 0
    ((2, 0, 4, 16), (2, 8, 2, 16)),  # no queries
    ((2, 8, 4, 16), (2, 0, 2, 16)),  # no keys: every row sees nothing
    ((2, 0, 4, 16), (2, 0, 2, 16)),
])
def test_zero_size_attention(q_shape, kv_shape):
    q, k = jnp.ones(q_shape), jnp.ones(kv_shape)
    for f in (jaxattn.attention, jax.jit(jaxattn.attention, static_argnames="return_lse")):
        out, lse = f(q, k, k, return_lse=True)
        assert out.shape == q_shape and lse.shape == (q_shape[0], 4, q_shape[1])
        assert np.all(out == 0) and np.all(lse == -np.inf)
    grads = jax.grad(lambda q, k: jaxattn.attention(q, k, k, is_causal=True).sum(), argnums=(0, 1))(q, k)
    assert [g.shape for g in grads] == [q_shape, kv_shape] and all(np.all(g == 0) for g in grads)


@pytest.mark.parametrize("query,pages,table,lens,cu", [
    ((0, 4, 16), (6, 4, 2, 16), (0, 2), (0,), None),  # no sequences
    ((3, 4, 16), (6, 4, 2, 16), (0, 2), (0,), [0]),  # no sequences, padding tokens
    ((0, 4, 16), (6, 4, 2, 16), (2, 2), (2,), [0, 0, 0]),  # no tokens
    ((2, 4, 16), (6, 4, 2, 16), (2, 0), (2,), None),  # no pages per sequence
    ((2, 4, 16), (0, 4, 2, 16), (2, 2), (2,), None),  # an empty cache
])
def test_zero_size_paged(query, pages, table, lens, cu):
    out = jaxattn.paged_attention(jnp.ones(query), jnp.ones(pages), jnp.ones(pages), jnp.zeros(lens, jnp.int32),
                                  jnp.zeros(table, jnp.int32), cu_q_lens=None if cu is None else jnp.array(cu))
    assert out.shape == query and np.all(out == 0)
