"""Timing attention backends on this device: what `jaxattn bench` prints.

Times are the median of several repetitions of back-to-back jitted calls after warm-up,
wall clock around `block_until_ready` (the method of ../shared/bench). FLOPs follow the
peers table: 4·B·Hq·Sq·Skv·D forward, halved when causal with q_len == kv_len; the
backward pass counts 2.5× the forward.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import jax
import jax.numpy as jnp

from .api import attention, select


def time_call(fn: Callable[[], Any], *, warmup: int = 2, repeats: int = 5, inner: int = 10) -> float:
    """Median seconds of one call of `fn` (a jitted closure), over `repeats` runs of `inner` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            result = fn()
        jax.block_until_ready(result)
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


def attention_flops(batch: int, q_len: int, kv_len: int, q_heads: int, head_dim: int, causal: bool) -> float:
    flops = 4.0 * batch * q_heads * q_len * kv_len * head_dim
    return flops / 2 if causal and q_len == kv_len else flops


@dataclass(frozen=True)
class BenchShape:
    batch: int
    q_len: int
    kv_len: int
    q_heads: int
    kv_heads: int
    head_dim: int
    causal: bool = False
    dtype: str = "bfloat16"

    def describe(self) -> str:
        causal = " causal" if self.causal else ""
        return (f"({self.batch}, {self.q_len}x{self.kv_len}, {self.q_heads}/{self.kv_heads} heads, "
                f"d={self.head_dim}) {self.dtype}{causal}")


@dataclass(frozen=True)
class BenchResult:
    backend: str
    shape: BenchShape
    forward_s: float | None
    train_s: float | None
    error: str = ""

    def tflops(self, seconds: float | None, factor: float) -> float | None:
        if seconds is None:
            return None
        s = self.shape
        return attention_flops(s.batch, s.q_len, s.kv_len, s.q_heads, s.head_dim, s.causal) * factor / seconds / 1e12


def _inputs(shape: BenchShape, seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    dtype = jnp.dtype(shape.dtype)
    q = jax.random.normal(kq, (shape.batch, shape.q_len, shape.q_heads, shape.head_dim), dtype)
    k = jax.random.normal(kk, (shape.batch, shape.kv_len, shape.kv_heads, shape.head_dim), dtype)
    v = jax.random.normal(kv, (shape.batch, shape.kv_len, shape.kv_heads, shape.head_dim), dtype)
    return q, k, v


def usable_backends(shape: BenchShape, train: bool) -> list[str]:
    """The backends `auto` ranks as usable for `shape`, best first."""
    q, k, v = _inputs(shape)
    from .metadata import OperationMetadata

    meta = OperationMetadata(mode="train" if train else "prefill")
    return list(select(q, k, v, is_causal=shape.causal, metadata=meta).ranking)


def bench_backend(name: str, shape: BenchShape, *, train: bool = True, repeats: int = 5,
                  inner: int = 10) -> BenchResult:
    """Time `name` on `shape`: forward, and forward+backward when `train`."""
    q, k, v = _inputs(shape)
    fwd = jax.jit(lambda q, k, v: attention(q, k, v, is_causal=shape.causal, backend=name))

    def loss(q, k, v):
        return attention(q, k, v, is_causal=shape.causal, backend=name).astype(jnp.float32).sum()

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    try:
        forward_s = time_call(lambda: fwd(q, k, v), repeats=repeats, inner=inner)
        train_s = time_call(lambda: step(q, k, v), repeats=repeats, inner=inner) if train else None
    except Exception as err:  # noqa: BLE001 - one failing backend must not stop the table
        return BenchResult(name, shape, None, None, f"{type(err).__name__}: {str(err).splitlines()[0]}")
    return BenchResult(name, shape, forward_s, train_s)


def run_bench(shapes: Sequence[BenchShape], backends: Sequence[str] | None = None, *, train: bool = True,
              repeats: int = 5, inner: int = 10, progress: TextIO | None = sys.stderr) -> list[BenchResult]:
    """Time every usable backend (or `backends`) on every shape, with a progress line."""
    jobs = [(shape, name) for shape in shapes for name in (backends or usable_backends(shape, train))]
    results = []
    for i, (shape, name) in enumerate(jobs, 1):
        if progress is not None:
            bar = "#" * (20 * i // len(jobs))
            progress.write(f"\r[{bar:<20}] {i}/{len(jobs)} {name} {shape.describe()}".ljust(100))
            progress.flush()
        results.append(bench_backend(name, shape, train=train, repeats=repeats, inner=inner))
    if progress is not None:
        progress.write("\n")
    return results


def format_results(results: Sequence[BenchResult]) -> str:
    rows = [("backend", "shape", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s")]
    for r in results:
        if r.error:
            rows.append((r.backend, r.shape.describe(), "error", r.error[:60], "", ""))
            continue
        rows.append((
            r.backend, r.shape.describe(),
            f"{r.forward_s * 1e3:.3f}" if r.forward_s else "-",
            f"{r.tflops(r.forward_s, 1.0):.2f}" if r.forward_s else "-",
            f"{r.train_s * 1e3:.3f}" if r.train_s else "-",
            f"{r.tflops(r.train_s, 3.5):.2f}" if r.train_s else "-",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
