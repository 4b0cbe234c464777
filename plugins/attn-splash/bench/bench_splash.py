"""Time the `splash` backend against `xla` (and jax's own splash kernel, unwrapped) on a TPU.

    python bench/bench_splash.py                    # default shapes, forward and fwd+bwd
    python bench/bench_splash.py --quick            # two small shapes
    python bench/bench_splash.py --interpret --quick  # smoke test on CPU (interpreter; times meaningless)
    python bench/bench_splash.py --config '{"block_q": 1024, "block_kv": 1024}'

Method (as `jaxattn bench` and the GPU peers tables, bench/results/peers_*.md): jitted calls, two warm-ups, then the
median of 5 repetitions of 10 back-to-back calls, wall clock around `block_until_ready`.
FLOPs count only visible (query, key) pairs: 4·B·Hq·pairs·D forward (so a causal square
mask counts about half, as the peers' tables do, and a sliding window counts its band);
forward + backward counts 3.5x the forward (backward = 2.5x). bf16 inputs. Each result
is also checked against the `xla` reference (relative error, forward).
Prints a Markdown table to paste into BENCHMARKS.md with the date, device and jax version.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

import jaxattn
from jaxattn import OperationMetadata
from jaxattn.bench import time_call


@dataclass(frozen=True)
class Shape:
    batch: int
    seq: int
    q_heads: int
    kv_heads: int
    head_dim: int
    causal: bool
    window: int | None = None  # left window (with causal)

    def label(self) -> str:
        mask = "causal" if self.causal else "full"
        if self.window:
            mask += f" + window {self.window}"
        return f"({self.batch}, {self.seq}, {self.q_heads}, {self.kv_heads}, {self.head_dim}) {mask}"

    def visible_pairs(self) -> int:
        i = np.arange(self.seq)
        first = np.zeros(self.seq, np.int64) if self.window is None else np.maximum(i - self.window, 0)
        last = i if self.causal else np.full(self.seq, self.seq - 1)
        return int(np.sum(last - first + 1))


DEFAULT_SHAPES = [
    Shape(4, 4096, 32, 32, 128, False),
    Shape(4, 4096, 32, 32, 128, True),
    Shape(4, 4096, 32, 8, 128, True),
    Shape(1, 16384, 16, 16, 128, True),
    Shape(8, 2048, 16, 16, 64, True),
    Shape(1, 32768, 16, 8, 128, True, window=4096),  # where block sparsity pays
]
QUICK_SHAPES = [Shape(2, 2048, 8, 8, 128, True), Shape(1, 8192, 8, 4, 128, True, window=1024)]
INTERPRET_SHAPES = [Shape(1, 256, 2, 2, 64, True), Shape(1, 512, 2, 1, 64, True, window=128)]


def _inputs(shape: Shape, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(kq, (shape.batch, shape.seq, shape.q_heads, shape.head_dim), dtype)
    k = jax.random.normal(kk, (shape.batch, shape.seq, shape.kv_heads, shape.head_dim), dtype)
    v = jax.random.normal(kv, (shape.batch, shape.seq, shape.kv_heads, shape.head_dim), dtype)
    return q, k, v


def _jaxattn_fn(backend, shape: Shape, metadata: OperationMetadata, train: bool):
    window = None if shape.window is None else (shape.window, 0)

    def fwd(q, k, v):
        return jaxattn.attention(q, k, v, is_causal=shape.causal, sliding_window=window, backend=backend,
                                 metadata=metadata)

    if not train:
        return jax.jit(fwd)
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fwd(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))


def _raw_splash_fn(shape: Shape, interpret, train: bool):
    """jax's own make_splash_mha/mqa (default 128 blocks unless overridden), for wrapper overhead."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    size = (shape.seq, shape.seq)
    if shape.window is not None:
        base = sa.LocalMask(size, (shape.window, 0), 0)
    elif shape.causal:
        base = sa.CausalMask(size)
    else:
        base = sa.FullMask(size)
    mask = sa.MultiHeadMask([base] * shape.q_heads)
    blocks = sa.BlockSizes(block_q=512, block_kv=512, block_kv_compute=512, block_q_dkv=512, block_kv_dkv=512,
                           block_kv_dkv_compute=512, block_q_dq=512, block_kv_dq=512)
    blocks = blocks if shape.seq >= 512 else None
    kernel = sa.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)
    scale = shape.head_dim ** -0.5

    def fwd(q, k, v):
        qt = (q * scale).astype(q.dtype).transpose(0, 2, 1, 3)
        out = jax.vmap(kernel)(qt, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))
        return out.transpose(0, 2, 1, 3)

    if not train:
        return jax.jit(fwd)
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fwd(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))


