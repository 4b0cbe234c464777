"""The translation of jaxattn inputs into cuDNN arguments is exact (CPU only).

Each case is translated to the arguments the backend would pass to cuDNN; those are
evaluated by `emulate_cudnn` (plain jax.numpy, cuDNN's mask semantics) and finished,
then compared with the `xla` backend in float32 (tolerance 1e-4), forward and, for a
selection, gradients. Plus unit tests of the band planning.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn import (
    CausalMask,
    ChunkedCausalMask,
    DenseMask,
    Hardware,
    OperationMetadata,
    SegmentMask,
    SlidingWindowMask,
)
from jaxattn.backends.xla import XlaAttention
from jaxattn.testing import build_inputs, lse_error, relative_error
from jaxattn_cudnn import BandPlan, CudnnAttention, Untranslatable, plan_band, translate
from jaxattn_cudnn._compat import mask_value

TOL = 1e-4
MD = OperationMetadata()
EMU = CudnnAttention(emulate=True)
REF = XlaAttention()
B, H, D = 2, 4, 8


# -- band planning (pure Python) ---------------------------------------------------------

@pytest.mark.parametrize("lo, hi, q, kv, want", [
    (None, None, 16, 16, BandPlan(0, 16, 0, 16)),
    (None, 0, 16, 16, BandPlan(0, 16, 0, 16, None, 0, causal=True)),
    (-4, 0, 16, 16, BandPlan(0, 16, 0, 16, -4, 0, causal=True, window=5)),
    (None, 15, 1, 16, BandPlan(0, 1, 0, 16)),  # decode: bottom-right causal is no mask at all
    (11, 15, 1, 16, BandPlan(0, 1, 11, 16)),  # decode with a window: keys sliced
    (None, 0, 8, 16, BandPlan(0, 8, 0, 8, None, 0, causal=True)),  # CausalMask(0), q < kv: keys sliced
    (None, -8, 16, 8, BandPlan(8, 16, 0, 8, None, 0, causal=True)),  # bottom-right, q > kv: rows sliced
    (None, -3, 16, 16, BandPlan(3, 16, 0, 13, None, 0, causal=True)),  # CausalMask(-3)
    (None, 0, 16, 8, BandPlan(0, 16, 0, 8, None, 0, causal=True)),  # top-left q > kv
    (5, 2, 16, 16, BandPlan(0, 0, 0, 0, empty=True)),
    (None, -16, 16, 16, BandPlan(0, 0, 0, 0, empty=True)),
    (-100, 100, 16, 16, BandPlan(0, 16, 0, 16)),  # bounds that exclude nothing are dropped
])
def test_plan_band(lo, hi, q, kv, want) -> None:
    assert plan_band(lo, hi, q, kv) == want


@pytest.mark.parametrize("lo, hi, q, kv", [(None, 8, 8, 16), (-4, 2, 16, 16), (-4, None, 16, 16)])
def test_plan_band_untranslatable(lo, hi, q, kv) -> None:
    with pytest.raises(Untranslatable, match="cannot express"):
        plan_band(lo, hi, q, kv)
    assert plan_band(lo, hi, q, kv, bias_available=True).in_bias


# -- translated arguments -----------------------------------------------------------------

def _qkv(key, sq=32, sk=32, hkv=H, dv=D, dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"query": jax.random.normal(k1, (B, sq, H, D), dtype),
            "key": jax.random.normal(k2, (B, sk, hkv, D), dtype),
            "value": jax.random.normal(k3, (B, sk, hkv, dv), dtype)}


def test_plain_causal_passes_inputs_through() -> None:
    """No slicing, no bias, no where: the call is exactly jax.nn's cuDNN call (zero overhead)."""
    inputs = build_inputs("attention", {**_qkv(jax.random.PRNGKey(0)), "is_causal": True}, MD)
    call = translate(inputs)
    assert call.causal and call.window is None and call.bias is None and call.q_seqlen is None
    assert call.query is inputs.query and call.key is inputs.key and call.value is inputs.value
    assert call.row_visible is None
    decode = translate(build_inputs("attention", {**_qkv(jax.random.PRNGKey(0), sq=1), "is_causal": True}, MD))
    assert not decode.causal and decode.key is not None and decode.key.shape[1] == 32


def test_window_and_mask_arguments() -> None:
    args = _qkv(jax.random.PRNGKey(1), dtype=jnp.bfloat16)
    call = translate(build_inputs("attention", {**args, "is_causal": True, "sliding_window": 6}, MD))
    assert call.causal and call.window == 7  # cuDNN: j > i - window
    ids = jnp.repeat(jnp.arange(4), 8)[None].repeat(B, 0)
    call = translate(build_inputs("attention", {**args, "segment_ids": ids}, MD))
    assert call.bias.shape == (B, 1, 32, 32) and call.bias.dtype == jnp.bfloat16
    assert set(np.unique(np.asarray(call.bias, np.float32))) == {0.0, mask_value(jnp.bfloat16)}


def test_untranslatable_inputs_raise() -> None:
    args = _qkv(jax.random.PRNGKey(2))
    # what only the mask's exact form decides: translate says why
    for extra in ({"mask": SlidingWindowMask(2, 2) | CausalMask(0)}, {"sliding_window": (4, 2)}):
        with pytest.raises(Untranslatable):
            translate(build_inputs("attention", {**args, **extra}, MD))
    # what the declared capabilities exclude: the core's check, before the forward runs
    for extra in ({"mask": ChunkedCausalMask(8)}, {"logits_soft_cap": 5.0}, {"sinks": jnp.zeros(H)},
                  {"dropout_rate": 0.1, "dropout_rng": jax.random.PRNGKey(0)}, {"sliding_window": (4, 2)}):
        with pytest.raises(ValueError, match="cudnn cannot serve"):
            EMU(build_inputs("attention", {**args, **extra}, MD), MD, Hardware.cpu())


