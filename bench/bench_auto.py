"""What `backend="auto"` chooses and reaches on this device, on the peers' shapes.

Run on the GPU machine with the core and every plugin installed:

    python3 bench/bench_auto.py > auto.md

For each shape of ../shared/bench/H100-peers.md (bf16) it prints the backend `auto` picks
for training (forward+backward) and for inference (forward only), the TFLOP/s of each,
and jax.nn.dot_product_attention(implementation="cudnn") measured in the same run.
Method: jaxattn.bench.time_call (median of 5 x 10 calls after 2 warm-ups).
"""

from __future__ import annotations

import datetime
import functools
import sys

import jax
import jax.numpy as jnp

import jaxattn
from jaxattn.bench import attention_flops, time_call

SHAPES = [  # (batch, seq, q heads, kv heads, head_dim)
    (4, 4096, 32, 32, 128),
    (4, 4096, 32, 8, 128),
    (1, 16384, 16, 16, 128),
    (8, 2048, 16, 16, 64),
]


def inputs(b, s, hq, hkv, d):
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(ks[0], (b, s, hq, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, s, hkv, d), jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, s, hkv, d), jnp.bfloat16)
    return q, k, v


def tflops(seconds, shape, causal, factor):
    b, s, hq, _, d = shape
    return attention_flops(b, s, s, hq, d, causal) * factor / seconds / 1e12


def cudnn_direct(q, k, v, causal):
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")


def row(shape, causal: bool) -> str:
    """One table row: auto's choices and TFLOP/s beside cudnn called directly."""
    q, k, v = inputs(*shape)
    train = jaxattn.OperationMetadata(mode="train")
    infer = jaxattn.OperationMetadata(mode="prefill")

    def ours(q, k, v, metadata):
        return jaxattn.attention(q, k, v, is_causal=causal, metadata=metadata)

    def peer(q, k, v, metadata):
        return cudnn_direct(q, k, v, causal)

    def loss(fn, metadata):
        return lambda q, k, v: fn(q, k, v, metadata).astype(jnp.float32).sum()

    cells = []
    for fn, metadata, factor in ((ours, infer, 1.0), (peer, infer, 1.0), (ours, train, 3.5), (peer, train, 3.5)):
        if factor == 1.0:
            compiled = jax.jit(functools.partial(fn, metadata=metadata))
        else:
            compiled = jax.jit(jax.grad(loss(fn, metadata), argnums=(0, 1, 2)))
        try:
            cells.append(f"{tflops(time_call(functools.partial(compiled, q, k, v)), shape, causal, factor):.0f}")
        except Exception as err:  # noqa: BLE001 - a failing peer is a cell, not the end
            cells.append(f"fails ({type(err).__name__})")
    fwd_choice = jaxattn.select(q, k, v, is_causal=causal, metadata=infer).name
    train_choice = jaxattn.select(q, k, v, is_causal=causal, metadata=train).name
    return (f"| {shape} | {'yes' if causal else 'no'} | {fwd_choice} | {cells[0]} | {cells[1]} | "
            f"{train_choice} | {cells[2]} | {cells[3]} |")


def main() -> None:
    hw = jaxattn.hardware.current()
    print(f"# auto on {hw.device_kind}, jax {jax.__version__}, {datetime.date.today()}\n")
    print("| shape (b, s, hq, hkv, d) | causal | auto fwd: backend | TFLOP/s | jax.nn cudnn fwd | "
          "auto fwd+bwd: backend | TFLOP/s | jax.nn cudnn fwd+bwd |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in SHAPES:
        for causal in (False, True):
            print(row(shape, causal))
            sys.stdout.flush()


if __name__ == "__main__":
    main()
