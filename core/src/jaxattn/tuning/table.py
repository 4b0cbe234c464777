"""The tuning table: what `jaxattn tune` measured, its JSON form, and how a call finds its entry.

One JSON object (`SCHEMA`, `SCHEMA_VERSION` 1)::

    {"schema": "jaxattn-tuning", "schema_version": 1,
     "device_kind": "NVIDIA H200", "platform": "gpu", "jax_version": "0.11.2",
     "versions": {"jaxattn": "0.1.0", "jaxattn-flash": "0.1.0", ...},
     "created": "2026-12-01T10:00:00Z",
     "entries": [{"case": {"op": "attention", "batch": 4, "q_len": 4096, "kv_len": 4096,
                           "q_heads": 32, "kv_heads": 8, "head_dim": 128, "value_head_dim": 128,
                           "dtype": "bfloat16", "features": ["causal"], "window": null},
                  "measurements": [<bench.BenchResult.to_dict()>, ...]}]}

`versions` holds every distribution whose backends were timed (and the core): the table
was true for those versions and that jax. A case is what the selector knows of a call
(its `AttentionRequest`), reduced to what decides speed; `features` are the mask kinds
and options (bias, soft-cap, sinks, lse...), `window` the width of a sliding window's
band; a paged call adds its page size and "ragged" or "decode" (its `batch` is the number
of sequences, `q_len` the query tokens of all of them, `kv_len` each one's cache capacity).
The same file is the user's cache and a plugin's shipped table.

Matching (`TuningTable.lookup`): a call matches an entry of the same op, dtype, head
dims, features, window-or-not and decode-or-not (q_len == 1). An entry of exactly its
shape wins; else the nearest entry whose lengths (q_len, kv_len, and the window) lie in
the same power-of-two bucket as the call's or the next bucket up or down (`bucket(n)`:
the power of two >= n), nearest by bucket steps, then by log2 distance of every size
(batch and heads included). Farther measurements say too little: the call then falls
back to declared priority.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..bench import BenchResult
from ..request import AttentionRequest
from ..selector import MeasuredRanking

SCHEMA = "jaxattn-tuning"
SCHEMA_VERSION = 1
FLAGS = ("has_bias", "logits_soft_cap", "has_sinks", "dropout", "q_seq_lengths", "kv_seq_lengths", "return_lse")


class TableError(ValueError):
    """A tuning table that cannot be read: malformed JSON or fields of the wrong form."""


def bucket(n: int) -> int:
    """The power-of-two bucket of a length: the smallest power of two >= n."""
    return 1 << max(0, int(n) - 1).bit_length()


@dataclass(frozen=True)
class Case:
    """The facts of a call that a measurement is keyed on."""

    op: str
    batch: int
    q_len: int
    kv_len: int
    q_heads: int
    kv_heads: int
    head_dim: int
    value_head_dim: int
    dtype: str
    features: tuple[str, ...] = ()
    window: int | None = None

    @classmethod
    def of(cls, request: AttentionRequest) -> Case:
        features = set(request.mask_kinds) | {f.removeprefix("has_") for f in FLAGS if getattr(request, f)}
        if request.paged is not None:
            features |= {f"page_size={request.paged.page_size}", "ragged" if request.paged.ragged else "decode"}
        if request.kv_dtype != request.dtype:  # a quantized cache is a different kernel
            features.add(f"kv_dtype={request.kv_dtype}")
        if request.kv_scale != "none":
            features.add(f"kv_scale={request.kv_scale}")
        band = request.band
        window = None
        if "sliding_window" in request.mask_kinds and band is not None and None not in band:
            window = int(band[1]) - int(band[0])  # type: ignore[operator]
        return cls(request.op, request.batch, request.q_len, request.kv_len, request.num_q_heads,
                   request.num_kv_heads, request.head_dim, request.value_head_dim, request.dtype,
                   tuple(sorted(features)), window)

    def family(self) -> tuple[object, ...]:
        """What must be equal for one case's measurement to stand for another's."""
        return (self.op, self.dtype, self.head_dim, self.value_head_dim, self.features,
                self.window is None, self.q_len == 1)

    def describe(self) -> str:
        window = f" window={self.window}" if self.window is not None else ""
        return (f"b={self.batch} q={self.q_len} kv={self.kv_len} hq={self.q_heads} hkv={self.kv_heads} "
                f"d={self.head_dim} {self.dtype} [{', '.join(self.features) or 'no mask'}]{window}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["features"] = list(self.features)
        return data

    @classmethod
    def from_dict(cls, data: Any) -> Case:
        if not isinstance(data, Mapping):
            raise TableError(f"case: expected an object, got {type(data).__name__}")
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                raise TableError(f"case: missing {f.name!r}")
            value = data[f.name]
            if f.name in ("op", "dtype"):
                ok = isinstance(value, str)
            elif f.name == "features":
                ok = isinstance(value, list) and all(isinstance(x, str) for x in value)
                value = tuple(sorted(value)) if ok else value
            else:
                ok = (value is None and f.name == "window") or (
                    isinstance(value, int) and not isinstance(value, bool) and value >= 0)
            if not ok:
                raise TableError(f"case[{f.name!r}]: expected {f.type}, got {value!r}")
            kwargs[f.name] = value
        return cls(**kwargs)


def _steps(a: int, b: int) -> int:
    return abs(bucket(a).bit_length() - bucket(b).bit_length())


def _log_distance(a: int, b: int) -> float:
    return abs(math.log2(max(a, 1)) - math.log2(max(b, 1)))


def distance(call: Case, measured: Case) -> tuple[int, float] | None:
    """How far `measured` is from `call`: (bucket steps, log2 distance), or None when it says
    nothing about it (another family, or a length more than one bucket away)."""
    if call.family() != measured.family():
        return None
    lengths = [(call.q_len, measured.q_len), (call.kv_len, measured.kv_len)]
    if call.window is not None and measured.window is not None:
        lengths.append((call.window, measured.window))
    steps = [_steps(a, b) for a, b in lengths]
    if max(steps) > 1:
        return None
    sizes = lengths + [(call.batch, measured.batch), (call.q_heads, measured.q_heads),
                       (call.kv_heads, measured.kv_heads)]
    return sum(steps), sum(_log_distance(a, b) for a, b in sizes)


@dataclass(frozen=True)
class Entry:
    """The measurements of one case: every backend and config timed on it."""

    case: Case
    measurements: tuple[BenchResult, ...]

    def ranking(self, differentiated: bool) -> tuple[tuple[str, ...], tuple[float, ...], tuple[dict[str, Any], ...]]:
        """Backends fastest first for one kind of call, each with its best time and config."""
        best: dict[str, tuple[float, dict[str, Any]]] = {}
        for m in self.measurements:
            seconds = m.train_s if differentiated else m.forward_s
            if seconds is not None and not m.error and (m.backend not in best or seconds < best[m.backend][0]):
                best[m.backend] = (seconds, dict(m.config))
        names = sorted(best, key=lambda n: (best[n][0], n))
        return tuple(names), tuple(best[n][0] for n in names), tuple(best[n][1] for n in names)

    def to_dict(self) -> dict[str, Any]:
        return {"case": self.case.to_dict(), "measurements": [m.to_dict() for m in self.measurements]}

    @classmethod
    def from_dict(cls, data: Any) -> Entry:
        if not isinstance(data, Mapping):
            raise TableError(f"entry: expected an object, got {type(data).__name__}")
        measurements = data.get("measurements")
        if not isinstance(measurements, list):
            raise TableError(f"entry['measurements']: expected a list, got {type(measurements).__name__}")
        try:
            records = tuple(BenchResult.from_dict(m) for m in measurements)
        except ValueError as err:
            raise TableError(str(err)) from None
        return cls(Case.from_dict(data.get("case")), records)


@dataclass(frozen=True)
class TuningTable:
    """Measurements of one device kind, with the versions they were taken with."""

    device_kind: str
    platform: str
    jax_version: str
    versions: Mapping[str, str]
    entries: tuple[Entry, ...]
    created: str = ""

    def lookup(self, request: AttentionRequest) -> tuple[Entry, str] | None:
        """The entry standing for `request` and how it matched ("exact shape" or the nearest
        bucket's measured shape), or None."""
        call = Case.of(request)
        scored = [(d, i) for i, e in enumerate(self.entries) if (d := distance(call, e.case)) is not None]
        if not scored:
            return None
        _, index = min(scored)
        entry = self.entries[index]
        how = "exact shape" if entry.case == call else f"nearest measured bucket: {entry.case.describe()}"
        return entry, how

    def ranking(self, request: AttentionRequest, source: str) -> MeasuredRanking | None:
        """`lookup` as the selector takes it, for the call kind `request.needs_grad` says."""
        found = self.lookup(request)
        if found is None:
            return None
        entry, how = found
        names, seconds, configs = entry.ranking(request.needs_grad)
        if not names:
            return None
        return MeasuredRanking(names, seconds, configs, source=source, match=how)

    def merged(self, newer: TuningTable) -> TuningTable:
        """This table with `newer`'s entries added; an entry of the same case is replaced."""
        cases = {e.case for e in newer.entries}
        kept = tuple(e for e in self.entries if e.case not in cases)
        return dataclasses.replace(newer, entries=kept + newer.entries)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
            "device_kind": self.device_kind, "platform": self.platform, "jax_version": self.jax_version,
            "versions": dict(sorted(self.versions.items())), "created": self.created,
            "entries": [e.to_dict() for e in self.entries],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    @classmethod
    def from_dict(cls, data: Any) -> TuningTable:
        """Read a `to_dict()`; TableError saying what is wrong with anything else."""
        if not isinstance(data, Mapping):
            raise TableError(f"expected a JSON object, got {type(data).__name__}")
        if data.get("schema") != SCHEMA or data.get("schema_version") != SCHEMA_VERSION:
            raise TableError(f"schema {data.get('schema')!r} version {data.get('schema_version')!r}; "
                             f"this jaxattn reads {SCHEMA!r} version {SCHEMA_VERSION}")
        fields: dict[str, Any] = {}
        for key in ("device_kind", "platform", "jax_version", "created"):
            value = data.get(key, "" if key == "created" else None)
            if not isinstance(value, str):
                raise TableError(f"{key!r}: expected a string, got {value!r}")
            fields[key] = value
        versions, entries = data.get("versions"), data.get("entries")
        if not isinstance(versions, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in versions.items()):
            raise TableError(f"'versions': expected an object of distribution -> version, got {versions!r}")
        if not isinstance(entries, list):
            raise TableError(f"'entries': expected a list, got {type(entries).__name__}")
        return cls(versions=dict(versions), entries=tuple(Entry.from_dict(e) for e in entries), **fields)

    @classmethod
    def from_json(cls, text: str) -> TuningTable:
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as err:
            raise TableError(f"not JSON: {err}") from None
        return cls.from_dict(data)


def stale_versions(table: TuningTable, jax_version: str, installed: Mapping[str, str | None]) -> Sequence[str]:
    """What differs between the versions `table` was measured with and those installed now
    (`installed`: distribution -> version, None when not installed; those are not compared)."""
    problems = []
    if table.jax_version != jax_version:
        problems.append(f"jax {table.jax_version} (now {jax_version})")
    for dist, version in sorted(table.versions.items()):
        now = installed.get(dist)
        if now is not None and now != version:
            problems.append(f"{dist} {version} (now {now})")
    return problems
