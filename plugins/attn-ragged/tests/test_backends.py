"""Registration, supports() reasons, selection, the conformance suite, the TPU wrapper, the GPU path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import AttentionRequest, Hardware
from jaxattn.request import PagedLayout
from jaxattn.testing import run_conformance
from jaxattn.testing.conformance import relative_error
from jaxattn_ragged import DecodeAttention, RaggedPagedAttention
from jaxattn_ragged._testing import assert_close, paged_problem, reference, run_impl

H100 = Hardware.nvidia()


def request(**kw):
    paged = PagedLayout(num_pages=64, page_size=kw.pop("page_size", 16), pages_per_seq=8, num_seqs=4,
                        ragged=kw.pop("ragged", True))
    base = dict(op="paged_attention", batch=4, q_len=32, kv_len=128, num_q_heads=8, num_kv_heads=2,
                head_dim=128, value_head_dim=128, dtype="bfloat16", kv_dtype="bfloat16",
                mask_kinds=frozenset({"causal"}), kv_seq_lengths=True, needs_grad=False, mode="prefill",
                paged=paged)
    base.update(kw)
    return AttentionRequest(**base)


def test_registered_through_entry_points():
    infos = {(b.name, b.op): b for b in jaxattn.list_backends()}
    assert ("ragged_paged", "paged_attention") in infos
    assert ("decode", "paged_attention") in infos
    assert set(infos[("ragged_paged", "paged_attention")].aliases) == {"ragged_page_attention_v3", "page_attention"}
    assert "autoregressive_decodeattn" in infos[("decode", "paged_attention")].aliases


def test_supports_reasons():
    impl = RaggedPagedAttention()
    assert impl.supports(request(), H100)
    cpu = impl.supports(request(), Hardware.cpu())
    assert not cpu and "interpret" in str(cpu) and "xla" in str(cpu)
    tpu = impl.supports(request(), Hardware.tpu())
    assert not tpu and "interpreter" in str(tpu)
    bad = impl.supports(request(page_size=12, head_dim=96, kv_dtype="float8_e4m3fn", needs_grad=True), H100)
    text = str(bad)
    for word in ("page_size 12", "head_dim 96", "float8_e4m3fn", "backward"):
        assert word in text, text
    assert len(bad.reasons) == 4
    assert not impl.supports(request(), Hardware.nvidia(compute_capability=(7, 5)))
    assert not impl.supports(request(), Hardware(platform="gpu", device_kind="MI300", gpu_vendor="amd"))
    # the decode backend serves decode calls only
    assert DecodeAttention().supports(request(ragged=False, mode="decode"), H100)
    assert "ragged_paged" in str(DecodeAttention().supports(request(), H100))
    # interpret mode accepts the CPU; the TPU wrapper, when enabled, names its own limits
    assert RaggedPagedAttention(interpret=True).supports(request(), Hardware.cpu())
    tpu_on = RaggedPagedAttention(enable_tpu=True).supports(request(has_sinks=True, head_dim=64, value_head_dim=64),
                                                            Hardware.tpu())
    assert "sinks" in str(tpu_on) and "multiple of 128" in str(tpu_on)


def test_supports_quantized_pages():
    impl = RaggedPagedAttention()
    for kv in ("int8", "float8_e4m3fn"):
        for scale in ("per_token", "scalar"):
            assert impl.supports(request(kv_dtype=kv, kv_scale=scale), H100)
            assert DecodeAttention().supports(request(kv_dtype=kv, kv_scale=scale, ragged=False, mode="decode"), H100)
        assert "need their scales (k_scale/v_scale)" in str(impl.supports(request(kv_dtype=kv), H100))
    a100 = Hardware.nvidia(compute_capability=(8, 0), device_kind="NVIDIA A100")
    assert impl.supports(request(kv_dtype="int8", kv_scale="per_token"), a100)
    assert ">= 8.9" in str(impl.supports(request(kv_dtype="float8_e4m3fn", kv_scale="per_token"), a100))
    assert "float8_e5m2" in str(impl.supports(request(kv_dtype="float8_e5m2", kv_scale="scalar"), H100))
    tpu = RaggedPagedAttention(enable_tpu=True).supports(request(kv_dtype="int8", kv_scale="per_token"), Hardware.tpu())
    assert "k_scale/v_scale" in str(tpu) and "no quantized cache" in str(tpu)


def test_auto_picks_the_kernel_on_a_gpu():
    args = paged_problem(0, [20, 7], [3, 1])
    sel = jaxattn.select(*(args[k] for k in ("query", "key_pages", "value_pages", "kv_lengths", "page_indices")),
                         cu_q_lens=args["cu_q_lens"], op="paged_attention", hardware=H100)
    assert sel.name == "ragged_paged"
    sel = jaxattn.select(*(args[k] for k in ("query", "key_pages", "value_pages", "kv_lengths", "page_indices")),
                         cu_q_lens=args["cu_q_lens"], op="paged_attention", hardware=Hardware.cpu())
    assert sel.name == "xla"
    k8, ks = jaxattn.quantize_kv(args["key_pages"], jnp.int8)  # int8 pages with scales: still the kernel
    sel = jaxattn.select(args["query"], k8, k8, args["kv_lengths"], args["page_indices"], cu_q_lens=args["cu_q_lens"],
                         k_scale=ks, v_scale=ks, op="paged_attention", hardware=H100)
    assert sel.name == "ragged_paged" and "kv int8" in sel.explain()


def test_conformance_ragged_paged():
    report = run_conformance(RaggedPagedAttention(interpret=True), hardware=Hardware.cpu(),
                             dtypes=["float32"], expect_supported="*")
    report.assert_ok()


def test_conformance_decode():
    report = run_conformance(DecodeAttention(interpret=True), hardware=Hardware.cpu(), dtypes=["bfloat16"],
                             cases=["paged_decode", "paged_soft_cap", "paged_fp8"], expect_supported="*")
    report.assert_ok()


def _tpu_reference_kernel():
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ref_ragged_paged_attention

    def kernel(q, kv, lens, table, cu, num_seqs, **kw):
        return ref_ragged_paged_attention(q, kv, lens, table, cu, num_seqs, **kw)
    return kernel


@pytest.mark.parametrize("ragged", [False, True])
def test_tpu_wrapper_layout(ragged):
    """The TPU path's conversions (combined K/V pages, window, decode/padding) checked with jax's own
    reference of the TPU kernel: the kernel itself cannot run in jax 0.10.2's TPU interpreter."""
    impl = RaggedPagedAttention(enable_tpu=True, tpu_kernel=_tpu_reference_kernel())
    if ragged:
        args = paged_problem(7, [40, 0, 23], [12, 0, 1], pad_tokens=3)
        kw = dict(sliding_window=9, logits_soft_cap=3.0)
    else:
        args = paged_problem(8, [40, 0, 23])
        kw = {}
    from jaxattn import OperationMetadata
    from jaxattn.validation import build_paged_inputs
    inputs = build_paged_inputs(*(args[k] for k in ("query", "key_pages", "value_pages", "kv_lengths",
                                                    "page_indices")), cu_q_lens=args.get("cu_q_lens"),
                                scale=None, sinks=None, metadata=OperationMetadata(),
                                sliding_window=kw.get("sliding_window"), logits_soft_cap=kw.get("logits_soft_cap"))
    # the forward itself (eager: jax's reference loops in Python): the reference kernel has none of the
    # real kernel's limits (head_dim 128, 16-bit), which the instance's supports() declares
    out, lse = impl.forward_tpu(inputs, OperationMetadata())
    assert lse is None
    assert_close(out, reference(args, **kw), jnp.float32)


