"""Selection: ranking, overrides, forced-backend errors, explanations, trace-time cost."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import Hardware, OperationImpl, Support
from jaxattn.backends.xla import XlaAttention
from jaxattn.request import AttentionRequest


class Fake(XlaAttention):
    """Computes with the xla math; declares only what the test says."""

    name = "fake"
    aliases = ("fake_alias",)
    platforms = ("cpu", "gpu")
    priority = {"cpu": 100, "gpu": 100}
    calls = 0

    def supports(self, request, hardware):
        reasons = []
        if "sliding_window" in request.mask_kinds:
            reasons.append("fake has no sliding window")
        if request.head_dim > 64:
            reasons.append(f"fake needs head_dim <= 64, got {request.head_dim}")
        return Support.from_reasons(reasons)

    def forward_native(self, inputs, metadata):
        type(self).calls += 1
        return super().forward_native(inputs, metadata)


class GpuOnly(Fake):
    name = "gpuonly"
    aliases = ()
    platforms = ("gpu",)
    priority = {"gpu": 200}

    def is_available(self, hardware):
        if hardware.platform != "gpu":
            return Support.no("gpuonly needs a GPU")
        return Support.yes()


class Plugin:
    @jaxattn.hookimpl
    def jaxattn_register_backends(self):
        return [Fake(), GpuOnly()]


@pytest.fixture(autouse=True)
def fakes(monkeypatch):
    """Fake backends, on a pretend CPU machine (so the ranking is the same on a GPU)."""
    monkeypatch.delenv("JAXATTN_BACKEND", raising=False)
    reg = jaxattn.default_registry()
    reg.add_plugin(Plugin(), "fakes")
    Fake.calls = 0
    with jaxattn.hardware.override(Hardware.cpu()):
        yield
    reg.remove_plugin("fakes")


def qkv(d=32):
    rng = np.random.default_rng(0)
    return tuple(jnp.asarray(rng.standard_normal((2, 16, 2, d)), jnp.float32) for _ in range(3))


def test_auto_ranks_by_priority_and_reports_rejections():
    q, k, v = qkv()
    sel = jaxattn.select(q, k, v, is_causal=True)
    assert sel.name == "fake" and sel.source == "auto"
    assert sel.ranking[0] == "fake" and "xla" in sel.ranking  # other installed backends may rank between
    rejected = {r.backend: r.reasons for r in sel.rejected}
    assert rejected["gpuonly"] == ("gpuonly needs a GPU",)
    sel = jaxattn.select(q, k, v, sliding_window=4)
    assert sel.name == "xla"
    text = sel.explain()
    assert "rejected: fake" in text and "fake has no sliding window" in text
    assert "rejected: gpuonly" in text


def test_what_if_hardware_changes_the_choice():
    q, k, v = qkv()
    assert jaxattn.select(q, k, v, hardware=Hardware.nvidia()).name == "gpuonly"
    with jaxattn.hardware.override(Hardware.nvidia()):
        assert jaxattn.select(q, k, v).name == "gpuonly"
    assert jaxattn.select(q, k, v).name == "fake"


def test_forced_backend_by_name_alias_list_context_and_env(monkeypatch):
    q, k, v = qkv()
    assert jaxattn.select(q, k, v, backend="xla").name == "xla"
    assert jaxattn.select(q, k, v, backend="sdpa").name == "xla"
    assert jaxattn.select(q, k, v, backend="fake_alias").name == "fake"
    sel = jaxattn.select(q, k, v, sliding_window=2, backend=["fake", "xla"])
    assert sel.name == "xla" and sel.rejected[0].backend == "fake"
    with jaxattn.use_backend("xla"):
        assert jaxattn.select(q, k, v).source == "use_backend"
        assert jaxattn.select(q, k, v).name == "xla"
        assert jaxattn.select(q, k, v, backend="fake").name == "fake"  # the call wins
    monkeypatch.setenv("JAXATTN_BACKEND", "xla")
    assert jaxattn.select(q, k, v).name == "xla"
    assert jaxattn.select(q, k, v).source == "JAXATTN_BACKEND"
    with jaxattn.use_backend(["fake"]):
        assert jaxattn.select(q, k, v).name == "fake"  # context beats environment


def test_forced_backend_that_cannot_serve_is_an_error_never_a_fallback(monkeypatch):
    q, k, v = qkv(d=128)
    with pytest.raises(jaxattn.BackendUnavailableError,
                       match=r"backend= asked for fake .* fake cannot: fake needs head_dim <= 64, got 128"):
        jaxattn.attention(q, k, v, backend="fake")
    with pytest.raises(jaxattn.BackendUnavailableError, match="gpuonly needs a GPU"):
        jaxattn.attention(q, k, v, backend="gpuonly")
    with jaxattn.use_backend("fake"), pytest.raises(jaxattn.BackendUnavailableError, match="use_backend"):
        jaxattn.attention(q, k, v)
    monkeypatch.setenv("JAXATTN_BACKEND", "fake")
    with pytest.raises(jaxattn.BackendUnavailableError, match="JAXATTN_BACKEND"):
        jaxattn.attention(q, k, v)
    with pytest.raises(ValueError, match="no attention backend named 'nope'"):
        jaxattn.attention(q, k, v, backend="nope")


def test_paged_and_dense_ops_are_kept_apart():
    req = AttentionRequest(op="paged_attention", batch=2, q_len=2, kv_len=64)
    sel = jaxattn.select_request(req)
    assert sel.name == "xla" and sel.backend.op == "paged_attention"
    with pytest.raises(ValueError, match="'fake' implements attention, not paged_attention"):
        jaxattn.select_request(req, backend="fake")


def test_selection_runs_once_at_trace_time():
    q, k, v = qkv()
    f = jax.jit(lambda q, k, v: jaxattn.attention(q, k, v, is_causal=True))
    out1 = f(q, k, v)
    out2 = f(q + 1, k, v)
    assert Fake.calls == 1  # traced once: selection and dispatch do not run per call
    assert out1.shape == out2.shape


def test_no_usable_backend_is_an_error():
    class Nothing(OperationImpl):
        name, op, platforms = "nothing", "attention", ("cpu",)

        def supports(self, request, hardware):
            return Support.no("never")

        def forward_native(self, inputs, metadata):
            raise AssertionError("never selected")

    reg = jaxattn.Registry(group="jaxattn.no-such-group")
    reg.add_plugin(type("P", (), {"jaxattn_register_backends": jaxattn.hookimpl(lambda self: [Nothing()])})(), "n")
    from jaxattn.selector import select

    with pytest.raises(jaxattn.NoBackendError, match="nothing: never"):
        select(AttentionRequest(), Hardware.cpu(), registry=reg)


def test_tuning_cache_seam_puts_measured_backends_first():
    class Measured:
        def ranking(self, request, hardware):
            return ["xla"]

    q, k, v = qkv()
    jaxattn.set_tuning_cache(Measured())
    try:
        assert jaxattn.select(q, k, v).name == "xla"
    finally:
        jaxattn.set_tuning_cache(None)
    assert jaxattn.select(q, k, v).name == "fake"


def test_a_crashing_supports_marks_the_backend_broken():
    class Crashy(Fake):
        name, aliases = "crashy", ()

        def supports(self, request, hardware):
            raise RuntimeError("boom")

    reg = jaxattn.default_registry()
    reg.add_plugin(type("P", (), {"jaxattn_register_backends": jaxattn.hookimpl(lambda self: [Crashy()])})(), "crashy")
    try:
        q, k, v = qkv()
        sel = jaxattn.select(q, k, v)
        assert sel.name == "fake" and "crashy" not in [r.backend for r in sel.rejected]
        assert "broken:   backend crashy of plugin crashy (local 0) in supports(): RuntimeError: boom" in sel.explain()
        with pytest.raises(ValueError, match="attention backend 'crashy' is broken"):
            jaxattn.select(q, k, v, backend="crashy")
    finally:
        reg.remove_plugin("crashy")


def test_support_invariants():
    assert Support.from_reasons([]) and not Support.from_reasons(["x"])
    assert (Support.no("a") & Support.no("b")).reasons == ("a", "b")
    with pytest.raises(ValueError):
        Support(False)
    with pytest.raises(ValueError):
        Support(True, ("x",))


def test_request_carries_the_static_band_of_the_mask():
    q = jnp.ones((1, 8, 2, 16))
    k = jnp.ones((1, 16, 2, 16))
    from jaxattn.validation import build_attention_inputs

    def request(**kwargs):
        args = dict(bias=None, mask=None, scale=None, is_causal=False, sliding_window=None, segment_ids=None,
                    query_seq_lengths=None, key_value_seq_lengths=None, logits_soft_cap=None, sinks=None,
                    dropout_rate=0.0, dropout_rng=None, return_lse=False, metadata=jaxattn.OperationMetadata())
        args.update(kwargs)
        return AttentionRequest.from_inputs(build_attention_inputs(q, k, k, args.pop("bias"), args.pop("mask"), **args))

    assert request(is_causal=True).band == (None, 8)                    # bottom-right
    assert request(mask=jaxattn.CausalMask(0)).band == (None, 0)       # top-left
    assert request(is_causal=True, sliding_window=3).band == (5, 8)
    assert request(mask=jaxattn.ChunkedCausalMask(4)).chunk == (4, 8)
    assert request().band is None and request(mask=jaxattn.CausalMask() | jaxattn.FullMask()).band is None
