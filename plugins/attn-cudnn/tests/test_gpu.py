"""GPU tests of the cudnn backend: the conformance suite and translations beyond it.

Run on a CUDA machine: `pytest -m gpu plugins/attn-cudnn/tests/test_gpu.py -s`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import CausalMask, DenseMask, Hardware, OperationMetadata, SlidingWindowMask
from jaxattn.backends.xla import XlaAttention
from jaxattn.testing import build_inputs, relative_error, run_conformance
from jaxattn_cudnn import CudnnAttention, _compat

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU"),
]

# What the cudnn backend claims; a rejection of any of these fails the suite.
EXPECTED = ["full", "causal", "gqa", "mqa", "sliding_window", "segment_ids", "seq_lengths", "bias",
            "bool_mask", "fully_masked_rows", "return_lse", "decode"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_conformance(dtype: str) -> None:
    report = run_conformance("cudnn", dtypes=[dtype], grads=True, expect_supported=EXPECTED)
    print(report.table())
    report.assert_ok()


def _normal(key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _ref(q, k, v, causal_hi):
    qf, kf, vf = (x.astype(jnp.float32) for x in (q, k, v))
    s = jnp.einsum("bqhd,bkhd->bhqk", qf, kf, precision="highest") / np.sqrt(q.shape[-1])
    d = jnp.arange(k.shape[1])[None, :] - jnp.arange(q.shape[1])[:, None]
    s = jnp.where(d <= causal_hi, s, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), vf, precision="highest")


def test_causal_alignment_matches_compat() -> None:
    """cuDNN's CAUSAL on q_len < kv_len is aligned as _compat.CAUSAL_ALIGNMENT says."""
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    q = _normal(ks[0], (1, 64, 2, 64), jnp.bfloat16)
    k = _normal(ks[1], (1, 128, 2, 64), jnp.bfloat16)
    v = _normal(ks[2], (1, 128, 2, 64), jnp.bfloat16)
    out, _ = _compat.fused_attention(q, k, v, None, None, None, scale=1 / 8, causal=True, window=None,
                                     return_lse=False)
    top_left = relative_error(out, _ref(q, k, v, 0))
    bottom_right = relative_error(out, _ref(q, k, v, 64))
    print(f"cuDNN causal q=64 kv=128: err vs top-left {top_left:.2e}, vs bottom-right {bottom_right:.2e}")
    found = "top_left" if top_left < bottom_right else "bottom_right"
    assert found == _compat.CAUSAL_ALIGNMENT


def _extra_cases(key: jax.Array, dtype) -> dict[str, dict]:
    ks = jax.random.split(key, 8)
    b, h, d = 2, 4, 64

    def qkv(sq, sk, hkv=h):
        return {"query": _normal(ks[0], (b, sq, h, d), dtype), "key": _normal(ks[1], (b, sk, hkv, d), dtype),
                "value": _normal(ks[2], (b, sk, hkv, d), dtype)}

    head_mask = jax.random.bernoulli(ks[3], 0.5, (1, h, 128, 128)).at[:, 1, 5].set(False)
    return {
        "causal_top_left_q_lt_kv": {**qkv(64, 128), "mask": CausalMask(0)},
        "causal_q_gt_kv": {**qkv(128, 64), "is_causal": True, "return_lse": True},
        "window_padding": {**qkv(128, 128), "is_causal": True, "sliding_window": 16,
                           "query_seq_lengths": jnp.array([128, 77], jnp.int32),
                           "key_value_seq_lengths": jnp.array([50, 128], jnp.int32)},
        "decode_window": {**qkv(1, 256, 2), "is_causal": True, "sliding_window": 40},
        "head_mask_empty_rows": {**qkv(128, 128), "mask": DenseMask(head_mask), "return_lse": True},
        "asym_window_with_mask": {**qkv(128, 128), "mask": SlidingWindowMask(16, 8) & DenseMask(head_mask)},
        "empty_band": {**qkv(32, 32), "mask": CausalMask(-40), "return_lse": True},
    }


@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_translations_beyond_conformance(dtype: str) -> None:
    """Masks the request-level check cannot see (offsets) and combinations, against xla."""
    impl, ref = CudnnAttention(), XlaAttention()
    hw = Hardware.nvidia()
    md = OperationMetadata()
    failures = []
    for name, args in _extra_cases(jax.random.PRNGKey(1), jnp.dtype(dtype)).items():
        inputs = build_inputs("attention", args, md)
        out, lse = jax.jit(lambda x: impl(x, md, hw))(inputs)
        f32 = inputs.replace(query=inputs.query.astype(jnp.float32), key=inputs.key.astype(jnp.float32),
                             value=inputs.value.astype(jnp.float32), return_lse=True)
        r_out, r_lse = jax.jit(lambda x: ref(x, md, Hardware.cpu()))(f32)
        err = relative_error(out, r_out)
        line = f"{name:26s} out={err:.1e}"
        if inputs.return_lse:
            fin = np.isfinite(np.asarray(r_lse))
            ok_inf = bool(np.all(np.asarray(lse)[~fin] == -np.inf))
            lerr = relative_error(np.asarray(lse)[fin], np.asarray(r_lse)[fin])
            line += f" lse={lerr:.1e} empty_rows_-inf={ok_inf}"
            if lerr > 1e-2 or not ok_inf:
                failures.append(line)
        print(line)
        if err > 1e-2:
            failures.append(line)
    assert not failures, "\n".join(failures)


NONFINITE_MASKS = {
    "causal": {"is_causal": True},
    "fully_masked_rows": {"mask": CausalMask(-20)},
    "window": {"is_causal": True, "sliding_window": 30},
    "segments_causal": {"is_causal": True,
                        "segment_ids": jnp.asarray(np.repeat([[0] * 50 + [1] * 78], 2, axis=0), jnp.int32)},
    "kv_lengths": {"key_value_seq_lengths": jnp.array([45, 100]), "query_seq_lengths": jnp.array([128, 90])},
}


@pytest.mark.parametrize("mask", list(NONFINITE_MASKS))
def test_non_finite_inputs_follow_the_semantics(mask: str) -> None:
    """NaN/inf in values of masked keys reach no other row (the value guard around cuDNN);
    non-finite logits propagate. Segment ids go to cuDNN as an additive bias, which an inf key
    survives (README), so that case keeps the keys finite."""
    from jaxattn.testing import assert_same_nonfinite, nonfinite_problem

    for seed in range(3):
        args = nonfinite_problem(seed, (2, 128, 4, 2, 64), dtype=jnp.bfloat16, bad_keys=mask != "segments_causal")
        got = jaxattn.attention(**args, **NONFINITE_MASKS[mask], return_lse=True, backend="cudnn",
                                metadata=OperationMetadata(mode="prefill"))
        ref = {name: x.astype(jnp.float32) for name, x in args.items()}
        want = jaxattn.attention(**ref, **NONFINITE_MASKS[mask], return_lse=True, backend="xla")
        assert_same_nonfinite(*got, *want, f"cudnn {mask} seed {seed}", rtol=3e-2, atol=3e-2)