def test_tpu_kernel_is_not_interpretable_here():
    """Documents why TPU is off by default; if a JAX makes this pass, turn the TPU path on."""
    from jaxattn_ragged._compat import tpu_interpret_mode
    from jaxattn_ragged.tpu import combine_kv_pages, tpu_paged_attention
    args = paged_problem(9, [40, 17], [10, 1], hq=4, hkv=2, d=128)
    with pytest.raises(Exception):  # noqa: B017 - any failure of the interpreter
        with tpu_interpret_mode():
            out = tpu_paged_attention(args["query"], args["key_pages"], args["value_pages"], args["kv_lengths"],
                                      args["page_indices"], args["cu_q_lens"], scale=0.1, window_left=None,
                                      soft_cap=None, num_kv_pages_per_block=2, num_queries_per_block=8)
            jax.block_until_ready(out)
    assert combine_kv_pages(args["key_pages"], args["value_pages"]).shape[2] == 4


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("impl", [RaggedPagedAttention, DecodeAttention], ids=["ragged_paged", "decode"])
def test_gpu_conformance(impl, dtype):
    """One test per kernel and dtype: each compiles every case it serves (a few minutes in all)."""
    run_conformance(impl(), hardware=Hardware.nvidia(), dtypes=[dtype]).assert_ok()


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_gpu_api_shapes_and_quantized_pages():
    args = paged_problem(10, [300, 41, 0, 1000], [64, 1, 0, 1], hq=32, hkv=8, d=128, dtype=jnp.bfloat16,
                         page_size=16, pad_tokens=7)
    out = jaxattn.paged_attention(**args, backend="ragged_paged", sliding_window=100, logits_soft_cap=20.0)
    assert_close(out, reference(args, sliding_window=100, logits_soft_cap=20.0), jnp.bfloat16)
    # other head dims and page sizes that supports() accepts
    for seed, (d, ps, hq, hkv) in enumerate([(256, 8, 16, 2), (64, 128, 8, 8), (128, 32, 64, 1), (32, 256, 4, 4)]):
        for counts in (None, [33, 1, 0]):
            args = paged_problem(20 + seed, [700, 3, 129], counts, hq=hq, hkv=hkv, d=d, dtype=jnp.float16,
                                 page_size=ps, pad_tokens=2 if counts else 0)
            for name in ("ragged_paged",) + (("decode",) if counts is None else ()):
                out = jaxattn.paged_attention(**args, backend=name, sliding_window=300)
                assert_close(out, reference(args, sliding_window=300), jnp.float16)
    dec = paged_problem(11, [5000, 1, 77], hq=32, hkv=8, d=128, dtype=jnp.bfloat16, page_size=64)
    assert_close(jaxattn.paged_attention(**dec, backend="decode"), reference(dec), jnp.bfloat16)
    # quantized pages through the public API (auto picks the kernel): the dequantized reference
    for dtype in (jnp.int8, jnp.float8_e4m3fn):
        k, ks = jaxattn.quantize_kv(dec["key_pages"], dtype)
        v, vs = jaxattn.quantize_kv(dec["value_pages"], dtype)
        quant = {**dec, "key_pages": k, "value_pages": v}
        for name in ("ragged_paged", "decode"):
            out = jaxattn.paged_attention(**quant, k_scale=ks, v_scale=vs, backend=name, sliding_window=3000)
            assert_close(out, reference(quant, k_scale=ks, v_scale=vs, sliding_window=3000), jnp.bfloat16)
        if dtype == jnp.int8:  # int8 tensor-core products (config int8_dots): one more rounding each
            for dots, tol in ((1, 1e-2), (2, 2e-2)):
                for name in ("ragged_paged", "decode"):
                    md = jaxattn.OperationMetadata(operation_configs={name: {"int8_dots": dots}})
                    out = jaxattn.paged_attention(**quant, k_scale=ks, v_scale=vs, backend=name, metadata=md)
                    err = relative_error(out, reference(quant, k_scale=ks, v_scale=vs))
                    assert err <= tol, (name, dots, err)
    out2 = run_impl(RaggedPagedAttention(), dec, hardware=Hardware.nvidia())[0]
    assert np.isfinite(np.asarray(out2, np.float32)).all()


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("name", ["ragged_paged", "decode"])
def test_gpu_non_finite_slots_and_bad_pages_under_jit(name):
    """Compiled kernels: NaN in never-written and written-but-invisible slots reaches no query
    that does not see it; out-of-range pages and lengths under jit are masked, never read."""
    counts = None if name == "decode" else [40, 1, 9]
    args = paged_problem(30, [300, 41, 90], counts, hq=16, hkv=4, d=128, dtype=jnp.bfloat16, page_size=16,
                         pad_tokens=0 if counts is None else 3)
    values = np.array(args["value_pages"], np.float32)
    rng = np.random.default_rng(0)
    for _ in range(20):
        values[rng.integers(values.shape[0]), rng.integers(values.shape[1]), rng.integers(values.shape[2])] = np.nan
    args["value_pages"] = jnp.asarray(values, jnp.bfloat16)
    table = np.array(args["page_indices"])
    table[0, 3], table[2, 1] = -1, table.shape[0] * 1000  # bad pages holding tokens of sequences 0 and 2
    args["page_indices"] = jnp.asarray(table)
    args["kv_lengths"] = args["kv_lengths"].at[1].set(10_000)  # past the capacity

    def run(backend):
        return jax.jit(lambda a: jaxattn.paged_attention(**a, backend=backend))(args)

    got, want = np.asarray(run(name), np.float32), np.asarray(run("xla"), np.float32)
    assert np.array_equal(np.isfinite(got).all(-1), np.isfinite(want).all(-1))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("backend", ["ragged_paged", "decode"])
