"""CPU tests of flash's TPU path: our Pallas TPU kernels through the Pallas interpreters.

Most conformance cases run through Pallas's generic (HLO) interpreter, which is about
twice as fast; `test_tpu_interpreter_*` run through the Pallas TPU interpreter
(`pltpu.InterpretParams`: simulated VMEM/SMEM and DMAs, NaN-filled scratch, out-of-bounds
reads raise). Blocks are 128 (TPU-legal) on sequences of 256, so every mask has empty,
full and partial tiles. The CI run keeps to ~60 s on 2 cores with a subset of the
matrix; `JAXATTN_FLASH_TPU_FULL=1` runs every declared case in float32 and bfloat16.
Nothing here was compiled for a real TPU.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import CausalMask, ChunkedCausalMask, Hardware, OperationMetadata, SlidingWindowMask
from jaxattn.testing import Shape, run_conformance
from jaxattn_flash import FlashAttention
from jaxattn_flash import tpu as flash_tpu
from jaxattn_flash._testing import DECLARED as TPU_DECLARED
from jaxattn_flash._testing import REJECTED, tiles
from jaxattn_flash._testing import request as _request

BLOCKS_128 = tiles(128)
SHAPE = Shape(batch=2, seq=256, num_heads=4, head_dim=32)
FULL_MATRIX = os.environ.get("JAXATTN_FLASH_TPU_FULL") == "1"
# the CI subset: every distinct code path (band offsets, lo/hi, chunk ids, segments, run-time
# lengths, soft-cap, sinks, -inf rows with lse, one query block); GQA/MQA groups in both
# dtypes; value head_dim != head_dim and padded query rows in the odd-shapes test below
CI_FLOAT32 = ["causal_q_lt_kv", "gqa", "sliding_window_asym", "chunked_causal", "segment_ids", "seq_lengths",
              "soft_cap", "sinks", "fully_masked_rows"]
CI_BFLOAT16 = ["mqa", "sinks"]


@pytest.fixture
def generic_interpreter(monkeypatch):
    monkeypatch.setattr(flash_tpu, "INTERPRETER", "generic")


def _conformance(cases, dtype, **kw):
    report = run_conformance(
        FlashAttention(interpret=True), hardware=Hardware.tpu(), dtypes=[dtype], cases=cases,
        expect_supported=[c for c in cases if c in TPU_DECLARED],
        metadata=OperationMetadata(operation_configs=BLOCKS_128), shape=SHAPE, **kw)
    print(report.table())
    report.assert_ok()
    assert {r.case for r in report.results if r.status == "rejected"} == set(cases) - set(TPU_DECLARED)
    assert all(r.backward for r in report.results if r.status == "pass" and r.case != "decode")
    return report


def test_tpu_conformance_float32(generic_interpreter):
    _conformance((TPU_DECLARED if FULL_MATRIX else CI_FLOAT32) + REJECTED, "float32")


def test_tpu_conformance_bfloat16(generic_interpreter):
    _conformance(TPU_DECLARED if FULL_MATRIX else CI_BFLOAT16, "bfloat16")


@pytest.mark.skipif(not FULL_MATRIX, reason="JAXATTN_FLASH_TPU_FULL=1 runs it (CI time)")
def test_tpu_group_of_16_heads(generic_interpreter):
    """More than 8 query heads per kv head: the kernels loop over the group (fori_loop)."""
    report = run_conformance(
        FlashAttention(interpret=True), hardware=Hardware.tpu(), dtypes=["float32"], cases=["mqa", "decode"],
        expect_supported="*", metadata=OperationMetadata(operation_configs=BLOCKS_128),
        shape=Shape(batch=1, seq=256, num_heads=16, head_dim=64))
    print(report.table())
    report.assert_ok()


def _inputs(q, k, v, **kw):
    md = OperationMetadata()
    args = dict(scale=None, is_causal=False, sliding_window=None, segment_ids=None, query_seq_lengths=None,
                key_value_seq_lengths=None, logits_soft_cap=None, sinks=None, dropout_rate=0.0,
                dropout_rng=None, return_lse=False)
    args.update(kw)
    mask = args.pop("mask", None)
    return jaxattn.validation.build_attention_inputs(q, k, v, None, mask, metadata=md, **args)


def _rel(x, ref):
    return float(jnp.linalg.norm(x - ref) / jnp.linalg.norm(ref))


def test_tpu_interpreter_odd_shapes_mixed_blocks():
    """Through the TPU interpreter: odd lengths (q 200, kv 300), head_dim 40 / value 24
    (padded to 128 lanes), GQA 2, a chunked causal & window mask, sequence lengths (one
    example with no key at all), different blocks per kernel; forward, lse and gradients."""
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(3), 4)
    q = jax.random.normal(k1, (2, 200, 4, 40), jnp.float32)
    k = jax.random.normal(k2, (2, 300, 2, 40), jnp.float32)
    v = jax.random.normal(k3, (2, 300, 2, 24), jnp.float32)
    d_out = jax.random.normal(k4, (2, 200, 4, 24), jnp.float32)
    lengths = dict(query_seq_lengths=jnp.array([200, 70]), key_value_seq_lengths=jnp.array([260, 0]))
    mask = ChunkedCausalMask(96) & SlidingWindowMask(70, 0)
    md = OperationMetadata(operation_configs={"flash": {
        "block_q": 128, "block_kv": 256, "block_q_dq": 256, "block_kv_dq": 128,
        "block_q_dkv": 128, "block_kv_dkv": 128, "num_warps": 4}})  # GPU-only keys are ignored

    def run(impl, md, hw):
        def f(q, k, v):
            out, lse = impl(_inputs(q, k, v, mask=mask, return_lse=True, **lengths), md, hw)
            return jnp.sum(out * d_out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0)), (out, lse)
        return jax.jit(jax.grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    grads, (out, lse) = run(FlashAttention(interpret=True), md, Hardware.tpu())
    ref_grads, (ref, ref_lse) = run(jaxattn.default_registry().get("xla", "attention"), OperationMetadata(),
                                    Hardware.cpu())
    assert _rel(out, ref) < 1e-5
    assert float(jnp.max(jnp.abs(out[1]))) == 0.0  # no key: zeros
    live = np.isfinite(np.asarray(ref_lse))
    assert np.array_equal(np.isfinite(np.asarray(lse)), live)
    assert float(jnp.max(jnp.abs(jnp.where(live, lse - ref_lse, 0.0)))) < 1e-4
    for g, r in zip(grads, ref_grads):
        assert bool(jnp.all(jnp.isfinite(g)))
        assert _rel(g, r) < 1e-4


# -- declarations, configuration, tile tables (no kernels run) ------------------------------


def test_supports_on_tpu():
    impl = FlashAttention()
    tpu = Hardware.tpu()
    assert impl.is_available(tpu)
    for kinds in ({"causal"}, {"sliding_window", "causal"}, {"chunked_causal"}, {"segment", "causal"}, frozenset()):
        assert impl.supports(_request(mask_kinds=frozenset(kinds)), tpu), kinds
    assert impl.supports(_request(dtype="float32", kv_dtype="float32", q_len=1000, kv_len=3001, head_dim=96,
                                  value_head_dim=64, logits_soft_cap=True, has_sinks=True, q_seq_lengths=True,
                                  kv_seq_lengths=True, return_lse=True, num_kv_heads=1), tpu)
    assert impl.supports(_request(q_len=1, kv_len=5000, mode="decode", needs_grad=False), tpu)
    verdict = impl.supports(_request(dtype="float16", kv_dtype="float16", has_bias=True, dropout=True,
                                     mask_kinds=frozenset({"dense", "or"})), tpu)
    for word in ("float16", "bias", "dropout", "dense", "`|`"):
        assert word in str(verdict), word
    too_big = impl.supports(_request(num_q_heads=64, num_kv_heads=1, head_dim=256, value_head_dim=256,
                                     dtype="float32", kv_dtype="float32"), tpu)
    assert not too_big and "VMEM" in str(too_big)
    assert "flash needs a GPU or TPU" in str(impl.supports(_request(), Hardware.cpu()))


def test_tpu_config():
    sizes = dict(generation=5, head_dim=128, value_head_dim=128, group=4, itemsize=2)
    blocks = flash_tpu.tpu_config({}, q_len=4096, kv_len=4096, **sizes)
    assert blocks["fwd"] == flash_tpu.TPU_DEFAULTS[5]["fwd"]
    assert flash_tpu.tpu_config({}, q_len=4096, kv_len=4096, **{**sizes, "generation": 6})["fwd"] == (512, 512)
    short = flash_tpu.tpu_config({"block_q": 512}, q_len=5, kv_len=200, **sizes)
    assert short["fwd"] == (128, 256) and short["dkv"][0] == 128  # one (padded) query block of 128 rows
    big_group = flash_tpu.tpu_config({"block_q": 1024}, q_len=8192, kv_len=8192, **{**sizes, "group": 16})
    assert big_group["fwd"][0] < 1024  # halved to fit the VMEM budget
    for kernel, (bq, bk) in big_group.items():
        assert flash_tpu.vmem_bytes(kernel, group=16, block_q=bq, block_kv=bk, head_dim=128,
                                    value_head_dim=128, itemsize=2) <= flash_tpu.VMEM_BUDGET or bq == 128
    with pytest.raises(ValueError, match="power of two >= 128"):
        flash_tpu.tpu_config({"block_kv": 64}, q_len=256, kv_len=256, **sizes)
    with pytest.raises(ValueError, match="unknown keys"):
        flash_tpu.tpu_config({"blockq": 128}, q_len=256, kv_len=256, **sizes)


def test_tile_tables_skip_empty_tiles():
    # sliding window 256 at 2048 tokens, blocks 128: each q block visits at most 3 of 16 kv blocks
    mask = CausalMask(0) & SlidingWindowMask(256, 0)
    plan = flash_tpu._plan(mask, 2048, 2048, 2048, 2048, 128, 128, outer_kv=False)
    assert plan.steps == 3 and plan.counts[:3] == (1, 2, 3)
    row = plan.table[5 * plan.steps: 6 * plan.steps]
    assert [e >> 1 for e in row] == [3, 4, 5]
    assert [e & 1 for e in row] == [1, 0, 1]  # only the two edge tiles apply the mask
    first = plan.table[: plan.steps]
    assert all(e == first[0] for e in first)  # padding repeats the last block: no new DMA
    # transposed (dk/dv): kv block 0 is seen by q blocks 0 (partial) and 1, 2 (partial)
    tplan = flash_tpu._plan(mask, 2048, 2048, 2048, 2048, 128, 128, outer_kv=True)
    assert tplan.table[: tplan.steps] == (1, 2, 5)
    # causal, kv_len not a multiple of the block: the last kv block is partial even where full
    plan = flash_tpu._plan(None, 256, 200, 256, 256, 128, 128, outer_kv=False)
    assert plan.table == (0, 3, 0, 3) and plan.counts == (2, 2)
