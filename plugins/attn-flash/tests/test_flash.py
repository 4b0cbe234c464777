"""CPU tests of the flash backend: its kernels in the Pallas interpreter, its declarations.

The conformance suite (every case, forward and gradients) runs the same Pallas kernels
that the GPU compiles through Triton, here through `interpret=True`, with blocks of 32
so that every mask has empty, full and partial tiles.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import jaxattn
from jaxattn import Hardware, OperationMetadata
from jaxattn.testing import Shape, run_conformance
from jaxattn_flash import FlashAttention
from jaxattn_flash import config as flash_config
from jaxattn_flash._testing import DECLARED, REJECTED, tiles
from jaxattn_flash._testing import request as _request

SMALL_BLOCKS = tiles(32)


def test_conformance_float32_interpret():
    report = run_conformance(
        FlashAttention(interpret=True), hardware=Hardware.cpu(), dtypes=["float32"],
        cases=DECLARED + REJECTED, expect_supported=DECLARED,
        metadata=OperationMetadata(operation_configs=SMALL_BLOCKS),
    )
    print(report.table())
    report.assert_ok()
    assert {r.case for r in report.results if r.status == "rejected"} == set(REJECTED)
    assert all(r.backward for r in report.results if r.status == "pass" and r.case != "decode")


def test_conformance_bfloat16_interpret():
    report = run_conformance(
        FlashAttention(interpret=True), hardware=Hardware.cpu(), dtypes=["bfloat16"],
        cases=["gqa", "segment_ids"], expect_supported="*",
        metadata=OperationMetadata(operation_configs=SMALL_BLOCKS),
        shape=Shape(batch=1, seq=128, num_heads=4, head_dim=64),
    )
    print(report.table())
    report.assert_ok()


def test_odd_lengths_default_blocks_and_padded_head_dim():
    """q_len/kv_len not multiples of any block, head_dim 40 (padded to 64), default tiles."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(3), 3)
    q = jax.random.normal(k1, (1, 100, 4, 40), jnp.float32)
    k = jax.random.normal(k2, (1, 150, 2, 40), jnp.float32)
    v = jax.random.normal(k3, (1, 150, 2, 40), jnp.float32)
    impl = FlashAttention(interpret=True)
    md = OperationMetadata()
    inputs = jaxattn.validation.build_attention_inputs(
        q, k, v, None, None, metadata=md, scale=None, is_causal=True, sliding_window=(30, 0),
        segment_ids=None, query_seq_lengths=None, key_value_seq_lengths=None, logits_soft_cap=None,
        sinks=None, dropout_rate=0.0, dropout_rng=None, return_lse=True)
    out, lse = impl(inputs, md, Hardware.cpu())
    ref, ref_lse = jaxattn.attention(q, k, v, is_causal=True, sliding_window=(30, 0), return_lse=True, backend="xla")
    assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) < 1e-5
    assert float(jnp.max(jnp.abs(lse - ref_lse))) < 1e-4


# -- declarations ---------------------------------------------------------------------------


def test_registered_instance_not_usable_on_cpu():
    impl = jaxattn.default_registry().get("flash", "attention")
    assert isinstance(impl, FlashAttention) and not impl.interpret
    assert jaxattn.default_registry().get("flash_attn2", "attention") is impl
    verdict = impl.supports(_request(), Hardware.cpu())
    assert not verdict and "flash needs a GPU or TPU" in str(verdict)
    assert "flash needs a GPU or TPU" in str(impl.is_available(Hardware.cpu()))


def test_supports_on_gpus():
    impl = FlashAttention()
    h100 = Hardware.nvidia()
    assert impl.supports(_request(), h100)
    for kinds in ({"sliding_window", "causal"}, {"chunked_causal"}, {"segment", "causal"}, frozenset()):
        assert impl.supports(_request(mask_kinds=frozenset(kinds)), h100)
    assert impl.supports(_request(dtype="float32", kv_dtype="float32", head_dim=96, value_head_dim=96,
                                  logits_soft_cap=True, has_sinks=True, q_seq_lengths=True,
                                  kv_seq_lengths=True, return_lse=True), h100)
    old = Hardware.nvidia(compute_capability=(7, 5))
    assert "compute capability" in str(impl.supports(_request(), old))
    amd = Hardware(platform="gpu", device_kind="MI300", gpu_vendor="amd")
    assert "NVIDIA" in str(impl.supports(_request(), amd))


