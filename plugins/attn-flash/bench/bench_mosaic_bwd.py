"""Check and time the Mosaic GPU backward (Hopper) beside the Triton backward and cuDNN.

    python3 bench/bench_mosaic_bwd.py check      # gradients vs xla in float32, small shapes, each backward
    python3 bench/bench_mosaic_bwd.py table      # fwd+bwd TFLOP/s on the peers-table shapes (and cuDNN, tokamax)
    python3 bench/bench_mosaic_bwd.py wide       # the same at head_dim 256 (mosaic_bwd_wide.py)
    python3 bench/bench_mosaic_bwd.py features   # (1, 32768, 32/8, 128): causal, soft-cap 50 (without
                                                 # and with the running max), sinks, window 4096,
                                                 # chunked 8192; fwd and fwd+bwd, beside cuDNN and
                                                 # tokamax where they take the row
    python3 bench/bench_mosaic_bwd.py alone [ROWS [BWDS]]  # the features rows' backward alone, Triton vs
                                                 # Mosaic (ROWS: comma-separated names, e.g. "window 4096",
                                                 # or "all"; BWDS: keys of BACKWARDS, default triton,mosaic)
    python3 bench/bench_mosaic_bwd.py nonfinite  # NaN/inf values: gradients' finiteness vs xla per mosaic_dq

A second argument names the backwards of `check` and `table` (comma-separated keys of BACKWARDS).

Timing as in bench_flash.py (median of 5 rounds of back-to-back calls after two warm-ups);
fwd+bwd counts 3.5x the forward FLOPs of the visible pairs. The flash forward is the default
(`auto`) in every column, so the columns differ by their backward only.
"""

from __future__ import annotations

import os
import sys
import traceback

import jax
import jax.numpy as jnp

import jaxattn
from jaxattn import ChunkedCausalMask, OperationMetadata

sys.path.insert(0, os.path.dirname(__file__))
from bench_flash import SHAPES, inputs, log, rel, round_timer, timeit  # noqa: E402

BACKWARDS = {
    "triton": {"gpu_backward": "triton"},
    "mosaic": {"gpu_backward": "mosaic"},
    "mosaic kv128": {"gpu_backward": "mosaic", "mosaic_block_kv_dq": 128},
    "mosaic 3 stages": {"gpu_backward": "mosaic", "mosaic_stages_bwd": 3},
    "mosaic split": {"gpu_backward": "mosaic", "mosaic_dq": "split"},
    "mosaic own": {"gpu_backward": "mosaic", "mosaic_dq": "own"},
    "mosaic separate": {"gpu_backward": "mosaic", "mosaic_dq": "separate"},
    "mosaic separate kv128": {"gpu_backward": "mosaic", "mosaic_dq": "separate", "mosaic_block_kv_dq": 128},
    "mosaic separate 3 stages": {"gpu_backward": "mosaic", "mosaic_dq": "separate", "mosaic_stages_bwd": 3},
    "mosaic dkv cluster 4": {"gpu_backward": "mosaic", "launch_cluster_dkv": 4},
    "mosaic dkv passes 2": {"gpu_backward": "mosaic", "launch_passes_dkv": 2},
}


def chosen() -> dict:
    """The backwards named by the second argument (comma-separated), else all of them."""
    names = sys.argv[2].split(",") if len(sys.argv) > 2 else list(BACKWARDS)
    return {name: BACKWARDS[name] for name in names}