@pytest.mark.parametrize("pages", ["bfloat16", "int8", "float8_e4m3fn"])
def test_gpu_kernels_lower_for_cuda_without_a_gpu(backend, pages):
    """`jax.export(..., platforms=["cuda"])` on an injected H100 runs Pallas's Triton lowering of the
    compiled paged kernels on this CPU machine (the interpreter never does): decode for both
    backends, a ragged prefill+decode batch for ragged_paged, with per-token scales on one-byte
    pages (their decode takes the Mosaic GPU kernel on this Hopper GPU). Not run here."""
    from jax import export

    quantized = pages != "bfloat16"
    kp = jax.ShapeDtypeStruct((64, 16, 2, 128), jnp.dtype(pages))
    scales = [jax.ShapeDtypeStruct((64, 16, 2), jnp.float32)] * 2 if quantized else []
    lengths, table = jax.ShapeDtypeStruct((4,), jnp.int32), jax.ShapeDtypeStruct((4, 16), jnp.int32)
    calls = {"decode": (jax.ShapeDtypeStruct((4, 8, 128), jnp.bfloat16), None)}
    if backend == "ragged_paged":
        calls["ragged"] = (jax.ShapeDtypeStruct((40, 8, 128), jnp.bfloat16), jax.ShapeDtypeStruct((5,), jnp.int32))
    unchecked = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    for kind, (q, cu) in calls.items():
        def run(q, k, v, n, t, cu, *scales):
            ks, vs = scales if scales else (None, None)
            return jaxattn.paged_attention(q, k, v, n, t, cu_q_lens=cu, k_scale=ks, v_scale=vs, backend=backend)

        with jaxattn.hardware.override(H100):
            exported = export.export(jax.jit(run), platforms=["cuda"], disabled_checks=unchecked)(
                q, kp, kp, lengths, table, cu, *scales)
        # one-byte decode on a Hopper GPU defaults to the Mosaic decode kernel (ONE_BYTE_DECODE)
        kernel = "mosaic_gpu" if quantized and kind == "decode" else "xla.gpu.triton"
        assert kernel in exported.mlir_module(), kind
        assert exported.out_avals[0].shape == q.shape, kind
