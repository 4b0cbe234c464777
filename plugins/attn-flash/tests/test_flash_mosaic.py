"""The Hopper forward path (Mosaic GPU): which calls take it, and (on an H100) that it is right.

The CPU tests ask `gpu_path.choose` (through `FlashAttention.gpu_kernel_for`) with
injected hardware, and run the custom_vjp around the kernel with the Triton forward in its
place: Mosaic GPU kernels cannot run in the interpreter. The GPU test runs
the conformance cases the Mosaic path serves, forced onto it, forward and gradients
and gradients (Triton or Mosaic GPU backward), bf16 and fp16, against the xla reference.
"""

from __future__ import annotations

import jax
import numpy as np
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
                "sliding_window_asym", "fully_masked_rows", "return_lse", "soft_cap", "sinks", "chunked_causal",
                "seq_lengths", "segment_ids", "value_head_dim"]


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
    for fields in ({"logits_soft_cap": True}, {"has_sinks": True}, {"kv_seq_lengths": True, "q_seq_lengths": True}):
        assert impl.gpu_kernel_for(_request(**fields), H100).kernel == "mosaic", fields  # the Mosaic forward has these
    # what auto cannot give to Mosaic goes to Triton, with the reason
    dropout = impl.gpu_kernel_for(_request(mask_kinds=frozenset({"causal", "segment"}), dropout=True), H100)
    assert dropout.kernel == "triton" and "has no dropout" in dropout.reason
    # both Mosaic paths take segment ids (packed sequences), and the backward lengths too
    for fields in ({"kv_seq_lengths": True, "q_seq_lengths": True}, {"mask_kinds": frozenset({"causal", "segment"})}):
        assert impl.gpu_kernel_for(_request(**fields), H100).kernel == "mosaic", fields
        assert impl.gpu_backward_for(_request(**fields), H100).kernel == "mosaic", fields


def test_mosaic_paths_take_a_value_head_dim_of_their_own(mosaic_importable, monkeypatch):
    """MLA-like calls (query/key head_dim 192, values 128) and other head_dim pairs: the forward
    takes each of 64/128/192/256, the backward each of 64/128 and pairs of those summing past 256
    (mosaic_bwd_wide.py); auto takes the measured MLA forward and backward and keeps what it has
    no measurement for on Triton, saying so."""
    impl = FlashAttention()
    mosaic = _md(gpu_kernel="mosaic", gpu_backward="mosaic")
    for d, dv in ((64, 128), (128, 64), (192, 128), (256, 128)):
        assert impl.gpu_kernel_for(_request(head_dim=d, value_head_dim=dv), H100, mosaic).kernel == "mosaic"
        assert impl.gpu_backward_for(_request(head_dim=d, value_head_dim=dv), H100, mosaic).kernel == "mosaic"
    with pytest.raises(ValueError, match=r"value head_dim 64/128 \(got 64/192"):  # 256 in all: the narrow kernel's
        impl.gpu_backward_for(_request(head_dim=64, value_head_dim=192), H100, mosaic)
    with pytest.raises(ValueError, match=r"each of 64/128/192/256 when they sum past 256 \(got 256/96"):
        impl.gpu_backward_for(_request(head_dim=256, value_head_dim=96), H100, mosaic)
    with pytest.raises(ValueError, match=r"value head_dim 64/128/192/256 \(got 96/128"):
        impl.gpu_kernel_for(_request(head_dim=96, value_head_dim=128), H100, mosaic)
    mla = _request(head_dim=192, value_head_dim=128)
    assert impl.gpu_kernel_for(mla, H100).kernel == "mosaic"  # AUTO_MOSAIC[(192, "band")]
    assert impl.gpu_backward_for(mla, H100).kernel == "mosaic"  # AUTO_MOSAIC_BWD[(192, "band")]
    monkeypatch.delitem(gpu_path.AUTO_MOSAIC_BWD, (192, "band"))
    mla_bwd = impl.gpu_backward_for(mla, H100)
    assert mla_bwd.kernel == "triton" and "not measured at head_dim 192" in mla_bwd.reason
    monkeypatch.delitem(gpu_path.AUTO_MOSAIC, (192, "band"))
    auto = impl.gpu_kernel_for(mla, H100)
    assert auto.kernel == "triton" and "not measured at head_dim 192, band mask" in auto.reason
    # the shared memory check counts O's own buffer: 192/128 fits with 64-key tiles, not with 128 x 3
    wide = _request(head_dim=192, value_head_dim=128)
    with pytest.raises(ValueError, match="at head_dim 192, value head_dim 128"):
        impl.gpu_kernel_for(wide, H100, _md(gpu_kernel="mosaic", mosaic_block_kv=128, mosaic_stages=3))


def test_triton_backward_pads_head_dims_a_mosaic_forward_hands_it(monkeypatch):
    """After a Mosaic forward of head_dim 192 (MLA) the Triton backward gets unpadded arrays of a
    head_dim it does not tile (Triton's blocks are powers of two; the interpreter would not
    mind): `_flash_bwd` hands its kernels arrays padded to 64 / 32 here and cuts the gradients
    back to head_dim 48 / values 24, equal to the xla reference's."""
    import jax.numpy as jnp

    from jaxattn_flash import backend, triton_vjp

    kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(3), 4)
    q = jax.random.normal(kq, (1, 64, 2, 48), jnp.float32)
    k = jax.random.normal(kk, (1, 64, 2, 48), jnp.float32)
    v = jax.random.normal(kv, (1, 64, 2, 24), jnp.float32)
    d_out = jax.random.normal(kd, (1, 64, 2, 24), jnp.float32)
    blocks = OperationMetadata(operation_configs=tiles(32))
    inputs = jaxattn.validation.build_attention_inputs(
        q, k, v, None, None, metadata=blocks, scale=None, is_causal=True, sliding_window=None, segment_ids=None,
        query_seq_lengths=None, key_value_seq_lengths=None, logits_soft_cap=None, sinks=None, dropout_rate=0.0,
        dropout_rng=None, return_lse=False)
    spec = backend._prepare(inputs, blocks, True, None).spec  # the interpreter's Triton spec
    seen = []
    for name in ("backward_dq", "backward_dkdv"):
        kernel = getattr(triton_vjp, name)
        monkeypatch.setattr(triton_vjp, name, lambda spec, q, k, v, do, *rest, kernel=kernel: (
            seen.append((q.shape[-1], k.shape[-1], v.shape[-1], do.shape[-1])) or kernel(spec, q, k, v, do, *rest)))
    out, lse = jaxattn.attention(q, k, v, is_causal=True, backend="xla", return_lse=True)
    residuals = triton_vjp.Residuals(q, k, v, out, lse)
    dq, dk, dv, *_ = triton_vjp._flash_bwd(spec, residuals, (d_out, jnp.zeros_like(lse)))
    want = jax.vjp(lambda q, k, v: jaxattn.attention(q, k, v, is_causal=True, backend="xla"), q, k, v)[1](d_out)
    assert seen == [(64, 64, 32, 32)] * 2
    for name, got, ref in zip(("dq", "dk", "dv"), (dq, dk, dv), want):
        assert got.shape == ref.shape, name
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-4, atol=2e-5, err_msg=name)


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
                   mask_kinds=frozenset({"causal", "dense", "chunked_causal"}), logits_soft_cap=True,
                   has_sinks=True, q_seq_lengths=True, kv_seq_lengths=True, dropout=True)
    with pytest.raises(ValueError) as err:
        impl.gpu_kernel_for(bad, H100, _md(gpu_kernel="mosaic"))
    text = str(err.value)
    for word in ("gpu_kernel='mosaic'", "float32", "head_dim", "(not dense)", "has no dropout"):
        assert word in text, word
    with pytest.raises(ValueError, match="the Mosaic GPU backward has no bias"):
        impl.gpu_backward_for(_request(has_bias=True), H100, _md(gpu_backward="mosaic"))
    chunked = frozenset({"causal", "chunked_causal"})
    with pytest.raises(ValueError, match="chunks of at least 64 positions"):
        impl.gpu_kernel_for(_request(mask_kinds=chunked, chunk=(32, 0)), H100, _md(gpu_kernel="mosaic"))
    assert impl.gpu_kernel_for(_request(mask_kinds=chunked, chunk=(8192, 0)), H100,
                               _md(gpu_kernel="mosaic")).kernel == "mosaic"
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
    "d64-fp16": ("float16", 64, ["causal", "gqa", "fully_masked_rows", "soft_cap", "sinks"], True),
    "d128-bf16": ("bfloat16", 128, ["causal", "sliding_window_asym", "soft_cap", "sinks", "seq_lengths",
                                     "segment_ids"], True),
    "d256-bf16": ("bfloat16", 256, ["causal", "gqa", "soft_cap"], True),
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