def attempt(label, fn, *args):
    """fn(*args), or None after logging why it failed (a variant that cannot compile is a line, not the end)."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001
        frames = traceback.extract_tb(e.__traceback__)[-4:]
        where = "; ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in frames)
        log(f"  {label}: fails: {type(e).__name__}: {str(e)[:600]} [{where}]")
        return None


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


def tokamax_grads(kw):
    """fwd+bwd of tokamax's default `dot_product_attention` (jax.nn keywords plus `logits_soft_cap`),
    or None where tokamax does not import (it needs jax >= 0.11.1; carry its wheels to the device)."""
    try:
        import tokamax
    except Exception:  # noqa: BLE001 - any failure means "no tokamax here"
        return None

    def loss(q, k, v, do):
        out = tokamax.dot_product_attention(q, k, v, **kw)
        return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def tokamax_forward(kw):
    try:
        import tokamax
    except Exception:  # noqa: BLE001
        return None
    return jax.jit(lambda q, k, v: tokamax.dot_product_attention(q, k, v, **kw))


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
             ((1, 512, 8, 2, 64), {"is_causal": True, "sinks": True}),
             ((2, 512, 4, 2, 256), {"is_causal": True}),  # head_dim 256: mosaic_bwd_wide.py
             ((1, 512, 4, 4, 256), {"logits_soft_cap": 30.0, "sliding_window": 200})]
    for shape, kw in cases:
        q, k, v, do = inputs(shape)
        if kw.pop("sinks", False):
            kw["sinks"] = jax.random.normal(jax.random.key(9), (shape[2],), jnp.float32)
        want = grads(kw, backend="xla")(*(x.astype(jnp.float32) for x in (q, k, v, do)))
        for name, config in chosen().items():
            got = attempt(f"{shape} {sorted(kw)} {name}", grads(kw, config), q, k, v, do)
            if got is not None:
                log(f"{shape} {sorted(kw)} {name}: rel err dq dk dv "
                    + " ".join(f"{rel(g, w):.2e}" for g, w in zip(got, want)))


WIDE_SHAPES = [(2, 4096, 16, 16, 256), (2, 4096, 16, 4, 256)]  # BENCHMARKS.md "head_dim 256"


def table(shapes=SHAPES):
    for shape in shapes:
        q, k, v, do = inputs(shape)
        b, s, hq, _, d = shape
        for causal in (False, True):
            flops = 4 * b * hq * s * s * d * (0.5 if causal else 1.0) * 3.5
            row = [("cudnn", flops / timeit(cudnn_grads({"is_causal": causal}), q, k, v, do)[0] / 1e12)]
            peer = tokamax_grads({"is_causal": causal})
            if peer is not None:
                timed = attempt(f"{shape} causal={causal} tokamax", timeit, peer, q, k, v, do)
                if timed is not None:
                    row.append(("tokamax", flops / timed[0] / 1e12))
            for name, config in chosen().items():
                timed = attempt(f"{shape} causal={causal} {name}", timeit,
                                grads({"is_causal": causal}, config), q, k, v, do)
                if timed is not None:
                    row.append((name, flops / timed[0] / 1e12))
            log(f"{shape} causal={causal}: " + "  ".join(f"{n} {t:.0f}" for n, t in row))


FEATURE_SHAPE = (1, 32768, 32, 8, 128)  # issue 22's features row


def feature_rows(s: int, hq: int) -> dict:
    """name: (attention kwargs, visible pairs, cuDNN kwargs or None, tokamax kwargs or None)."""
    sinks = jax.random.normal(jax.random.key(5), (hq,), jnp.float32)
    causal = causal_pairs(s)
    window = {"is_causal": True, "local_window_size": (4095, 0)}
    capped = {"is_causal": True, "logits_soft_cap": 50.0}
    return {
        "causal": ({"is_causal": True}, causal, {"is_causal": True}, {"is_causal": True}),
        "soft-cap 50": (capped, causal, None, capped),
        "soft-cap 50, running max": (capped, causal, None, None),  # the forward as before 2026-12-01
        "sinks": ({"is_causal": True, "sinks": sinks}, causal, None, None),  # neither peer takes sinks
        "window 4096": ({"is_causal": True, "sliding_window": 4096}, causal_pairs(s, window=4096), window, window),
        # neither peer has a chunked mask (a dense [S, S] mask skips no tile)
        "chunked 8192": ({"mask": ChunkedCausalMask(8192)}, causal_pairs(s, chunk=8192), None, None),
    }


def features():
    b, s, hq, _, d = FEATURE_SHAPE
    q, k, v, do = inputs(FEATURE_SHAPE)
    for name, (kw, pairs, cudnn_kw, tokamax_kw) in feature_rows(s, hq).items():
        flops = 4 * b * hq * pairs * d
        row = []
        extra = {"mosaic_softcap_running_max": True} if name.endswith("running max") else {}
        for label, kernel in (("fwd", "auto"), ("fwd triton", "triton")):
            md = OperationMetadata(operation_configs={"flash": {"gpu_kernel": kernel, **extra}})
            fwd = jax.jit(lambda q, k, v, md=md, kw=kw: jaxattn.attention(q, k, v, backend="flash", metadata=md,
                                                                           **kw))
            row.append((label, flops / timeit(fwd, q, k, v)[0] / 1e12))
        for label in ("triton", "mosaic"):
            try:
                seconds, _ = timeit(grads(kw, {**BACKWARDS[label], **extra}), q, k, v, do)
                row.append((f"fwd+bwd {label}", 3.5 * flops / seconds / 1e12))
            except ValueError as e:  # the Mosaic backward says why it cannot serve the call
                log(f"  {name} {label}: {e}")
        if cudnn_kw is not None:
            cudnn_fwd = jax.jit(lambda q, k, v, kw=cudnn_kw: jax.nn.dot_product_attention(
                q, k, v, implementation="cudnn", **kw))
            row.append(("cudnn fwd", flops / timeit(cudnn_fwd, q, k, v)[0] / 1e12))
            row.append(("cudnn fwd+bwd", 3.5 * flops / timeit(cudnn_grads(cudnn_kw), q, k, v, do)[0] / 1e12))
        if tokamax_kw is not None and tokamax_forward(tokamax_kw) is not None:
            for label, fn, args, factor in (("tokamax fwd", tokamax_forward(tokamax_kw), (q, k, v), 1.0),
                                            ("tokamax fwd+bwd", tokamax_grads(tokamax_kw), (q, k, v, do), 3.5)):
                timed = attempt(f"{name} {label}", timeit, fn, *args)
                if timed is not None:
                    row.append((label, factor * flops / timed[0] / 1e12))
        log(f"{name}: " + "  ".join(f"{n} {t:.0f}" for n, t in row))


def backward_alone(shape=FEATURE_SHAPE, names=None, labels=("triton", "mosaic"), rounds=5):
    """Issue 22's "1.3x its Triton backward", measured on the backward: each backward's pullback
    timed alone over residuals its forward made once (the forward is flash's default in both, so
    fwd+bwd figures dilute the ratio with a shared forward), the two in alternated rounds; ms
    median (best) and the first label's time over each other's. `names`: rows of `feature_rows`
    (default: all); `labels`: keys of BACKWARDS, timed in alternated rounds."""
    import statistics

    b, s, hq, _, d = shape
    q, k, v, do = inputs(shape)
    rows = feature_rows(s, hq)
    for name in names or list(rows):
        kw = rows[name][0]
        extra = {"mosaic_softcap_running_max": True} if name.endswith("running max") else {}
        timers = {}
        for label in labels:
            md = OperationMetadata(operation_configs={"flash": {**BACKWARDS[label], **extra}})
            _, pull = jax.vjp(lambda q, k, v, md=md, kw=kw: jaxattn.attention(
                q, k, v, backend="flash", metadata=md, **kw), q, k, v)
            timers[label] = attempt(f"{name} {label}", lambda pull=pull: round_timer(
                jax.jit(lambda pull, do: pull(do)), pull, do, n=5))
        if any(t is None for t in timers.values()):
            continue
        times = {label: [] for label in timers}
        for _ in range(rounds):
            for label, (once, _out) in timers.items():
                times[label].append(once())
        med = {label: statistics.median(t) for label, t in times.items()}
        first = labels[0]
        log(f"{name}: backward alone, ms median (best): " + "  ".join(
            f"{label} {med[label] * 1e3:.3f} ({min(times[label]) * 1e3:.3f})" for label in times)
            + "".join(f"  {first}/{label} {med[first] / med[label]:.2f}x" for label in labels[1:]))


def nonfinite():
    """Per `mosaic_dq`: the gradient entries whose finiteness differs from xla's, on values holding
    NaN/inf (causal; the loss reads only the rows that see none), jax.grad outside jit."""
    import numpy as np

    from jaxattn.testing import nonfinite_problem

    for shape, modes in (((2, 256, 4, 2, 64), ("separate", "own")),
                         ((2, 256, 4, 2, 128), ("separate", "own", "split"))):
        args = nonfinite_problem(0, shape, dtype=jnp.bfloat16)
        ref_args = {n: x.astype(jnp.float32) for n, x in args.items()}
        ref_out = jaxattn.attention(**ref_args, is_causal=True, backend="xla")
        weight = jnp.asarray(np.isfinite(np.asarray(ref_out)).all(-1), jnp.float32)[..., None]

        def grads(backend, a, md=None, weight=weight):
            def loss(q, k, v):
                out = jaxattn.attention(q, k, v, is_causal=True, backend=backend, metadata=md).astype(jnp.float32)
                return jnp.sum(jnp.where(weight > 0, out, 0.0) * weight)
            return jax.grad(loss, argnums=(0, 1, 2))(a["query"], a["key"], a["value"])

        want = grads("xla", ref_args)
        for mode in modes:
            md = OperationMetadata(operation_configs={"flash": {"gpu_kernel": "mosaic", "gpu_backward": "mosaic",
                                                                "mosaic_dq": mode}})
            for name, g, w in zip(("dq", "dk", "dv"), grads("flash", args, md), want):
                g, w = np.asarray(g, np.float32), np.asarray(w)
                both = np.isfinite(w) & np.isfinite(g)
                log(f"{shape} {mode} {name} finite-mismatch {int((np.isfinite(g) != np.isfinite(w)).sum())} "
                    f"of {g.size}, non-finite got/want {int((~np.isfinite(g)).sum())}/{int((~np.isfinite(w)).sum())}, "
                    f"max abs err on the finite {np.abs(g[both] - w[both]).max():.3g}")


if __name__ == "__main__":
    {"check": check, "table": table, "features": features, "nonfinite": nonfinite,
     "wide": lambda: table(WIDE_SHAPES),
     "alone": lambda: backward_alone(
         names=sys.argv[2].split(",") if len(sys.argv) > 2 and sys.argv[2] != "all" else None,
         labels=tuple(sys.argv[3].split(",")) if len(sys.argv) > 3 else ("triton", "mosaic"))}[sys.argv[1]]()
