"""Test helpers (used by this plugin's tests): random paged problems, the xla reference, direct calls."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxattn
from jaxattn.testing.conformance import relative_error

TOL = {"float32": 1e-4, "bfloat16": 1e-2, "float16": 1e-2}


def paged_problem(seed, kv_lengths, q_counts=None, *, hq=4, hkv=2, d=32, dv=None, page_size=16,
                  dtype=jnp.float32, pad_tokens=0, spare_pages=3):
    """Random shuffled page table; `q_counts=None` is decode. Returns kwargs of paged_attention."""
    rng = np.random.default_rng(seed)
    num_seqs = len(kv_lengths)
    pps = -(-max(list(kv_lengths) + [1]) // page_size) + 1
    num_pages = num_seqs * pps + spare_pages
    table = rng.permutation(num_pages)[: num_seqs * pps].reshape(num_seqs, pps)
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    tokens = num_seqs if q_counts is None else int(sum(q_counts)) + pad_tokens
    args = dict(
        query=jax.random.normal(k[0], (tokens, hq, d), jnp.float32).astype(dtype),
        key_pages=jax.random.normal(k[1], (num_pages, page_size, hkv, d), jnp.float32).astype(dtype),
        value_pages=jax.random.normal(k[2], (num_pages, page_size, hkv, dv or d), jnp.float32).astype(dtype),
        kv_lengths=jnp.asarray(kv_lengths, jnp.int32),
        page_indices=jnp.asarray(table, jnp.int32),
    )
    if q_counts is not None:
        args["cu_q_lens"] = jnp.asarray(np.concatenate([[0], np.cumsum(q_counts)]), jnp.int32)
    return args


def reference(args, **kw):
    f32 = {k: (v.astype(jnp.float32) if k in ("query", "key_pages", "value_pages") else v) for k, v in args.items()}
    return jaxattn.paged_attention(**f32, backend="xla", **kw)


def assert_close(out, ref, dtype):
    err = relative_error(out, ref)
    assert err <= TOL[jnp.dtype(dtype).name], f"relative error {err:.2e}"
    return err


def run_impl(impl, args, hardware=None, **kw):
    """Call a backend instance directly (as the conformance suite does), under jit."""
    from jaxattn import Hardware, OperationMetadata
    from jaxattn.validation import build_paged_inputs

    inputs = build_paged_inputs(
        args["query"], args["key_pages"], args["value_pages"], args["kv_lengths"], args["page_indices"],
        cu_q_lens=args.get("cu_q_lens"), scale=kw.get("scale"), sliding_window=kw.get("sliding_window"),
        logits_soft_cap=kw.get("logits_soft_cap"), sinks=kw.get("sinks"), metadata=OperationMetadata(),
        k_scale=kw.get("k_scale"), v_scale=kw.get("v_scale"))
    hardware = hardware or Hardware.cpu()
    return jax.jit(lambda i: impl(i, OperationMetadata(), hardware))(inputs)
