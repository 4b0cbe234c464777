"""The Mosaic GPU kernels on a Hopper GPU (skipped elsewhere): the conformance cases each path
serves, forced onto it, forward and gradients (Triton or Mosaic GPU backward), bf16 and fp16,
against the xla reference; MLA's head dims; launch orders; the soft-capped forward's forms
(running max or none, exp2 on the special-function unit or partly on the FMA pipe).
One test runs on CPU too: every conformance run's forced path serves each of its cases.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import AttentionRequest, OperationMetadata
from jaxattn.hardware import Hardware
from jaxattn.testing import Shape, run_conformance
from jaxattn.testing.cases import all_cases
from jaxattn.testing.conformance import build_inputs
from jaxattn_flash import FlashAttention, gpu_path
from jaxattn_flash._testing import flash_metadata as _md
from jaxattn_flash._testing import on_hopper as _on_hopper
from jaxattn_flash._testing import peers_request as _request

MOSAIC = OperationMetadata(operation_configs={"flash": {"gpu_kernel": "mosaic"}})
MOSAIC_CASES = ["full", "causal", "causal_q_lt_kv", "causal_top_left", "gqa", "mqa", "sliding_window",
                "sliding_window_asym", "fully_masked_rows", "return_lse", "soft_cap", "sinks", "chunked_causal",
                "seq_lengths", "segment_ids", "value_head_dim"]


GPU_RUNS = {  # name: (dtype, head_dim, cases, gradients)
    "d64-bf16": ("bfloat16", 64, MOSAIC_CASES, True),
    "d64-fp16": ("float16", 64, ["causal", "gqa", "fully_masked_rows", "soft_cap", "sinks"], True),
    "d128-bf16": ("bfloat16", 128, ["causal", "sliding_window_asym", "soft_cap", "sinks", "seq_lengths",
                                     "segment_ids"], True),
    "d256-bf16": ("bfloat16", 256, ["causal", "gqa", "soft_cap"], True),
}


def _by_case(runs):
    """(run, case) pairs of a table of runs, one test each: xdist's workers share a run's cases (the
    16 of d64-bf16 in one test did not finish within a 290 s device call)."""
    return [pytest.param(run, case, id=f"{run}-{case}") for run, spec in runs.items() for case in spec[2]]


@pytest.mark.gpu
@pytest.mark.skipif(not _on_hopper(), reason="needs a Hopper GPU (compute capability 9.x)")
@pytest.mark.parametrize("run,case", _by_case(GPU_RUNS))
def test_mosaic_conformance_gpu(run, case):
    dtype, head_dim, _, grads = GPU_RUNS[run]
    impl = FlashAttention()
    assert impl.gpu_kernel_for(_request(head_dim=head_dim, value_head_dim=head_dim),
                               jaxattn.hardware.current()).kernel == "mosaic"
    report = run_conformance(impl, dtypes=[dtype], cases=[case], expect_supported="*", metadata=MOSAIC,
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
    # the separate dq kernel's 128-key tile (2 stages: 3 do not fit), and 3 stages of the default forms
    "d128-bf16-dq-kv128": ("bfloat16", 128, ["causal", "gqa", "sliding_window_asym"],
                           {"mosaic_dq": "separate", "mosaic_block_kv_dq": 128}),
    "d128-bf16-3stages": ("bfloat16", 128, ["causal", "gqa", "sliding_window_asym"], {"mosaic_stages_bwd": 3}),
    "d128-bf16-mosaic-forward": ("bfloat16", 128, ["full", "causal", "gqa", "sliding_window", "soft_cap", "sinks",
                                                               "seq_lengths", "segment_ids"], {"gpu_kernel": "mosaic"}),
    # part of P's exp2 on the FMA pipe (mosaic_poly_exp2_bwd): rows without keys and past their
    # lengths must still get P = 0 (the polynomial's flush), NaN rows NaN
    "d128-bf16-poly-bwd": ("bfloat16", 128, ["causal", "gqa", "fully_masked_rows", "soft_cap", "sinks", "seq_lengths"],
                           {"gpu_kernel": "mosaic", "mosaic_poly_exp2_bwd": 2}),
    "d256-bf16-poly-bwd": ("bfloat16", 256, ["causal", "soft_cap"], {"mosaic_poly_exp2_bwd": 3, "mosaic_poly_degree": 3}),
}


def _forced_runs():
    """(name, dtype, head_dim, cases, metadata) of every conformance run above, as each forces its path."""
    for name, (dtype, head_dim, cases, _) in GPU_RUNS.items():
        yield f"forward {name}", dtype, head_dim, cases, MOSAIC
    for name, (dtype, head_dim, cases, config) in GPU_BWD_RUNS.items():
        yield f"backward {name}", dtype, head_dim, cases, _md(gpu_backward="mosaic", **config)


@pytest.mark.parametrize("run", list(_forced_runs()), ids=lambda run: run[0])
def test_every_gpu_run_is_served_on_hopper(run, monkeypatch):
    """On CPU, with Hopper injected: each case of each GPU conformance run above is one its forced path
    takes, so a GPU session spends its time on kernels, not on a config the plugin refuses (a run of
    the separate dq kernel's 128-key tile in 3 stages stayed here after the shared-memory check
    refused it, and failed on the H200)."""
    monkeypatch.setattr(gpu_path._compat, "mosaic_import_error", lambda: None)
    _, dtype, head_dim, cases, metadata = run
    impl, hopper = FlashAttention(), Hardware.nvidia()
    shape = Shape(batch=2, seq=256, num_heads=4, head_dim=head_dim)
    for case in (c for c in all_cases() if c.name in cases):
        inputs = build_inputs(case.op, case.build(jax.random.PRNGKey(0), jnp.dtype(dtype), shape), metadata)
        request = AttentionRequest.from_inputs(inputs, mode="train" if case.grad else "prefill",
                                               needs_grad=case.grad)
        verdict = impl.supports(request, hopper)
        assert verdict, f"{case.name}: {verdict.reasons}"
        # a forced path that cannot serve the call raises here (in the GPU run: the case's "error")
        impl.gpu_kernel_for(request, hopper, metadata)
        if case.grad and metadata is not MOSAIC:
            assert impl.gpu_backward_for(request, hopper, metadata).kernel == "mosaic", case.name


@pytest.mark.gpu
@pytest.mark.skipif(not _on_hopper(), reason="needs a Hopper GPU (compute capability 9.x)")
@pytest.mark.parametrize("run,case", _by_case(GPU_BWD_RUNS))
def test_mosaic_backward_conformance_gpu(run, case):
    """The Mosaic GPU backward, forced, after the Triton forward (soft-cap and sinks reach it
    through the lse) or the Mosaic one: gradients against the xla reference."""
    dtype, head_dim, _, config = GPU_BWD_RUNS[run]
    metadata = OperationMetadata(operation_configs={"flash": {"gpu_backward": "mosaic", **config}})
    report = run_conformance(FlashAttention(), dtypes=[dtype], cases=[case], expect_supported="*",
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
    without a running max (the bfloat16 default under a cap of 30; by default half of its exp2 on
    the FMA pipe by a quadratic, `mosaic_exp2`), a third there by the cubic, none there, and the
    one with the running max, each against xla in float32 (out, lse, gradients), and against each
    other."""
    import jax.numpy as jnp

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
    cubic = run(_md(**base, mosaic_poly_exp2=3, mosaic_poly_degree=3))
    mufu = run(_md(**base, mosaic_poly_exp2=0))
    running = run(_md(**base, mosaic_softcap_running_max=True))
    ref = run(None, "xla", *(x.astype(jnp.float32) for x in (q, k, v)))
    rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))  # noqa: E731
    for name, got in (("bounded", bounded), ("cubic", cubic), ("mufu", mufu), ("running max", running)):
        assert rel(got[0], ref[0]) < 1e-2 and np.allclose(got[1], ref[1], atol=2e-2), name
        for g, w, grad in zip(got[2:], ref[2:], ("dq", "dk", "dv")):
            assert rel(g, w) < 2e-2, (name, grad)
    # the polynomials' errors (1.8e-3 and 7.5e-5) sit under bfloat16's rounding of P in the output,
    # but a row of few keys carries them into its lse (its sum has few terms to average them)
    from jaxattn_flash.config import MOSAIC_POLY_DEGREE
    from jaxattn_flash.mosaic_exp2 import POLY_ERROR

    lse_tol = 1e-3 + POLY_ERROR[MOSAIC_POLY_DEGREE]
    assert rel(bounded[0], running[0]) < 5e-3 and np.allclose(bounded[1], running[1], atol=lse_tol)
    for poly, tol in ((bounded, lse_tol), (cubic, 1e-3 + POLY_ERROR[3])):
        assert rel(poly[0], mufu[0]) < 5e-3 and np.allclose(poly[1], mufu[1], atol=tol)