# -- exactness against xla ------------------------------------------------------------------

def _cases(key):
    ks = jax.random.split(key, 8)
    dense = jax.random.bernoulli(ks[1], 0.6, (B, 1, 32, 32))
    head_dense = jax.random.bernoulli(ks[2], 0.5, (1, H, 32, 32)).at[:, 2, 3].set(False)
    seg = jnp.asarray(np.repeat([[0, 1, 2, 3]], B, 0).repeat(8, 1))
    seg_kv = jnp.asarray(np.repeat([[0, 1, 2, 5]], B, 0).repeat(8, 1))  # segment 3 of q sees no key
    bias = jax.random.normal(ks[3], (B, H, 32, 32))
    lens = {"query_seq_lengths": jnp.array([32, 19]), "key_value_seq_lengths": jnp.array([11, 32])}
    qkv = lambda **kw: _qkv(ks[0], **kw)  # noqa: E731
    return {
        "causal": {**qkv(), "is_causal": True},
        "gqa_causal": {**qkv(hkv=2), "is_causal": True},
        "mqa": qkv(hkv=1),
        "window": {**qkv(), "is_causal": True, "sliding_window": 5},
        "window_left_only": {**qkv(), "sliding_window": (5, 0)},
        "causal_q_gt_kv": {**qkv(sq=32, sk=16), "is_causal": True},
        "causal_top_left_q_lt_kv": {**qkv(sq=16, sk=32), "mask": CausalMask(0)},
        "causal_offset_negative": {**qkv(), "mask": CausalMask(-5)},
        "empty_band": {**qkv(), "mask": CausalMask(-40)},
        "decode_causal": {**qkv(sq=1), "is_causal": True},
        "decode_window": {**qkv(sq=1), "is_causal": True, "sliding_window": 9},
        "seq_lengths": {**qkv(), **lens},
        "seq_lengths_causal_window": {**qkv(), **lens, "is_causal": True, "sliding_window": 4},
        "kv_length_zero": {**qkv(), "key_value_seq_lengths": jnp.array([0, 20]), "is_causal": True},
        "segments_causal": {**qkv(), "is_causal": True, "segment_ids": seg},
        "segments_unmatched": {**qkv(), "mask": SegmentMask(seg, seg_kv)},
        "dense_causal": {**qkv(), "is_causal": True, "mask": dense},
        "dense_per_head_empty_row": {**qkv(), "mask": DenseMask(head_dense)},
        "dense_broadcast_kv": {**qkv(), "mask": (jnp.arange(32) < 20)[None, :]},
        "bias_broadcast": {**qkv(), "bias": bias[:1, :, :1, :], "is_causal": True},
        "bias_and_dense": {**qkv(), "bias": bias, "mask": dense},
        "asym_window_in_bias": {**qkv(), "sliding_window": (6, 3), "mask": dense},
        "q_lt_kv_causal_in_bias": {**qkv(sq=16, sk=32), "is_causal": True, "mask": dense[:, :, :16]},
        "value_head_dim": {**qkv(dv=2 * D), "is_causal": True},
    }


CASES = _cases(jax.random.PRNGKey(3))
GRAD_CASES = ["gqa_causal", "causal_offset_negative", "seq_lengths_causal_window", "kv_length_zero",
              "segments_unmatched", "dense_per_head_empty_row", "bias_broadcast"]


def _run(impl, inputs):
    if impl is EMU:  # many small ops: one compilation beats op-by-op dispatch
        return jax.jit(lambda x: impl(x, MD, Hardware.cpu()))(inputs)
    return impl(inputs, MD, Hardware.cpu())


@pytest.mark.parametrize("name", sorted(set(CASES) - set(GRAD_CASES)))
def test_forward_matches_xla(name: str) -> None:
    inputs = build_inputs("attention", {**CASES[name], "return_lse": True}, MD)
    out, lse = _run(EMU, inputs)
    r_out, r_lse = _run(REF, inputs)
    assert relative_error(out, r_out) < TOL
    assert lse_error(lse, r_lse) < TOL
    assert np.all(np.isfinite(np.asarray(out)))


@pytest.mark.parametrize("name", GRAD_CASES)
def test_gradients_match_xla(name: str) -> None:
    inputs = build_inputs("attention", CASES[name], MD)
    primals = {n: getattr(inputs, n) for n in ("query", "key", "value", "bias") if getattr(inputs, n) is not None}
    d_out = jax.random.normal(jax.random.PRNGKey(9), inputs.query.shape[:3] + inputs.value.shape[-1:])

    def grads(impl):
        def f(p):
            return impl(inputs.replace(**p), MD, Hardware.cpu())[0]
        return jax.jit(lambda p: jax.vjp(f, p)[1](d_out)[0])(primals)

    out, _ = _run(EMU, inputs)
    assert relative_error(out, _run(REF, inputs)[0]) < TOL
    got, ref = grads(EMU), grads(REF)
    for n in primals:
        assert np.all(np.isfinite(np.asarray(got[n]))), n
        assert relative_error(got[n], ref[n]) < TOL, n
