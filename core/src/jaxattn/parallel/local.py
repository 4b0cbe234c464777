"""One shard's piece of a context-parallel attention: a query chunk against a key chunk.

Ring and all-gather attention compute, on each device, attention of a chunk of queries at
global offset `q_off` against a chunk of keys at `k_off`. Global masking rules become local
ones: a band `lo <= j - i <= hi` becomes `lo - d <= j' - i' <= hi - d` with
`d = k_off - q_off`; a chunked-causal mask keeps its chunks when `k_off` is a multiple of
the chunk size; segment ids, sequence lengths and query positions are sliced or shifted.
The offsets are known only inside `shard_map` (they depend on the device), but take few
values: every possible `(q chunk, k chunk)` pair is classified ahead of time into a small
set of distinct local problems (`Plan`), and `lax.switch` runs the one that applies. A pair
that no query can attend is skipped (zeros, lse −inf), which is how a sliding window skips
the key blocks it cannot see.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..hardware import Hardware
from ..inputs import AttentionInputs
from ..masks import (
    EMPTY,
    BandMask,
    CausalMask,
    ChunkedCausalMask,
    Mask,
    QueryPositionMask,
    SegmentMask,
    SlidingWindowMask,
)
from ..metadata import OperationMetadata
from ..request import AttentionRequest
from ..selector import select


@dataclass(frozen=True)
class GlobalMask:
    """The global mask of a call, split into what a chunk pair needs."""

    band: tuple[int | None, int | None] = (None, None)
    chunk: tuple[int, int] | None = None  # (chunk_size, offset): ChunkedCausalMask rule
    segments: bool = False
    positions: tuple[int | None, int] | None = None  # (left, right) of a QueryPositionMask

    @classmethod
    def of(cls, mask: Mask | None, q_len: int, kv_len: int, scheme: str) -> GlobalMask:
        """Raise ValueError for masks a chunked scheme cannot split (use "ulysses" for those)."""
        if mask is None:
            return cls()
        if "or" in mask.kinds():
            raise ValueError(f"mask: masks combined with | cannot be split by {scheme} context parallelism; "
                             "use metadata.context_parallel='ulysses'")
        lo: int | None = None
        hi: int | None = None
        chunk = None
        segments = False
        positions = None
        for part in mask.conjuncts():
            if isinstance(part, BandMask):
                p_lo, p_hi = part.band(q_len, kv_len)
                lo = p_lo if lo is None else (lo if p_lo is None else max(lo, p_lo))
                hi = p_hi if hi is None else (hi if p_hi is None else min(hi, p_hi))
            elif isinstance(part, ChunkedCausalMask) and chunk is None:
                chunk = (int(part.chunk_size), part.resolved_offset(q_len, kv_len))
                hi = chunk[1] if hi is None else min(hi, chunk[1])
            elif isinstance(part, SegmentMask) and not segments:
                segments = True
            elif isinstance(part, QueryPositionMask) and positions is None:
                positions = (part.left, int(part.right))
            else:
                raise ValueError(f"mask: a {part.kind!r} mask (or two of one kind) cannot be split by {scheme} "
                                 "context parallelism; use metadata.context_parallel='ulysses'")
        return cls((lo, hi), chunk, segments, positions)


@dataclass(frozen=True)
class Local:
    """One distinct local problem: the local band and chunk offset, or nothing to compute."""

    empty: bool
    band: tuple[int | None, int | None] = (None, None)
    chunk_offset: int | None = None


def local_problem(g: GlobalMask, delta: int, q_chunk: int, k_chunk: int) -> Local:
    """The local form of `g` for a query chunk of `q_chunk` rows and a key chunk of `k_chunk`
    keys that starts `delta` positions after the query chunk's start."""
    lo, hi = g.band
    lo = None if lo is None else lo - delta
    hi = None if hi is None else hi - delta
    # j' - i' lies in [-(q_chunk - 1), k_chunk - 1]: bounds outside it are no bounds at all
    if lo is not None and lo <= -(q_chunk - 1):
        lo = None
    if hi is not None and hi >= k_chunk - 1:
        hi = None
    if (lo is not None and lo > k_chunk - 1) or (hi is not None and hi < -(q_chunk - 1)) or (
            lo is not None and hi is not None and lo > hi):
        return Local(empty=True)
    chunk_offset = None
    if g.chunk is not None:
        size, offset = g.chunk
        chunk_offset = offset - delta
        local = ChunkedCausalMask(size, offset=chunk_offset)
        if local.block_structure(q_chunk, k_chunk, q_chunk, k_chunk)[0, 0] == EMPTY:
            return Local(empty=True)
    return Local(False, (lo, hi), chunk_offset)


