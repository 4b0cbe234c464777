"""Sequence lengths and segment ids (packed sequences) on the Mosaic GPU forward and backward,
on a Hopper GPU: forward, lse and gradients (the Mosaic backward, and the Triton one after the
Mosaic forward) against xla in float32, NaN/inf rows, the conformance cases, and TFLOP/s of
visible work beside the Triton kernels; `mla` times MLA's head dims (192 / 128) beside cuDNN,
`mla256` queries/keys of 256 with values of 128.

    python3 plugins/attn-flash/bench/bench_mosaic_inputs.py [check[:VARIANT]] [conformance] [speed[:CASE]]
        [mla[:full]] [mla256[:full]]
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jaxattn
from jaxattn import OperationMetadata
from jaxattn.bench import time_call
from jaxattn.testing import Shape, assert_same_nonfinite, nonfinite_problem, run_conformance
from jaxattn_flash import FlashAttention


def _flash(**config) -> OperationMetadata:
    return OperationMetadata(operation_configs={"flash": config})


MOSAIC = _flash(gpu_kernel="mosaic", gpu_backward="mosaic")
MOSAIC_DQ_KERNEL = _flash(gpu_kernel="mosaic", gpu_backward="mosaic", mosaic_dq="separate")
MOSAIC_TRITON_BWD = _flash(gpu_kernel="mosaic", gpu_backward="triton")
TRITON = _flash(gpu_kernel="triton", gpu_backward="triton")


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def packed_ids(batch: int, seq: int, lengths_per_row) -> jax.Array:
    """int32 `[batch, seq]` segment ids of documents of the given lengths, one list per row."""
    rows = [np.repeat(np.arange(len(ls)), ls) for ls in lengths_per_row]
    assert all(len(r) == seq for r in rows) and len(rows) == batch
    return jnp.asarray(np.stack(rows), jnp.int32)


def check(only: str | None = None, shape=(2, 1024, 4, 2, 128)) -> None:
    b, s, hq, hkv, d = shape
    ids = packed_ids(b, s, [[300, 400, 324], [128, 384, 512]])
    variants = {
        "lengths": dict(query_seq_lengths=jnp.array([s, 700]), key_value_seq_lengths=jnp.array([900, s - 1])),
        "segments": dict(segment_ids=ids),
        "segments+lengths": dict(segment_ids=ids, key_value_seq_lengths=jnp.array([900, s - 1])),
    }
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(ks[0], (b, s, hq, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, s, hkv, d), jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, s, hkv, d), jnp.bfloat16)
    do = jax.random.normal(ks[3], (b, s, hq, d), jnp.float32)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    for name, extra in variants.items():
        if only is not None and name != only:
            continue
        for causal in (True, False):
            def loss(q, k, v, backend, metadata, causal=causal, extra=extra):
                out = jaxattn.attention(q, k, v, is_causal=causal, backend=backend, metadata=metadata, **extra)
                return jnp.sum(out.astype(jnp.float32) * do)

            run = jax.jit(lambda q, k, v, c=causal, e=extra: jaxattn.attention(
                q, k, v, is_causal=c, backend="flash", metadata=MOSAIC, return_lse=True, **e))
            out, lse = run(q, k, v)
            ref, ref_lse = jaxattn.attention(f32(q), f32(k), f32(v), is_causal=causal, backend="xla",
                                             return_lse=True, **extra)
            want = jax.grad(functools.partial(loss, backend="xla", metadata=None), argnums=(0, 1, 2))(
                f32(q), f32(k), f32(v))
            lse_ok = np.allclose(np.asarray(lse), np.asarray(ref_lse), atol=2e-2)
            print(f"CHECK {name} causal={causal}: out {rel(out, ref):.1e}, lse close {lse_ok}", flush=True)
            for bwd, metadata in (("mosaic", MOSAIC), ("mosaic dq kernel", MOSAIC_DQ_KERNEL),
                                  ("triton", MOSAIC_TRITON_BWD)):
                flash = functools.partial(loss, backend="flash", metadata=metadata)
                grads = jax.jit(jax.grad(flash, argnums=(0, 1, 2)))(q, k, v)
                print(f"  grads, {bwd} backward: {[f'{rel(g, w):.1e}' for g, w in zip(grads, want)]}", flush=True)
            args = nonfinite_problem(1, shape, dtype=jnp.bfloat16)
            got = jax.jit(lambda a, c=causal, e=extra: jaxattn.attention(
                **a, is_causal=c, backend="flash", metadata=MOSAIC, return_lse=True, **e))(args)
            ref = jaxattn.attention(**{n: f32(x) for n, x in args.items()}, is_causal=causal, backend="xla",
                                    return_lse=True, **extra)
            assert_same_nonfinite(*got, *ref, f"non-finite {name} causal={causal}", rtol=3e-2, atol=3e-2)
            print(f"  non-finite rows equal ({name}, causal={causal})", flush=True)


def conformance() -> None:
    """The conformance cases of the optional inputs, forced onto both Mosaic paths."""
    runs = [("bfloat16", 128, {}), ("bfloat16", 64, {}), ("float16", 128, {"mosaic_dq": "separate"})]
    for dtype, head_dim, extra in runs:
        report = run_conformance(FlashAttention(), dtypes=[dtype], cases=["segment_ids", "seq_lengths"],
                                 expect_supported="*", grads=True,
                                 metadata=_flash(gpu_kernel="mosaic", gpu_backward="mosaic", **extra),
                                 shape=Shape(batch=2, seq=256, num_heads=4, head_dim=head_dim))
        print(f"CONFORMANCE {dtype} d{head_dim} {extra}: ok={report.ok}", flush=True)
        print(report.table(), flush=True)


def speed(only: str | None = None, shape=(4, 4096, 32, 8, 128)) -> None:
    b, s, hq, hkv, d = shape
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(ks[0], (b, s, hq, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, s, hkv, d), jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, s, hkv, d), jnp.bfloat16)
    do = jax.random.normal(ks[3], (b, s, hq, d), jnp.bfloat16)
    lens = jnp.array([s, 3 * s // 4, s // 2, s - 100])
    docs = [[1000, 1500, 600, 996], [4096], [2048, 2048], [512] * 8]
    ids = packed_ids(b, s, docs)
    cases = {  # name: (attention kwargs, visible pairs under causal)
        "lengths": (dict(key_value_seq_lengths=lens), sum(min(i + 1, int(n)) for n in lens for i in range(s))),
        "packed": (dict(segment_ids=ids), sum(n * (n + 1) // 2 for row in docs for n in row)),
    }
    for case, (extra, pairs) in cases.items():
        if only is not None and case != only:
            continue
        flops = pairs * hq * 4.0 * d
        for name, metadata in (("mosaic", MOSAIC), ("triton", TRITON)):
            def fwd(q, k, v, m=metadata, e=extra):
                return jaxattn.attention(q, k, v, is_causal=True, backend="flash", metadata=m, **e)

            def fwd_bwd(q, k, v, m=metadata, e=extra):
                out, pull = jax.vjp(functools.partial(fwd, m=m, e=e), q, k, v)
                return out, pull(do)

            t_fwd = time_call(functools.partial(jax.jit(fwd), q, k, v))
            t_both = time_call(functools.partial(jax.jit(fwd_bwd), q, k, v))
            print(f"TIME {name}, causal, {case} {shape}: forward {flops / t_fwd / 1e12:.0f}, "
                  f"forward+backward {3.5 * flops / t_both / 1e12:.0f} TFLOP/s", flush=True)


def mla(mask: str = "causal", shape=(2, 8192, 16, 16, 192, 128)) -> None:
    """DeepSeek's MLA head dims (queries/keys 192, values 128), `mask` "causal" or "full": the Mosaic
    forward with the Triton and the Mosaic backward, the Triton forward and backward, beside cuDNN
    (which takes MLA on Hopper)."""
    b, s, hq, hkv, d, dv = shape
    causal = mask == "causal"
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(ks[0], (b, s, hq, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, s, hkv, d), jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, s, hkv, dv), jnp.bfloat16)
    do = jax.random.normal(ks[3], (b, s, hq, dv), jnp.bfloat16)
    flops = 2.0 * b * hq * s * s * (d + dv) / (2 if causal else 1)  # S = QK^T over d, O = PV over dv
    for name, backend, metadata in (("mosaic", "flash", _flash(gpu_kernel="mosaic")),
                                    ("mosaic, Mosaic backward", "flash", MOSAIC),
                                    ("triton", "flash", TRITON), ("cudnn", "cudnn", None)):
        def fwd(q, k, v, backend=backend, metadata=metadata):
            return jaxattn.attention(q, k, v, is_causal=causal, backend=backend, metadata=metadata)

        def fwd_bwd(q, k, v, fwd=fwd):
            out, pull = jax.vjp(fwd, q, k, v)
            return out, pull(do)

        t_fwd = time_call(functools.partial(jax.jit(fwd), q, k, v))
        t_both = time_call(functools.partial(jax.jit(fwd_bwd), q, k, v))
        print(f"TIME {name}, {mask}, MLA {shape}: forward {flops / t_fwd / 1e12:.0f}, "
              f"forward+backward {3.5 * flops / t_both / 1e12:.0f} TFLOP/s", flush=True)


if __name__ == "__main__":
    parts = sys.argv[1:] or ["check", "conformance", "speed"]
    for part in parts:
        name, _, only = part.partition(":")  # check:segments runs that variant alone
        {"check": check, "conformance": conformance, "speed": speed, "mla": mla,
         "mla256": functools.partial(mla, shape=(2, 4096, 16, 16, 256, 128))}[name](*([only] if only else []))
