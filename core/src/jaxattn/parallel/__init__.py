"""Distributed attention: context parallelism over a sharded sequence, and its load balancing.

`jaxattn.attention` calls into this package when `metadata.mesh` shards the sequence
(`PartitionAxis.sequence_axis`); `load_balance` / `unload_balance` reorder a sequence so
that causal work is even across its shards. Orchestration only: every shard runs an
ordinary backend on its piece, so any backend (that returns lse, for ring) works.
"""

from __future__ import annotations

from .balance import load_balance, unload_balance
from .context import SCHEMES, choose_scheme, describe, run_context_parallel, sequence_shards

__all__ = ["SCHEMES", "choose_scheme", "describe", "load_balance", "run_context_parallel", "sequence_shards",
           "unload_balance"]