@pytest.mark.gpu
@pytest.mark.skipif(not _on_hopper(), reason="needs a Hopper GPU (compute capability 9.x)")
@pytest.mark.parametrize("causal", [True, False])
def test_mosaic_forward_forms_are_bitwise_the_same_gpu(causal):
    """`MosaicSpec.lse=False` (no lse output, for forward-only calls that do not return it) and
    under causal the retry's `early_vote`: the same output, bitwise, as the kernel that writes the
    lse, with the value guard (causal) or without."""
    from dataclasses import replace

    import jax.numpy as jnp

    from jaxattn_flash.mosaic_kernels import MosaicSpec, mosaic_forward

    ks = jax.random.split(jax.random.PRNGKey(4), 3)
    q = jax.random.normal(ks[0], (2, 1024, 8, 128), jnp.bfloat16)
    k, v = (jax.random.normal(key, (2, 1024, 2, 128), jnp.bfloat16) for key in ks[1:])
    spec = MosaicSpec(scale=128 ** -0.5, band_lo=None, band_hi=0 if causal else None, guard_values=causal)
    out, lse = jax.jit(lambda q, k, v: mosaic_forward(spec, q, k, v))(q, k, v)
    bare, none = jax.jit(lambda q, k, v: mosaic_forward(replace(spec, lse=False), q, k, v))(q, k, v)
    assert none is None and lse.shape == (2, 8, 1024)
    assert np.array_equal(np.asarray(out, np.float32), np.asarray(bare, np.float32))
    if causal:  # the retry's early vote (MosaicSpec.early_vote): the same bits, with a NaN value too,
        # which only rows that see its key may show (the block reruns guarded)
        early = jax.jit(lambda q, k, v: mosaic_forward(replace(spec, early_vote=True), q, k, v)[0])
        v_nan = v.at[1, 700, 0, 3].set(jnp.nan)
        for values in (v, v_nan):
            want = np.asarray(jax.jit(lambda q, k, v: mosaic_forward(spec, q, k, v)[0])(q, k, values), np.float32)
            got = np.asarray(early(q, k, values), np.float32)
            assert np.array_equal(want, got, equal_nan=True)
        assert np.isnan(want[1, 700:, :4]).any() and not np.isnan(want[1, :700]).any()
