"""The conformance suite itself: it passes the reference and catches wrong backends."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from jaxattn import Support
from jaxattn.backends.xla import XlaAttention, XlaPagedAttention
from jaxattn.testing import Shape, all_cases, run_conformance

SMALL = Shape(batch=2, seq=32, num_heads=4, head_dim=16, page_size=4)


class IgnoresSinks(XlaAttention):
    """Claims sinks but drops them: the suite must notice."""

    name = "ignores_sinks"

    def forward_native(self, inputs, metadata):
        return super().forward_native(inputs.replace(sinks=None), metadata)


class WrongScale(XlaAttention):
    name = "wrong_scale"

    def forward_native(self, inputs, metadata):
        return super().forward_native(inputs.replace(scale=inputs.scale * 1.01), metadata)


class NoWindow(XlaAttention):
    name = "no_window"

    def supports(self, request, hardware):
        return Support.from_reasons(["no windows here"] if "sliding_window" in request.mask_kinds else [])


class LowPrecisionGrad(XlaAttention):
    """Right forward, but gradients rounded to bfloat16: fails the float32 gradient check."""

    name = "low_precision_grad"

    def forward_native(self, inputs, metadata):
        import jax

        @jax.custom_vjp
        def rounded(x):
            return x

        rounded.defvjp(lambda x: (x, None), lambda _, g: (g.astype(jnp.bfloat16).astype(g.dtype),))
        return super().forward_native(inputs.replace(query=rounded(inputs.query)), metadata)


def test_reference_passes_every_case():
    report = run_conformance(XlaAttention(), shape=SMALL, expect_supported="*", dtypes=["float32"])
    assert report.ok, report.table()
    assert {r.case for r in report.results} == {c.name for c in all_cases()}


def test_reference_in_bf16_is_within_the_bf16_tolerance():
    report = run_conformance(XlaAttention(), shape=SMALL, dtypes=["bfloat16"], cases=["causal", "gqa", "sinks"])
    assert report.ok, report.table()
    assert all(1e-5 < r.errors["out"] < 1e-2 for r in report.results)  # really rounded, and not too much


class IgnoresValueScales(XlaPagedAttention):
    """Reads quantized pages but drops the per token value scales (uses their mean): the suite must notice."""

    name = "ignores_value_scales"

    def forward_native(self, inputs, metadata):
        v_scale = inputs.v_scale
        if v_scale is not None and v_scale.ndim:
            v_scale = jnp.nanmean(v_scale)
        return super().forward_native(inputs.replace(v_scale=v_scale), metadata)


def test_paged_reference_passes_every_case():
    report = run_conformance("xla", op="paged_attention", shape=SMALL, expect_supported="*")
    assert report.ok, report.table()
    loss = {r.case: r.errors.get("vs_unquantized") for r in report.results}
    assert 1e-3 < loss["paged_int8"] < 2e-2 and 1e-2 < loss["paged_fp8"] < 5e-2, loss  # what a user loses
    assert loss["paged_decode"] is None and "vs_unquantized=" in report.table()


class NoScales(XlaPagedAttention):
    """A paged backend from before quantized caches: it never declared kv_scales."""

    name = "no_scales"
    kv_scales = False


def test_a_backend_that_does_not_declare_kv_scales_is_not_given_them():
    report = run_conformance(NoScales(), cases=["paged_decode", "paged_int8"], shape=SMALL, dtypes=["float32"])
    assert [r.status for r in report.results] == ["pass", "rejected"], report.table()
    assert "declares kv_scales = True" in report.results[1].detail


def test_quantized_cases_catch_a_backend_that_drops_scales():
    report = run_conformance(IgnoresValueScales(), cases=["paged_int8", "paged_fp8_per_tensor"], shape=SMALL,
                             dtypes=["float32"])
    assert [r.status for r in report.results] == ["fail", "pass"], report.table()


@pytest.mark.parametrize("impl,case,needle", [
    (IgnoresSinks(), "sinks", "fail"),
    (WrongScale(), "causal", "fail"),
    (LowPrecisionGrad(), "full", "fail"),
])
def test_wrong_backends_fail(impl, case, needle):
    report = run_conformance(impl, cases=[case], shape=SMALL, dtypes=["float32"])
    assert not report.ok
    assert report.results[0].status == needle
    with pytest.raises(AssertionError, match=impl.name):
        report.assert_ok()


def test_rejections_are_recorded_and_can_be_required():
    report = run_conformance(NoWindow(), cases=["sliding_window", "causal"], shape=SMALL)
    assert report.ok
    status = {r.case: (r.status, r.detail) for r in report.results}
    assert status["sliding_window"] == ("rejected", "no windows here")
    strict = run_conformance(NoWindow(), cases=["sliding_window"], shape=SMALL, expect_supported=["sliding_window"])
    assert not strict.ok


def test_unknown_case_names_are_an_error():
    with pytest.raises(ValueError, match="unknown case names"):
        run_conformance("xla", cases=["nope"])
