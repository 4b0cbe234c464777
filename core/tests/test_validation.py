"""Bad input raises ValueError naming the argument and the expected form, before any kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn

q = jnp.ones((2, 8, 4, 16)) * 0.5
k = jnp.ones((2, 10, 2, 16)) * 0.25
v = jnp.ones((2, 10, 2, 16)) * 0.75


@pytest.mark.parametrize("kwargs,match", [
    ({"query": jnp.ones((8, 4, 16))}, r"query: expected rank 4 \[batch, seq, heads, head_dim\]"),
    ({"key": jnp.ones((2, 10, 16))}, r"key: expected rank 4"),
    ({"key": jnp.ones((3, 10, 2, 16)), "value": jnp.ones((3, 10, 2, 16))}, r"key/value: batch must equal query's \(2\)"),
    ({"value": jnp.ones((2, 9, 2, 16))}, r"value: sequence length must equal key's \(10\)"),
    ({"key": jnp.ones((2, 10, 3, 16)), "value": jnp.ones((2, 10, 3, 16))},
     r"key: query heads \(4\) must be a multiple of key/value heads \(3\)"),
    ({"key": jnp.ones((2, 10, 2, 8))}, r"key: head_dim must equal query's \(16\)"),
    ({"value": jnp.ones((2, 10, 2, 16), jnp.bfloat16)}, r"query/key/value: dtypes must match"),
    ({"query": jnp.ones((2, 8, 4, 16), jnp.int32)}, r"query: expected a floating-point array"),
    ({"bias": jnp.ones((2, 4, 8, 9))}, r"bias: expected an array broadcastable to \[batch, heads, q_len, kv_len\]"),
    ({"mask": jnp.ones((8, 10), jnp.float32)}, r"mask: expected a boolean array"),
    ({"mask": "causal"}, r"mask: expected a boolean array or a jaxattn mask object"),
    ({"mask": jnp.ones((3, 4, 8, 10), bool)}, r"mask: shape \(3, 4, 8, 10\) is not broadcastable"),
    ({"sliding_window": -1}, r"sliding_window: expected an int >= 0 or a pair"),
    ({"sliding_window": (4, -2)}, r"sliding_window: expected an int >= 0 or a pair"),
    ({"sliding_window": (1, 2, 3)}, r"sliding_window"),
    ({"segment_ids": jnp.zeros((2, 8), jnp.int32)}, r"segment_ids: one array needs q_len == kv_len"),
    ({"segment_ids": (jnp.zeros((2, 8), jnp.int32), jnp.zeros((2, 9), jnp.int32))},
     r"segment_ids: kv_segment_ids must have shape \[batch, seq\] = \(2, 10\)"),
    ({"segment_ids": (jnp.zeros((2, 8)), jnp.zeros((2, 10)))}, r"segment_ids \(q_segment_ids\): expected an integer array"),
    ({"query_seq_lengths": jnp.array([1, 2, 3])}, r"query_seq_lengths: expected shape \[batch\] = \(2,\)"),
    ({"key_value_seq_lengths": jnp.array([1.0, 2.0])}, r"key_value_seq_lengths: expected an integer array"),
    ({"logits_soft_cap": 0.0}, r"logits_soft_cap: expected a finite number > 0 or None"),
    ({"sinks": jnp.ones((2,))}, r"sinks: expected shape \[q_heads\] = \(4,\)"),
    ({"dropout_rate": 1.0}, r"dropout_rate: expected a number in \[0, 1\)"),
    ({"dropout_rate": 0.1}, r"dropout_rng: a PRNG key is required"),
    ({"scale": "big"}, r"scale: expected a finite Python number or None"),
    ({"is_causal": "yes"}, r"is_causal: expected a bool"),
    ({"metadata": {"mesh": None}}, r"metadata: expected a jaxattn.OperationMetadata"),
    ({"backend": 3}, r"backend: expected a backend name or a list of names"),
    ({"backend": "nonexistent"}, r"backend: no attention backend named 'nonexistent' \(installed: .*xla"),
])
def test_bad_attention_input_is_rejected_with_its_name(kwargs, match):
    args = {"query": q, "key": k, "value": v, **kwargs}
    with pytest.raises(ValueError, match=match):
        jaxattn.attention(args.pop("query"), args.pop("key"), args.pop("value"), **args)


def test_runtime_dtype_casts_instead_of_rejecting_a_mix():
    meta = jaxattn.OperationMetadata(runtime_dtype=jnp.bfloat16)
    out = jaxattn.attention(q, k, v.astype(jnp.bfloat16), metadata=meta)
    assert out.dtype == jnp.bfloat16


def test_errors_come_before_any_kernel_runs():
    calls = []

    class Spy(jaxattn.OperationImpl):
        name, op, platforms = "spy", "attention", ("cpu",)

        def supports(self, request, hardware):
            return jaxattn.Support.yes()

        def forward_native(self, inputs, metadata):
            calls.append(1)
            raise AssertionError("must not run")

    reg = jaxattn.default_registry()
    reg.add_plugin(type("P", (), {"jaxattn_register_backends": jaxattn.hookimpl(lambda self: [Spy()])})(), "spy")
    try:
        with pytest.raises(ValueError, match="sliding_window"):
            jaxattn.attention(q, k, v, sliding_window=-3, backend="spy")
        assert not calls
    finally:
        reg.remove_plugin("spy")


PAGES = jnp.ones((6, 4, 2, 16)) * 0.5
TABLE = jnp.array([[0, 1], [2, 3]], jnp.int32)
LENS = jnp.array([5, 7], jnp.int32)
PQ = jnp.ones((2, 4, 16))
I8 = PAGES.astype(jnp.int8)
F8 = PAGES.astype(jnp.float8_e4m3fn)


@pytest.mark.parametrize("kwargs,match", [
    ({"query": jnp.ones((2, 1, 4, 16))}, r"query: expected rank 3 \[tokens, q_heads, head_dim\]"),
    ({"key_pages": jnp.ones((6, 4, 16))}, r"key_pages: expected rank 4 \[num_pages, page_size, kv_heads, head_dim\]"),
    ({"value_pages": jnp.ones((6, 8, 2, 16))}, r"value_pages: expected the first three dims of key_pages"),
    ({"page_indices": jnp.array([[0, 6], [2, 3]], jnp.int32)}, r"page_indices: entries must be in \[0, num_pages=6\)"),
    ({"page_indices": jnp.array([[0, -1], [2, 3]], jnp.int32)}, r"page_indices: entries must be in"),
    ({"page_indices": jnp.array([[0.0, 1.0], [2.0, 3.0]])}, r"page_indices: expected an integer array"),
    ({"kv_lengths": jnp.array([5, 9], jnp.int32)}, r"kv_lengths: entries must be in \[0, pages_per_seq \* page_size = 8\]"),
    ({"kv_lengths": jnp.array([5], jnp.int32)}, r"kv_lengths: expected shape \[num_seqs\] = \(2,\)"),
    ({"query": jnp.ones((3, 4, 16))}, r"query: decode takes one query per sequence"),
    ({"query": jnp.ones((4, 4, 16)), "cu_q_lens": jnp.array([0, 2], jnp.int32)}, r"cu_q_lens: expected shape \[num_seqs \+ 1\]"),
    ({"query": jnp.ones((4, 4, 16)), "cu_q_lens": jnp.array([0, 3, 2], jnp.int32)}, r"cu_q_lens: expected 0 = cu\[0\]"),
    ({"query": jnp.ones((9, 4, 16)), "cu_q_lens": jnp.array([0, 6, 9], jnp.int32)}, r"cu_q_lens: a sequence has more queries than kv_lengths"),
    ({"key_pages": jnp.ones((6, 4, 3, 16)), "value_pages": jnp.ones((6, 4, 3, 16))}, r"key_pages: query heads \(4\) must be a multiple of kv heads \(3\)"),
    ({"sliding_window": (2, -1)}, r"sliding_window"),
    ({"sinks": jnp.ones((3,))}, r"sinks: expected shape \[q_heads\]"),
    # quantized pages: their scales are required, and must fit [num_pages, page_size, kv_heads]
    ({"key_pages": I8, "value_pages": I8}, r"k_scale/v_scale: key_pages/value_pages are int8, so their scales"),
    ({"key_pages": F8, "value_pages": F8, "k_scale": 0.5}, r"^v_scale: .* are float8_e4m3fn"),
    ({"key_pages": PAGES.astype(jnp.float8_e5m2), "value_pages": PAGES.astype(jnp.float8_e5m2), "k_scale": 1.0,
      "v_scale": 1.0}, r"one-byte pages must be int8 or float8_e4m3fn, got float8_e5m2"),
    ({"key_pages": PAGES.astype(jnp.int16), "value_pages": PAGES.astype(jnp.int16)},
     r"key_pages: expected floating-point, int8 or float8_e4m3fn pages, got int16"),
    ({"key_pages": I8, "value_pages": I8, "k_scale": jnp.ones((6, 4, 3)), "v_scale": 1.0},
     r"k_scale: expected a scalar or an array broadcastable to \[num_pages, page_size, kv_heads\] = \(6, 4, 2\)"),
    ({"key_pages": I8, "value_pages": I8, "k_scale": 1.0, "v_scale": jnp.ones((6, 4, 2), jnp.int32)},
     r"v_scale: expected a floating-point array"),
    ({"key_pages": I8, "value_pages": I8, "k_scale": "1", "v_scale": 1.0}, r"k_scale: expected a number"),
])
def test_bad_paged_input_is_rejected_with_its_name(kwargs, match):
    args = {"query": PQ, "key_pages": PAGES, "value_pages": PAGES, "kv_lengths": LENS,
            "page_indices": TABLE, **kwargs}
    positional = [args.pop(n) for n in ("query", "key_pages", "value_pages", "kv_lengths", "page_indices")]
    with pytest.raises(ValueError, match=match):
        jaxattn.paged_attention(*positional, **args)


def test_page_values_are_not_checked_under_jit_but_shapes_are():
    f = jax.jit(lambda table: jaxattn.paged_attention(PQ, PAGES, PAGES, LENS, table))
    assert np.all(np.isfinite(np.asarray(f(TABLE))))
    with pytest.raises(ValueError, match="page_indices: expected rank 2"):
        jax.jit(lambda table: jaxattn.paged_attention(PQ, PAGES, PAGES, LENS, table[0]))(TABLE)


def test_scales_are_normalized_and_seen_by_the_request():
    from jaxattn.request import AttentionRequest
    from jaxattn.validation import build_paged_inputs

    def build(**kw):
        return build_paged_inputs(PQ, I8, I8, LENS, TABLE, cu_q_lens=None, scale=None, sliding_window=None,
                                  logits_soft_cap=None, sinks=None, metadata=jaxattn.OperationMetadata(), **kw)

    per_head = build(k_scale=jnp.full((2,), 0.5), v_scale=2.0)  # [kv_heads] broadcasts; a number is a scalar
    assert per_head.k_scale.shape == (6, 4, 2) and per_head.v_scale.shape == ()
    request = AttentionRequest.from_paged_inputs(per_head)
    assert request.kv_dtype == "int8" and request.kv_scale == "per_token"
    assert "kv int8" in request.describe() and "kv_scale=per_token" in request.describe()
    assert AttentionRequest.from_paged_inputs(build(k_scale=1.0, v_scale=jnp.ones((1,)))).kv_scale == "scalar"
    floats = build_paged_inputs(PQ, PAGES, PAGES, LENS, TABLE, cu_q_lens=None, scale=None, sliding_window=None,
                                logits_soft_cap=None, sinks=None, metadata=jaxattn.OperationMetadata())
    assert AttentionRequest.from_paged_inputs(floats).kv_scale == "none"
    # scales on float pages multiply them, as on quantized pages
    out = jaxattn.paged_attention(PQ, PAGES, PAGES, LENS, TABLE, v_scale=3.0, backend="xla")
    np.testing.assert_allclose(np.asarray(out), 3 * np.asarray(jaxattn.paged_attention(PQ, PAGES, PAGES, LENS, TABLE)),
                               rtol=1e-6)
