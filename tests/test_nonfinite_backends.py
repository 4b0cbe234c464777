"""Every backend that runs on CPU (kernels in the Pallas interpreter) agrees with `xla` on
fully masked rows and non-finite inputs (README "Semantics"), on seeded random problems.

Per mask, random values with NaN/inf injected at random places (a value of some key, a
query row, a key): the rows that come out non-finite must be the reference's, the finite
rows must match it, and a row that sees no key is zeros with an lse of -inf. Each case
compiles once per backend (the masks are fixed, only values vary), so this stays fast.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn import AttentionRequest, CausalMask, Hardware, OperationMetadata
from jaxattn.backends.xla import XlaAttention, XlaPagedAttention
from jaxattn.testing import assert_same_nonfinite, build_inputs, nonfinite_problem
from jaxattn_cudnn import CudnnAttention
from jaxattn_flash import FlashAttention
from jaxattn_flash import tpu as flash_tpu
from jaxattn_flash._testing import tiles
from jaxattn_ragged import RaggedPagedAttention
from jaxattn_ragged._testing import paged_problem

B, S, HQ, HKV, D = 2, 48, 4, 2, 32
SEGMENTS = np.repeat([[0] * 20 + [1] * 28], B, axis=0).astype(np.int32)
MASKS = {
    "causal": {"is_causal": True},
    "fully_masked_rows": {"mask": CausalMask(-12)},
    "segments_causal": {"is_causal": True, "segment_ids": jnp.asarray(SEGMENTS)},
    "kv_lengths": {"key_value_seq_lengths": jnp.array([21, 29]), "query_seq_lengths": jnp.array([48, 40])},
    "window": {"is_causal": True, "sliding_window": 10},
}
FLASH_META = OperationMetadata(operation_configs=tiles(16))
TPU_META = OperationMetadata(operation_configs=tiles(128))
SEEDS = (0, 1, 2)


def _problem(seed: int, bad_keys: bool = True) -> dict:
    return nonfinite_problem(seed, (B, S, HQ, HKV, D), bad_keys=bad_keys)


_agrees = assert_same_nonfinite


BACKENDS = {
    "flash_triton": (FlashAttention(interpret=True), Hardware.cpu(), FLASH_META),
    "flash_tpu": (FlashAttention(interpret=True), Hardware.tpu(), TPU_META),
    "cudnn_emulated": (CudnnAttention(emulate=True), Hardware.nvidia(), OperationMetadata()),
}
# cuDNN applies segment ids (and dense masks) as an additive bias: an inf in a key's vector
# survives it and reaches, as NaN, the rows those masks hide it from (README: a known limit).
ADDITIVE_MASKS = {("cudnn_emulated", "segments_causal")}


CASES = [(backend, mask) for backend in BACKENDS for mask in MASKS
         if backend != "flash_tpu" or mask in ("fully_masked_rows", "segments_causal", "kv_lengths")]  # CI time


@pytest.mark.parametrize("backend,mask", CASES)
def test_backend_agrees_with_xla_on_non_finite_inputs(backend, mask, monkeypatch):
    impl, hardware, metadata = BACKENDS[backend]
    monkeypatch.setattr(flash_tpu, "INTERPRETER", "generic")
    bad_keys = (backend, mask) not in ADDITIVE_MASKS
    inputs = [build_inputs("attention", {**_problem(seed, bad_keys), **MASKS[mask], "return_lse": True}, metadata)
              for seed in SEEDS]
    verdict = impl.supports(AttentionRequest.from_inputs(inputs[0], needs_grad=False), hardware)
    if not verdict:
        pytest.skip(f"{backend} does not serve {mask}: {verdict}")
    run = jax.jit(lambda x: impl(x, metadata, hardware))
    ref = jax.jit(lambda x: XlaAttention()(x, OperationMetadata(), Hardware.cpu()))
    for seed, x in zip(SEEDS, inputs):
        _agrees(*run(x), *ref(x), f"{backend} {mask} seed {seed}")


def test_backward_keeps_non_finite_values_to_the_rows_that_see_them():
    """Gradients of the rows that see no non-finite value are finite and match xla (flash, Triton)."""
    impl = FlashAttention(interpret=True)
    x = build_inputs("attention", {**_problem(0), **MASKS["segments_causal"]}, FLASH_META)
    bad_rows = ~np.isfinite(np.asarray(XlaAttention()(x, OperationMetadata(), Hardware.cpu())[0])).all(-1)
    weight = jnp.asarray(~bad_rows, jnp.float32)[..., None]  # the loss reads only the finite rows

    def grads(backend, meta):
        def loss(q, k, v):
            out, _ = backend(x.replace(query=q, key=k, value=v), meta, Hardware.cpu())
            return jnp.sum(jnp.where(weight > 0, out, 0.0) * weight)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x.query, x.key, x.value)

    got, want = grads(impl, FLASH_META), grads(XlaAttention(), OperationMetadata())
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        g, w = np.asarray(g), np.asarray(w)
        assert np.array_equal(np.isfinite(g), np.isfinite(w)), f"{name}: non-finite entries differ"
        np.testing.assert_allclose(g[np.isfinite(w)], w[np.isfinite(w)], rtol=1e-3, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("seed", [0])
def test_paged_kernel_agrees_with_xla_on_non_finite_cache_slots(seed):
    """The ragged kernel (interpreted): NaN/inf in written-but-invisible slots (a prefill's later
    keys) and in never-written ones reach no query that does not see them."""
    args = paged_problem(seed, [37, 20, 9], q_counts=[12, 1, 9], pad_tokens=2, spare_pages=2)
    rng = np.random.default_rng(seed)
    values = np.array(args["value_pages"])
    for _ in range(3):
        values[rng.integers(values.shape[0]), rng.integers(values.shape[1]), rng.integers(values.shape[2])] = np.nan
    args["value_pages"] = jnp.asarray(values)
    inputs = build_inputs("paged_attention", args, OperationMetadata())
    got, _ = RaggedPagedAttention(interpret=True)(inputs, OperationMetadata(), Hardware.cpu())
    want, _ = XlaPagedAttention()(inputs, OperationMetadata(), Hardware.cpu())
    got, want = np.asarray(got), np.asarray(want)
    assert np.array_equal(np.isfinite(got).all(-1), np.isfinite(want).all(-1))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("mask", ["segments_causal", "kv_lengths"])
def test_splash_agrees_with_xla_on_non_finite_inputs(mask):
    """jax's splash kernels (Pallas interpreter) under the value guard: one batch of 128 tokens
    (splash tiles by 128), the keys' masks of the cases above stretched to it."""
    from jaxattn_splash import SplashAttention

    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((1, 128, 2, 64)).astype(np.float32) for _ in range(3))
    v[0, 70, 0, 3] = np.nan  # after the first segment and past the first row's key length
    q[0, 5, 1] = np.nan
    extra = {"segments_causal": {"is_causal": True, "segment_ids": jnp.asarray([[0] * 64 + [1] * 64], jnp.int32)},
             "kv_lengths": {"key_value_seq_lengths": jnp.array([65]), "query_seq_lengths": jnp.array([120])}}[mask]
    meta = OperationMetadata(operation_configs={"splash": {"use_fused_bwd_kernel": True}})
    x = build_inputs("attention", {"query": jnp.asarray(q), "key": jnp.asarray(k), "value": jnp.asarray(v),
                                   **extra, "return_lse": True}, meta)
    got = jax.jit(lambda x: SplashAttention(interpret=True)(x, meta, Hardware.cpu()))(x)
    _agrees(*got, *XlaAttention()(x, OperationMetadata(), Hardware.cpu()), f"splash {mask}")
