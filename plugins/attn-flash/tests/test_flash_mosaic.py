"""The Hopper forward path (Mosaic GPU): which calls take it, and (on an H100) that it is right.

The CPU tests ask `gpu_path.choose` (through `FlashAttention.gpu_kernel_for`) with
injected hardware, and run the custom_vjp around the kernel with the Triton forward in its
place: Mosaic GPU kernels cannot run in the interpreter. The GPU test runs
the conformance cases the Mosaic path serves, forced onto it, forward and gradients
(the backward is the Triton kernels), bf16 and fp16, against the xla reference.
"""

from __future__ import annotations

import jax
import pytest

import jaxattn
from jaxattn import Hardware, OperationMetadata
from jaxattn.testing import Shape, run_conformance
from jaxattn_flash import FlashAttention, gpu_path
from jaxattn_flash import config as flash_config
from jaxattn_flash._testing import request, tiles

H100 = Hardware.nvidia()
A100 = Hardware.nvidia(compute_capability=(8, 0), device_kind="NVIDIA A100-SXM4-80GB")
MOSAIC = OperationMetadata(operation_configs={"flash": {"gpu_kernel": "mosaic"}})
MOSAIC_CASES = ["full", "causal", "causal_q_lt_kv", "causal_top_left", "gqa", "mqa", "sliding_window",
                "sliding_window_asym", "fully_masked_rows", "return_lse"]


@pytest.fixture
def mosaic_importable(monkeypatch):
    monkeypatch.setattr(gpu_path._compat, "mosaic_import_error", lambda: None)


def _request(**kw):
    """The peers-table shape (4, 4096, 32 q / 8 kv heads, 128)."""
    return request(**{"batch": 4, "q_len": 4096, "kv_len": 4096, "num_q_heads": 32, "num_kv_heads": 8, **kw})


def _md(**config):
    return OperationMetadata(operation_configs={"flash": config})


def test_auto_takes_mosaic_on_hopper_only(mosaic_importable):
    impl = FlashAttention()
    for kinds in ({"causal"}, set(), {"full"}, {"causal", "sliding_window"}):
        choice = impl.gpu_kernel_for(_request(mask_kinds=frozenset(kinds)), H100)
        assert choice.kernel == "mosaic", choice
    assert impl.gpu_kernel_for(_request(dtype="float16", kv_dtype="float16", head_dim=64, value_head_dim=64),
                               H100).kernel == "mosaic"
    on_a100 = impl.gpu_kernel_for(_request(), A100)
    assert on_a100.kernel == "triton" and "compute capability 9.x" in on_a100.reason and "8.0" in on_a100.reason
    assert impl.gpu_kernel_for(_request(), H100, _md(gpu_kernel="triton")).kernel == "triton"
    # what auto cannot give to Mosaic goes to Triton, with the reason
    soft = impl.gpu_kernel_for(_request(logits_soft_cap=True), H100)
    assert soft.kernel == "triton" and "soft-cap" in soft.reason


def test_auto_without_mosaic_gpu(monkeypatch):
    monkeypatch.setattr(gpu_path._compat, "mosaic_import_error", lambda: "ImportError: no mosaic here")
    choice = FlashAttention().gpu_kernel_for(_request(), H100)
    assert choice.kernel == "triton" and "no mosaic here" in choice.reason


def test_auto_follows_the_measured_rule(mosaic_importable, monkeypatch):
    monkeypatch.setitem(gpu_path.AUTO_MOSAIC, (128, "band"), False)
    choice = FlashAttention().gpu_kernel_for(_request(), H100)
    assert choice.kernel == "triton" and "AUTO_MOSAIC" in choice.reason
    assert FlashAttention().gpu_kernel_for(_request(), H100, _md(gpu_kernel="mosaic")).kernel == "mosaic"


