"""Does the jaxattn `cudnn` backend cost anything over calling cuDNN through jax.nn directly?

Times, under jax.jit, `jaxattn.attention(..., backend="cudnn")` against
`jax.nn.dot_product_attention(..., implementation="cudnn")` on the shapes of
bench/results/peers_H100_2026-11-22.md: forward, forward+backward, and decode (q_len = 1).
Selection happens at trace time (cached), so both should compile to the same program.
Method as the peers table: bf16 inputs, two warm-up calls, then the median of REPS
repetitions of INNER back-to-back calls around block_until_ready; the two variants are
timed in alternation so that clock drift hits both alike. FLOPs: 4·B·Hq·Sq·Skv·D
(halved when causal); forward+backward counts 3.5x the forward. Decode bandwidth: the
bytes of K and V read once.

    python bench_cudnn.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxattn

SHAPES = [(4, 4096, 32, 32, 128), (4, 4096, 32, 8, 128), (1, 16384, 16, 16, 128), (8, 2048, 16, 16, 64)]
DECODE = [(32, 8192, 32, 8, 128), (64, 4096, 32, 8, 128)]
REPS, INNER = 7, 20


def timeit(fns, args, reps=REPS, inner=INNER):
    """Median seconds per call of each fn in `fns`, timed in alternation."""
    for f in fns:
        for _ in range(2):
            jax.block_until_ready(f(*args))
    times = [[] for _ in fns]
    for _ in range(reps):
        for i, f in enumerate(fns):
            t = time.perf_counter()
            for _ in range(inner):
                out = f(*args)
            jax.block_until_ready(out)
            times[i].append((time.perf_counter() - t) / inner)
    return [float(np.median(t)) for t in times]


def variants(causal: bool, train: bool, direct_causal: bool | None = None):
    """(plugin, direct) jitted callables. `direct_causal` differs from `causal` for decode:
    jaxattn's is_causal aligns the last query with the last key (one query sees the whole
    cache), while jax.nn's cuDNN causal mask is top-left (one query would see key 0 only),
    so the same computation is jax.nn with is_causal=False."""
    direct_causal = causal if direct_causal is None else direct_causal

    def plugin(q, k, v):
        return jaxattn.attention(q, k, v, is_causal=causal, backend="cudnn")

    def direct(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=direct_causal, implementation="cudnn")

    if not train:
        return jax.jit(plugin), jax.jit(direct)

    def grad_of(fn):
        def step(q, k, v, do):
            out, vjp = jax.vjp(fn, q, k, v)
            return out, vjp(do)
        return jax.jit(step)

    return grad_of(plugin), grad_of(direct)


def same_program(f_plugin, f_direct, args) -> bool:
    """Whether the two compile to the same optimized HLO (same ops and shapes, names aside)."""
    pattern = re.compile(r"=\s+(\S+)\s+([\w\-]+)\(")

    def ops(f):
        return sorted(pattern.findall(f.lower(*args).compile().as_text()))
    try:
        return ops(f_plugin) == ops(f_direct)
    except Exception:  # noqa: BLE001 - the check is informative only
        return False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one shape per mode (a smoke test)")
    ap.add_argument("--decode-only", action="store_true", help="only the decode shapes")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    dev = jax.devices()[0]
    print(f"# {datetime.date.today()} {dev.device_kind} jax {jax.__version__}", flush=True)
    sel = jaxattn.select(jnp.zeros((1, 128, 8, 128), jnp.bfloat16), jnp.zeros((1, 128, 8, 128), jnp.bfloat16),
                         jnp.zeros((1, 128, 8, 128), jnp.bfloat16), is_causal=True)
    print(f"# auto selects {sel.name!r} for a bf16 causal call", flush=True)
    rows = []
    shapes = [] if a.decode_only else SHAPES[:1] if a.quick else SHAPES
    key = jax.random.PRNGKey(0)
    for (b, s, hq, hk, d) in shapes:
        k1, k2, k3, k4 = jax.random.split(jax.random.fold_in(key, s * hq + d), 4)
        q = jax.random.normal(k1, (b, s, hq, d), jnp.bfloat16)
        k = jax.random.normal(k2, (b, s, hk, d), jnp.bfloat16)
        v = jax.random.normal(k3, (b, s, hk, d), jnp.bfloat16)
        do = jax.random.normal(k4, (b, s, hq, d), jnp.bfloat16)
        for causal in (False, True):
            flops = 4 * b * hq * s * s * d * (0.5 if causal else 1.0)
            for mode in ("fwd", "fwd+bwd"):
                train = mode != "fwd"
                fp, fd = variants(causal, train)
                args = (q, k, v, do) if train else (q, k, v)
                tp, td = timeit([fp, fd], args)
                factor = 3.5 if train else 1.0
                row = dict(shape=[b, s, hq, hk, d], causal=causal, mode=mode, plugin_ms=tp * 1e3,
                           direct_ms=td * 1e3, plugin_tflops=factor * flops / tp / 1e12,
                           direct_tflops=factor * flops / td / 1e12, overhead_pct=100 * (tp / td - 1),
                           same_program=same_program(fp, fd, args) if (b, s) == SHAPES[0][:2] else None)
                rows.append(row)
                print(f"{str((b, s, hq, hk, d)):24s} causal={causal!s:5s} {mode:7s} plugin {tp*1e3:7.3f} ms "
                      f"{row['plugin_tflops']:6.1f} TF/s | jax.nn cudnn {td*1e3:7.3f} ms {row['direct_tflops']:6.1f} "
                      f"TF/s | overhead {row['overhead_pct']:+.2f}% same_hlo={row['same_program']}", flush=True)
    for (b, s, hq, hk, d) in (DECODE[:1] if a.quick else DECODE):
        k1, k2, k3 = jax.random.split(jax.random.fold_in(key, b * s), 3)
        q = jax.random.normal(k1, (b, 1, hq, d), jnp.bfloat16)
        k = jax.random.normal(k2, (b, s, hk, d), jnp.bfloat16)
        v = jax.random.normal(k3, (b, s, hk, d), jnp.bfloat16)
        fp, fd = variants(True, False, direct_causal=False)
        tp, td = timeit([fp, fd], (q, k, v))
        a_out, b_out = (np.asarray(f(q, k, v), np.float32) for f in (fp, fd))
        same_out = bool(np.array_equal(a_out, b_out))
        nbytes = 2 * b * s * hk * d * 2
        row = dict(shape=[b, s, hq, hk, d], causal=True, mode="decode", plugin_us=tp * 1e6, direct_us=td * 1e6,
                   plugin_tbs=nbytes / tp / 1e12, direct_tbs=nbytes / td / 1e12, overhead_pct=100 * (tp / td - 1),
                   same_program=same_program(fp, fd, (q, k, v)), same_output=same_out)
        rows.append(row)
        print(f"decode {str((b, s, hq, hk, d)):24s} plugin {tp*1e6:7.1f} us {row['plugin_tbs']:.2f} TB/s | "
              f"jax.nn cudnn {td*1e6:7.1f} us {row['direct_tbs']:.2f} TB/s | overhead {row['overhead_pct']:+.2f}% "
              f"same_hlo={row['same_program']} same_output={same_out}", flush=True)
    worst = max(abs(r["overhead_pct"]) for r in rows)
    print(f"# worst |overhead| {worst:.2f}%", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(date=str(datetime.date.today()), device=dev.device_kind, jax=jax.__version__,
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