MOSAIC_BWD = OperationMetadata(operation_configs={"flash": {"gpu_backward": "mosaic"}})
MOSAIC_BWD_CASES = ["full", "causal", "causal_q_lt_kv", "causal_top_left", "gqa", "mqa", "sliding_window",
                    "sliding_window_asym", "fully_masked_rows", "return_lse", "soft_cap", "sinks", "chunked_causal",
                    "seq_lengths", "segment_ids"]
GPU_BWD_RUNS = {  # name: (dtype, head_dim, cases, flash config)
    "d64-bf16": ("bfloat16", 64, MOSAIC_BWD_CASES + ["value_head_dim"], {}),  # values of head_dim 128
    "d256-bf16": ("bfloat16", 256, ["full", "causal", "causal_q_lt_kv", "gqa", "sliding_window_asym",
                                    "fully_masked_rows", "soft_cap", "sinks", "chunked_causal", "seq_lengths",
                                    "segment_ids"], {}),
    "d128-bf16": ("bfloat16", 128, MOSAIC_BWD_CASES, {}),
    "d128-fp16": ("float16", 128, ["causal", "gqa", "soft_cap", "sinks"], {}),
    "d128-bf16-kv128-3stages": ("bfloat16", 128, ["causal", "gqa", "sliding_window_asym"],
                                {"mosaic_block_kv_dq": 128, "mosaic_stages_bwd": 3}),
    "d128-bf16-mosaic-forward": ("bfloat16", 128, ["full", "causal", "gqa", "sliding_window", "soft_cap", "sinks",
                                                               "seq_lengths", "segment_ids"], {"gpu_kernel": "mosaic"}),
}


@pytest.mark.gpu
@pytest.mark.skipif(not _on_hopper(), reason="needs a Hopper GPU (compute capability 9.x)")
@pytest.mark.parametrize("run", list(GPU_BWD_RUNS))
def test_mosaic_backward_conformance_gpu(run):
    """The Mosaic GPU backward, forced, after the Triton forward (soft-cap and sinks reach it
    through the lse) or the Mosaic one: gradients against the xla reference."""
    dtype, head_dim, cases, config = GPU_BWD_RUNS[run]
    metadata = OperationMetadata(operation_configs={"flash": {"gpu_backward": "mosaic", **config}})
    report = run_conformance(FlashAttention(), dtypes=[dtype], cases=cases, expect_supported="*",
                             metadata=metadata, grads=True,
                             shape=Shape(batch=2, seq=256, num_heads=4, head_dim=head_dim))
    print(report.table())
    report.assert_ok()


@pytest.mark.gpu
@pytest.mark.skipif(not _on_hopper(), reason="needs a Hopper GPU (compute capability 9.x)")
@pytest.mark.parametrize("dims,backward", [((192, 128), "triton"), ((192, 128), "mosaic"), ((256, 128), "mosaic")],
                         ids=["mla-triton-bwd", "mla-mosaic-bwd", "256-128-mosaic-bwd"])
