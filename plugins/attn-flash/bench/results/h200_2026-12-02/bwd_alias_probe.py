# As run on 2026-12-02 (with a temporary switch, mosaic_bwd_kernels._ALIASED_INPUTS, since removed: the kept
# form is "dq ref only").
# ruff: noqa: E501, B023 (kept as run)
"""The fused Mosaic backward's launch: every input a mutable ref (aliased in and out: copies) vs plain
operands with only dq a ref; fwd+bwd through jaxattn.attention (flash), alternated rounds, medians."""
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxattn
from jaxattn import ChunkedCausalMask
from jaxattn_flash import mosaic_bwd_kernels as mbk

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
print("jax", jax.__version__, flush=True)
ROWS = [("causal", (1, 32768, 32, 8, 128), dict(is_causal=True)),
        ("window 4096", (1, 32768, 32, 8, 128), dict(is_causal=True, sliding_window=4096)),
        ("chunked 8192", (1, 32768, 32, 8, 128), dict(mask=ChunkedCausalMask(8192))),
        ("causal", (4, 4096, 32, 8, 128), dict(is_causal=True))]
for name, (b, s, hq, hkv, d), kw in ROWS:
    key = jax.random.PRNGKey(1)
    q, k, v = (jax.random.normal(jax.random.fold_in(key, i), (b, s, h, d), jnp.float32).astype(jnp.bfloat16)
               for i, h in enumerate((hq, hkv, hkv)))
    g = jax.random.normal(jax.random.fold_in(key, 9), (b, s, hq, d), jnp.float32).astype(jnp.bfloat16)

    def loss(q, k, v, kw=kw, g=g):
        return jnp.sum(jaxattn.attention(q, k, v, backend="flash", **kw).astype(jnp.float32) * g)

    fns, grads, texts = {}, {}, {}
    for form, aliased in (("all refs", True), ("dq ref only", False)):
        mbk._ALIASED_INPUTS = aliased
        mbk._dkdv_jit.clear_cache()
        fns[form] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        grads[form] = [np.asarray(x, np.float32) for x in fns[form](q, k, v)]
        texts[form] = fns[form].lower(q, k, v).as_text()
    diffs = [float(np.linalg.norm(a - c) / np.linalg.norm(c)) for a, c in zip(grads["dq ref only"], grads["all refs"])]
    print(name, (b, s, hq, hkv, d), "grads' relative difference dq/dk/dv:", " ".join(f"{x:.1e}" for x in diffs),
          "programs differ:", texts["all refs"] != texts["dq ref only"], "finite:", all(np.isfinite(x).all() for x in grads["dq ref only"]), flush=True)
    times = {f: [] for f in fns}
    for _ in range(rounds):
        for f, fn in fns.items():
            jax.block_until_ready(fn(q, k, v))
            t0 = time.perf_counter()
            for _ in range(5):
                out = fn(q, k, v)
            jax.block_until_ready(out)
            times[f].append((time.perf_counter() - t0) / 5)
    print("  fwd+bwd ms (median / best):", "  ".join(
        f"{f} {statistics.median(t) * 1e3:.3f} ({min(t) * 1e3:.3f})" for f, t in times.items()), flush=True)
