"""One int8 decode call through paged_attention's default (the Mosaic kernel), per shape, for ncu:

    ncu --metrics gpu__time_duration.sum --csv python3 persistent_ncu_probe.py 32x8192
"""
import sys

import jax
import jax.numpy as jnp

import jaxattn

b, kv = (int(x) for x in sys.argv[1].split("x"))
hq, hkv, d, ps = 32, 8, 128, 16
key = jax.random.PRNGKey(0)
per = kv // ps
table = jax.random.permutation(key, b * per).astype(jnp.int32).reshape(b, per)
kp = jax.random.normal(jax.random.fold_in(key, 1), (b * per, ps, hkv, d), jnp.float32).astype(jnp.bfloat16)
vp = jax.random.normal(jax.random.fold_in(key, 2), (b * per, ps, hkv, d), jnp.float32).astype(jnp.bfloat16)
(k, ks), (v, vs) = jaxattn.quantize_kv(kp, jnp.int8), jaxattn.quantize_kv(vp, jnp.int8)
q = jax.random.normal(jax.random.fold_in(key, 3), (b, hq, d), jnp.float32).astype(jnp.bfloat16)
lens = jnp.full((b,), kv, jnp.int32)
f = jax.jit(lambda *a: jaxattn.paged_attention(a[0], a[1], a[2], a[3], a[4], k_scale=a[5], v_scale=a[6],
                                                  backend="decode"))
args = (q, k, v, lens, table, ks, vs)
f(*args).block_until_ready()
jax.effects_barrier()
print("=== timed call ===", flush=True)
f(*args).block_until_ready()
