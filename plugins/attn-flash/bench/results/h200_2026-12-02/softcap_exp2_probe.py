"""Soft-capped causal forward at (1, 32768, 32 q / 8 kv, 128) bf16 with part of each tile's exp2 on the
FMA units (flash config `mosaic_fma_exp2`, removed since), beside plain causal and the capped
forward with every exp2 on the special-function unit; alternated rounds, medians.

    python3 softcap_exp2_probe.py [ROUNDS]   # on a Hopper GPU, ~2 minutes, at commit 66ced9d

Why: issue 22's bar asks the capped forward within 5% of plain causal (0.91x on an H200, where the
special-function unit takes a tanh and an exp2 per logit); the output differences beside the
timings say what the polynomial exp2 costs in accuracy (expected: within bf16's rounding)."""

from __future__ import annotations

import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxattn

b, s, hq, hkv, d = 1, 32768, 32, 8, 128
key = jax.random.PRNGKey(0)
q = jax.random.normal(key, (b, s, hq, d), jnp.float32).astype(jnp.bfloat16)
k = jax.random.normal(jax.random.fold_in(key, 1), (b, s, hkv, d), jnp.float32).astype(jnp.bfloat16)
v = jax.random.normal(jax.random.fold_in(key, 2), (b, s, hkv, d), jnp.float32).astype(jnp.bfloat16)
flops = 4 * b * hq * s * s * d / 2
forms = {"plain causal": (None, {}), "softcap 50": (50.0, {}), "softcap 50 fma64": (50.0, {"mosaic_fma_exp2": 64}),
         "softcap 50 fma128": (50.0, {"mosaic_fma_exp2": 128})}
fns, outs = {}, {}
for name, (cap, cfg) in forms.items():
    md = jaxattn.OperationMetadata(operation_configs={"flash": {"gpu_kernel": "mosaic", **cfg}})
    f = jax.jit(lambda q, k, v, cap=cap, md=md: jaxattn.attention(q, k, v, is_causal=True, logits_soft_cap=cap,
                                                                  backend="flash", metadata=md))
    outs[name] = np.asarray(f(q, k, v), np.float32)
    fns[name] = f
    print(name, "compiled", flush=True)
base = outs["softcap 50"]
for name in forms:
    if name.startswith("softcap"):
        diff = np.linalg.norm(outs[name] - base) / np.linalg.norm(base)
        print(f"{name}: relative difference from 'softcap 50' {diff:.2e}", flush=True)
times = {n: [] for n in fns}
for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 5):
    for n, f in fns.items():
        f(q, k, v).block_until_ready()
        t0 = time.perf_counter()
        for _ in range(10):
            out = f(q, k, v)
        out.block_until_ready()
        times[n].append((time.perf_counter() - t0) / 10)
plain = statistics.median(times["plain causal"])
for n, t in times.items():
    med = statistics.median(t)
    print(f"{n:20s} {med * 1e3:7.3f} ms {flops / med / 1e12:6.1f} TFLOP/s  x{plain / med:5.3f} plain  rounds "
          + " ".join(f"{x * 1e3:.3f}" for x in t), flush=True)
