"""How much of a one-byte decode call is outside the Mosaic kernel, each part its own jit (so the
gather's figure is host dispatch, not GPU time; scale_gather_probe_in_jit.py times it on the GPU).
Run from the repository root: python3 bench/results/h200_2026-12-02/scale_gather_probe.py"""
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, "plugins/attn-ragged/bench")
from bench_ragged import timeit  # noqa: E402 - median of 5 rounds of 20 calls, as bench_ragged times
from decode_forms import problem  # noqa: E402

from jaxattn_ragged.kernel import merge_splits  # noqa: E402
from jaxattn_ragged.mosaic_decode import mosaic_decode  # noqa: E402


def probe(b, kv, name):
    q, table, lens, caches = problem(b, kv, 32, 8, 128, False)
    splits = 16 if b == 1 else 1
    k, v, ks, vs = caches[name]
    num_pages, ps, hkv = ks.shape
    max_pages = table.shape[1]

    def full(q, k, v, lens, table, ks, vs):
        out, lse = mosaic_decode(q, k, v, lens, table, ks, vs, scale=128 ** -0.5, splits=splits, consumers=2,
                                 stages=4, quantized_qk=True)
        return merge_splits(out, lse)[0].astype(q.dtype)

    def in_token_order(s):
        return s[jnp.clip(table, 0, num_pages - 1)].reshape(b, max_pages * ps, hkv).transpose(0, 2, 1)

    def gather(ks, vs):
        return in_token_order(ks), in_token_order(vs)

    def plain_gather(ks, vs):  # one fused read and write of both
        return jnp.stack([ks, vs])[:, jnp.clip(table, 0, num_pages - 1)]

    t_full, t_gather, t_plain = (timeit(jax.jit(f), *args)[0] * 1e6 for f, args in (
        (full, (q, k, v, lens, table, ks, vs)), (gather, (ks, vs)), (plain_gather, (ks, vs))))
    print(f"{b:3d} x {kv:6d} {name}: full call {t_full:7.1f} us; scale gather in token order {t_gather:6.1f} us; "
          f"plain gather of both {t_plain:6.1f} us", flush=True)


for b, kv in ((32, 8192), (64, 4096), (1, 131072)):
    for name in ("int8", "fp8"):
        probe(b, kv, name)
    jax.clear_caches()
