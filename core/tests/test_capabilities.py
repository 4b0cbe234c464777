"""Limits declared once: `Capabilities` give the default `supports()` its standard reasons,
`extra_reasons()` the rest; calling a backend checks support before its forward runs."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

import jaxattn
from jaxattn import FEATURES, AttentionRequest, Capabilities, Hardware, OperationMetadata, Support
from jaxattn.backends.xla import XlaAttention
from jaxattn.faults import declaration_problems
from jaxattn.testing import build_inputs


class Declared(XlaAttention):
    """The xla math behind declared limits."""

    name = "declared"
    capabilities = Capabilities(
        dtypes=("bfloat16", "float32"), same_dtype=True, max_head_dim=64, head_dim_multiple=8,
        mask_kinds=frozenset({"causal", "sliding_window"}), features=frozenset(FEATURES) - {"bias", "sinks"},
        notes={"bias": "use xla"},
    )

    def extra_reasons(self, request, hardware):
        return ["declared needs q_len >= 4"] if request.q_len < 4 else []


def test_standard_reasons_come_from_the_declaration():
    impl = Declared()
    assert impl.supports(AttentionRequest(dtype="float32", kv_dtype="float32", q_len=8), Hardware.cpu())
    verdict = impl.supports(AttentionRequest(
        dtype="float16", kv_dtype="float32", head_dim=100, value_head_dim=100, q_len=2, has_bias=True,
        has_sinks=True, mask_kinds=frozenset({"causal", "segment", "or"})), Hardware.cpu())
    assert list(verdict.reasons) == [
        "declared takes bfloat16 or float32 inputs, not float16",
        "declared needs key/value in the query's dtype (float16), got float32",
        "declared supports head_dim up to 64 (got 100/100)",
        "declared needs head dims that are multiples of 8, got head_dim=100",
        "declared needs head dims that are multiples of 8, got value_head_dim=100",
        "declared cannot apply masks combined with `|` (only `&`)",
        "declared cannot apply segment ids",
        "declared has no additive bias (use xla)",
        "declared has no attention sinks",
        "declared needs q_len >= 4",
    ]
    assert "implements attention, not paged_attention" in str(impl.supports(AttentionRequest(
        op="paged_attention"), Hardware.cpu()))


def test_calling_a_backend_checks_support_first():
    q = jnp.ones((1, 8, 2, 16))
    meta = OperationMetadata()
    inputs = build_inputs("attention", {"query": q, "key": q, "value": q, "bias": jnp.zeros((8, 8))}, meta)
    with pytest.raises(ValueError, match="declared cannot serve .* declared has no additive bias"):
        Declared()(inputs, meta, Hardware.cpu())
    with pytest.raises(ValueError, match="has no additive bias"):
        jaxattn.attention(q, q, q, bias=jnp.zeros((8, 8)), backend=_registered(Declared()))


def _registered(impl):
    reg = jaxattn.default_registry()
    reg.add_plugin(type("P", (), {"jaxattn_register_backends": jaxattn.hookimpl(lambda self: [impl])})(), impl.name)
    return impl.name


def test_a_backend_declares_capabilities_or_implements_supports():
    class Neither(jaxattn.OperationImpl):
        name, platforms = "neither", ("cpu",)

        def forward_native(self, inputs, metadata):
            return None

    class OwnSupports(Neither):
        name = "own"

        def supports(self, request, hardware):
            return Support.yes()

    assert "supports() is not implemented (and no capabilities are declared)" in declaration_problems(Neither())
    assert not declaration_problems(OwnSupports()) and not declaration_problems(Declared())
    with pytest.raises(ValueError, match="unknown features"):
        Capabilities(features=frozenset({"bias", "telepathy"}))


@pytest.fixture(autouse=True)
def _cleanup():
    yield
    jaxattn.default_registry().remove_plugin("declared")
