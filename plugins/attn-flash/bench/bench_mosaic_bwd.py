"""Check and time the Mosaic GPU backward (Hopper) beside the Triton backward and cuDNN.

    python3 bench/bench_mosaic_bwd.py check      # gradients vs xla in float32, small shapes, each backward
    python3 bench/bench_mosaic_bwd.py table      # fwd+bwd TFLOP/s on the peers-table shapes
    python3 bench/bench_mosaic_bwd.py features   # (1, 32768, 32/8, 128): causal, soft-cap 50, sinks,
                                                 # window 4096, chunked 8192; fwd and fwd+bwd

Timing as in bench_flash.py (median of 5 rounds of back-to-back calls after two warm-ups);
fwd+bwd counts 3.5x the forward FLOPs of the visible pairs. The flash forward is the default
(`auto`) in every column, so the columns differ by their backward only.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp

import jaxattn
from jaxattn import ChunkedCausalMask, OperationMetadata

sys.path.insert(0, os.path.dirname(__file__))
from bench_flash import SHAPES, inputs, log, rel, timeit  # noqa: E402

BACKWARDS = {
    "triton": {"gpu_backward": "triton"},
    "mosaic": {"gpu_backward": "mosaic"},
    "mosaic kv128": {"gpu_backward": "mosaic", "mosaic_block_kv_dq": 128},
    "mosaic 3 stages": {"gpu_backward": "mosaic", "mosaic_stages_bwd": 3},
}


def grads(kw, config=None, backend="flash"):
    metadata = OperationMetadata(operation_configs={"flash": config or {}})

    def loss(q, k, v, do):
        out = jaxattn.attention(q, k, v, backend=backend, metadata=metadata, **kw)
        return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def cudnn_grads(kw):
    def loss(q, k, v, do):
        out = jax.nn.dot_product_attention(q, k, v, implementation="cudnn", **kw)
        return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def causal_pairs(s: int, window: int | None = None, chunk: int | None = None) -> float:
    """Visible (query, key) pairs of a causal mask over s tokens, in a window or chunks."""
    if chunk:
        return (s // chunk) * chunk * (chunk + 1) / 2
    w = window or s
    return w * (w + 1) / 2 + (s - w) * w


def check():
    cases = [((2, 512, 4, 4, 128), {}), ((2, 512, 4, 2, 128), {"is_causal": True}),
             ((1, 1024, 4, 1, 64), {"is_causal": True, "sliding_window": 256}),
             ((1, 512, 4, 4, 128), {"is_causal": True, "logits_soft_cap": 30.0}),
             ((1, 512, 8, 2, 64), {"is_causal": True, "sinks": True})]
    for shape, kw in cases:
        q, k, v, do = inputs(shape)
        if kw.pop("sinks", False):
            kw["sinks"] = jax.random.normal(jax.random.key(9), (shape[2],), jnp.float32)
        want = grads(kw, backend="xla")(*(x.astype(jnp.float32) for x in (q, k, v, do)))
        for name, config in BACKWARDS.items():
            got = grads(kw, config)(q, k, v, do)
            log(f"{shape} {sorted(kw)} {name}: rel err dq dk dv "
                + " ".join(f"{rel(g, w):.2e}" for g, w in zip(got, want)))


def table():
    for shape in SHAPES:
        q, k, v, do = inputs(shape)
        b, s, hq, _, d = shape
        for causal in (False, True):
            flops = 4 * b * hq * s * s * d * (0.5 if causal else 1.0) * 3.5
            row = [("cudnn", flops / timeit(cudnn_grads({"is_causal": causal}), q, k, v, do)[0] / 1e12)]
            for name, config in BACKWARDS.items():
                seconds, _ = timeit(grads({"is_causal": causal}, config), q, k, v, do)
                row.append((name, flops / seconds / 1e12))
            log(f"{shape} causal={causal}: " + "  ".join(f"{n} {t:.0f}" for n, t in row))


def features():
    shape = (1, 32768, 32, 8, 128)
    b, s, hq, _, d = shape
    q, k, v, do = inputs(shape)
    sinks = jax.random.normal(jax.random.key(5), (hq,), jnp.float32)
    causal = causal_pairs(s)
    rows = {  # name: (attention kwargs, visible pairs, cuDNN kwargs or None)
        "causal": ({"is_causal": True}, causal, {"is_causal": True}),
        "soft-cap 50": ({"is_causal": True, "logits_soft_cap": 50.0}, causal, None),
        "sinks": ({"is_causal": True, "sinks": sinks}, causal, None),
        "window 4096": ({"is_causal": True, "sliding_window": 4096}, causal_pairs(s, window=4096),
                        {"is_causal": True, "local_window_size": (4095, 0)}),
        "chunked 8192": ({"mask": ChunkedCausalMask(8192)}, causal_pairs(s, chunk=8192), None),
    }
    for name, (kw, pairs, cudnn_kw) in rows.items():
        flops = 4 * b * hq * pairs * d
        row = []
        for label, kernel in (("fwd", "auto"), ("fwd triton", "triton")):
            md = OperationMetadata(operation_configs={"flash": {"gpu_kernel": kernel}})
            fwd = jax.jit(lambda q, k, v, md=md, kw=kw: jaxattn.attention(q, k, v, backend="flash", metadata=md,
                                                                           **kw))
            row.append((label, flops / timeit(fwd, q, k, v)[0] / 1e12))
        for label in ("triton", "mosaic"):
            try:
                seconds, _ = timeit(grads(kw, BACKWARDS[label]), q, k, v, do)
                row.append((f"fwd+bwd {label}", 3.5 * flops / seconds / 1e12))
            except ValueError as e:  # the Mosaic backward says why it cannot serve the call
                log(f"  {name} {label}: {e}")
        if cudnn_kw is not None:
            cudnn_fwd = jax.jit(lambda q, k, v, kw=cudnn_kw: jax.nn.dot_product_attention(
                q, k, v, implementation="cudnn", **kw))
            row.append(("cudnn fwd", flops / timeit(cudnn_fwd, q, k, v)[0] / 1e12))
            row.append(("cudnn fwd+bwd", 3.5 * flops / timeit(cudnn_grads(cudnn_kw), q, k, v, do)[0] / 1e12))
        log(f"{name}: " + "  ".join(f"{n} {t:.0f}" for n, t in row))


if __name__ == "__main__":
    {"check": check, "table": table, "features": features}[sys.argv[1]]()
