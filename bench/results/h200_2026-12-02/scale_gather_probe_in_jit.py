"""GPU time of the per-call scale gather, without host dispatch: 20 iterations inside one jit,
against the same loop without the gather. Run from the repository root:
python3 bench/results/h200_2026-12-02/scale_gather_probe_in_jit.py"""
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from jax import lax

sys.path.insert(0, "plugins/attn-ragged/bench")
from decode_forms import problem  # noqa: E402

from jaxattn_ragged.kernel import merge_splits  # noqa: E402
from jaxattn_ragged.mosaic_decode import mosaic_decode  # noqa: E402

N = 20


def per_iteration(f, *args, rounds=5):
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append((time.perf_counter() - t0) / N * 1e6)
    return statistics.median(times)


def probe(b, kv):
    q, table, lens, caches = problem(b, kv, 32, 8, 128, False)
    splits = 16 if b == 1 else 1
    k, v, ks, vs = caches["int8"]
    num_pages, ps, hkv = ks.shape
    tokens = table.shape[1] * ps

    def in_token_order(s, t):
        return s[jnp.clip(t, 0, num_pages - 1)].reshape(b, tokens, hkv).transpose(0, 2, 1)

    def loop_gather(ks, vs, table):
        def body(i, acc):
            t = (table + i) % num_pages
            return acc + in_token_order(ks, t) + in_token_order(vs, t)
        return lax.fori_loop(0, N, body, jnp.zeros((b, hkv, tokens), jnp.float32))

    def loop_add(ks, vs, table):
        g = in_token_order(ks, table)

        def body(i, acc):
            return acc + g * i.astype(jnp.float32) + g
        return lax.fori_loop(0, N, body, jnp.zeros((b, hkv, tokens), jnp.float32))

    def loop_full(q, k, v, lens, table, ks, vs):
        def body(i, acc):
            out, lse = mosaic_decode(q + acc.astype(q.dtype), k, v, lens, table, ks, vs, scale=128 ** -0.5,
                                     splits=splits, consumers=2, stages=4, quantized_qk=True)
            return acc + 1e-6 * merge_splits(out, lse)[0]
        return lax.fori_loop(0, N, body, jnp.zeros(q.shape, jnp.float32))

    t_gather = per_iteration(jax.jit(loop_gather), ks, vs, table)
    t_add = per_iteration(jax.jit(loop_add), ks, vs, table)
    t_full = per_iteration(jax.jit(loop_full), q, k, v, lens, table, ks, vs)
    print(f"{b:3d} x {kv:6d} int8, per iteration in one jit: gather both scales + add {t_gather:6.1f} us, "
          f"add only {t_add:6.1f} us (gather ~{t_gather - t_add:5.1f} us); full call {t_full:6.1f} us", flush=True)


for b, kv in ((32, 8192), (1, 131072)):
    probe(b, kv)
