"""CPU tests of flash's TPU path, run through the Pallas TPU interpreter."""

from __future__ import annotations

from jaxattn import AttentionRequest, Hardware
from jaxattn.testing import run_conformance
from jaxattn_flash import FlashAttention


def _request(**kw):
    base = dict(batch=2, q_len=1024, kv_len=1024, num_q_heads=8, num_kv_heads=2, head_dim=128,
                value_head_dim=128, dtype="bfloat16", kv_dtype="bfloat16", mask_kinds=frozenset({"causal"}),
                needs_grad=True)
    base.update(kw)
    return AttentionRequest(**base)


def test_supports_on_tpu():
    impl = FlashAttention()
    tpu = Hardware.tpu()
    assert impl.supports(_request(), tpu)
    assert impl.supports(_request(mask_kinds=frozenset({"segment", "causal"}), dtype="float32", kv_dtype="float32"), tpu)
    verdict = impl.supports(_request(mask_kinds=frozenset({"sliding_window"}), has_sinks=True, return_lse=True,
                                     dtype="float16", kv_dtype="float16", q_len=1000), tpu)
    for word in ("sliding_window", "sinks", "return_lse", "float16", "q_len"):
        assert word in str(verdict), word


TPU_DECLARED = ["full", "causal", "gqa", "mqa", "segment_ids"]


def test_tpu_path_conformance_interpret():
    """jax's TPU flash kernel, wrapped, through the Pallas TPU interpreter."""
    report = run_conformance(
        FlashAttention(interpret=True), hardware=Hardware.tpu(), dtypes=["float32"],
        cases=TPU_DECLARED + ["sliding_window", "sinks"], expect_supported=TPU_DECLARED,
    )
    print(report.table())
    report.assert_ok()
    assert all(r.backward for r in report.results if r.status == "pass")