@pytest.mark.parametrize("causal", [True, False])
def test_mosaic_forward_mla_head_dims_gpu(causal, dims, backward):
    """DeepSeek's MLA head dims (queries/keys 192, values 128), and 256/128, on the Mosaic forward,
    forced, with the Triton backward after it (which pads 192 to its tiles) or the Mosaic one
    (mosaic_bwd_wide.py): out, lse and gradients against xla in float32."""
    import jax.numpy as jnp
    import numpy as np

    ks = jax.random.split(jax.random.PRNGKey(5), 4)
    d, dv = dims
    q = jax.random.normal(ks[0], (2, 256, 4, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (2, 256, 2, d), jnp.bfloat16)
    v = jax.random.normal(ks[2], (2, 256, 2, dv), jnp.bfloat16)
    d_out = jax.random.normal(ks[3], (2, 256, 4, dv), jnp.float32)
    md = _md(gpu_kernel="mosaic", gpu_backward=backward)
    here, req = jaxattn.hardware.current(), _request(head_dim=d, value_head_dim=dv)
    assert FlashAttention().gpu_kernel_for(req, here, md).kernel == "mosaic"
    assert FlashAttention().gpu_backward_for(req, here, md).kernel == backward

    def run(q, k, v, backend, metadata=None):
        return jaxattn.attention(q, k, v, is_causal=causal, backend=backend, metadata=metadata, return_lse=True)

    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    (out, lse), pull = jax.vjp(lambda *a: run(*a, "flash", md), q, k, v)
    (ref, ref_lse), ref_pull = jax.vjp(lambda *a: run(*a, "xla"), *f32)
    rel = lambda a, b: float(np.linalg.norm(np.asarray(a, np.float32) - b) / np.linalg.norm(b))  # noqa: E731
    assert rel(out, ref) < 1e-2 and np.allclose(np.asarray(lse), np.asarray(ref_lse), atol=2e-2)
    grads = pull((d_out.astype(out.dtype), jnp.zeros_like(lse)))
    want = ref_pull((d_out, jnp.zeros_like(ref_lse)))
    for name, g, w in zip(("dq", "dk", "dv"), grads, want):
        assert g.shape == w.shape and rel(g, w) < 2e-2, name


@pytest.mark.gpu
@pytest.mark.skipif(not _on_hopper(), reason="needs a Hopper GPU (compute capability 9.x)")
@pytest.mark.parametrize("head_dim", [128, 256])
def test_mosaic_backward_launch_passes_gpu(head_dim):
    """The grids launched in another order (dk/dv in passes, `launch_passes_dkv`, the default under
    causal GQA in the wide kernel; forward and dk/dv in clusters, `launch_cluster_*`, the causal
    defaults of the forward and of the 128-key dk/dv kernel under GQA) only reorder
    the CUDA blocks: the output, dk and dv equal the plain order's bit for bit, dq (summed by TMA
    reductions in arrival order) within rounding, on a grid of several clusters' worth of blocks."""
    import jax.numpy as jnp
    import numpy as np

    ks = jax.random.split(jax.random.PRNGKey(11), 4)
    q = jax.random.normal(ks[0], (2, 1024, 8, head_dim), jnp.bfloat16)
    k = jax.random.normal(ks[1], (2, 1024, 2, head_dim), jnp.bfloat16)
    v = jax.random.normal(ks[2], (2, 1024, 2, head_dim), jnp.bfloat16)
    d_out = jax.random.normal(ks[3], q.shape, jnp.bfloat16)
    results = []
    plain = {"launch_passes_dkv": 1, "launch_cluster_fwd": 1, "launch_cluster_dkv": 1}
    for order in (plain, {"launch_passes_dkv": 4}, {"launch_cluster_fwd": 3, "launch_cluster_dkv": 3}, {}):
        md = _md(gpu_kernel="mosaic", gpu_backward="mosaic", **order)
        out, pull = jax.vjp(lambda *a, md=md: jaxattn.attention(*a, is_causal=True, backend="flash", metadata=md),
                            q, k, v)
        results.append([np.asarray(x, np.float32) for x in (out, *pull(d_out))])
    (out1, dq1, dk1, dv1), *others = results
    for out, dq, dk, dv in others:
        assert np.array_equal(out1, out) and np.array_equal(dk1, dk) and np.array_equal(dv1, dv)
        assert np.linalg.norm(dq1 - dq) <= 1e-2 * np.linalg.norm(dq1)


@pytest.mark.gpu
@pytest.mark.skipif(not _on_hopper(), reason="needs a Hopper GPU (compute capability 9.x)")
@pytest.mark.parametrize("sinks", [False, True])
def test_mosaic_softcap_without_max_gpu(sinks):
    """A soft-capped causal call with logits pushed against the cap (q scaled by 8): the forward
    without a running max (the bfloat16 default under a cap of 30) and the one with it, each
    against xla in float32 (out, lse, gradients), and against each other."""
    import jax.numpy as jnp
    import numpy as np

    ks = jax.random.split(jax.random.PRNGKey(3), 5)
    q = (8 * jax.random.normal(ks[0], (2, 1024, 8, 128), jnp.float32)).astype(jnp.bfloat16)
    k = jax.random.normal(ks[1], (2, 1024, 2, 128), jnp.bfloat16)
    v = jax.random.normal(ks[2], (2, 1024, 2, 128), jnp.bfloat16)
    sink = 2 * jax.random.normal(ks[3], (8,), jnp.float32) if sinks else None
    d_out = jax.random.normal(ks[4], q.shape, jnp.float32)

    def run(md, backend="flash", *args):
        def f(q, k, v):
            return jaxattn.attention(q, k, v, is_causal=True, logits_soft_cap=30.0, sinks=sink, return_lse=True,
                                     backend=backend, metadata=md)
        (out, lse), pull = jax.vjp(f, *(args or (q, k, v)))
        return [np.asarray(x, np.float32) for x in (out, lse, *pull((d_out.astype(out.dtype), jnp.zeros_like(lse))))]

    base = {"gpu_kernel": "mosaic", "gpu_backward": "mosaic"}
    bounded = run(_md(**base))
    running = run(_md(**base, mosaic_softcap_running_max=True))
    ref = run(None, "xla", *(x.astype(jnp.float32) for x in (q, k, v)))
    rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))  # noqa: E731
    for name, got in (("bounded", bounded), ("running max", running)):
        assert rel(got[0], ref[0]) < 1e-2 and np.allclose(got[1], ref[1], atol=2e-2), name
        for g, w, grad in zip(got[2:], ref[2:], ("dq", "dk", "dv")):
            assert rel(g, w) < 2e-2, (name, grad)
    assert rel(bounded[0], running[0]) < 5e-3 and np.allclose(bounded[1], running[1], atol=1e-3)


