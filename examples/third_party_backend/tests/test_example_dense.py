"""The example backend's own tests: the core's conformance suite, and its declared limits.

Run after installing the package (`pip install ./examples/third_party_backend`):
`pytest examples/third_party_backend/tests`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import jaxattn
from jaxattn.testing import Shape, run_conformance
from jaxattn_example import MAX_LOGITS

# A small base shape: on a CPU the suite's time is the compilation of each case, not its size.
SHAPE = Shape(batch=2, seq=32, num_heads=4, head_dim=16)

# Every conformance case but dropout, which the backend rejects with its reason.
SUPPORTED = [
    "full", "causal", "causal_q_lt_kv", "causal_top_left", "gqa", "mqa", "sliding_window", "sliding_window_asym",
    "chunked_causal", "segment_ids", "seq_lengths", "bias", "bool_mask", "soft_cap", "sinks", "fully_masked_rows",
    "return_lse", "value_head_dim", "or_mask", "query_positions", "decode",
]


def test_conformance_forward_and_gradients():
    report = run_conformance("example_dense", expect_supported=SUPPORTED, shape=SHAPE)
    report.assert_ok()
    [dropout] = [r for r in report.results if r.case == "dropout"]
    assert dropout.status == "rejected" and "no dropout" in dropout.detail


def _qkv(seq):
    q = jax.ShapeDtypeStruct((1, seq, 4, 32), jnp.float32)
    return q, q, q


def test_limits_are_declared_and_auto_keeps_xla():
    assert MAX_LOGITS == 4096 * 4096
    text = jaxattn.explain(*_qkv(8192), is_causal=True, hardware=jaxattn.Hardware.cpu())
    assert "example_dense" in text and "at most 16777216" in text
    assert jaxattn.select(*_qkv(64), hardware=jaxattn.Hardware.cpu()).name == "xla"  # priority -1
    with pytest.raises(jaxattn.BackendUnavailableError, match="no dropout"):
        jaxattn.select(*_qkv(64), dropout_rate=0.1, dropout_rng=jax.random.PRNGKey(0), backend="example_dense")


def test_settings_are_checked_before_it_runs():
    q = jnp.ones((1, 8, 2, 16))
    meta = jaxattn.OperationMetadata(operation_configs={"example_dense": {"precision": "fast"}})
    with pytest.raises(ValueError, match=r"operation_configs\['example_dense'\]\['precision'\]"):
        jaxattn.attention(q, q, q, backend="example_dense", metadata=meta)