def _rel(x, ref) -> float:
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small shapes")
    parser.add_argument("--interpret", action="store_true",
                        help="run splash through the Pallas interpreter (CPU smoke test; times meaningless)")
    parser.add_argument("--config", default="{}", help="JSON of metadata.operation_configs['splash']")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--no-raw", action="store_true", help="skip jax's own (unwrapped) splash kernel")
    parser.add_argument("--no-xla", action="store_true", help="skip the xla backend (slow at long sequences)")
    args = parser.parse_args(argv)

    config = json.loads(args.config)
    if args.interpret:
        from jaxattn_splash import SplashAttention

        splash: object = SplashAttention(interpret=True)
        shapes = INTERPRET_SHAPES
        config = {"block_q": 128, "block_kv": 128, "block_kv_compute": 128, "block_q_dkv": 128,
                  "block_kv_dkv": 128, "block_kv_dkv_compute": 128, "block_q_dq": 128, "block_kv_dq": 128,
                  **config}
        timing = dict(warmup=1, repeats=1, inner=1)
    else:
        splash = "splash"
        shapes = QUICK_SHAPES if args.quick else DEFAULT_SHAPES
        timing = {}
    metadata = OperationMetadata(operation_configs={"splash": config})
    dtype = jnp.dtype(args.dtype)
    device = jax.devices()[0]
    print(f"# splash vs xla, {datetime.date.today()}, {device.device_kind} x{len(jax.devices())}, "
          f"jax {jax.__version__}, {dtype.name}, splash config {config or 'defaults'}", flush=True)

    columns = ["splash"] + ([] if args.no_raw else ["jax splash (raw)"]) + ([] if args.no_xla else ["xla"])
    rows = []
    for train in (False, True):
        for shape in shapes:
            q, k, v = _inputs(shape, dtype)
            flops = 4.0 * shape.batch * shape.q_heads * shape.visible_pairs() * shape.head_dim
            flops *= 3.5 if train else 1.0
            cells = []
            ref = None if args.no_xla else _jaxattn_fn("xla", shape, OperationMetadata(), False)(q, k, v)
            for column in columns:
                if column == "splash":
                    fn = (_interpreted(splash, shape, metadata, train) if args.interpret
                          else _jaxattn_fn("splash", shape, metadata, train))
                elif column == "xla":
                    fn = _jaxattn_fn("xla", shape, OperationMetadata(), train)
                else:
                    fn = _raw_splash_fn(shape, args.interpret, train)
                try:
                    seconds = time_call(lambda fn=fn, q=q, k=k, v=v: fn(q, k, v), **timing)
                    note = f" ({seconds * 1e3:.3g} ms"
                    if not train and ref is not None and column != "xla":
                        note += f", err {_rel(fn(q, k, v), ref):.0e}"
                    cells.append(f"{flops / seconds / 1e12:.1f}{note})")
                except Exception as err:  # noqa: BLE001 - report and go on
                    cells.append(f"fails: {type(err).__name__}")
                    print(f"  {column} {shape.label()}: {err}", file=sys.stderr)
            row = f"| {shape.label()} | {'fwd+bwd' if train else 'fwd'} | " + " | ".join(cells) + " |"
            rows.append(row)
            print(row, flush=True)

    print("\n| (batch, seq, q heads, kv heads, head_dim) mask | pass | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    print("\n".join(rows))
    print("\nTFLOP/s (visible pairs; fwd+bwd counts 3.5x the forward), (time per call, forward relative "
          "error vs xla).")
    return 0


def _interpreted(impl, shape: Shape, metadata: OperationMetadata, train: bool):
    """The interpret-mode instance through the same normalization as jaxattn.attention."""
    from jaxattn import CausalMask, Hardware, SlidingWindowMask
    from jaxattn.testing.conformance import build_inputs

    mask = CausalMask() if shape.causal else None
    if shape.window is not None:
        mask = mask & SlidingWindowMask(shape.window, 0)

    def fwd(q, k, v):
        inputs = build_inputs("attention", {"query": q, "key": k, "value": v, "mask": mask}, metadata)
        return impl(inputs, metadata, Hardware.cpu())[0]

    if not train:
        return jax.jit(fwd)
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fwd(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))


if __name__ == "__main__":
    sys.exit(main())
