"""Test helpers (used by this plugin's tests): the conformance cases flash declares, and
requests for `supports()`/path checks without building arrays."""

from __future__ import annotations

from typing import Any

import jax

import jaxattn
from jaxattn import AttentionRequest, OperationMetadata

# Every platform (GPU Triton, TPU) declares the same cases.
DECLARED = [
    "full", "causal", "causal_q_lt_kv", "causal_top_left", "gqa", "mqa", "sliding_window",
    "sliding_window_asym", "chunked_causal", "segment_ids", "seq_lengths", "soft_cap", "sinks",
    "fully_masked_rows", "return_lse", "value_head_dim", "decode",
]
REJECTED = ["bias", "bool_mask", "or_mask", "dropout", "query_positions"]


def tiles(size: int) -> dict[str, dict[str, int]]:
    """`operation_configs` giving every flash kernel (forward, dq, dk/dv) `size` x `size` tiles:
    small tiles make several blocks of small test shapes."""
    return {"flash": {f"{b}{s}": size for b in ("block_q", "block_kv") for s in ("", "_dq", "_dkv")}}


def request(**fields: Any) -> AttentionRequest:
    """A bf16 causal GQA training request (2, 1024, 8 q / 2 kv heads, 128), `fields` changed."""
    base: dict[str, Any] = dict(
        batch=2, q_len=1024, kv_len=1024, num_q_heads=8, num_kv_heads=2, head_dim=128, value_head_dim=128,
        dtype="bfloat16", kv_dtype="bfloat16", mask_kinds=frozenset({"causal"}), needs_grad=True)
    base.update(fields)
    return AttentionRequest(**base)


def peers_request(**fields: Any) -> AttentionRequest:
    """`request` at the peers-table shape (4, 4096, 32 q / 8 kv heads, 128)."""
    return request(**{"batch": 4, "q_len": 4096, "kv_len": 4096, "num_q_heads": 32, "num_kv_heads": 8, **fields})


def flash_metadata(**config: Any) -> OperationMetadata:
    """Metadata whose `operation_configs["flash"]` is `config`."""
    return OperationMetadata(operation_configs={"flash": config})


def on_hopper() -> bool:
    """Whether this process runs on a Hopper GPU (compute capability 9.x): the Mosaic paths' GPU tests."""
    return jax.default_backend() == "gpu" and jaxattn.hardware.current().is_hopper
