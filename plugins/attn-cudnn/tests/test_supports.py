"""supports() / is_available() verdicts of the cudnn backend for injected hardware (CPU only)."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from jaxattn import AttentionRequest, Hardware, list_backends, select
from jaxattn_cudnn import CudnnAttention
from jaxattn_cudnn.capabilities import version_str

IMPL = CudnnAttention()
H100 = Hardware.nvidia((9, 0), 91900)
A100 = Hardware.nvidia((8, 0), 90800, device_kind="NVIDIA A100-SXM4-80GB")
T4 = Hardware.nvidia((7, 5), 90800, device_kind="Tesla T4")


def req(**kw) -> AttentionRequest:
    base = dict(batch=2, q_len=1024, kv_len=1024, num_q_heads=8, num_kv_heads=8, head_dim=128,
                value_head_dim=128, dtype="bfloat16", kv_dtype="bfloat16", mask_kinds=frozenset({"causal"}),
                needs_grad=True)
    base.update(kw)
    if "band" not in kw and "causal" in base["mask_kinds"]:  # what is_causal=True builds: bottom-right
        base["band"] = (None, base["kv_len"] - base["q_len"])
    if "head_dim" in kw and "value_head_dim" not in kw:
        base["value_head_dim"] = kw["head_dim"]
    return AttentionRequest(**base)


def verdict(request: AttentionRequest, hw: Hardware) -> tuple[bool, str]:
    s = IMPL.is_available(hw) & IMPL.supports(request, hw)
    return s.ok, "; ".join(s.reasons)


def test_cpu_not_usable_with_reason() -> None:
    ok, why = verdict(req(), Hardware.cpu())
    assert not ok and "NVIDIA GPU" in why and "cpu" in why
    info = {b.name: b for b in list_backends(Hardware.cpu()) if b.op == "attention"}
    assert "cudnn" in info and not info["cudnn"].usable
    assert "NVIDIA GPU" in info["cudnn"].reason
    with pytest.raises(RuntimeError, match="NVIDIA"):
        IMPL.forward_native(None, None)


@pytest.mark.parametrize("hw, ok, fragment", [
    (T4, False, "compute capability >= 8.0"),
    (A100, True, ""),
    (H100, True, ""),
    (Hardware.nvidia((9, 0), 8600), False, "cuDNN 8.6.0 has no fused flash attention"),
    (Hardware.nvidia((9, 0), 8904), True, ""),
    (Hardware.nvidia((9, 0), None), False, "no cuDNN"),
    (Hardware.nvidia((10, 3), 91000), False, "10.3 needs cuDNN >= 9.11.0"),
    (Hardware.nvidia((10, 3), 91100), True, ""),
    (Hardware(platform="gpu", device_kind="AMD MI300X", gpu_vendor="amd"), False, "NVIDIA GPU"),
    (Hardware.tpu(), False, "NVIDIA GPU"),
])
def test_hardware(hw: Hardware, ok: bool, fragment: str) -> None:
    got, why = verdict(req(), hw)
    assert got == ok, why
    assert fragment in why


@pytest.mark.parametrize("hw, head_dim, ok", [
    (A100, 128, True), (A100, 256, False), (H100, 256, True), (H100, 264, False), (H100, 100, False),
    (T4, 64, False),
])
def test_head_dim_limits(hw: Hardware, head_dim: int, ok: bool) -> None:
    got, why = verdict(req(head_dim=head_dim), hw)
    assert got == ok, why
    if not ok and hw is not T4:
        assert "head_dim a multiple of 8 and at most" in why


@pytest.mark.parametrize("hw, ok", [
    (Hardware.nvidia((9, 0), 90800), False), (Hardware.nvidia((9, 0), 91000), True), (A100.with_(cudnn_version=91900), False),
])
def test_value_head_dim_differs(hw: Hardware, ok: bool) -> None:
    got, why = verdict(req(head_dim=64, value_head_dim=128), hw)
    assert got == ok, why
    if not ok:
        assert "value head_dim != head_dim needs cuDNN >= 9.10.0" in why


@pytest.mark.parametrize("version, ok", [(90100, False), (90200, True)])
def test_sliding_window_needs_cudnn_9_2(version: int, ok: bool) -> None:
    got, why = verdict(req(mask_kinds=frozenset({"causal", "sliding_window"}), band=(-128, 0)),
                       Hardware.nvidia((9, 0), version))
    assert got == ok, why
    if not ok:
        assert "sliding window needs cuDNN >= 9.2.0" in why


def test_exact_band_lets_a_top_left_causal_mask_through() -> None:
    # CausalMask(0) with q_len < kv_len: the band (None, 0) is cuDNN's own after slicing keys.
    got, why = verdict(req(q_len=512, band=(None, 0)), H100)
    assert got, why
    # the bottom-right causal mask of the same shape is not
    got, why = verdict(req(q_len=512, band=(None, 512)), H100)
    assert not got and "aligned top-left" in why


@pytest.mark.parametrize("changes, fragment", [
    (dict(dtype="float32", kv_dtype="float32"), "float16 or bfloat16"),
    (dict(kv_dtype="float16"), "key/value in the query's dtype"),
    (dict(logits_soft_cap=True), "soft-cap"),
    (dict(has_sinks=True), "sinks"),
    (dict(dropout=True), "seed fixed at compile time"),
    (dict(return_lse=True), "cotangent of the softmax statistics"),
    (dict(mask_kinds=frozenset({"or", "causal", "sliding_window"})), "combined with `|`"),
    (dict(mask_kinds=frozenset({"chunked_causal"})), "chunked-causal"),
    (dict(mask_kinds=frozenset({"query_positions"})), "a position per query"),
    (dict(q_len=512), "aligned top-left"),
    (dict(mask_kinds=frozenset({"sliding_window"}), band=(-128, 128)), "-128 <= j - i <= 128"),
    (dict(has_bias=True, q_len=1023, kv_len=1023), "even q_len and kv_len"),
    (dict(op="paged_attention"), "paged_attention"),
])
def test_request_rejections(changes: dict, fragment: str) -> None:
    got, why = verdict(req(**changes), H100)
    assert not got
    assert fragment in why


@pytest.mark.parametrize("changes", [
    dict(),  # causal, training
    dict(mask_kinds=frozenset()),
    dict(dtype="float16", kv_dtype="float16"),
    dict(num_kv_heads=2), dict(num_kv_heads=1),  # GQA, MQA
    dict(mask_kinds=frozenset({"causal", "sliding_window"})),
    dict(q_len=1, kv_len=8192, needs_grad=False, mode="decode"),  # decode: every band is expressible
    dict(q_len=1, kv_len=8192, needs_grad=False, mode="decode", mask_kinds=frozenset({"causal", "sliding_window"})),
    dict(q_len=2048, kv_len=1024),  # bottom-right causal with q_len > kv_len: rows are sliced
    dict(q_len=512, mask_kinds=frozenset({"causal", "dense"})),  # the band joins the mask's bias
    dict(mask_kinds=frozenset({"sliding_window", "segment"})),
    dict(mask_kinds=frozenset({"causal", "segment"})),
    dict(has_bias=True), dict(mask_kinds=frozenset({"dense"})),
    dict(q_seq_lengths=True, kv_seq_lengths=True),
    dict(return_lse=True, needs_grad=False, mode="prefill"),
    dict(has_bias=True, q_len=1023, kv_len=1023, needs_grad=False, mode="prefill"),
])
def test_request_accepted(changes: dict) -> None:
    got, why = verdict(req(**changes), H100)
    assert got, why


def test_all_reasons_are_collected() -> None:
    s = IMPL.supports(req(dtype="float32", kv_dtype="float32", logits_soft_cap=True, has_sinks=True), T4)
    assert not s.ok and len(s.reasons) >= 4


def test_version_str() -> None:
    assert version_str(90800) == "9.8.0" and version_str(8904) == "8.9.4" and version_str(91100) == "9.11.0"


def test_auto_selection_on_injected_h100() -> None:
    x = jnp.zeros((1, 256, 4, 64), jnp.bfloat16)
    sel = select(x, x, x, is_causal=True, hardware=H100)
    assert sel.name == "cudnn"
    capped = select(x, x, x, is_causal=True, logits_soft_cap=30.0, hardware=H100)
    assert capped.name != "cudnn" and "soft-cap" in capped.explain()
    assert select(x, x, x, is_causal=True, hardware=Hardware.cpu()).name != "cudnn"
