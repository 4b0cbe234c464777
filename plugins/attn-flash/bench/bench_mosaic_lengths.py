"""Sequence lengths on the Mosaic GPU forward and backward, on a Hopper GPU: forward, lse and
gradients (the Mosaic backward, and the Triton one after the Mosaic forward) against xla in
float32, NaN/inf rows, and TFLOP/s of the Mosaic forward beside the Triton one with lengths.
`python3 plugins/attn-flash/bench/bench_mosaic_lengths.py`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import jaxattn
from jaxattn import OperationMetadata
from jaxattn.bench import time_call
from jaxattn.testing import assert_same_nonfinite, nonfinite_problem

MOSAIC = OperationMetadata(operation_configs={"flash": {"gpu_kernel": "mosaic", "gpu_backward": "mosaic"}})
MOSAIC_TRITON_BWD = OperationMetadata(operation_configs={"flash": {"gpu_kernel": "mosaic", "gpu_backward": "triton"}})
TRITON = OperationMetadata(operation_configs={"flash": {"gpu_kernel": "triton"}})


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def check(shape=(2, 1024, 4, 2, 128)) -> None:
    b, s, hq, hkv, d = shape
    lens = dict(query_seq_lengths=jnp.array([s, 700]), key_value_seq_lengths=jnp.array([900, s - 1]))
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(ks[0], (b, s, hq, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, s, hkv, d), jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, s, hkv, d), jnp.bfloat16)
    do = jax.random.normal(ks[3], (b, s, hq, d), jnp.float32)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    for causal in (True, False):
        def loss(q, k, v, backend, metadata, causal=causal):
            out = jaxattn.attention(q, k, v, is_causal=causal, backend=backend, metadata=metadata, **lens)
            return jnp.sum(out.astype(jnp.float32) * do)

        run = jax.jit(lambda q, k, v, c=causal: jaxattn.attention(q, k, v, is_causal=c, backend="flash",
                                                                   metadata=MOSAIC, return_lse=True, **lens))
        out, lse = run(q, k, v)
        ref, ref_lse = jaxattn.attention(f32(q), f32(k), f32(v), is_causal=causal, backend="xla", return_lse=True,
                                         **lens)
        reference = functools.partial(loss, backend="xla", metadata=None)
        want = jax.grad(reference, argnums=(0, 1, 2))(f32(q), f32(k), f32(v))
        lse_ok = np.allclose(np.asarray(lse), np.asarray(ref_lse), atol=2e-2)
        print(f"CHECK causal={causal}: out {rel(out, ref):.1e}, lse close {lse_ok}", flush=True)
        for name, metadata in (("mosaic", MOSAIC), ("triton", MOSAIC_TRITON_BWD)):
            flash = functools.partial(loss, backend="flash", metadata=metadata)
            grads = jax.jit(jax.grad(flash, argnums=(0, 1, 2)))(q, k, v)
            print(f"  grads, {name} backward: {[f'{rel(g, w):.1e}' for g, w in zip(grads, want)]}", flush=True)
        args = nonfinite_problem(1, shape, dtype=jnp.bfloat16)
        got = jax.jit(lambda a, c=causal: jaxattn.attention(**a, is_causal=c, backend="flash", metadata=MOSAIC,
                                                            return_lse=True, **lens))(args)
        ref = jaxattn.attention(**{n: f32(x) for n, x in args.items()}, is_causal=causal, backend="xla",
                                return_lse=True, **lens)
        assert_same_nonfinite(*got, *ref, f"non-finite causal={causal}", rtol=3e-2, atol=3e-2)
        print(f"  non-finite rows equal (causal={causal})", flush=True)


def speed(shape=(4, 4096, 32, 8, 128)) -> None:
    b, s, hq, hkv, d = shape
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(ks[0], (b, s, hq, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, s, hkv, d), jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, s, hkv, d), jnp.bfloat16)
    lens = jnp.array([s, 3 * s // 4, s // 2, s - 100])
    visible = sum(min(i + 1, int(n)) for n in lens for i in range(s)) * hq * 4.0 * d
    for name, metadata in (("mosaic", MOSAIC), ("triton", TRITON)):
        fn = jax.jit(lambda q, k, v, m=metadata: jaxattn.attention(q, k, v, is_causal=True, backend="flash",
                                                                   metadata=m, key_value_seq_lengths=lens))
        seconds = time_call(functools.partial(fn, q, k, v))
        print(f"TIME {name} forward, causal, kv lengths {shape}: {visible / seconds / 1e12:.0f} TFLOP/s", flush=True)


if __name__ == "__main__":
    check()
    speed()