@pytest.mark.parametrize("optional", ["none", "lengths", "segments"])
def test_mosaic_wrapper_gives_the_rows_that_see_a_nan_value_nan_gradients(monkeypatch, optional):
    """`gpu_path.flash_mosaic` (the Mosaic forward's custom_vjp), its kernel replaced by the
    Triton forward in the interpreter so it runs on CPU (a kernel that guards values itself, as
    the Mosaic kernel does with `guard_values`), on values holding NaN/inf: the rows that see
    one are NaN in the output and in dq, as with the xla reference, because the poisoned output
    is the backward's residual (found on one H200, where no partitioned path hid it), and dv is
    zero at the keys whose value was non-finite; the primal gives the same output. With sequence
    lengths or segment ids, the wrapper hands them to the kernel and to the backward's residuals."""
    import jax.numpy as jnp
    import numpy as np

    from jaxattn import value_guard
    from jaxattn.testing import nonfinite_problem
    from jaxattn_flash import backend, mosaic_kernels, triton_kernels

    args = nonfinite_problem(0, (2, 128, 4, 2, 32))
    blocks = OperationMetadata(operation_configs=tiles(32))
    q_lens, kv_lens = (jnp.array([128, 100]), jnp.array([90, 128])) if optional == "lengths" else (None, None)
    ids = jnp.asarray(np.repeat([[0] * 50 + [1] * 78], 2, axis=0), jnp.int32) if optional == "segments" else None
    inputs = jaxattn.validation.build_attention_inputs(
        args["query"], args["key"], args["value"], None, None, metadata=blocks, scale=None, is_causal=True,
        sliding_window=None, segment_ids=ids, query_seq_lengths=q_lens, key_value_seq_lengths=kv_lens,
        logits_soft_cap=None, sinks=None, dropout_rate=0.0, dropout_rng=None, return_lse=False)
    spec = backend._prepare(inputs, blocks, True, None).spec  # the Triton path: interpreter, no padding here
    assert spec.q_pad == 128 and spec.interpret and spec.segments == (ids is not None)
    monkeypatch.setattr(mosaic_kernels, "mosaic_forward",
                        lambda mspec, q, k, v, sinks, q_lens, kv_lens, q_seg, kv_seg, bad_keys=None:
                        triton_kernels.forward(spec, q, k, v, sinks, q_seg, kv_seg, q_lens, kv_lens))
    bad = value_guard.bad_keys(inputs.value)
    lens = dict(query_seq_lengths=q_lens, key_value_seq_lengths=kv_lens, segment_ids=ids)
    ref_out = jaxattn.attention(**args, is_causal=True, backend="xla", **lens)
    weight = jnp.asarray(np.isfinite(np.asarray(ref_out)).all(-1), jnp.float32)[..., None]
    assert 0 < float(weight.mean()) < 1  # some rows see a NaN value, others do not

    def loss_mosaic(q, k, v):
        out, _ = gpu_path.flash_mosaic(spec, None, q, k, v, None, q_lens, kv_lens, ids, ids, bad)
        return jnp.sum(jnp.where(weight > 0, out, 0.0) * weight), out

    def loss_xla(q, k, v):
        out = jaxattn.attention(q, k, v, is_causal=True, backend="xla", **lens)
        return jnp.sum(jnp.where(weight > 0, out, 0.0) * weight)

    (_, out), got = jax.value_and_grad(loss_mosaic, argnums=(0, 1, 2), has_aux=True)(
        args["query"], args["key"], args["value"])
    want = jax.grad(loss_xla, argnums=(0, 1, 2))(args["query"], args["key"], args["value"])
    assert np.array_equal(np.isfinite(np.asarray(out)).all(-1), np.asarray(weight[..., 0]) > 0)
    primal, _ = jax.jit(lambda q, k, v: gpu_path.flash_mosaic(spec, None, q, k, v, None, q_lens, kv_lens, ids, ids,
                                                              bad))(
        args["query"], args["key"], args["value"])
    np.testing.assert_array_equal(np.asarray(primal), np.asarray(out))
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        g, w = np.asarray(g), np.asarray(w)
        assert np.array_equal(np.isfinite(g), np.isfinite(w)), f"{name}: non-finite entries differ"
        np.testing.assert_allclose(g[np.isfinite(w)], w[np.isfinite(w)], rtol=2e-4, atol=2e-5, err_msg=name)


# -- the Mosaic GPU backward: which calls take it (CPU), its tile ranges (CPU) --------------------


def test_auto_backward_takes_mosaic_on_hopper_with_soft_cap_and_sinks(mosaic_importable):
    impl = FlashAttention()
    for fields in ({}, {"mask_kinds": frozenset()}, {"logits_soft_cap": True}, {"has_sinks": True},
                   {"mask_kinds": frozenset({"causal", "sliding_window"})},
                   {"head_dim": 64, "value_head_dim": 64, "dtype": "float16", "kv_dtype": "float16"}):
        choice = impl.gpu_backward_for(_request(**fields), H100)
        assert choice.kernel == "mosaic", (fields, choice)
    mla = _request(head_dim=192, value_head_dim=128)  # measured: the wide Mosaic backward
    assert impl.gpu_backward_for(mla, H100).kernel == "mosaic"
    on_a100 = impl.gpu_backward_for(_request(), A100)
    assert on_a100.kernel == "triton" and "compute capability 9.x" in on_a100.reason
    d256 = _request(head_dim=256, value_head_dim=256)
    assert impl.gpu_backward_for(d256, H100).kernel == "mosaic"  # mosaic_bwd_wide.py, measured faster
    assert impl.gpu_backward_for(_request(), H100, _md(gpu_backward="triton")).kernel == "triton"


def test_auto_backward_follows_the_measured_rule(mosaic_importable, monkeypatch):
    monkeypatch.setitem(gpu_path.AUTO_MOSAIC_BWD, (128, "band"), False)
    choice = FlashAttention().gpu_backward_for(_request(), H100)
    assert choice.kernel == "triton" and "AUTO_MOSAIC_BWD" in choice.reason
    assert FlashAttention().gpu_backward_for(_request(), H100, _md(gpu_backward="mosaic")).kernel == "mosaic"


def test_forced_mosaic_backward_says_every_reason(mosaic_importable):
    impl = FlashAttention()
    bad = _request(dtype="float32", kv_dtype="float32", head_dim=96, value_head_dim=96,
                   mask_kinds=frozenset({"causal", "dense"}), q_seq_lengths=True, has_bias=True)
    with pytest.raises(ValueError) as err:
        impl.gpu_backward_for(bad, A100, _md(gpu_backward="mosaic"))
    text = str(err.value)
    for word in ("gpu_backward='mosaic'", "compute capability 9.x", "float32", "head_dim 64/128", "(not dense)",
                 "has no bias"):
        assert word in text, word
    with pytest.raises(ValueError, match="kv_len a multiple of 128"):
        impl.gpu_backward_for(_request(kv_len=1000), H100, _md(gpu_backward="mosaic"))
    with pytest.raises(ValueError, match="interpreter"):
        FlashAttention(interpret=True).gpu_backward_for(_request(), H100, _md(gpu_backward="mosaic"))
    assert FlashAttention(interpret=True).gpu_backward_for(_request(), H100).kernel == "triton"
    with pytest.raises(ValueError, match="mosaic_block_kv_dq"):
        impl.gpu_backward_for(_request(), H100, _md(mosaic_block_kv_dq=256))
    # head_dim 256 (mosaic_bwd_wide.py): equal value head_dim, the dq settings it takes
    forced = _md(gpu_backward="mosaic")
    for fields, config, words in (
            ({"value_head_dim": 96}, {}, "when they sum past 256 (got 256/96)"),
            ({}, {"mosaic_stages_bwd": 3}, "mosaic_stages_bwd=3 does not fit in shared memory at head_dim 256"),
            ({}, {"mosaic_dq": "own"}, "mosaic_dq='own' does not fit at head_dim 256"),
            ({}, {"mosaic_block_kv_dq": 64}, "mosaic_block_kv_dq does not apply at head_dim 256")):
        request = _request(**{"head_dim": 256, "value_head_dim": 256, **fields})
        with pytest.raises(ValueError) as err:
            impl.gpu_backward_for(request, H100, _md(gpu_backward="mosaic", **config))
        assert words in str(err.value), (fields, config, str(err.value))
    assert impl.gpu_backward_for(_request(head_dim=256, value_head_dim=256), H100, forced).kernel == "mosaic"
    packed = _request(head_dim=256, value_head_dim=256, mask_kinds=frozenset({"causal", "segment"}))
    assert impl.gpu_backward_for(packed, H100, forced).kernel == "mosaic"  # segment ids at 256 too
    with pytest.raises(ValueError, match="gpu_backward"):
        impl.gpu_backward_for(_request(), H100, _md(gpu_backward="cudnn"))


