"""The default Mosaic backward at head_dim 128 under a window or chunks (the separate dq kernel since
config.MOSAIC_DQ_BOUNDED): gradients against xla in float32 on the GPU (log beside it)."""
import jax
import jax.numpy as jnp
import numpy as np

import jaxattn
from jaxattn import ChunkedCausalMask, OperationMetadata

md = OperationMetadata(operation_configs={"flash": {"gpu_backward": "mosaic"}})
ks = jax.random.split(jax.random.PRNGKey(3), 4)


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float32) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


for hkv, kw in ((2, {"is_causal": True, "sliding_window": 200}), (4, {"sliding_window": (100, 37)}),
                (1, {"mask": ChunkedCausalMask(128)})):
    q = jax.random.normal(ks[0], (2, 512, 4, 128), jnp.bfloat16)
    k = jax.random.normal(ks[1], (2, 512, hkv, 128), jnp.bfloat16)
    v = jax.random.normal(ks[2], (2, 512, hkv, 128), jnp.bfloat16)
    do = jax.random.normal(ks[3], (2, 512, 4, 128), jnp.bfloat16)

    def f(*a, b="flash", m=md, kw=kw):
        return jaxattn.attention(*a, backend=b, metadata=m, **kw)

    out, pull = jax.vjp(f, q, k, v)
    ref, rpull = jax.vjp(lambda *a: f(*a, b="xla", m=None), *(x.astype(jnp.float32) for x in (q, k, v)))
    g, w = pull(do), rpull(do.astype(jnp.float32))
    print(kw if "mask" not in kw else "chunk 128", hkv, "out", f"{rel(out, ref):.2e}", "dq dk dv",
          " ".join(f"{rel(a, b):.2e}" for a, b in zip(g, w)))
