"""Context parallelism: attention over a sequence sharded across devices, for any backend.

With `metadata.mesh` holding `partition_axis.sequence_axis` (default "sp") of `n > 1`
devices, each device holds `1/n` of the queries, keys and values (batch and heads may be
sharded too). `metadata.context_parallel` picks how the devices cooperate:

* "ring": key/value shards travel around the ring with `ppermute`; each device attends its
  queries to the shard it holds, and partial results merge by their lse. The transfer of
  the next shard is issued before the compute of the current one, so they overlap. Needs
  only a backend that returns lse; steps that no query can attend (sliding windows) are
  skipped, and with a window the ring stops after the last step that can see anything.
* "all_gather": every device gathers all keys/values (cheap with few K/V heads) and attends
  its queries to them in one call per query chunk.
* "ulysses": an all-to-all turns sequence shards into head shards, the backend sees the
  whole sequence for `heads / n` heads, and a second all-to-all turns it back. Any backend
  and any mask (bias and dense masks too); needs the query heads divisible by `n` (K/V heads
  are repeated when fewer).
* "auto" (default): "ulysses" when the heads divide, else "ring". Measured on two H200s
  (causal GQA 32/8, head_dim 128, forward+backward, 32k to 128k tokens): ulysses is the
  fastest; it alone keeps whole rows on one device, so the backend returns no lse and any
  backend serves (cuDNN among them), and the causal work is even without reordering. Ring
  and all_gather need each piece's lse to merge (differentiated: not cuDNN, whose JAX
  backward ignores the lse's cotangent), and load balancing; ring edges out all_gather.

A causal mask gives the last shard `2n - 1` times the work of the first; with
`load_balanced=True` the sequence is in `load_balance` order (each device holds chunks `r`
and `2n - 1 - r`) and the work is even. Everything is differentiable: the backward pass is
the transpose of the forward's collectives (JAX's autodiff through `shard_map`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from .._compat import shard_map
from ..hardware import Hardware
from ..inputs import AttentionInputs
from ..masks import AndMask, DenseMask, Mask, OrMask, QueryPositionMask, SegmentMask
from ..merge import merge_attention
from ..metadata import OperationMetadata
from ..request import AttentionRequest
from ..selector import select
from ..sharding import attention_specs
from .balance import chunk_order
from .local import Caller, GlobalMask, Plan

SCHEMES = ("ring", "ulysses", "all_gather")


def sequence_shards(metadata: OperationMetadata) -> int:
    """How many devices the sequence is split over (1: no context parallelism)."""
    axis = metadata.partition_axis.sequence_axis
    if metadata.mesh is None or axis is None or axis not in metadata.mesh.shape:
        return 1
    return int(metadata.mesh.shape[axis])


def _heads_per_shard(request: AttentionRequest, metadata: OperationMetadata) -> tuple[int, int]:
    rules = metadata.get_shardings(request.mode, "bshd", batch=request.batch, num_q_heads=request.num_q_heads,
                                   num_kv_heads=request.num_kv_heads)
    tp = metadata.mesh_axis_size(rules.query[2]) if rules.query[2] is not None else 1
    return request.num_q_heads // tp, request.num_kv_heads * rules.kv_repeat // tp


def choose_scheme(request: AttentionRequest, inputs: AttentionInputs, metadata: OperationMetadata) -> str:
    """The scheme `metadata.context_parallel` names, or the one "auto" picks (module docstring)."""
    n = sequence_shards(metadata)
    hq, hkv = _heads_per_shard(request, metadata)
    ulysses_fits = hq % n == 0 and hq % math.lcm(hkv, n) == 0 if hkv % n else hq % n == 0
    if metadata.context_parallel != "auto":
        return metadata.context_parallel
    return "ulysses" if ulysses_fits else "ring"


def describe(request: AttentionRequest, inputs: AttentionInputs, metadata: OperationMetadata) -> str:
    """One line for `explain`: which axis splits the sequence, by which scheme, and why."""
    n = sequence_shards(metadata)
    scheme = choose_scheme(request, inputs, metadata)
    how = "chosen by auto" if metadata.context_parallel == "auto" else "metadata.context_parallel"
    balance = "load balanced" if metadata.load_balanced else "contiguous shards"
    return (f"context parallel: the sequence is split over mesh axis {metadata.partition_axis.sequence_axis!r} "
            f"({n} shards, {balance}) by {scheme} ({how}); each shard runs the backend on its piece")


def run_context_parallel(inputs: AttentionInputs, request: AttentionRequest, metadata: OperationMetadata,
                         backend: Any, hardware: Hardware) -> tuple[jax.Array, jax.Array | None]:
    """Attention of `inputs` (global arrays) with the sequence sharded over the mesh."""
    n = sequence_shards(metadata)
    axis = metadata.partition_axis.sequence_axis
    scheme = choose_scheme(request, inputs, metadata)
    m = 2 if metadata.load_balanced else 1
    for name, length in (("query", request.q_len), ("key", request.kv_len)):
        if length % (n * m):
            raise ValueError(f"{name}: the sequence length {length} must be a multiple of "
                             f"{'2 * ' if m == 2 else ''}{n} to be split over mesh axis {axis!r}"
                             f"{' with load_balanced=True' if m == 2 else ''}")
    g = GlobalMask()
    if scheme != "ulysses":
        if inputs.bias is not None:
            raise ValueError(f"bias: {scheme} context parallelism splits the keys; a bias needs "
                             "metadata.context_parallel='ulysses'")
        g = GlobalMask.of(inputs.mask, request.q_len, request.kv_len, scheme)  # raises for masks it cannot split
    rules = metadata.get_shardings(request.mode, "bshd", batch=request.batch, num_q_heads=request.num_q_heads,
                                   num_kv_heads=request.num_kv_heads)
    if rules.kv_repeat > 1:
        inputs = inputs.replace(key=jnp.repeat(inputs.key, rules.kv_repeat, axis=2),
                                value=jnp.repeat(inputs.value, rules.kv_repeat, axis=2))
    b, h = rules.query[0], rules.query[2]
    seq_rules = rules._replace(
        query=P(b, axis, h, None), key=P(b, axis, h, None), value=P(b, axis, h, None),
        output=P(b, axis, h, None), q_segment_ids=P(b, axis), kv_segment_ids=P(b, axis), lse=P(b, h, axis))
    local_metadata = dataclasses.replace(metadata, mesh=None)
    setup = _Setup(scheme, axis, n, m, request.q_len // (n * m), request.kv_len // (n * m),
                   metadata.load_balanced, Caller(inputs, g, local_metadata, hardware, backend))
    body = {"ring": setup.ring, "all_gather": setup.all_gather, "ulysses": setup.ulysses}[scheme]
    in_specs = attention_specs(inputs, seq_rules)
    fn = shard_map(body, mesh=metadata.mesh, in_specs=(in_specs,), out_specs=(seq_rules.output, seq_rules.lse))
    out, lse = fn(inputs)
    return out, (lse if inputs.return_lse else None)


@dataclasses.dataclass(frozen=True)
class _Setup:
    scheme: str
    axis: str
    n: int
    m: int  # chunks per device: 2 when load balanced
    q_chunk: int
    k_chunk: int
    balanced: bool
    caller: Caller

    # -- shared pieces -------------------------------------------------------------------
    def natural(self, shard: jax.Array, t: int) -> jax.Array:
        """Natural chunk index of local chunk `t` of `shard`."""
        return shard if t == 0 else 2 * self.n - 1 - shard

    def q_pieces(self, x: AttentionInputs) -> list[dict[str, Any]]:
        seg, pos = _segment_and_positions(x.mask)
        pieces = []
        for t in range(self.m):
            rows = slice(t * self.q_chunk, (t + 1) * self.q_chunk)
            piece: dict[str, Any] = {"query": x.query[:, rows]}
            if seg is not None:
                piece["q_segment_ids"] = seg.q_segment_ids[:, rows]
            if pos is not None:
                piece["positions"] = pos.positions[:, rows]
            pieces.append(piece)
        return pieces

    def q_lengths(self, x: AttentionInputs, piece: dict[str, Any], g: jax.Array) -> dict[str, Any]:
        if x.q_seq_lengths is None:
            return piece
        return {**piece, "q_seq_lengths": jnp.clip(x.q_seq_lengths - g * self.q_chunk, 0, self.q_chunk)}

    def kv_piece(self, x: AttentionInputs, kv: dict[str, Any], u: int, g: jax.Array) -> dict[str, Any]:
        cols = slice(u * self.k_chunk, (u + 1) * self.k_chunk)
        piece = {name: a[:, cols] for name, a in kv.items()}
        if x.kv_seq_lengths is not None:
            piece["kv_seq_lengths"] = jnp.clip(x.kv_seq_lengths - g * self.k_chunk, 0, self.k_chunk)
        return piece

    def rng(self, x: AttentionInputs, gq: jax.Array, gk: jax.Array) -> jax.Array | None:
        if x.dropout_rng is None:
            return None
        return jax.random.fold_in(jax.random.fold_in(x.dropout_rng, gq), gk)

    def finish(self, x: AttentionInputs, parts: list[tuple[jax.Array, jax.Array]]) -> tuple[jax.Array, jax.Array]:
        out = jnp.concatenate([o for o, _ in parts], axis=1)
        lse = jnp.concatenate([lse for _, lse in parts], axis=2)
        if x.sinks is None:
            return out, lse
        sink = x.sinks.astype(jnp.float32)[None, :, None]
        has_key = jnp.isfinite(lse)
        total = jnp.where(has_key, jnp.logaddexp(jnp.where(has_key, lse, 0.0), sink), -jnp.inf)
        keep = jnp.where(has_key, jnp.exp(jnp.where(has_key, lse - total, 0.0)), 0.0)
        out = (out.astype(jnp.float32) * jnp.swapaxes(keep, 1, 2)[..., None]).astype(out.dtype)
        return out, total

    # -- the schemes ---------------------------------------------------------------------
    def ring(self, x: AttentionInputs) -> tuple[jax.Array, jax.Array]:
        n, m = self.n, self.m
        r = lax.axis_index(self.axis)
        g = self.caller.g
        chunks = n * m
        offsets_q = [a * self.q_chunk for a in range(chunks)]
        offsets_k = [b * self.k_chunk for b in range(chunks)]
        plan = Plan.build(g, offsets_q, offsets_k, self.q_chunk, self.k_chunk, self.k_chunk)
        steps = self._ring_steps(plan)
        table = jnp.asarray(plan.table)
        kv = {"key": x.key, "value": x.value}
        seg, _ = _segment_and_positions(x.mask)
        if seg is not None:
            kv["kv_segment_ids"] = seg.kv_segment_ids
        pieces = self.q_pieces(x)
        merged: list[tuple[jax.Array, jax.Array] | None] = [None] * m
        perm = [(i, (i + 1) % n) for i in range(n)]
        for s in range(steps):
            following = lax.ppermute(kv, self.axis, perm) if s + 1 < steps else None  # overlaps the compute below
            src = (r - s) % n
            for t in range(m):
                gq = self.natural(r, t)
                q_piece = self.q_lengths(x, pieces[t], gq)
                for u in range(m):
                    gk = self.natural(src, u)
                    part = self.caller.switch(plan, table[gq, gk], q_piece, self.kv_piece(x, kv, u, gk),
                                              gk * self.k_chunk, self.rng(x, gq, gk))
                    merged[t] = part if merged[t] is None else merge_attention(
                        [merged[t][0], part[0]], [merged[t][1], part[1]])
            kv = following
        return self.finish(x, merged)

    def _ring_steps(self, plan: Plan) -> int:
        """Steps after the last one in which any device has a pair to compute are dropped."""
        steps = 1
        for s in range(self.n):
            for r in range(self.n):
                src = (r - s) % self.n
                pairs = [(self.natural(r, t), self.natural(src, u)) for t in range(self.m) for u in range(self.m)]
                if any(not plan.is_empty(a, b) for a, b in pairs):
                    steps = s + 1
        return steps

    def gathered(self, a: jax.Array, axis: int = 1) -> jax.Array:
        """`a` gathered over the sequence axis, in natural order."""
        full = lax.all_gather(a, self.axis, axis=axis, tiled=True)
        if not self.balanced:
            return full
        shape = full.shape
        chunks = full.reshape(shape[:axis] + (2 * self.n, shape[axis] // (2 * self.n)) + shape[axis + 1:])
        order = jnp.asarray(np.argsort(chunk_order(self.n)).astype(np.int32))
        return jnp.take(chunks, order, axis=axis).reshape(shape)

    def all_gather(self, x: AttentionInputs) -> tuple[jax.Array, jax.Array]:
        r = lax.axis_index(self.axis)
        kv = {"key": self.gathered(x.key), "value": self.gathered(x.value)}
        seg, _ = _segment_and_positions(x.mask)
        if seg is not None:
            kv["kv_segment_ids"] = self.gathered(seg.kv_segment_ids)
        if x.kv_seq_lengths is not None:
            kv["kv_seq_lengths"] = x.kv_seq_lengths
        kv_len = kv["key"].shape[1]
        plan = Plan.build(self.caller.g, [a * self.q_chunk for a in range(self.n * self.m)], [0],
                          self.q_chunk, kv_len, kv_len)
        table = jnp.asarray(plan.table[:, 0])
        parts = []
        for t, piece in enumerate(self.q_pieces(x)):
            gq = self.natural(r, t)
            parts.append(self.caller.switch(plan, table[gq], self.q_lengths(x, piece, gq), kv, jnp.int32(0),
                                            self.rng(x, gq, jnp.int32(0))))
        return self.finish(x, parts)

    def ulysses(self, x: AttentionInputs) -> tuple[jax.Array, jax.Array]:
        n = self.n
        hq, hkv = x.query.shape[2], x.key.shape[2]
        if hq % n:
            raise ValueError(f"query: ulysses context parallelism needs the query heads on each shard ({hq}) "
                             f"divisible by the sequence shards ({n}); use 'ring' or 'all_gather'")
        k, v = x.key, x.value
        if hkv % n:
            rep = math.lcm(hkv, n) // hkv
            if hq % (hkv * rep):
                raise ValueError(f"key: ulysses cannot split {hkv} K/V heads for {hq} query heads over {n} "
                                 "shards; use 'ring' or 'all_gather'")
            k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
        r = lax.axis_index(self.axis)

        def to_heads(a: jax.Array) -> jax.Array:  # [b, S/n, H, d] -> [b, S, H/n, d], natural order
            full = lax.all_to_all(a, self.axis, 2, 1, tiled=True)
            return self._natural_seq(full, 1)

        def head_slice(a: jax.Array) -> jax.Array:  # a replicated over the shards, heads on axis 1
            if a.shape[1] == 1:
                return a
            size = a.shape[1] // n
            return lax.dynamic_slice_in_dim(a, r * size, size, axis=1)

        local = x.replace(
            query=to_heads(x.query), key=to_heads(k), value=to_heads(v),
            bias=None if x.bias is None else head_slice(x.bias),
            mask=_remap_arrays(x.mask, lambda a: self.gathered(a), head_slice),
            sinks=None if x.sinks is None else lax.dynamic_slice_in_dim(x.sinks, r * (hq // n), hq // n),
            dropout_rng=None if x.dropout_rng is None else jax.random.fold_in(x.dropout_rng, r),
            return_lse=x.return_lse,  # no lse asked for: backends that cannot differentiate one (cuDNN) serve
        )
        caller = self.caller
        request = AttentionRequest.from_inputs(local, mode=caller.metadata.mode, needs_grad=caller.metadata.needs_grad)
        chosen = select(request, caller.hardware, caller.backend)
        out, lse = chosen.backend(local, caller.metadata, caller.hardware)
        out = lax.all_to_all(self._balanced_seq(out, 1), self.axis, 1, 2, tiled=True)
        if lse is None:
            return out, jnp.zeros((x.query.shape[0], hq, x.query.shape[1]), jnp.float32)  # not asked for
        lse = lax.all_to_all(self._balanced_seq(lse, 2), self.axis, 2, 1, tiled=True)
        return out, lse

    def _natural_seq(self, a: jax.Array, axis: int) -> jax.Array:
        return self._reorder(a, axis, np.argsort(chunk_order(self.n)).astype(np.int32))

    def _balanced_seq(self, a: jax.Array, axis: int) -> jax.Array:
        return self._reorder(a, axis, chunk_order(self.n))

    def _reorder(self, a: jax.Array, axis: int, order: np.ndarray) -> jax.Array:
        if not self.balanced:
            return a
        shape = a.shape
        chunks = a.reshape(shape[:axis] + (2 * self.n, shape[axis] // (2 * self.n)) + shape[axis + 1:])
        return jnp.take(chunks, jnp.asarray(order), axis=axis).reshape(shape)


def _segment_and_positions(mask: Mask | None) -> tuple[SegmentMask | None, QueryPositionMask | None]:
    seg = pos = None
    for part in () if mask is None else mask.conjuncts():
        if isinstance(part, SegmentMask):
            seg = part
        elif isinstance(part, QueryPositionMask):
            pos = part
    return seg, pos


def _remap_arrays(mask: Mask | None, seq: Any, heads: Any) -> Mask | None:
    """`mask` with its sequence-sharded arrays gathered (`seq`) and dense masks cut to this
    shard's heads (`heads`), for ulysses."""
    if mask is None:
        return None
    if isinstance(mask, (AndMask, OrMask)):
        return type(mask)(_remap_arrays(mask.a, seq, heads), _remap_arrays(mask.b, seq, heads))
    if isinstance(mask, SegmentMask):
        return SegmentMask(seq(mask.q_segment_ids), seq(mask.kv_segment_ids))
    if isinstance(mask, QueryPositionMask):
        return dataclasses.replace(mask, positions=seq(mask.positions))
    if isinstance(mask, DenseMask):
        return DenseMask(heads(mask.array4d))
    if jax.tree_util.tree_leaves(mask):
        raise ValueError(f"mask: a {type(mask).__name__} holding arrays cannot be split by context parallelism")
    return mask