def test_forced_mosaic_says_every_reason(mosaic_importable):
    impl = FlashAttention()
    with pytest.raises(ValueError, match="compute capability 9.x"):
        impl.gpu_kernel_for(_request(), A100, _md(gpu_kernel="mosaic"))
    bad = _request(dtype="float32", kv_dtype="float32", head_dim=96, value_head_dim=96, q_len=200,
                   mask_kinds=frozenset({"causal", "segment", "chunked_causal"}), logits_soft_cap=True,
                   has_sinks=True, q_seq_lengths=True, kv_seq_lengths=True)
    with pytest.raises(ValueError) as err:
        impl.gpu_kernel_for(bad, H100, _md(gpu_kernel="mosaic"))
    text = str(err.value)
    for word in ("gpu_kernel='mosaic'", "float32", "head_dim", "chunked_causal, segment", "soft-cap", "sinks",
                 "query sequence lengths", "key/value sequence lengths"):
        assert word in text, word
    with pytest.raises(ValueError, match="q_len a multiple of 128"):
        impl.gpu_kernel_for(_request(q_len=200), H100, _md(gpu_kernel="mosaic"))
    with pytest.raises(ValueError, match="does not fit in shared memory"):
        impl.gpu_kernel_for(_request(), H100, _md(gpu_kernel="mosaic", mosaic_stages=4))


def test_interpreter_never_takes_mosaic():
    impl = FlashAttention(interpret=True)
    assert impl.gpu_kernel_for(_request(), H100).kernel == "triton"
    with pytest.raises(ValueError, match="interpreter"):
        impl.gpu_kernel_for(_request(), H100, _md(gpu_kernel="mosaic"))
    q = jax.numpy.ones((1, 128, 2, 64), jax.numpy.float32)
    inputs = jaxattn.validation.build_attention_inputs(
        q, q, q, None, None, metadata=MOSAIC, scale=None, is_causal=True, sliding_window=None, segment_ids=None,
        query_seq_lengths=None, key_value_seq_lengths=None, logits_soft_cap=None, sinks=None, dropout_rate=0.0,
        dropout_rng=None, return_lse=False)
    with pytest.raises(ValueError, match="interpreter"):
        impl(inputs, MOSAIC, Hardware.cpu())  # the call itself refuses, before any kernel runs


def test_gpu_kernel_config_keys():
    assert flash_config.gpu_kernel({}) == "auto"
    with pytest.raises(ValueError, match="gpu_kernel"):
        flash_config.gpu_kernel({"gpu_kernel": "cuda"})
    assert flash_config.mosaic_tiles({}, 128) == flash_config.MOSAIC_DEFAULTS[128]
    assert flash_config.mosaic_tiles({"mosaic_block_kv": 64, "mosaic_stages": 3}, 128) == (64, 3)
    with pytest.raises(ValueError, match="mosaic_block_kv"):
        flash_config.mosaic_tiles({"mosaic_block_kv": 96}, 128)
    with pytest.raises(ValueError, match="mosaic_stages"):
        flash_config.mosaic_tiles({"mosaic_stages": 5}, 128)
    with pytest.raises(ValueError, match="unknown keys"):
        flash_config.gpu_kernel({"gpu_kernels": "auto"})
    # the Triton tiles still resolve with the new keys present
    assert flash_config.resolve({"gpu_kernel": "triton", "mosaic_stages": 2}, 64, 256, 256)["fwd"].block_q == 128


def _on_hopper() -> bool:
    if jax.default_backend() != "gpu":
        return False
    cc = jaxattn.hardware.current().compute_capability
    return cc is not None and cc[0] == 9


GPU_RUNS = {  # name: (dtype, head_dim, cases, gradients)
    "d64-bf16": ("bfloat16", 64, MOSAIC_CASES, True),
    "d64-fp16": ("float16", 64, ["causal", "gqa", "fully_masked_rows"], True),
    "d128-bf16": ("bfloat16", 128, ["causal", "sliding_window_asym"], True),
    "d256-bf16": ("bfloat16", 256, ["causal", "gqa"], True),
}