def test_prepare_hands_the_backward_spec_to_the_kernels(mosaic_importable):
    """On Hopper (injected) a soft-capped causal call runs the Mosaic forward with the cap and
    carries the Mosaic backward's spec; forcing Triton leaves each out. Segment ids and lengths
    reach both specs and the backward's residuals (a backward spec without `segments` once gave
    wrong gradients on an H200 while the forward was right)."""
    from jaxattn_flash import backend

    q = jax.random.normal(jax.random.PRNGKey(0), (1, 256, 4, 128), jax.numpy.bfloat16)
    k = jax.random.normal(jax.random.PRNGKey(1), (1, 256, 2, 128), jax.numpy.bfloat16)

    def prepare(config, **optional):
        md = _md(**config)
        optional = {"segment_ids": None, "query_seq_lengths": None, "key_value_seq_lengths": None, **optional}
        inputs = jaxattn.validation.build_attention_inputs(
            q, k, k, None, None, metadata=md, scale=None, is_causal=True, sliding_window=None, **optional,
            logits_soft_cap=30.0, sinks=None, dropout_rate=0.0, dropout_rng=None, return_lse=False)
        return backend._prepare(inputs, md, False, H100)

    call = prepare({})
    assert call.mosaic is not None and call.mosaic.soft_cap == 30.0 and not call.mosaic.sinks
    assert prepare({"gpu_kernel": "triton"}).mosaic is None
    bspec = call.spec.mosaic_bwd
    assert bspec is not None and bspec.soft_cap == 30.0 and (bspec.band_lo, bspec.band_hi) == (None, 0)
    assert bspec.scale == pytest.approx(128 ** -0.5)
    assert (bspec.dq_block_kv, bspec.stages) == flash_config.MOSAIC_BWD_DEFAULTS
    tuned = prepare({"mosaic_block_kv_dq": 128, "mosaic_stages_bwd": 3}).spec.mosaic_bwd
    assert (tuned.dq_block_kv, tuned.stages) == (128, 3)
    assert prepare({"gpu_backward": "triton"}).spec.mosaic_bwd is None
    # a bfloat16 soft-cap of 30 bounds exp2: no running max, unless the config keeps it
    assert call.mosaic.bounded_logits and not prepare({"mosaic_softcap_running_max": True}).mosaic.bounded_logits
    assert bspec.fused_dq == "split"  # head_dim 128: dq inside the dk/dv kernel
    q256 = jax.random.normal(jax.random.PRNGKey(2), (1, 256, 4, 256), jax.numpy.bfloat16)
    kv256 = jax.random.normal(jax.random.PRNGKey(3), (1, 256, 2, 256), jax.numpy.bfloat16)
    md = _md(gpu_backward="mosaic")
    wide = backend._prepare(jaxattn.validation.build_attention_inputs(
        q256, kv256, kv256, None, None, metadata=md, scale=None, is_causal=True, sliding_window=None,
        segment_ids=None, query_seq_lengths=None, key_value_seq_lengths=None, logits_soft_cap=None, sinks=None,
        dropout_rate=0.0, dropout_rng=None, return_lse=False), md, False, H100)
    assert (wide.spec.mosaic_bwd.dq_block_kv, wide.spec.mosaic_bwd.fused_dq) == (32, None)  # mosaic_bwd_wide
    # causal GQA: the dk/dv launch passes where they were measured to gain (the Triton kernel and
    # the wide Mosaic one), the plain order in the 128-key Mosaic kernel; the config key wins
    assert (call.spec.dkdv_passes, bspec.passes, wide.spec.mosaic_bwd.passes) == (4, 1, 4)
    assert prepare({"launch_passes_dkv": 3}).spec.mosaic_bwd.passes == 3
    # launch clusters (launch_order.clustered_order): causal forward, causal GQA in the 128-key
    # dk/dv kernel; the wide kernel keeps its passes
    assert (call.mosaic.cluster, bspec.cluster, wide.spec.mosaic_bwd.cluster) == (4, 8, 1)
    assert prepare({"launch_passes_dkv": 3}).spec.mosaic_bwd.cluster == 1
    clustered = prepare({"launch_cluster_fwd": 4, "launch_cluster_dkv": 8})
    assert (clustered.mosaic.cluster, clustered.spec.mosaic_bwd.cluster) == (4, 8)
    with pytest.raises(ValueError, match=r"\['launch_cluster_dkv'\] must be an int from 1 to 64"):
        prepare({"launch_cluster_dkv": 0})
    assert prepare({"mosaic_dq": "separate"}).spec.mosaic_bwd.fused_dq is None  # the deterministic kernel
    assert not (bspec.segments or bspec.kv_lengths or call.mosaic.segments or call.mosaic.kv_lengths)
    # segment ids and lengths reach both Mosaic specs and ride with the call, unpadded
    ids = jax.numpy.asarray(np.repeat([[0] * 100 + [1] * 156], 1, axis=0), jax.numpy.int32)
    lens = jax.numpy.array([200])
    call = prepare({}, segment_ids=ids, query_seq_lengths=lens, key_value_seq_lengths=lens)
    assert call.mosaic.segments and call.mosaic.q_lengths and call.mosaic.kv_lengths
    assert call.spec.mosaic_bwd.segments and call.spec.mosaic_bwd.kv_lengths
    assert call.q_seg.shape == call.kv_seg.shape == (1, 256) and call.kv_lens is not None
    residuals = call.residuals(q, jax.numpy.zeros((1, 4, 256)))
    assert residuals.q_seg is call.q_seg and residuals.kv_lens is call.kv_lens  # for the backward


BANDS = [(None, None), (None, 0), (None, 256), (None, -128), (-255, 0), (-1000, 37), (-64, 300), (5, None)]
# chunked causal (band_lo, band_hi, chunk, chunk_offset): band_hi <= chunk_offset, as the mask makes it
CHUNKED = [(None, -256, 256, -256), (None, 0, 200, 0), (None, 0, 128, 64), (-300, -256, 384, -256)]
MASKS = [(lo, hi, None, 0) for lo, hi in BANDS] + CHUNKED


def _visibility(mask, q_len: int, kv_len: int):
    import numpy as np

    lo, hi, chunk, offset = mask
    i = np.arange(q_len)[:, None]
    j = np.arange(kv_len)[None, :]
    vis = np.ones((q_len, kv_len), bool)
    if lo is not None:
        vis &= j - i >= lo
    if hi is not None:
        vis &= j - i <= hi
    if chunk is not None:
        vis &= j // chunk == (i + offset) // chunk
    return vis


