"""`jaxattn tune`: time every usable backend per call kind, and write the tuning table.

For each shape, the forward-only request and the forward+backward request are built as
`attention` builds them (a paged shape: `paged_attention`'s, forward-only); every backend
usable for either is timed for the kinds it can serve (`bench.run_jobs`, the one timing
helper), once per entry of its declared `tuning_space` (its defaults first). All records
go into the table, not only the winners: `auto` ranks from them per call kind, and a
later look can tell by how much. `save` writes a table to the user's cache (merging with
a compatible one) or to any file: the same file is what a plugin ships (`package_tables`).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import jax

from .. import hardware as _hardware
from .. import selector
from ..bench import BenchJob, BenchShape, requests, run_jobs
from ..registry import Registry, default_registry
from .cache import MeasuredTables, installed_versions
from .table import Case, Entry, TableError, TuningTable, stale_versions

# Common model shapes, bf16: (batch, q_len, kv_len, q_heads, kv_heads, head_dim, causal, window).
_LLM = [
    (4, 4096, 4096, 32, 8, 128, False, None),    # GQA 4:1 (Llama-3 8B-like), the README's table
    (4, 4096, 4096, 32, 8, 128, True, None),
    (4, 4096, 4096, 32, 32, 128, False, None),   # MHA
    (4, 4096, 4096, 32, 32, 128, True, None),
    (2, 8192, 8192, 32, 8, 128, True, None),
    (1, 16384, 16384, 16, 16, 128, False, None),  # long context
    (1, 16384, 16384, 16, 16, 128, True, None),
    (1, 16384, 16384, 16, 16, 128, True, 1024),  # sliding window (Mistral/Gemma-like)
    (8, 2048, 2048, 16, 16, 64, False, None),    # small models, head_dim 64
    (8, 2048, 2048, 16, 16, 64, True, None),
    (16, 1024, 1024, 12, 12, 64, False, None),   # encoders (BERT-like)
    (2, 4096, 4096, 16, 8, 256, True, None),     # head_dim 256 (Gemma-like)
]
PRESETS: dict[str, tuple[BenchShape, ...]] = {
    "llm": tuple(BenchShape(b, q, kv, hq, hkv, d, causal, "bfloat16", w) for b, q, kv, hq, hkv, d, causal, w in _LLM)
    + (BenchShape(4, 4096, 4096, 32, 8, 128, True, "bfloat16", documents=4),),  # packed training (segment ids)
    # paged KV cache (pages of 16): decode batches, one long sequence (split-KV), a ragged prefill chunk
    "serve": tuple(BenchShape(b, q, kv, 32, 8, 128, True, "bfloat16", page_size=16) for b, q, kv in
                   ((32, 1, 8192), (8, 1, 4096), (128, 1, 2048), (1, 1, 131072), (4, 256, 4096))),
    # tiny float32 shapes: a minute on a CPU, to try the command and its output
    "smoke": (BenchShape(1, 128, 128, 2, 2, 32, True, "float32"),
              BenchShape(2, 256, 256, 4, 2, 64, False, "float32"),
              BenchShape(4, 1, 256, 4, 2, 32, True, "float32", page_size=16)),
}


def preset(name: str, part: str | None = None) -> tuple[BenchShape, ...]:
    """The shapes of preset `name`; `part` "K/N" keeps the K-th of N near-equal slices (1-based),
    so that a long run can be split into commands that each merge into the same file."""
    if name not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {name!r}")
    shapes = PRESETS[name]
    if part is None:
        return shapes
    k, sep, n = part.partition("/")
    if not (sep and k.isdigit() and n.isdigit() and 1 <= int(k) <= int(n)):
        raise ValueError(f"part: expected K/N with 1 <= K <= N, e.g. 1/3, got {part!r}")
    k_, n_ = int(k), int(n)
    return shapes[(k_ - 1) * len(shapes) // n_: k_ * len(shapes) // n_]


def _jobs(shape: BenchShape, backends: Sequence[str] | None, search: bool,
          registry: Registry) -> tuple[Case, list[BenchJob]]:
    hw = _hardware.current()
    forward_request, train_request = requests(shape)
    request = train_request or forward_request  # a paged call has no forward+backward request
    forward_ok = selector.usable_backends(forward_request, hw, registry)
    train_ok = [] if train_request is None else selector.usable_backends(train_request, hw, registry)
    names = [n for n in dict.fromkeys(forward_ok + train_ok) if backends is None or n in backends]
    jobs = []
    for name in names:
        impl = registry.get(name, request.op)
        space = impl.tuning_space(request, hw) if search else ({},)
        for config in space:
            jobs.append(BenchJob(name, shape, dict(config), forward=name in forward_ok, train=name in train_ok))
    return Case.of(request), jobs


def tune(shapes: Sequence[BenchShape], backends: Sequence[str] | None = None, *, search: bool = True,
         repeats: int = 5, inner: int = 10, progress: TextIO | bool = True,
         registry: Registry | None = None) -> TuningTable:
    """Time every usable backend (or those of `backends` that are usable) on every shape,
    forward-only and forward+backward, over each backend's `tuning_space` when `search`."""
    if not shapes:
        raise ValueError("shapes: expected at least one shape to tune")
    registry = registry or default_registry()
    cases, all_jobs = [], []
    for shape in shapes:
        case, jobs = _jobs(shape, backends, search, registry)
        cases.append((case, len(jobs)))
        all_jobs += jobs
    results = run_jobs(all_jobs, repeats=repeats, inner=inner, progress=progress)
    entries, start = [], 0
    for case, count in cases:
        entries.append(Entry(case, tuple(results[start:start + count])))
        start += count
    versions = {"jaxattn": installed_versions(["jaxattn"])["jaxattn"] or "source"}
    for job in all_jobs:
        record = registry.record(job.backend, "attention" if job.shape.page_size is None else "paged_attention")
        versions[record.distribution] = record.version
    hw = _hardware.current()
    created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return TuningTable(hw.device_kind, hw.platform, jax.__version__, versions, tuple(entries), created)


