"""Launch order of flash's Mosaic forward on banded masks (window, chunked causal), beside the
default: the query blocks reversed (heaviest last row block first, as causal calls run) in
launch clusters of 1, 4 and 8 (batch, head) groups; forward and forward+backward at
(1, 32768, 32 q / 8 kv, 128) bf16, alternated rounds in one process, medians (best).

    python3 plugins/attn-flash/bench/banded_launch_probe.py [ROUNDS]   # on a Hopper GPU, ~4 minutes

Why: `config.heavy_first` reverses the forward's blocks for causal bands only; under a window the
first `window / 128` row blocks are light and under a chunk each chunk's first ones are, so the
launch ends on light blocks only if reversed (one probe on 2026-12-02 measured the window forward
3.6% and the chunked one 3.0% faster reversed in clusters of 8; BENCHMARKS.md "The fused
backward's launch"). Each form is traced with `mosaic_kernels.heavy_first` patched for the
forward only (the backward's orders stay), then the compiled forms are timed in turn."""

from __future__ import annotations

import os
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jaxattn
from jaxattn import ChunkedCausalMask, OperationMetadata
from jaxattn_flash import mosaic_kernels

sys.path.insert(0, os.path.dirname(__file__))
from bench_flash import round_timer  # noqa: E402

b, s, hq, hkv, d = 1, 32768, 32, 8, 128
MASKS = {"window 4096": dict(is_causal=True, sliding_window=4096), "chunked 8192": dict(mask=ChunkedCausalMask(8192))}
FORMS = {"default": (False, None), "reversed": (True, 1), "reversed, clusters of 4": (True, 4),
         "reversed, clusters of 8": (True, 8)}
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
original = mosaic_kernels.heavy_first
key = jax.random.PRNGKey(0)
q, k, v, g = (jax.random.normal(jax.random.fold_in(key, i), (b, s, h, d), jnp.float32).astype(jnp.bfloat16)
              for i, h in enumerate((hq, hkv, hkv, hq)))
print("jax", jax.__version__, flush=True)
for mask_name, kw in MASKS.items():
    fns, texts = {}, {}
    for form, (reverse, cluster) in FORMS.items():
        md = OperationMetadata(operation_configs={"flash": {} if cluster is None else {"launch_cluster_fwd": cluster}})
        mosaic_kernels.heavy_first = (lambda *a: True) if reverse else original

        def fwd(q, k, v, md=md, kw=kw):
            return jaxattn.attention(q, k, v, backend="flash", metadata=md, **kw)

        def loss(q, k, v, md=md, kw=kw):
            return jnp.sum(fwd(q, k, v, md).astype(jnp.float32) * g)

        fns[(form, "fwd")] = jax.jit(fwd)
        fns[(form, "fwd+bwd")] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        for kind in ("fwd", "fwd+bwd"):
            jax.block_until_ready(fns[(form, kind)](q, k, v))  # traced and compiled with this form's order
        texts[form] = fns[(form, "fwd")].lower(q, k, v).as_text()
    mosaic_kernels.heavy_first = original
    base = np.asarray(fns[("default", "fwd")](q, k, v), np.float32)
    for form in FORMS:
        diff = float(np.abs(np.asarray(fns[(form, "fwd")](q, k, v), np.float32) - base).max())
        print(f"{mask_name}: {form}: forward's largest difference from the default {diff:.1e}; "
              f"its own program: {form == 'default' or texts[form] != texts['default']}", flush=True)
    timers = {f: round_timer(fn, q, k, v, n=5)[0] for f, fn in fns.items()}
    times = {f: [] for f in fns}
    for _ in range(rounds):  # alternated: each round times every form once
        for f, once in timers.items():
            times[f].append(once())
    for (form, kind), t in times.items():
        print(f"{mask_name:13s} {kind:8s} {form:26s} {statistics.median(t) * 1e3:8.3f} ms ({min(t) * 1e3:.3f})",
              flush=True)
