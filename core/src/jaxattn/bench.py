"""Timing attention backends on this device: the one helper behind `jaxattn bench` and `tune`.

Times are the median of several repetitions of back-to-back jitted calls after warm-up,
wall clock around `block_until_ready`. The forward-only and the forward+backward call
are timed separately, each with the call kind's own request (`needs_grad` off and on),
so a backend that only runs forward is timed for that alone. Every timing is a
`BenchResult` record (`to_dict()` is what `--json` prints and the tuning cache stores);
tables are made from records. FLOPs follow the peers table: 4·B·Hq·Sq·Skv·D forward,
halved when causal with q_len == kv_len; the backward pass counts 2.5× the forward.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import jax
import jax.numpy as jnp

from .api import attention, select
from .metadata import OperationMetadata
from .request import AttentionRequest


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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def attention_flops(batch: int, q_len: int, kv_len: int, q_heads: int, head_dim: int, causal: bool) -> float:
    flops = 4.0 * batch * q_heads * q_len * kv_len * head_dim
    return flops / 2 if causal and q_len == kv_len else flops


@dataclass(frozen=True)
class BenchShape:
    """One timed call: shapes, dtype, causal, and a sliding window (`window` keys to the left;
    to both sides when not causal)."""

    batch: int
    q_len: int
    kv_len: int
    q_heads: int
    kv_heads: int
    head_dim: int
    causal: bool = False
    dtype: str = "bfloat16"
    window: int | None = None

    def describe(self) -> str:
        causal = " causal" if self.causal else ""
        window = f" window {self.window}" if self.window is not None else ""
        return (f"({self.batch}, {self.q_len}x{self.kv_len}, {self.q_heads}/{self.kv_heads} heads, "
                f"d={self.head_dim}) {self.dtype}{causal}{window}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BenchShape:
        """Read a `to_dict()`; ValueError naming the field on a bad one."""
        if not isinstance(data, Mapping):
            raise ValueError(f"shape: expected an object, got {type(data).__name__}")
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                if f.default is dataclasses.MISSING:
                    raise ValueError(f"shape: missing {f.name!r}")
                continue
            value = data[f.name]
            if f.name == "dtype":
                ok = isinstance(value, str)
            elif f.name == "causal":
                ok = isinstance(value, bool)
            else:
                ok = (value is None and f.name == "window") or (_is_int(value) and value >= 0)
            if not ok:
                raise ValueError(f"shape[{f.name!r}]: expected {f.type}, got {value!r}")
            kwargs[f.name] = value
        return cls(**kwargs)


@dataclass(frozen=True)
class BenchResult:
    """One backend timed on one shape with one config; None where not timed (or failed)."""

    backend: str
    shape: BenchShape
    forward_s: float | None
    train_s: float | None
    error: str = ""
    config: Mapping[str, Any] = field(default_factory=dict)

    def tflops(self, seconds: float | None, factor: float) -> float | None:
        if seconds is None:
            return None
        s = self.shape
        return attention_flops(s.batch, s.q_len, s.kv_len, s.q_heads, s.head_dim, s.causal) * factor / seconds / 1e12

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "shape": self.shape.to_dict(), "config": dict(self.config),
                "forward_s": self.forward_s, "train_s": self.train_s, "error": self.error}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BenchResult:
        """Read a `to_dict()`; ValueError naming the field on a bad one."""
        if not isinstance(data, Mapping):
            raise ValueError(f"measurement: expected an object, got {type(data).__name__}")
        backend, config, error = data.get("backend"), data.get("config", {}), data.get("error", "")
        if not isinstance(backend, str) or not backend:
            raise ValueError(f"measurement['backend']: expected a backend name, got {backend!r}")
        if not isinstance(config, Mapping) or not all(isinstance(k, str) for k in config):
            raise ValueError(f"measurement['config']: expected an object, got {config!r}")
        if not isinstance(error, str):
            raise ValueError(f"measurement['error']: expected a string, got {error!r}")
        times = []
        for key in ("forward_s", "train_s"):
            value = data.get(key)
            ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0)
            if not ok:
                raise ValueError(f"measurement[{key!r}]: expected seconds > 0 or null, got {value!r}")
            times.append(None if value is None else float(value))
        return cls(backend, BenchShape.from_dict(data.get("shape")), times[0], times[1], error, dict(config))


@dataclass(frozen=True)
class BenchJob:
    """What to time: a backend on a shape with a config, forward-only and/or forward+backward."""

    backend: str
    shape: BenchShape
    config: Mapping[str, Any] = field(default_factory=dict)
    forward: bool = True
    train: bool = True


def _inputs(shape: BenchShape, seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    dtype = jnp.dtype(shape.dtype)
    q = jax.random.normal(kq, (shape.batch, shape.q_len, shape.q_heads, shape.head_dim), dtype)
    k = jax.random.normal(kk, (shape.batch, shape.kv_len, shape.kv_heads, shape.head_dim), dtype)
    v = jax.random.normal(kv, (shape.batch, shape.kv_len, shape.kv_heads, shape.head_dim), dtype)
    return q, k, v


def _call(shape: BenchShape, train: bool, backend: str = "auto", config: Mapping[str, Any] | None = None,
          ) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    configs = {backend: dict(config)} if config else {}
    meta = OperationMetadata(needs_grad=train, operation_configs=configs)
    return lambda q, k, v: attention(q, k, v, is_causal=shape.causal, sliding_window=shape.window,
                                     backend=backend, metadata=meta)


def requests(shape: BenchShape) -> tuple[AttentionRequest, AttentionRequest]:
    """The (forward-only, forward+backward) requests of `shape`, as `attention` builds them."""
    q, k, v = _inputs(shape)
    forward = select(q, k, v, is_causal=shape.causal, sliding_window=shape.window,
                     metadata=OperationMetadata(needs_grad=False))
    train = select(q, k, v, is_causal=shape.causal, sliding_window=shape.window,
                   metadata=OperationMetadata(needs_grad=True))
    return forward.request, train.request


def usable_backends(shape: BenchShape, train: bool) -> list[str]:
    """The backends `auto` ranks as usable for `shape` (forward+backward when `train`), best first."""
    q, k, v = _inputs(shape)
    meta = OperationMetadata(needs_grad=train)
    return list(select(q, k, v, is_causal=shape.causal, sliding_window=shape.window, metadata=meta).ranking)


def bench_backend(name: str, shape: BenchShape, *, config: Mapping[str, Any] | None = None, forward: bool = True,
                  train: bool = True, repeats: int = 5, inner: int = 10) -> BenchResult:
    """Time `name` on `shape` (with `config` as its settings): forward-only, and forward+backward."""
    q, k, v = _inputs(shape)
    fwd = jax.jit(_call(shape, False, name, config))
    call = _call(shape, True, name, config)

    def loss(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return call(q, k, v).astype(jnp.float32).sum()

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    try:
        forward_s = time_call(lambda: fwd(q, k, v), repeats=repeats, inner=inner) if forward else None
        train_s = time_call(lambda: step(q, k, v), repeats=repeats, inner=inner) if train else None
    except Exception as err:  # noqa: BLE001 - one failing backend must not stop the table
        message = str(err).splitlines()[0] if str(err) else ""
        return BenchResult(name, shape, None, None, f"{type(err).__name__}: {message}", dict(config or {}))
    return BenchResult(name, shape, forward_s, train_s, config=dict(config or {}))


def run_jobs(jobs: Sequence[BenchJob], *, repeats: int = 5, inner: int = 10,
             progress: TextIO | bool = True) -> list[BenchResult]:
    """Time every job in order, with a progress line on `progress` (True: stderr; False: none)."""
    stream = sys.stderr if progress is True else (progress or None)
    results = []
    for i, job in enumerate(jobs, 1):
        if stream is not None:
            bar = "#" * (20 * i // len(jobs))
            settings = f" {dict(job.config)}" if job.config else ""
            stream.write(f"\r[{bar:<20}] {i}/{len(jobs)} {job.backend}{settings} {job.shape.describe()}".ljust(100))
            stream.flush()
        results.append(bench_backend(job.backend, job.shape, config=job.config, forward=job.forward,
                                     train=job.train, repeats=repeats, inner=inner))
    if stream is not None:
        stream.write("\n")
    return results


def run_bench(shapes: Sequence[BenchShape], backends: Sequence[str] | None = None, *, train: bool = True,
              repeats: int = 5, inner: int = 10, progress: TextIO | bool = True) -> list[BenchResult]:
    """Time every usable backend (or `backends`) on every shape with its default settings."""
    jobs = [BenchJob(name, shape, train=train)
            for shape in shapes for name in (backends or usable_backends(shape, train))]
    return run_jobs(jobs, repeats=repeats, inner=inner, progress=progress)


def format_results(results: Sequence[BenchResult]) -> str:
    rows = [("backend", "shape", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s")]
    for r in results:
        name = r.backend + (f" {dict(r.config)}" if r.config else "")
        if r.error:
            rows.append((name, r.shape.describe(), "error", r.error[:60], "", ""))
            continue
        fwd_tflops, train_tflops = r.tflops(r.forward_s, 1.0), r.tflops(r.train_s, 3.5)
        rows.append((
            name, r.shape.describe(),
            f"{r.forward_s * 1e3:.3f}" if r.forward_s else "-",
            f"{fwd_tflops:.2f}" if fwd_tflops else "-",
            f"{r.train_s * 1e3:.3f}" if r.train_s else "-",
            f"{train_tflops:.2f}" if train_tflops else "-",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
