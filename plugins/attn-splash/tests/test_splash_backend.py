"""The splash backend on CPU: jax's TPU splash kernels run through the Pallas interpreter
(`SplashAttention(interpret=True)`), compared with the `xla` reference by the core's
conformance suite, forward and backward; plus what `supports()` says."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from jaxattn import (
    AttentionRequest,
    CausalMask,
    DenseMask,
    Hardware,
    OperationMetadata,
    SegmentMask,
    SlidingWindowMask,
)
from jaxattn.testing import Case, Shape, check_case, run_conformance
from jaxattn.testing.conformance import build_inputs, relative_error
from jaxattn_splash import SplashAttention, config, describe_mask

BLOCKS_128 = dict(block_q=128, block_kv=128, block_kv_compute=128, block_q_dkv=128, block_kv_dkv=128,
                  block_kv_dkv_compute=128, block_q_dq=128, block_kv_dq=128)
# 256-token sequences in 128-tiles: 2 x 2 tiles, so empty/partial/full tiles are all exercised.
METADATA = OperationMetadata(operation_configs={"splash": BLOCKS_128})
FUSED = OperationMetadata(operation_configs={"splash": dict(block_q=128, block_kv=128, block_q_dkv=128,
                                                            block_kv_dkv=128, use_fused_bwd_kernel=True)})
# Batch 1 keeps the suite inside CI's time budget (the interpreter's compile time dominates);
# batches of 2 (the vmapped path) run in the extra cases and under the mesh below.
SHAPE = Shape(batch=1, seq=256, num_heads=2, head_dim=64)
REJECTED = {"bias", "dropout", "decode"}
CPU = Hardware.cpu()


@pytest.fixture(scope="module")
def impl() -> SplashAttention:
    return SplashAttention(interpret=True)


def test_conformance_every_declared_feature(impl):
    """Every conformance case but bias, dropout and decode, float32, forward and backward
    (fused backward kernel here; the separate dQ kernel runs in the extra cases and on the mesh)."""
    from jaxattn.testing import attention_cases

    names = [c.name for c in attention_cases()]
    report = run_conformance(impl, hardware=CPU, dtypes=["float32"], shape=SHAPE, metadata=FUSED,
                             expect_supported=[n for n in names if n not in REJECTED])
    print(report.table())
    report.assert_ok()
    rejected = {r.case for r in report.results if r.status == "rejected"}
    assert rejected == REJECTED
    assert all(r.backward for r in report.results if r.status == "pass")


# -- paths the standard cases do not reach ---------------------------------------------------


def _qkv(key, dtype, b, sq, skv, hq, hkv, d=64, dv=64, scale=1.0):
    kq, kk, kv = jax.random.split(key, 3)
    return {
        "query": (scale * jax.random.normal(kq, (b, sq, hq, d))).astype(dtype),
        "key": (scale * jax.random.normal(kk, (b, skv, hkv, d))).astype(dtype),
        "value": jax.random.normal(kv, (b, skv, hkv, dv)).astype(dtype),
    }


def _segments(b, n, cuts):
    ids = np.zeros((b, n), np.int32)
    for row, row_cuts in enumerate(cuts):
        for c in row_cuts:
            ids[row, c:] += 1
    return jnp.asarray(ids)


EXTRA = [
    Case("odd_lengths_q_longer", "attention", lambda k, d, s: {
        **_qkv(k, d, 2, 328, 200, 2, 1), "is_causal": True,
        "key_value_seq_lengths": jnp.asarray([200, 150], jnp.int32),
        "query_seq_lengths": jnp.asarray([300, 250], jnp.int32), "return_lse": True},
        description="q/kv not multiples of 128 (both padded), q_len > kv_len so the first 128 rows "
                    "see no key, MQA, q and kv lengths per example, lse; fused backward kernel"),
    Case("sinks_segments_dead_rows", "attention", lambda k, d, s: {
        **_qkv(k, d, 2, 256, 256, 2, 2), "mask": CausalMask(-20),
        "segment_ids": _segments(2, 256, [[60, 190], [130]]),
        "sinks": jax.random.normal(jax.random.fold_in(k, 1), (2,)), "return_lse": True},
        description="sinks applied after the kernel (segments may leave rows empty), dead rows, lse"),
    Case("gqa_window_sinks_softcap_lse", "attention", lambda k, d, s: {
        **_qkv(k, d, 1, 256, 256, 4, 2, scale=2.0), "is_causal": True, "sliding_window": 100,
        "sinks": jax.random.normal(jax.random.fold_in(k, 1), (4,)), "logits_soft_cap": 5.0,
        "return_lse": True},
        description="sinks inside the kernel, GQA, window, soft-cap, gradient through the lse (bf16)"),
    Case("dense_per_batch_head_and_or_segments", "attention", lambda k, d, s: {
        **_qkv(k, d, 2, 256, 256, 2, 2), "sliding_window": (64, 64),
        "mask": DenseMask(jax.random.bernoulli(jax.random.fold_in(k, 2), 0.6, (2, 2, 256, 256)))
        & (SegmentMask(_segments(2, 256, [[100], [30]]), _segments(2, 256, [[100], [30]])) | CausalMask())},
        description="the last-resort dynamic path: a dense [B, H, q, kv] mask, and an | involving "
                    "segments, materialized with the window; fused backward kernel"),
]
DTYPE = {"gqa_window_sinks_softcap_lse": jnp.bfloat16}


@pytest.mark.parametrize("case", EXTRA, ids=lambda c: c.name)
def test_extra_cases(impl, case):
    metadata = METADATA if case.name in ("sinks_segments_dead_rows", "gqa_window_sinks_softcap_lse") else FUSED
    result = check_case(impl, case, hardware=CPU, dtype=DTYPE.get(case.name, jnp.float32), metadata=metadata)
    print(result.line())
    assert result.status == "pass", result.line()
    assert result.backward


def test_tpu_faithful_interpreter():
    """The same kernels under `pltpu.InterpretParams` (simulated VMEM/SMEM and DMAs,
    uninitialized memory read as NaN, out-of-bounds reads raise): causal + packed segments."""
    from jaxattn.testing import attention_cases
    from jaxattn_splash import _compat

    if _compat.InterpretParams is None:
        pytest.skip("this jax has no pltpu.InterpretParams")
    impl = SplashAttention(interpret=_compat.InterpretParams())
    case = next(c for c in attention_cases() if c.name == "segment_ids")
    # batch 1: this interpreter cannot run a vmapped pallas_call (jax 0.10.2: its grid gains a
    # dimension that the kernel's dimension_semantics do not list), so no vmap is used then.
    result = check_case(impl, case, hardware=CPU, dtype=jnp.float32, shape=SHAPE, metadata=METADATA)
    assert result.status == "pass" and result.backward, result.line()


def test_sharded_heads_and_batch(impl):
    """Under a mesh the core runs the backend in shard_map; the kernel sees local heads and
    builds its mask info per shard (lazy mask, and a per-head dense mask sharded by heads)."""
    from jaxattn.backends.xla import XlaAttention
    from jaxattn.sharding import run_sharded

    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("dp", "tp"))
    sharded = OperationMetadata(mesh=mesh, operation_configs={"splash": BLOCKS_128})
    args = _qkv(jax.random.PRNGKey(3), jnp.float32, 2, 256, 256, 4, 2)
    per_head = jax.random.bernoulli(jax.random.PRNGKey(4), 0.7, (1, 4, 256, 256))
    for mask in (CausalMask() & SlidingWindowMask(70, 0), DenseMask(per_head) & CausalMask()):
        inputs = build_inputs("attention", {**args, "mask": mask, "return_lse": True}, sharded)
        request = AttentionRequest.from_inputs(inputs)

        def loss(q, k, v, backend, metadata, inputs=inputs, request=request):
            out, lse = backend(inputs.replace(query=q, key=k, value=v), request, metadata)
            return jnp.sum(out * out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

        def splash(i, r, m):
            return run_sharded(impl, i, r, m, CPU)

        def xla(i, r, m):
            return XlaAttention()(i, OperationMetadata(), CPU)

        primals = (args["query"], args["key"], args["value"])
        got = jax.jit(jax.value_and_grad(lambda *p: loss(*p, splash, sharded), argnums=(0, 1, 2)))(*primals)
        want = jax.jit(jax.value_and_grad(lambda *p: loss(*p, xla, None), argnums=(0, 1, 2)))(*primals)
        assert relative_error(got[0], want[0]) < 1e-4
        for g, w in zip(got[1], want[1]):
            assert relative_error(g, w) < 1e-4


# -- what it declares ------------------------------------------------------------------------


def _request(**changes) -> AttentionRequest:
    base = dict(batch=2, q_len=4096, kv_len=4096, num_q_heads=8, num_kv_heads=2, head_dim=128,
                value_head_dim=128, dtype="bfloat16", kv_dtype="bfloat16",
                mask_kinds=frozenset({"causal", "sliding_window", "segment"}), has_sinks=True,
                logits_soft_cap=True, return_lse=True, needs_grad=True, q_seq_lengths=True,
                kv_seq_lengths=True)
    return AttentionRequest(**{**base, **changes})


def test_supports_on_tpu():
    registered = SplashAttention()
    for gen, kind in ((4, "TPU v4"), (5, "TPU v5 lite"), (5, "TPU v5p"), (6, "TPU v6 lite")):
        assert registered.supports(_request(), Hardware.tpu(gen, kind)).ok
    assert registered.supports(_request(mask_kinds=frozenset({"dense", "or", "chunked_causal"})),
                               Hardware.tpu()).ok


def test_rejections_give_every_reason():
    registered = SplashAttention()
    verdict = registered.supports(
        _request(dtype="float16", kv_dtype="float16", head_dim=32, q_len=1, has_bias=True, dropout=True),
        Hardware.tpu(3, "TPU v3"))
    text = " | ".join(verdict.reasons)
    assert not verdict.ok
    for words in ("TPU v4 or newer", "float16", "head_dim=32", "q_len=1", "bias", "dropout"):
        assert words in text, words


def test_not_usable_on_cpu_or_gpu_except_interpreted():
    registered = SplashAttention()
    for hw in (Hardware.cpu(), Hardware.nvidia()):
        verdict = registered.is_available(hw)
        assert not verdict.ok and "needs a TPU" in verdict.reasons[0]
        assert not registered.supports(_request(), hw).ok
    assert SplashAttention(interpret=True).supports(_request(), CPU).ok
    with pytest.raises(RuntimeError, match="TPU only"):
        registered.forward_native(None, OperationMetadata())


def test_registered_through_the_entry_point():
    import jaxattn

    infos = {b.name: b for b in jaxattn.list_backends() if b.op == "attention"}
    assert "splash" in infos and "blocksparse" in infos["splash"].aliases


def test_block_sizes_clamped_and_checked():
    bs = config.block_sizes({}, Hardware.tpu(5, "TPU v5 lite"), 384, 1024)
    assert (bs.block_q, bs.block_kv, bs.block_q_dkv) == (384, 512, 384)
    bs = config.block_sizes({"block_q": 256}, Hardware.tpu(6, "TPU v6 lite"), 4096, 8192)
    assert (bs.block_q, bs.block_kv, bs.block_kv_compute) == (256, 1024, 512)
    bs = config.block_sizes({"use_fused_bwd_kernel": True}, None, 256, 256)
    assert bs.use_fused_bwd_kernel and bs.block_q_dq is None
    with pytest.raises(ValueError, match="unknown keys"):
        config.block_sizes({"block_z": 128}, None, 256, 256)
    with pytest.raises(ValueError, match="multiple of 128"):
        config.block_sizes({"block_q": 100}, None, 256, 256)
    with pytest.raises(ValueError, match=r"\['splash'\]\['use_fused_bwd_kernel'\] must be one of True, False"):
        config.SplashConfig(use_fused_bwd_kernel="yes")
    typed = config.block_sizes(config.SplashConfig(block_q=256), Hardware.tpu(6, "TPU v6 lite"), 4096, 8192)
    assert typed == config.block_sizes({"block_q": 256}, Hardware.tpu(6, "TPU v6 lite"), 4096, 8192)


def test_describe_mask_says_when_dense_is_used():
    assert describe_mask(CausalMask() & SlidingWindowMask(8, 0), 256, 256) == "lazy"
    assert "last resort" in describe_mask(DenseMask(jnp.ones((256, 256), bool)), 256, 256)


def test_traces_reuse_mask_info_and_32k_never_builds_a_dense_mask(impl):
    """Tracing the backend (what jit does) at 32k tokens with causal + window: no q x kv array
    is allocated, and a second trace (another layer, a re-jit) reuses the cached MaskInfo."""
    import tracemalloc

    from jaxattn import AttentionInputs
    from jaxattn_splash.mask_info import lazy_mask_info

    n = 32768
    spec = jax.ShapeDtypeStruct((1, n, 2, 128), jnp.bfloat16)
    mask = CausalMask() & SlidingWindowMask(1024, 0)
    metadata = OperationMetadata(operation_configs={"splash": {"block_q": 512, "block_kv": 512}})

    def step(q, k, v):
        inputs = AttentionInputs(q, k, v, mask=mask, scale=0.1, return_lse=True)
        return jax.grad(lambda q: impl(inputs.replace(query=q), metadata, CPU)[0].astype(jnp.float32).sum())(q)

    lazy_mask_info.cache_clear()
    tracemalloc.start()
    try:
        jax.eval_shape(step, spec, spec, spec)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 128 * 2**20, f"peak {peak / 2**20:.0f} MiB"  # a 32k x 32k bool mask is 1 GiB
    built = lazy_mask_info.cache_info().misses
    assert built == 2  # forward and dQ (same blocks: one entry), and dK/dV
    jax.eval_shape(step, spec, spec, spec)
    assert lazy_mask_info.cache_info().misses == built