def test_supports_collects_every_reason():
    impl = FlashAttention()
    verdict = impl.supports(_request(has_bias=True, dropout=True, mask_kinds=frozenset({"dense", "or", "query_positions"}),
                                     head_dim=512, dtype="float64", kv_dtype="float16"), Hardware.nvidia())
    text = str(verdict)
    for word in ("bias", "dropout", "dense", "`|`", "head_dim", "float64", "key/value", "position per query"):
        assert word in text, word


def test_selectable_on_an_h100_not_with_bias():
    q = jnp.ones((1, 256, 4, 64), jnp.bfloat16)
    h100 = Hardware.nvidia()
    assert jaxattn.select(q, q, q, is_causal=True, hardware=h100, backend="flash").backend.name == "flash"
    explained = jaxattn.explain(q, q, q, bias=jnp.ones((1, 4, 256, 256), jnp.bfloat16), hardware=h100)
    assert "flash has no additive bias" in explained


def test_config_resolution():
    tiles = flash_config.resolve({}, 128, 4096, 4096)
    assert tiles["fwd"].block_q == flash_config.DEFAULTS[128]["fwd"][0]
    tiles = flash_config.resolve({"block_q": 64, "num_warps_dkv": 2}, 64, 20, 4096)
    assert tiles["fwd"].block_q == 32  # clipped to the padded sequence
    assert tiles["dkv"].num_warps == 2
    with pytest.raises(ValueError, match="unknown keys"):
        flash_config.resolve({"blockq": 64}, 64, 128, 128)
    with pytest.raises(ValueError, match="power of two"):
        flash_config.resolve({"block_kv": 48}, 64, 128, 128)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_conformance_gpu():
    # Every case compiles its own kernels (3-18 s each on an H100): the whole matrix in
    # bfloat16, the other dtypes on the cases that change the kernels' arithmetic.
    shape = Shape(batch=2, seq=256, num_heads=4, head_dim=64)
    report = run_conformance("flash", dtypes=["bfloat16"], expect_supported=DECLARED, shape=shape)
    print(report.table())
    report.assert_ok()
    arithmetic = ["causal", "gqa", "segment_ids", "soft_cap", "sinks", "return_lse", "decode"]
    report = run_conformance("flash", dtypes=["float16", "float32"], cases=arithmetic,
                             expect_supported=arithmetic, shape=shape)
    print(report.table())
    report.assert_ok()


TRITON_LOWERED = {  # name: (attention keyword arguments, extra inputs by name: (shape, dtype))
    "causal-gqa": ({"is_causal": True}, {}),
    "window-softcap": ({"is_causal": True, "sliding_window": 64, "logits_soft_cap": 30.0}, {}),
    "chunked-sinks": ({"mask": jaxattn.ChunkedCausalMask(128)}, {"sinks": ((4,), jnp.float32)}),
    "segments-lengths": ({}, {"segment_ids": ((1, 512), jnp.int32), "key_value_seq_lengths": ((1,), jnp.int32)}),
}


@pytest.mark.parametrize("name", list(TRITON_LOWERED))
def test_triton_kernels_lower_for_cuda_without_a_gpu(name):
    """`jax.export(..., platforms=["cuda"])` on an injected H100 runs Pallas's Triton lowering of the
    compiled forward, dq and dk/dv kernels on this CPU machine (the interpreter, which the rest of
    the suite uses, never does): each feature's kernel code must lower. Not run here."""
    from jax import export

    kwargs, extra = TRITON_LOWERED[name]
    q = jax.ShapeDtypeStruct((1, 512, 4, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 512, 2, 128), jnp.bfloat16)
    more = {n: jax.ShapeDtypeStruct(shape, dtype) for n, (shape, dtype) in extra.items()}
    triton = OperationMetadata(mode="train", operation_configs={"flash": {"gpu_kernel": "triton",
                                                                          "gpu_backward": "triton"}})

    def loss(q, k, v, more):
        out = jaxattn.attention(q, k, v, **kwargs, **more, backend="flash", metadata=triton)
        return out.astype(jnp.float32).sum()

    unchecked = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    with jaxattn.hardware.override(Hardware.nvidia(compute_capability=(9, 0))):
        exported = export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=["cuda"],
                                 disabled_checks=unchecked)(q, kv, kv, more)
    assert exported.mlir_module().count("xla.gpu.triton") == 3  # forward, dq, dk/dv
    assert [o.shape for o in exported.out_avals] == [q.shape, kv.shape, kv.shape]