def save(table: TuningTable, path: str | Path) -> str:
    """Write `table` to `path`, merged into the table already there when that one is
    readable and of the same device kind and versions; returns what was done."""
    path = Path(path)
    action = f"wrote {path}"
    if path.is_file():
        try:
            old = TuningTable.from_json(path.read_text())
        except (OSError, UnicodeDecodeError, TableError) as err:
            action = f"replaced {path} (unreadable: {err})"
        else:
            # compare the versions both tables name (a distribution only one names is no conflict)
            now = {**dict.fromkeys(old.versions), **table.versions}
            same = (old.device_kind, old.platform) == (table.device_kind, table.platform) and not stale_versions(
                old, table.jax_version, now)
            if same:
                table = old.merged(table)
                action = f"merged into {path} ({len(table.entries)} cases)"
            else:
                action = f"replaced {path} (it was measured on another device or with other versions)"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table.to_json())
    if isinstance(selector.tuning_cache(), MeasuredTables):
        selector.set_tuning_cache(None)  # the next `auto` selection reads the new measurements
    return action


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f} ms"


def format_table(table: TuningTable) -> str:
    """One line per case and call kind: the winner, its time, and its margin over the next."""
    lines = [f"device: {table.device_kind}, jax {table.jax_version}"]
    for entry in table.entries:
        lines.append(entry.case.describe())
        for kind, differentiated in (("forward-only", False), ("fwd+bwd", True)):
            names, seconds, configs = entry.ranking(differentiated)
            if not names:
                lines.append(f"  {kind:12s} no backend measured")
                continue
            settings = f" {configs[0]}" if configs[0] else ""
            margin = f", {seconds[1] / seconds[0]:.2f}x faster than {names[1]}" if len(names) > 1 else ""
            lines.append(f"  {kind:12s} {names[0]}{settings} {_ms(seconds[0])}{margin}")
        errors = [m for m in entry.measurements if m.error]
        lines.extend(f"  error: {m.backend} {dict(m.config) or ''} {m.error}" for m in errors)
    return "\n".join(lines)