@dataclass(frozen=True)
class Plan:
    """Every (query chunk, key chunk) pair of one scheme, classified: `table[a, b]` is the
    index in `problems` of natural query chunk `a` against key chunk `b`."""

    problems: tuple[Local, ...]
    table: np.ndarray

    @classmethod
    def build(cls, g: GlobalMask, q_offsets: list[int], k_offsets: list[int], q_chunk: int, k_chunk: int,
              chunk_size: int | None) -> Plan:
        problems: list[Local] = []
        table = np.zeros((len(q_offsets), len(k_offsets)), np.int32)
        for a, q_off in enumerate(q_offsets):
            for b, k_off in enumerate(k_offsets):
                if g.chunk is not None and k_off % g.chunk[0]:
                    raise ValueError(f"mask: a chunked-causal mask of chunk {g.chunk[0]} needs shard chunks of a "
                                     f"multiple of it, got key chunks of {chunk_size}; use "
                                     "metadata.context_parallel='ulysses'")
                problem = local_problem(g, k_off - q_off, q_chunk, k_chunk)
                if problem not in problems:
                    problems.append(problem)
                table[a, b] = problems.index(problem)
        return cls(tuple(problems), table)

    def is_empty(self, a: int, b: int) -> bool:
        return self.problems[int(self.table[a, b])].empty


@dataclass(frozen=True)
class Caller:
    """Runs the backend (chosen per local problem, by `backend` as the user gave it) on
    local pieces of the inputs; the static facts shared by every call of one attention."""

    template: AttentionInputs  # the global inputs' static fields (scale, soft-cap, dropout rate)
    g: GlobalMask
    metadata: OperationMetadata  # without the mesh
    hardware: Hardware
    backend: Any

    def __call__(self, problem: Local, q: dict[str, Any], k: dict[str, Any], k_offset: jax.Array,
                 rng: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """Attention of query piece `q` against key piece `k` (dicts of arrays), `(out, lse)`."""
        query, key, value = q["query"], k["key"], k["value"]
        b, sq, hq, _ = query.shape
        if problem.empty:
            out = jnp.zeros((b, sq, hq, value.shape[-1]), value.dtype)
            return out, jnp.full((b, hq, sq), -jnp.inf, jnp.float32)
        masks: list[Mask] = []
        lo, hi = problem.band
        if lo is None and hi is not None:
            masks.append(CausalMask(hi))
        elif lo is not None:
            right = key.shape[1] + query.shape[1] if hi is None else 0  # no upper bound within the pair
            masks.append(SlidingWindowMask(0 if hi is None else hi - lo, right, offset=lo if hi is None else hi))
        if problem.chunk_offset is not None:
            masks.append(ChunkedCausalMask(self.g.chunk[0], offset=problem.chunk_offset))
        if self.g.segments:
            masks.append(SegmentMask(q["q_segment_ids"], k["kv_segment_ids"]))
        if self.g.positions is not None:
            left, right = self.g.positions
            masks.append(QueryPositionMask(q["positions"] - k_offset, left=left, right=right))
        mask = None
        for m in masks:
            mask = m if mask is None else mask & m
        inputs = dataclasses.replace(
            self.template, query=query, key=key, value=value, bias=None, mask=mask, sinks=None,
            q_seq_lengths=q.get("q_seq_lengths"), kv_seq_lengths=k.get("kv_seq_lengths"),
            dropout_rng=rng if self.template.dropout_rate > 0.0 else None, return_lse=True,
        )
        request = AttentionRequest.from_inputs(inputs, mode=self.metadata.mode, needs_grad=self.metadata.needs_grad)
        chosen = select(request, self.hardware, self.backend)
        out, lse = chosen.backend(inputs, self.metadata, self.hardware)
        if lse is None:
            raise RuntimeError(f"backend {chosen.name!r} returned no lse although return_lse=True")
        return out, lse

    def switch(self, plan: Plan, index: jax.Array, q: dict[str, Any], k: dict[str, Any], k_offset: jax.Array,
               rng: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """`self(plan.problems[index], ...)`, with `index` known only at run time."""
        branches = [lambda q, k, off, rng, p=p: self(p, q, k, off, rng) for p in plan.problems]
        if len(branches) == 1:
            return branches[0](q, k, k_offset, rng)
        return lax.switch(index, branches, q, k, k_offset, rng)
