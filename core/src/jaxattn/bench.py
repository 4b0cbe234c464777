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
import re
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import jax
import jax.numpy as jnp

from .api import attention, paged_attention, select
from .metadata import OperationMetadata
from .request import AttentionRequest
from .selector import Selection


def time_call(fn: Callable[[], Any], *, warmup: int = 2, repeats: int = 5, inner: int = 10) -> float:
    """Median seconds of one call of `fn` (a jitted closure), over `repeats` runs of `inner` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    return statistics.median([_sample(fn, inner) for _ in range(repeats)])


def _sample(fn: Callable[[], Any], inner: int) -> float:
    """Seconds per call of `inner` back-to-back calls of `fn`, waited for once at the end."""
    start = time.perf_counter()
    for _ in range(inner):
        result = fn()
    jax.block_until_ready(result)
    return (time.perf_counter() - start) / inner


def time_side_by_side(calls: Mapping[str, Callable[[], Any]], *, warmup: int = 2, repeats: int = 5,
                      inner: int = 10) -> tuple[dict[str, float], dict[str, str]]:
    """Median seconds of one call of each of `calls` (jitted closures by name), timed in turn: each
    cycle takes one sample of `inner` calls from every call, the order rotated by one from cycle to
    cycle, so a drift of the device over the run (clocks settling under load) and the first slot
    after a pause land on every column alike, not on whichever a loop times first. Returns the
    medians and the calls that raised (name -> exception type), timed no further."""
    if not _is_int(repeats) or repeats < 1 or not _is_int(inner) or inner < 1:
        raise ValueError(f"repeats and inner must be ints >= 1, got repeats={repeats!r}, inner={inner!r}")
    failed: dict[str, str] = {}
    for name, fn in calls.items():
        try:
            for _ in range(warmup):
                jax.block_until_ready(fn())
        except Exception as err:  # noqa: BLE001 - a failing column is a cell, not the end of the run
            failed[name] = type(err).__name__
    names = [n for n in calls if n not in failed]
    samples: dict[str, list[float]] = {n: [] for n in names}
    for cycle in range(repeats):
        shift = cycle % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            if name in failed:
                continue
            try:
                samples[name].append(_sample(calls[name], inner))
            except Exception as err:  # noqa: BLE001
                failed[name] = type(err).__name__
    return {n: statistics.median(t) for n, t in samples.items() if n not in failed}, failed


def program_text(fn: Any, *args: Any) -> str:
    """The optimized HLO that the jitted `fn` compiles to for `args`, without what names where it
    came from (op metadata, the source-location tables, the module's name)."""
    hlo = fn.lower(*args).compile().as_text()
    tables = r"\s*(FileNames|FunctionNames|FileLocations|StackFrames)\b"
    blocks = [b for b in hlo.split("\n\n") if not re.match(tables, b)]
    hlo = re.sub(r", metadata=\{[^}]*\}", "", "\n\n".join(blocks))
    return re.sub(r"^HloModule \S+", "HloModule", hlo, flags=re.M)


def lowered_text(fn: Any, *args: Any) -> str:
    """The StableHLO that the jitted `fn` lowers to for `args`, without locations or the module's name."""
    text = fn.lower(*args).as_text(debug_info=False)
    return re.sub(r"^module @\S+", "module", text, flags=re.M)


def same_program(first: Any, second: Any, *args: Any) -> bool:
    """Whether two jitted callables run one program for `args`: timing both then times one
    program twice, and the gap between the two figures is the run's noise, not a difference.
    One StableHLO is one program (a GPU's compiled text may still differ in names drawn from
    where each was traced); else the optimized HLO decides."""
    return lowered_text(first, *args) == lowered_text(second, *args) or \
        program_text(first, *args) == program_text(second, *args)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def attention_flops(batch: int, q_len: int, kv_len: int, q_heads: int, head_dim: int, causal: bool) -> float:
    flops = 4.0 * batch * q_heads * q_len * kv_len * head_dim
    return flops / 2 if causal and q_len == kv_len else flops


@dataclass(frozen=True)
class BenchShape:
    """One timed call: shapes, dtype, causal, and a sliding window (`window` keys to the left;
    to both sides when not causal).

    With a `page_size`, the call is `paged_attention` over a full cache: `batch` sequences of
    `kv_len` cached tokens each, `q_len` new queries per sequence (1: decode; more: a ragged
    batch with `cu_q_lens`), always causal; it is timed forward-only.

    With `documents`, every row packs that many documents of equal length (segment ids, as
    packed training does); FLOPs count the pairs inside a document only.
    """

    batch: int
    q_len: int
    kv_len: int
    q_heads: int
    kv_heads: int
    head_dim: int
    causal: bool = False
    dtype: str = "bfloat16"
    window: int | None = None
    page_size: int | None = None
    documents: int | None = None

    def __post_init__(self) -> None:
        if self.documents is not None:
            if self.page_size is not None:
                raise ValueError("documents: packed documents are for attention, not a paged call")
            if self.documents < 1 or self.q_len != self.kv_len or self.q_len % self.documents:
                raise ValueError(f"documents: expected a count >= 1 that divides q_len == kv_len, got "
                                 f"{self.documents} for q_len {self.q_len}, kv_len {self.kv_len}")

    def flops(self) -> float:
        """The matrix-product FLOPs of one forward call (visible pairs only, as the peers count)."""
        if self.documents is None:
            return attention_flops(self.batch, self.q_len, self.kv_len, self.q_heads, self.head_dim, self.causal)
        length = self.q_len // self.documents
        return attention_flops(self.batch * self.documents, length, length, self.q_heads, self.head_dim, self.causal)

    def segment_ids(self) -> jax.Array | None:
        """int32 `[batch, q_len]`: the packed documents' ids (None without `documents`)."""
        if self.documents is None:
            return None
        ids = jnp.arange(self.q_len, dtype=jnp.int32) // (self.q_len // self.documents)
        return jnp.broadcast_to(ids, (self.batch, self.q_len))

    def describe(self) -> str:
        causal = " causal" if self.causal else ""
        window = f" window {self.window}" if self.window is not None else ""
        if self.documents is not None:
            window += f" {self.documents} documents"
        if self.page_size is not None:
            return (f"paged ({self.batch} seqs, {self.q_len} q x {self.kv_len} kv, {self.q_heads}/{self.kv_heads} "
                    f"heads, d={self.head_dim}, pages of {self.page_size}) {self.dtype}{window}")
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
                ok = (value is None and f.name in ("window", "page_size", "documents")) or (
                    _is_int(value) and value >= 0)
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
        return self.shape.flops() * factor / seconds / 1e12

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


def _arrays(shape: BenchShape, seed: int = 0) -> tuple[jax.Array, ...]:
    """Random inputs of `shape`: (q, k, v), or the paged call's (query, key_pages, value_pages,
    kv_lengths, page_indices[, cu_q_lens]) with every sequence's cache full and its pages shuffled."""
    kq, kk, kv, kp = jax.random.split(jax.random.PRNGKey(seed), 4)
    dtype = jnp.dtype(shape.dtype)
    if shape.page_size is None:
        q = jax.random.normal(kq, (shape.batch, shape.q_len, shape.q_heads, shape.head_dim), dtype)
        k = jax.random.normal(kk, (shape.batch, shape.kv_len, shape.kv_heads, shape.head_dim), dtype)
        v = jax.random.normal(kv, (shape.batch, shape.kv_len, shape.kv_heads, shape.head_dim), dtype)
        return q, k, v
    pages_per_seq = -(-shape.kv_len // shape.page_size)
    num_pages = shape.batch * pages_per_seq
    pages = (num_pages, shape.page_size, shape.kv_heads, shape.head_dim)
    arrays = (
        jax.random.normal(kq, (shape.batch * shape.q_len, shape.q_heads, shape.head_dim), dtype),
        jax.random.normal(kk, pages, dtype),
        jax.random.normal(kv, pages, dtype),
        jnp.full((shape.batch,), shape.kv_len, jnp.int32),
        jax.random.permutation(kp, num_pages).reshape(shape.batch, pages_per_seq).astype(jnp.int32),
    )
    if shape.q_len == 1:
        return arrays  # decode: one query per sequence
    return (*arrays, jnp.arange(shape.batch + 1, dtype=jnp.int32) * shape.q_len)


def _call(shape: BenchShape, train: bool, backend: str = "auto",
          config: Mapping[str, Any] | None = None) -> Callable[..., jax.Array]:
    """The call `shape` times, on `_arrays(shape)`, with `config` as `backend`'s settings."""
    configs = {backend: dict(config)} if config else {}
    if shape.page_size is not None:
        meta = OperationMetadata(operation_configs=configs)

        def paged(q: jax.Array, kp: jax.Array, vp: jax.Array, lengths: jax.Array, table: jax.Array,
                  cu_q_lens: jax.Array | None = None) -> jax.Array:
            return paged_attention(q, kp, vp, lengths, table, cu_q_lens=cu_q_lens, sliding_window=shape.window,
                                   backend=backend, metadata=meta)

        return paged
    meta = OperationMetadata(needs_grad=train, operation_configs=configs)
    ids = shape.segment_ids()
    return lambda q, k, v: attention(q, k, v, is_causal=shape.causal, sliding_window=shape.window,
                                     segment_ids=ids, backend=backend, metadata=meta)


def _selection(shape: BenchShape, train: bool) -> Selection:
    """What `auto` selects for `shape`, traced on abstract inputs: selection reads shapes, dtypes
    and static arguments only, as under `jit`, so no array of the shape is made."""
    found: list[Selection] = []

    def trace(*arrays: jax.Array) -> jax.Array:
        if shape.page_size is not None:
            q, kp, vp, lengths, table, *cu_q_lens = arrays
            found.append(select(q, kp, vp, lengths, table, op="paged_attention", sliding_window=shape.window,
                                cu_q_lens=cu_q_lens[0] if cu_q_lens else None))
        else:
            found.append(select(*arrays, is_causal=shape.causal, sliding_window=shape.window,
                                segment_ids=shape.segment_ids(), metadata=OperationMetadata(needs_grad=train)))
        return arrays[0]

    jax.eval_shape(trace, *jax.eval_shape(lambda: _arrays(shape)))
    return found[0]


def requests(shape: BenchShape) -> tuple[AttentionRequest, AttentionRequest | None]:
    """The (forward-only, forward+backward) requests of `shape`, as the API builds them
    (None for forward+backward of a paged call: paged attention is never differentiated)."""
    train = None if shape.page_size is not None else _selection(shape, True).request
    return _selection(shape, False).request, train


def usable_backends(shape: BenchShape, train: bool) -> list[str]:
    """The backends `auto` ranks as usable for `shape` (forward+backward when `train`), best first."""
    return list(_selection(shape, train).ranking)


def bench_backend(name: str, shape: BenchShape, *, config: Mapping[str, Any] | None = None, forward: bool = True,
                  train: bool = True, repeats: int = 5, inner: int = 10) -> BenchResult:
    """Time `name` on `shape` (with `config` as its settings): forward-only, and forward+backward
    (never for a paged shape)."""
    arrays = _arrays(shape)
    fwd = jax.jit(_call(shape, False, name, config))
    call = _call(shape, True, name, config)

    def loss(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return call(q, k, v).astype(jnp.float32).sum()

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    train = train and shape.page_size is None
    try:
        forward_s = time_call(lambda: fwd(*arrays), repeats=repeats, inner=inner) if forward else None
        train_s = time_call(lambda: step(*arrays), repeats=repeats, inner=inner) if train else None
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