@pytest.mark.gpu
@pytest.mark.skipif(not _on_hopper(), reason="needs a Hopper GPU (compute capability 9.x)")
@pytest.mark.parametrize("run", list(GPU_RUNS))
def test_mosaic_conformance_gpu(run):
    dtype, head_dim, cases, grads = GPU_RUNS[run]
    impl = FlashAttention()
    assert impl.gpu_kernel_for(_request(head_dim=head_dim, value_head_dim=head_dim),
                               jaxattn.hardware.current()).kernel == "mosaic"
    report = run_conformance(impl, dtypes=[dtype], cases=cases, expect_supported="*", metadata=MOSAIC,
                             grads=grads, shape=Shape(batch=2, seq=256, num_heads=4, head_dim=head_dim))
    print(report.table())
    report.assert_ok()


def test_mosaic_wrapper_gives_the_rows_that_see_a_nan_value_nan_gradients(monkeypatch):
    """`gpu_path.flash_mosaic` (the Mosaic forward's custom_vjp), its kernel replaced by the
    Triton forward in the interpreter so it runs on CPU, on values holding NaN/inf: the rows
    that see one are NaN in the output and in dq, as with the xla reference, because the
    poisoned output is the backward's residual (found on one H200, where no partitioned path
    hid it)."""
    import jax.numpy as jnp
    import numpy as np

    from jaxattn import value_guard
    from jaxattn.testing import nonfinite_problem
    from jaxattn_flash import backend, mosaic_kernels, triton_kernels

    args = nonfinite_problem(0, (2, 128, 4, 2, 32))
    blocks = OperationMetadata(operation_configs=tiles(32))
    inputs = jaxattn.validation.build_attention_inputs(
        args["query"], args["key"], args["value"], None, None, metadata=blocks, scale=None, is_causal=True,
        sliding_window=None, segment_ids=None, query_seq_lengths=None, key_value_seq_lengths=None,
        logits_soft_cap=None, sinks=None, dropout_rate=0.0, dropout_rng=None, return_lse=False)
    spec = backend._prepare(inputs, blocks, True, None).spec  # the Triton path: interpreter, no padding here
    assert spec.q_pad == 128 and spec.interpret
    monkeypatch.setattr(mosaic_kernels, "mosaic_forward",
                        lambda mspec, q, k, v: triton_kernels.forward(spec, q, k, v, None, None, None, None, None))
    rows = value_guard.seen_rows(value_guard.bad_keys(inputs.value), inputs)
    ref_out = jaxattn.attention(**args, is_causal=True, backend="xla")
    weight = jnp.asarray(np.isfinite(np.asarray(ref_out)).all(-1), jnp.float32)[..., None]
    assert 0 < float(weight.mean()) < 1  # some rows see a NaN value, others do not

    def loss_mosaic(q, k, v):
        out, _ = gpu_path.flash_mosaic(spec, None, q, k, value_guard.clean(v, value_guard.bad_keys(v)), rows)
        return jnp.sum(jnp.where(weight > 0, out, 0.0) * weight), out

    def loss_xla(q, k, v):
        out = jaxattn.attention(q, k, v, is_causal=True, backend="xla")
        return jnp.sum(jnp.where(weight > 0, out, 0.0) * weight)

    (_, out), got = jax.value_and_grad(loss_mosaic, argnums=(0, 1, 2), has_aux=True)(
        args["query"], args["key"], args["value"])
    want = jax.grad(loss_xla, argnums=(0, 1, 2))(args["query"], args["key"], args["value"])
    assert np.array_equal(np.isfinite(np.asarray(out)).all(-1), np.asarray(weight[..., 0]) > 0)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        g, w = np.asarray(g), np.asarray(w)
        assert np.array_equal(np.isfinite(g), np.isfinite(w)), f"{name}: non-finite entries differ"
        np.testing.assert_allclose(g[np.isfinite(w)], w[np.isfinite(w)], rtol=2e-4, atol=2e-5, err_msg=name)