@pytest.mark.parametrize("kv_end", [None, 700, 640])
@pytest.mark.parametrize("mask", MASKS)
def test_mosaic_tile_ranges_and_masks_hold_every_visible_pair(mask, kv_end):
    """The Mosaic kernels visit only the tiles in [lb, ub) and skip the mask on [fs, fe). Brute
    force, for the forward (key tiles of 128-row blocks; [fs, fe) per consumer and, for the value
    guard, per block), the dk/dv kernel (query tiles of its 128 keys) and the dq kernel (key tiles
    of 128 rows): every visible pair is inside the visited range, the unmasked range holds only
    visible pairs, the visited range holds no tile without one; and `visible` on every tile
    equals the mask (bands, chunks: a tile's queries may straddle a chunk boundary; a batch row's
    key length `kv_end`, inside a tile or on its edge)."""
    import numpy as np

    from jaxattn_flash import mosaic_bwd_kernels as mbk
    from jaxattn_flash import mosaic_kernels as mk

    lo, hi, chunk, offset = mask
    spec = mbk.MosaicBwdSpec(scale=1.0, band_lo=lo, band_hi=hi, chunk=chunk, chunk_offset=offset)
    q_len, kv_len, tile = 1024, 768, 64
    vis = _visibility(mask, q_len, kv_len)
    if kv_end is not None:
        vis[:, kv_end:] = False

    def tiles_of(block, size=tile):  # [tiles] any / all visible within `block` (rows x cols of vis)
        t = block.reshape(block.shape[0], -1, size)
        return t.any(axis=(0, 2)), t.all(axis=(0, 2))

    for c0 in range(0, kv_len, mbk.BLOCK_ROWS):  # dk/dv: query tiles of key rows
        lb, ub = (int(x) for x in mbk.q_tile_range(spec, c0, mbk.BLOCK_ROWS, tile, q_len // tile, kv_end))
        any_vis, _ = tiles_of(vis[:, c0:c0 + mbk.BLOCK_ROWS].T)
        assert set(np.flatnonzero(any_vis)) <= set(range(lb, ub)), (c0, lb, ub)
        assert lb == ub or (any_vis[lb] and any_vis[ub - 1]), (c0, lb, ub)
        for c in (c0, c0 + mbk.WG_ROWS):
            fs, fe = (int(x) for x in mbk.q_full_range(spec, c, tile, lb, ub, kv_end))
            _, all_vis = tiles_of(vis[:, c:c + mbk.WG_ROWS].T)
            assert lb <= fs <= fe <= ub and all(all_vis[fs:fe]), (c, fs, fe)
            full = np.flatnonzero(all_vis[lb:ub]) + lb
            assert set(full) <= set(range(fs, fe)), (c, fs, fe, full)
    for r0 in range(0, q_len, mbk.BLOCK_ROWS):  # dq: key tiles of query rows
        lb, ub = (int(x) for x in mbk.kv_tile_range(spec, r0, mbk.BLOCK_ROWS, tile, kv_len // tile, kv_end))
        any_vis, _ = tiles_of(vis[r0:r0 + mbk.BLOCK_ROWS])
        assert set(np.flatnonzero(any_vis)) <= set(range(lb, ub)), (r0, lb, ub)
        for r in (r0, r0 + mbk.WG_ROWS):
            fs, fe = (int(x) for x in mbk.kv_full_range(spec, r, tile, lb, ub, kv_end))
            _, all_vis = tiles_of(vis[r:r + mbk.WG_ROWS])
            assert lb <= fs <= fe <= ub and all(all_vis[fs:fe]), (r, fs, fe)
            assert set(np.flatnonzero(all_vis[lb:ub]) + lb) <= set(range(fs, fe)), (r, fs, fe)

    fwd = mk.MosaicSpec(scale=1.0, band_lo=lo, band_hi=hi, chunk=chunk, chunk_offset=offset)  # 64 x 128 tiles
    bk = fwd.block_kv
    for r0 in range(0, q_len, fwd.rows):  # forward: key tiles of 128-row blocks
        lb, ub = (int(x) for x in mk.block_range(fwd, r0, kv_len // bk, kv_end))
        any_vis, _ = tiles_of(vis[r0:r0 + fwd.rows], bk)
        assert set(np.flatnonzero(any_vis)) <= set(range(lb, ub)), (r0, lb, ub)
        for r, rows in ((r0, fwd.block_q), (r0 + fwd.block_q, fwd.block_q), (r0, fwd.rows)):
            fs, fe = (int(x) for x in mk.full_range(fwd, r, lb, ub, rows, kv_end))
            _, all_vis = tiles_of(vis[r:r + rows], bk)
            assert lb <= fs <= fe <= ub and all(all_vis[fs:fe]), (r, rows, fs, fe)
            assert set(np.flatnonzero(all_vis[lb:ub]) + lb) <= set(range(fs, fe)), (r, rows, fs, fe)

    for q0 in range(0, q_len, fwd.block_q):  # the in-tile mask, on every 64 x 128 tile
        for k0 in range(0, kv_len, bk):
            q_pos = np.arange(q0, q0 + fwd.block_q)[:, None] + np.zeros((1, bk), int)
            k_pos = np.arange(k0, k0 + bk)[None, :] + np.zeros((fwd.block_q, 1), int)
            ok = mk.visible(fwd, jax.numpy.asarray(q_pos), jax.numpy.asarray(k_pos), q0, kv_end)
            want = vis[q0:q0 + fwd.block_q, k0:k0 + bk]
            got = np.ones_like(want) if ok is None else np.asarray(ok)
            assert np.array_equal(got, want), (q0, k0)


def _packed_ids(rng, length: int, docs: int):
    """Segment ids 0..docs-1 of packed documents of random lengths, in order along `length`."""
    cuts = np.sort(rng.choice(np.arange(1, length), docs - 1, replace=False))
    return np.searchsorted(cuts, np.arange(length), side="right").astype(np.int32)


@pytest.mark.parametrize("ids", ["packed", "packed-causal", "one-document", "returning"])
def test_segment_tile_ranges_hold_every_visible_pair(ids):
    """With segment ids the Mosaic kernels visit the tiles `segment_tile_ranges` bounds, cut
    by the band's (`clip_range`, `clip_full`, as the forward's blocks and the dk/dv kernel's key
    blocks do). Brute force over random ids: every pair with equal ids (and inside the causal
    band) is in a visited tile, the unmasked tiles hold only such pairs; packed documents visit
    no tile without one and run their one-document tiles unmasked; ids that come back (0, 1, 0)
    stay correct."""
    from jaxattn_flash import mosaic_kernels as mk
    from jaxattn_flash.mosaic_segments import clip_full, clip_range, segment_tile_ranges

    rng = np.random.default_rng(7)
    n, rows, tile = 1024, 128, 64
    if ids == "returning":
        q_ids = (np.arange(n) // 100 % 2).astype(np.int32)
    elif ids == "one-document":
        q_ids = np.zeros(n, np.int32)
    else:
        q_ids = _packed_ids(rng, n, 5)
    causal = ids == "packed-causal"
    vis = q_ids[:, None] == q_ids[None, :]
    if causal:
        vis &= np.tri(n, dtype=bool)
    spec = mk.MosaicSpec(scale=1.0, band_lo=None, band_hi=0 if causal else None, block_kv=tile)
    for keys_major, v in ((False, vis), (True, vis.T)):  # forward / dq blocks, and dk/dv key blocks
        ranges = segment_tile_ranges(jax.numpy.asarray(q_ids[None]), jax.numpy.asarray(q_ids[None]), rows, tile)
        for blk in range(n // rows):
            block = v[blk * rows:(blk + 1) * rows].reshape(rows, n // tile, tile)
            any_vis, all_vis = block.any(axis=(0, 2)), block.all(axis=(0, 2))
            # in the kernels' order: the band's visited range, cut; its full tiles within, cut
            if keys_major:  # the band seen from keys (not checked here): all tiles visited, none full
                lb, ub = clip_range(ranges, 0, blk, 0, n // tile)
                fs, fe = lb, (lb if causal else ub)
            else:
                lb, ub = clip_range(ranges, 0, blk, *mk.block_range(spec, blk * rows, n // tile))
                fs, fe = mk.full_range(spec, blk * rows, lb, ub, rows)
            fs, fe = clip_full(ranges, 0, blk, ub, fs, fe)
            lb, ub, fs, fe = (int(x) for x in (lb, ub, fs, fe))
            assert lb <= fs <= fe <= ub, (keys_major, blk, lb, fs, fe, ub)
            assert set(np.flatnonzero(any_vis)) <= set(range(lb, ub)), (keys_major, blk, lb, ub)
            assert all(all_vis[fs:fe]), (keys_major, blk, fs, fe)
            if ids != "returning" and not (keys_major and causal):
                assert all(any_vis[lb:ub]), (keys_major, blk, lb, ub)  # tight: no tile without a pair
                assert set(np.flatnonzero(all_vis)) <= set(range(fs, fe)), (keys_major, blk, fs, fe)


@pytest.mark.parametrize("fused, head_dim, chunk", [(None, 128, None), ("split", 128, None), ("own", 128, None),
                                                    ("own", 64, None), (None, 64, 96), ("split", 128, 128)])
def test_mosaic_backward_traces_in_each_dq_form(fused, head_dim, chunk):
    """The Mosaic backward kernels trace (jax.make_jaxpr, no GPU) for each way of making dq, with a
    causal GQA band (chunked causal where `chunk`) and soft-cap, and give dq/dk/dv of the inputs'
    shapes and dtype: two kernels for the dq kernel's form, one writing in place with TMA
    add-reductions for the fused ones."""
    import jax.numpy as jnp

    from jaxattn_flash.mosaic_bwd_kernels import MosaicBwdSpec, mosaic_backward

    b, s, hq, hkv = 1, 256, 4, 2
    q = jax.ShapeDtypeStruct((b, s, hq, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, s, hkv, head_dim), jnp.bfloat16)
    rows = jax.ShapeDtypeStruct((b, hq, s), jnp.float32)
    spec = MosaicBwdSpec(scale=0.1, band_lo=None, band_hi=0, soft_cap=30.0, fused_dq=fused, chunk=chunk)
    traced = jax.make_jaxpr(lambda *a: mosaic_backward(spec, *a))(q, kv, kv, q, rows, rows)
    assert [(o.aval.shape, o.aval.dtype) for o in traced.jaxpr.outvars] == [
        (q.shape, q.dtype), (kv.shape, kv.dtype), (kv.shape, kv.dtype)]
    text = str(traced)
    if fused is None:
        assert text.count("mpmd_map") == 2 and "core_map" not in text and "reduction_op=add" not in text
    else:
        assert "mpmd_map" not in text and "core_map" in text and "reduction_op=add" in text


def test_fused_dq_backward_traces_under_vmap():
    """`core_map`, which the fused form's in-place dq buffer needs, has no batching rule: under
    `vmap` (nested, with an unmapped key) the mapped axes join the batch axis of one kernel call."""
    import jax.numpy as jnp

    from jaxattn_flash.mosaic_bwd_kernels import MosaicBwdSpec, mosaic_backward

    spec = MosaicBwdSpec(scale=0.1, band_lo=None, band_hi=0, fused_dq="split")
    q = jax.ShapeDtypeStruct((3, 2, 1, 256, 4, 128), jnp.bfloat16)
    v = jax.ShapeDtypeStruct((3, 2, 1, 256, 2, 128), jnp.bfloat16)
    k = jax.random.normal(jax.random.PRNGKey(0), (1, 256, 2, 128), jnp.bfloat16)  # shared by every mapped call
    rows = jax.ShapeDtypeStruct((3, 2, 1, 4, 256), jnp.float32)
    inner = jax.vmap(lambda q, v, do, l, dl: mosaic_backward(spec, q, k, v, do, l, dl))
    traced = jax.make_jaxpr(jax.vmap(inner))(q, v, q, rows, rows)
    assert [o.aval.shape for o in traced.jaxpr.outvars] == [q.shape, (3, 2, 1, 256, 2, 128), (3, 2, 1, 256, 2, 128)]
    text = str(traced)
    assert "core_map" in text and "bf16[6,256,4,128]" in text  # one call over 3 x 2 x 1 batch rows


@pytest.mark.parametrize("head_dim, band, sinks, chunk", [(128, (None, 0), False, None), (64, (-100, 0), False, None),
                                                          (256, (None, 0), True, None), (128, (None, 0), False, 192)])
def test_guarded_forward_traces_with_its_cleaning_state(head_dim, band, sinks, chunk):
    """`guard_values` (the Mosaic forward's in-kernel value guard) traces (no GPU) for causal,
    a window and head_dim 256 (K/V tiles of 64, column chunks of 128), with the same outputs as
    the unguarded kernel and one more shared-memory buffer: the per-stage marks of the keys
    whose value was non-finite. The GPU tests (`test_gpu_nonfinite.py`) check its numbers."""
    import jax.numpy as jnp

    from jaxattn_flash import mosaic_kernels as mk

    block_kv = 64 if head_dim == 256 else 128
    q = jax.ShapeDtypeStruct((1, 512, 4, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 512, 2, head_dim), jnp.bfloat16)
    extra = (jax.ShapeDtypeStruct((4,), jnp.float32),) if sinks else ()
    traced = {}
    for guard in (False, True):
        spec = mk.MosaicSpec(scale=0.1, band_lo=band[0], band_hi=band[1], block_kv=block_kv, sinks=sinks,
                             guard_values=guard, chunk=chunk)
        jaxpr = jax.make_jaxpr(lambda *a, spec=spec: mk.mosaic_forward(spec, *a))(q, kv, kv, *extra)
        traced[guard] = jaxpr
        assert [(o.aval.shape, o.aval.dtype) for o in jaxpr.jaxpr.outvars] == [
            (q.shape, q.dtype), ((1, 4, 512), jnp.float32)]
    marks = f"Ref<smem>{{f32[2,{block_kv}]}}"  # (stages, block_kv)
    assert str(traced[True]).count(marks) > str(traced[False]).count(marks)
    # the guarded kernel runs its cleaning only for (batch row, kv head) pairs whose values hold a
    # non-finite entry: one flag per pair, read from v before the kernel (the kernel's own test is
    # (x - x) == 0)
    assert "is_finite" in str(traced[True]) and "is_finite" not in str(traced[False])
    # a differentiated call has the keys' flags already (value_guard.bad_keys, for the backward):
    # the guard takes them and reads v no second time
    bad = jax.ShapeDtypeStruct((1, 512, 2), jnp.bool_)
    with_bad = jax.make_jaxpr(lambda q, k, v, bad, *sink: mk.mosaic_forward(spec, q, k, v, *sink, bad_keys=bad))(
        q, kv, kv, bad, *extra)
    assert "is_finite" not in str(with_bad)


LOWERED = {  # name: forward spec fields (head_dim 128 unless named)
    "causal": dict(band_lo=None, band_hi=0),
    "full-d64": dict(band_lo=None, band_hi=None, head_dim=64),
    "causal-guarded-d256-passes": dict(band_lo=None, band_hi=0, guard_values=True, head_dim=256, block_kv=64,
                                       passes=4),
    "window-softcap-lengths-d256": dict(band_lo=-200, band_hi=0, soft_cap=30.0, kv_lengths=True, head_dim=256,
                                        block_kv=64),
    "chunked-d256": dict(band_lo=None, band_hi=0, chunk=192, head_dim=256, block_kv=64),
    "segments-causal-lengths-d256": dict(band_lo=None, band_hi=0, segments=True, kv_lengths=True, head_dim=256,
                                         block_kv=64),
    "causal-guarded-passes": dict(band_lo=None, band_hi=0, guard_values=True, passes=4),
    "causal-clusters": dict(band_lo=None, band_hi=0, cluster=4, dkv_cluster=2),
    "window-guarded-softcap": dict(band_lo=-200, band_hi=0, guard_values=True, soft_cap=30.0),
    "chunked-guarded-sinks": dict(band_lo=None, band_hi=0, guard_values=True, chunk=192, sinks=True),
    "lengths-guarded": dict(band_lo=None, band_hi=0, guard_values=True, q_lengths=True, kv_lengths=True),
    "segments-full-d64": dict(band_lo=None, band_hi=None, segments=True, head_dim=64),
    "segments-causal-guarded-lengths": dict(band_lo=None, band_hi=0, guard_values=True, segments=True,
                                            kv_lengths=True),
    "mla-192-128-causal-guarded": dict(band_lo=None, band_hi=0, guard_values=True, head_dim=192,
                                       value_head_dim=128, block_kv=64),
    "d64-dv128-window-guarded": dict(band_lo=-200, band_hi=0, guard_values=True, head_dim=64, value_head_dim=128),
    "d128-dv64-full": dict(band_lo=None, band_hi=None, value_head_dim=64),
    "d256-dv128-window": dict(band_lo=-200, band_hi=0, head_dim=256, value_head_dim=128, block_kv=64),
    "d128-dv256-full": dict(band_lo=None, band_hi=None, head_dim=128, value_head_dim=256, block_kv=64),
    # soft-capped logits without a running max
    "causal-softcap-bounded": dict(band_lo=None, band_hi=0, soft_cap=30.0, bounded_logits=True),
    "window-guarded-softcap-bounded-sinks": dict(band_lo=-200, band_hi=0, guard_values=True, soft_cap=30.0,
                                                 bounded_logits=True, sinks=True),
}


@pytest.mark.parametrize("name", list(LOWERED))
def test_mosaic_kernels_lower_for_cuda_without_a_gpu(name):
    """`jax.export(..., platforms=["cuda"])` runs Pallas's Mosaic GPU lowering on this CPU machine:
    every lowering rule and inline PTX emitter of the forward (named barriers, the value guard's
    cleaning, chunk masks, sinks) and of the dq/dk/dv kernels (launch passes' id arithmetic) must
    accept what we give them. The
    module that comes out is what a GPU compiles (not run here)."""
    import jax.numpy as jnp
    from jax import export

    from jaxattn_flash import mosaic_bwd_kernels as mbk
    from jaxattn_flash import mosaic_kernels as mk

    fields = dict(LOWERED[name])
    passes = fields.pop("passes", 1)  # the dk/dv grid's launch passes (backward only)
    dkv_cluster = fields.pop("dkv_cluster", 0)  # the dk/dv grid's launch clusters
    d = fields.pop("head_dim", 128)
    d_v = fields.pop("value_head_dim", d)
    q = jax.ShapeDtypeStruct((1, 512, 4, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 512, 2, d), jnp.bfloat16)
    values = jax.ShapeDtypeStruct((1, 512, 2, d_v), jnp.bfloat16)
    sinks = jax.ShapeDtypeStruct((4,), jnp.float32) if fields.get("sinks") else None
    lengths = jax.ShapeDtypeStruct((1,), jnp.int32)
    ids = jax.ShapeDtypeStruct((1, 512), jnp.int32)
    segments = (ids, ids) if fields.get("segments") else (None, None)
    spec = mk.MosaicSpec(scale=0.1, **fields)
    forward = export.export(jax.jit(lambda *a: mk.mosaic_forward(spec, *a)), platforms=["cuda"])(
        q, kv, values, sinks, lengths if spec.q_lengths else None, lengths if spec.kv_lengths else None, *segments)
    assert "mosaic_gpu" in forward.mlir_module()
    assert [o.shape for o in forward.out_avals] == [(1, 512, 4, d_v), (1, 4, 512)]
    wide = flash_config.wide_backward(d, d_v)
    if not (wide or {d, d_v} <= set(gpu_path.MOSAIC_BWD_HEAD_DIMS)):
        return
    # the backward's separate dq kernel and its dk/dv kernel (the fused form writes a mutable ref,
    # which jax.export does not take), with the forward's band and chunk
    bspec = mbk.MosaicBwdSpec(scale=0.1, band_lo=fields["band_lo"], band_hi=fields["band_hi"],
                              soft_cap=fields.get("soft_cap"), chunk=fields.get("chunk"),
                              kv_lengths=fields.get("kv_lengths", False), segments=spec.segments,
                              dq_block_kv=32 if wide else 64, passes=passes,
                              cluster=dkv_cluster)  # wide: mosaic_bwd_wide's dk/dv
    rows = jax.ShapeDtypeStruct((1, 4, 512), jnp.float32)
    backward = export.export(jax.jit(lambda *a: mbk.mosaic_backward(bspec, *a)), platforms=["cuda"])(
        q, kv, values, jax.ShapeDtypeStruct((1, 512, 4, d_v), jnp.bfloat16), rows, rows,
        lengths if bspec.kv_lengths else None, *segments)
    assert [o.shape for o in backward.out_avals] == [q.shape, kv.shape, values.shape]
