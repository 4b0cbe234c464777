"""The Hopper decode kernel (`mosaic_decode.py`, config `mosaic=1`): it lowers
for CUDA on this CPU machine (every Mosaic GPU rule it uses), its logic matches the reference in
Pallas's Mosaic GPU interpreter, it says why it cannot serve a call, and on a Hopper GPU it
matches the reference over bf16 and int8 pages (GPU tests)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn.pallas_compat import SMEM_PER_BLOCK
from jaxattn.testing.conformance import relative_error
from jaxattn_ragged import RaggedPagedAttention
from jaxattn_ragged._testing import assert_close, paged_problem, reference, run_impl


@pytest.mark.parametrize("pages", ["bfloat16", "int8", "float8_e4m3fn", "int8 widener", "int8 qk widener",
                                   "float8_e4m3fn widener", "bfloat16 two consumers", "int8 qk two consumers",
                                   "float8_e4m3fn two consumers",
                                   "bfloat16 one producer warp", "float8_e4m3fn widener one producer warp",
                                   "float8_e4m3fn qk two consumers", "float8_e4m3fn qk widener",
                                   "int8 fp16 queries", "float8_e4m3fn qk fp16 queries",
                                   "int8 qk two consumers ps64"])
def test_mosaic_decode_lowers_for_cuda_without_a_gpu(pages):
    from jax import export

    from jaxattn_ragged.mosaic_decode import mosaic_decode

    b, hq, hkv, d, max_pages = 2, 8, 2, 128, 32
    ps = _page_size(pages)  # 64: two pages a step, so two of the four producer warps copy only scales
    q = jax.ShapeDtypeStruct((b, hq, d), jnp.float16 if "fp16 queries" in pages else jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((b * max_pages, ps, hkv, d), jnp.dtype(pages.split()[0]))
    scales = jax.ShapeDtypeStruct((b * max_pages, ps, hkv), jnp.float32) if "bfloat16" not in pages else None
    consumers = 2 if "two consumers" in pages else 1
    options = dict(widener="widener" in pages, quantized_qk=" qk" in pages, consumers=consumers, stages=2,
                   producer_warps=1 if "one producer warp" in pages else 4)
    lowered = export.export(jax.jit(lambda *a: mosaic_decode(*a, scale=0.1, splits=2, **options)),
                            platforms=["cuda"])(
        q, cache, cache, jax.ShapeDtypeStruct((b,), jnp.int32), jax.ShapeDtypeStruct((b, max_pages), jnp.int32),
        scales, scales)
    assert "mosaic_gpu" in lowered.mlir_module()
    assert [o.shape for o in lowered.out_avals] == [(2 * consumers, b, hq, d), (2 * consumers, b, hq)]


def test_mosaic_switch_says_every_reason_it_cannot_serve_a_call():
    from jaxattn_ragged.kernel import RAGGED_CONFIG
    from jaxattn_ragged.plugin import RaggedConfig

    args = paged_problem(3, [40, 7], [5, 1], hq=4, hkv=2, d=32, dtype=jnp.float32, page_size=8)
    impl = RaggedPagedAttention(interpret=True, config=RAGGED_CONFIG.replace(mosaic=1))
    with pytest.raises(ValueError) as err:
        run_impl(impl, args, sliding_window=8)
    text = str(err.value)
    for reason in ("mosaic=1", "decode calls only", "no sliding window", "bf16/fp16 queries", "head_dim 64 or 128",
                   "Hopper GPU only"):
        assert reason in text, reason
    impl = RaggedPagedAttention(interpret=True, config=RAGGED_CONFIG.replace(mosaic=2, num_stages=3))
    with pytest.raises(ValueError, match=r"mosaic=2: .*2 consumer warpgroups needs stages \(num_stages\) a multiple"):
        run_impl(impl, args)
    from jaxattn_ragged.mosaic_serves import mosaic_reasons

    q = jax.ShapeDtypeStruct((2, 8, 128), jnp.bfloat16)
    fp16 = jax.ShapeDtypeStruct((16, 12, 2, 128), jnp.float16)
    reasons = " ".join(mosaic_reasons(q, fp16, fp16))
    assert "pages of the query's dtype, int8 or float8_e4m3fn" in reasons and "page_size a multiple of 8" in reasons
    fp8 = jax.ShapeDtypeStruct((16, 16, 2, 128), jnp.float8_e4m3fn)
    assert mosaic_reasons(q, fp8, fp8) == []
    assert "int8_dots needs int8 pages" in " ".join(mosaic_reasons(q, fp8, fp8, int8_dots=1))
    int8_struct = jax.ShapeDtypeStruct((16, 16, 2, 128), jnp.int8)
    assert "fp8_dots needs float8_e4m3fn pages" in " ".join(mosaic_reasons(q, int8_struct, int8_struct, fp8_dots=1))
    assert mosaic_reasons(q, fp8, fp8, fp8_dots=1, stages=4, consumers=2) == []  # no widened keys: 4 slots of 128
    assert "more than" in " ".join(mosaic_reasons(q, fp8, fp8, stages=4, consumers=2))  # keys widened too
    bf16 = jax.ShapeDtypeStruct((16, 16, 2, 128), jnp.bfloat16)
    assert mosaic_reasons(q, bf16, bf16) == []
    # the kernel itself refuses with the same reasons (and pages without their scales)
    from jaxattn_ragged.mosaic_decode import mosaic_decode

    qa = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 128), jnp.bfloat16)
    pages = jax.random.normal(jax.random.PRNGKey(1), (4, 12, 2, 128), jnp.bfloat16)
    table, lens = jnp.zeros((2, 2), jnp.int32), jnp.full((2,), 20, jnp.int32)
    with pytest.raises(ValueError, match=r"mosaic_decode: .*page_size a multiple of 8"):
        mosaic_decode(qa, pages, pages, lens, table, scale=0.1)
    int8 = pages.astype(jnp.int8)[:, :8]
    with pytest.raises(ValueError, match="one-byte pages take k_scale and v_scale"):
        mosaic_decode(qa, int8, int8, lens, table, scale=0.1)
    # the widener takes one-byte pages only, and only where its 16-bit ring fits
    from jaxattn_ragged.mosaic_serves import widener_fits

    bf16_pages = pages[:, :8]
    with pytest.raises(ValueError, match="widener=True widens one-byte pages; these are 16-bit"):
        mosaic_decode(qa, bf16_pages, bf16_pages, lens, table, scale=0.1, widener=True)
    assert widener_fits(128, 4, 128, 3, True) and widener_fits(128, 4, 128, 2, False)
    assert not widener_fits(128, 4, 128, 3, False) and not widener_fits(128, 4, 128, 4, True)
    fp8_pages = bf16_pages.astype(jnp.float8_e4m3fn)
    scales = jnp.ones(fp8_pages.shape[:3], jnp.float32)
    with pytest.raises(ValueError, match="widener=True at block_kv 128 and 3 stages does not fit"):
        mosaic_decode(qa, fp8_pages, fp8_pages, lens, table, scales, scales, scale=0.1, stages=3, widener=True)
    # two consumer warpgroups: each owns every other slot, and the widener feeds one consumer only
    assert mosaic_reasons(q, bf16, bf16, stages=2, consumers=2) == []
    assert "needs stages (num_stages) a multiple of 2" in " ".join(mosaic_reasons(q, bf16, bf16, stages=3,
                                                                                   consumers=2))
    assert "consumers 1 or 2, got 3" in " ".join(mosaic_reasons(q, bf16, bf16, stages=3, consumers=3))
    assert "more than" in " ".join(mosaic_reasons(q, bf16, bf16, stages=4, consumers=2))  # 4 bf16 slots of 128
    with pytest.raises(ValueError, match="widener=True feeds one consumer warpgroup, not consumers=2"):
        mosaic_decode(qa, fp8_pages, fp8_pages, lens, table, scales, scales, scale=0.1, stages=2, widener=True,
                      consumers=2)
    with pytest.raises(ValueError, match="producer_warps is 1 or 4 .*, got 2"):
        mosaic_decode(qa, bf16_pages, bf16_pages, lens, table, scale=0.1, producer_warps=2)
    with pytest.raises(ValueError, match="producer_warps=4 runs per-warp code, which Pallas's Mosaic GPU interpreter"):
        mosaic_decode(qa, bf16_pages, bf16_pages, lens, table, scale=0.1, producer_warps=4, interpret=True)
    assert RaggedConfig(mosaic=2).mosaic == 2
    with pytest.raises(ValueError, match="mosaic"):
        RaggedConfig(mosaic=3)
    with pytest.raises(ValueError, match="fp8_dots"):
        RaggedConfig(fp8_dots=2)
    with pytest.raises(ValueError, match="quantized_qk"):  # 16-bit pages have no one-byte products
        mosaic_decode(qa, bf16_pages, bf16_pages, lens, table, scale=0.1, quantized_qk=True)
    with pytest.raises(ValueError, match=r"ctas is None \(a block per unit\) or a positive int, got 0"):
        mosaic_decode(qa, bf16_pages, bf16_pages, lens, table, scale=0.1, ctas=0)
    with pytest.raises(ValueError, match="order is 'heads' or 'sequences', got 'rows'"):
        mosaic_decode(qa, bf16_pages, bf16_pages, lens, table, scale=0.1, order="rows")


@pytest.mark.parametrize("case", ["bfloat16 c1 s2", "bfloat16 c2 s6 bk64 g16", "int8 qk c2 s4", "float8_e4m3fn qk c2 s4",
                                  "int8 qk widener c1 s3", "int8 c1 s2", "float8_e4m3fn widener c1 s2 d64 g8"])
def test_smem_bytes_are_what_the_lowering_allocates(case, monkeypatch):
    """`mosaic_serves.smem_bytes`, the budget the plugin and `tune` judge a config by before
    tracing, against the shared memory Mosaic GPU's own lowering allocates for the kernel (on this
    CPU machine, lowering for CUDA): the same bytes (the defaults and a config 3 KB under the
    limit), and a config it refuses is one the lowering refuses too."""
    from jax import export

    from jaxattn.testing.smem import lowered_smem
    from jaxattn_ragged import mosaic_serves
    from jaxattn_ragged.mosaic_decode import mosaic_decode

    words = case.split()
    dtype = jnp.dtype(words[0])
    option = {w[0]: int(w[1:]) if w[1:].isdigit() else w for w in words[1:] if w[0] in "csg"}
    d = 64 if "d64" in words else 128
    block_kv = 64 if "bk64" in words else 128
    consumers, stages, group = option["c"], option["s"], option.get("g", 4)
    quant, qk, widener = dtype != jnp.bfloat16, "qk" in words, "widener" in words
    b, hkv, ps, max_pages = 2, 2, 16, 32
    scales = jax.ShapeDtypeStruct((b * max_pages, ps, hkv), jnp.float32) if quant else None
    cache = jax.ShapeDtypeStruct((b * max_pages, ps, hkv, d), dtype)
    args = (jax.ShapeDtypeStruct((b, hkv * group, d), jnp.bfloat16), cache, cache,
            jax.ShapeDtypeStruct((b,), jnp.int32), jax.ShapeDtypeStruct((b, max_pages), jnp.int32), scales, scales)
    with lowered_smem() as counted:
        export.export(jax.jit(lambda *a: mosaic_decode(*a, scale=0.1, block_kv=block_kv, stages=stages,
                                                       consumers=consumers, quantized_qk=qk, widener=widener)),
                      platforms=["cuda"])(*args)
    model = mosaic_serves.smem_bytes(d, d, group, block_kv, stages, dtype.itemsize, quant and not qk, quant,
                                     1 if qk else 2, widened_slots=stages if widener else 1, consumers=consumers)
    assert counted and model == max(counted) <= SMEM_PER_BLOCK
    # one slot more than fits: the model refuses it and so does the lowering (its own message)
    over = stages + consumers if not widener else stages + 1
    while mosaic_serves.smem_bytes(d, d, group, block_kv, over, dtype.itemsize, quant and not qk, quant,
                                   1 if qk else 2, widened_slots=over if widener else 1,
                                   consumers=consumers) <= SMEM_PER_BLOCK:
        over += consumers
    import jaxattn_ragged.mosaic_decode as decode_module

    monkeypatch.setattr(decode_module, "mosaic_reasons", lambda *a, **k: [])  # let the lowering judge it
    monkeypatch.setattr(decode_module, "widener_fits", lambda *a: True)
    with pytest.raises(Exception, match="exceeds available shared memory"):
        export.export(jax.jit(lambda *a: mosaic_decode(*a, scale=0.1, block_kv=block_kv, stages=over,
                                                       consumers=consumers, quantized_qk=qk, widener=widener)),
                      platforms=["cuda"])(*args)


def test_one_byte_decode_defaults_to_the_mosaic_kernel_on_hopper_only_where_it_serves():
    """With no settings given, int8/fp8 decode on a Hopper GPU takes `ONE_BYTE_DECODE` (two
    consumers, 4 stages, K·Qᵀ in the pages' dtype); everywhere else the Triton defaults:
    bf16 pages, a window, ragged calls, another GPU, the interpreter, and any settings given."""
    from jaxattn import Hardware, OperationMetadata
    from jaxattn.validation import build_paged_inputs
    from jaxattn_ragged.kernel import DECODE_CONFIG, RAGGED_CONFIG
    from jaxattn_ragged.mosaic_serves import ONE_BYTE_DECODE

    def config(dtype, hardware, impl=None, q_counts=None, configs=None, sliding_window=None):
        args = paged_problem(5, [40, 23], q_counts, hq=8, hkv=2, d=128, dtype=jnp.bfloat16, page_size=16)
        k_scale = v_scale = None
        if dtype != "bfloat16":
            (args["key_pages"], k_scale), (args["value_pages"], v_scale) = (
                jaxattn.quantize_kv(args[name], jnp.dtype(dtype)) for name in ("key_pages", "value_pages"))
        metadata = OperationMetadata(operation_configs=configs or {})
        inputs = build_paged_inputs(args["query"], args["key_pages"], args["value_pages"], args["kv_lengths"],
                                    args["page_indices"], cu_q_lens=args.get("cu_q_lens"), metadata=metadata,
                                    k_scale=k_scale, v_scale=v_scale, scale=None, sliding_window=sliding_window,
                                    logits_soft_cap=None, sinks=None)
        with jaxattn.hardware.override(hardware):
            return (impl or RaggedPagedAttention()).kernel_config(inputs, metadata)

    hopper, ampere = Hardware.nvidia(compute_capability=(9, 0)), Hardware.nvidia(compute_capability=(8, 0))
    assert config("int8", hopper) == DECODE_CONFIG.replace(**ONE_BYTE_DECODE["int8"])
    assert config("int8", hopper).mosaic == 2 and config("int8", hopper).int8_dots == 1
    assert config("float8_e4m3fn", hopper) == DECODE_CONFIG.replace(**ONE_BYTE_DECODE["float8_e4m3fn"])
    assert config("float8_e4m3fn", hopper).fp8_dots == 1 and config("float8_e4m3fn", hopper).int8_dots == 0
    assert config("bfloat16", hopper) == DECODE_CONFIG
    assert config("int8", ampere) == DECODE_CONFIG
    assert config("int8", hopper, sliding_window=16) == DECODE_CONFIG  # the Mosaic kernel has no window
    assert config("int8", hopper, q_counts=[3, 1]) == RAGGED_CONFIG  # ragged calls: the Triton kernel
    assert config("int8", hopper, impl=RaggedPagedAttention(interpret=True)) == DECODE_CONFIG
    given = config("int8", hopper, configs={"ragged_paged": {"num_warps": 8}})
    assert given == DECODE_CONFIG.replace(num_warps=8)  # settings given: over the defaults, no rule


def _past_lengths_poisoned(args, k_scale=None, v_scale=None):
    """NaN in every cache slot past a sequence's length (16-bit pages: the keys and values; int8
    pages: their scales), as a never-written slot of a real cache may hold."""
    ps = args["key_pages"].shape[1]
    table, lengths = np.asarray(args["page_indices"]), np.asarray(args["kv_lengths"])
    pages, slots = [], []
    for seq, length in enumerate(lengths):
        for j in range(int(length), table.shape[1] * ps):
            pages.append(table[seq, j // ps])
            slots.append(j % ps)
    pages, slots = np.asarray(pages), np.asarray(slots)
    if k_scale is None:
        return {**args, **{name: args[name].at[pages, slots].set(jnp.nan) for name in ("key_pages", "value_pages")}}
    return (args, *(s.at[pages, slots].set(jnp.nan) for s in (k_scale, v_scale)))


@pytest.mark.parametrize("pages", ["bfloat16 grid", "bfloat16 cta5 sequences", "int8", "int8 qk", "float8_e4m3fn",
                                   "int8 widener", "int8 qk widener", "float8_e4m3fn widener", "bfloat16 two consumers",
                                   "int8 qk two consumers", "int8 qk two consumers grid",
                                   "float8_e4m3fn qk two consumers", "int8 fp16 queries",
                                   "int8 qk two consumers ps32"])
def test_mosaic_decode_logic_in_the_gpu_interpreter(pages):
    """The kernel's pipeline, page gathers, splits, masking and scales run in Pallas's Mosaic GPU
    interpreter on CPU (its products as plain dots: the interpreter's wgmma takes no transposed
    operand): lengths of 0, partial pages, a sequence across both splits, NaN past each length;
    the reference's numbers (int8: against the dequantized cache). With two consumers a split's
    steps alternate between them (one sees none at length 17) and their reductions take turns:
    the interpreter fails a barrier phase that no warpgroup waits for. Three persistent blocks (as
    on a GPU by default; `ctaN`: N) over the 16 (sequence, kv head, split) units, five or six each,
    empty ones among them, the ring and the query slots running on from unit to unit; `grid`: a
    block per unit; `sequences`: the units in sequence order; `ps32`: pages of 32 (two a step,
    of 64 keys), else 16. (The interpreter runs a block at a time: three blocks take a third of
    the time sixteen do.)"""
    from jaxattn_ragged.kernel import merge_splits
    from jaxattn_ragged.mosaic_decode import mosaic_decode

    q_dtype = jnp.float16 if "fp16 queries" in pages else jnp.bfloat16  # fp16: the products in float16
    args = paged_problem(40, [150, 0, 64, 17], hq=8, hkv=2, d=64, dtype=q_dtype, page_size=_page_size(pages))
    ks = vs = None
    if pages.startswith("bfloat16"):
        args = _past_lengths_poisoned(args)
    else:
        dtype = jnp.dtype(pages.split()[0])
        k, ks = jaxattn.quantize_kv(args["key_pages"], dtype)
        v, vs = jaxattn.quantize_kv(args["value_pages"], dtype)
        args, ks, vs = _past_lengths_poisoned({**args, "key_pages": k, "value_pages": v}, ks, vs)
    out, lse = mosaic_decode(args["query"], args["key_pages"], args["value_pages"], args["kv_lengths"],
                             args["page_indices"], ks, vs, scale=64 ** -0.5, block_kv=64, splits=2,
                             quantized_qk=" qk" in pages, widener="widener" in pages, interpret=True,
                             ctas=None if "grid" in pages else next(
                                 (int(w[3:]) for w in pages.split() if w.startswith("cta")), 3),
                             order="sequences" if "sequences" in pages else "heads",
                             **(dict(consumers=2, stages=4) if "two consumers" in pages else dict(stages=2)))
    out, lse = merge_splits(out, lse)
    ref = reference(args) if ks is None else reference(args, k_scale=ks, v_scale=vs)
    # against the dequantized cache: quantizing the queries too adds int8's or float8's rounding
    bound = {"int8": 6e-3, "float8_e4m3fn": 3e-2}[pages.split()[0]] if " qk" in pages else 3e-3
    assert relative_error(out.astype(q_dtype), ref) < bound
    lse = np.asarray(lse)
    assert np.isfinite(lse[[0, 2, 3]]).all() and np.isneginf(lse[1]).all()  # [B, Hq]; no keys: -inf
    assert np.isfinite(np.asarray(out, np.float32)).all()


def _page_size(pages: str) -> int:
    """A case's page size: `psN` in its name, else 16."""
    return next((int(w[2:]) for w in pages.split() if w.startswith("ps")), 16)


def _on_hopper() -> bool:
    return jax.default_backend() == "gpu" and jaxattn.hardware.current().is_hopper


@pytest.mark.gpu
@pytest.mark.skipif(not _on_hopper(), reason="needs a Hopper GPU (compute capability 9.x)")
def test_mosaic_decode_gpu():
    """bf16, int8 and fp8 pages, lengths of 0, partial pages and several splits, NaN in the slots
    past a length: the reference's numbers (one-byte pages: against the dequantized cache)."""
    md = jaxattn.OperationMetadata(operation_configs={"decode": {"mosaic": 1}})
    md_qk = jaxattn.OperationMetadata(operation_configs={"decode": {"mosaic": 1, "int8_dots": 1}})
    for seed, (lengths, hq, hkv, d, ps) in enumerate([([300, 0, 1000, 17], 32, 8, 128, 16),
                                                     ([5000, 1, 77], 8, 1, 64, 64)]):
        args = paged_problem(30 + seed, lengths, hq=hq, hkv=hkv, d=d, dtype=jnp.bfloat16, page_size=ps)
        k, ks = jaxattn.quantize_kv(args["key_pages"], jnp.int8)
        v, vs = jaxattn.quantize_kv(args["value_pages"], jnp.int8)
        quant, ks, vs = _past_lengths_poisoned({**args, "key_pages": k, "value_pages": v}, ks, vs)
        args = _past_lengths_poisoned(args)
        out = jaxattn.paged_attention(**args, backend="decode", metadata=md)
        assert_close(out, reference(args), jnp.bfloat16)
        ref = reference(quant, k_scale=ks, v_scale=vs)
        for meta, bound in ((md, 1e-2), (md_qk, 1.5e-2)):  # int8_dots=1: K·Qᵀ on int8 tensor cores
            out = jaxattn.paged_attention(**quant, k_scale=ks, v_scale=vs, backend="decode", metadata=meta)
            assert relative_error(out, ref) < bound
            assert np.isfinite(np.asarray(out, np.float32)).all()
        from jaxattn_ragged.kernel import merge_splits
        from jaxattn_ragged.mosaic_decode import mosaic_decode

        # the widener warpgroup beside the consumer's own widening; two consumer warpgroups; persistent blocks
        for form in (dict(widener=False, stages=3), dict(widener=True, stages=3), dict(consumers=2, stages=4),
                     dict(consumers=2, stages=4, ctas=5), dict(widener=True, stages=3, ctas=3, order="sequences")):
            out, _ = merge_splits(*mosaic_decode(quant["query"], quant["key_pages"], quant["value_pages"],
                                                 quant["kv_lengths"], quant["page_indices"], ks, vs, scale=d ** -0.5,
                                                 splits=2, quantized_qk=True, **form))
            assert relative_error(out.astype(jnp.bfloat16), ref) < 1.5e-2, form
            assert np.isfinite(np.asarray(out, np.float32)[np.asarray(quant["kv_lengths"]) > 0]).all(), form
        for pages, form in ((args, dict(stages=2)), (quant, dict(stages=2)),  # two consumers, 16-bit and int8 pages
                            (args, dict(stages=2, ctas=3))):
            scales = (ks, vs) if pages is quant else (None, None)
            out, _ = merge_splits(*mosaic_decode(pages["query"], pages["key_pages"], pages["value_pages"],
                                                 pages["kv_lengths"], pages["page_indices"], *scales, scale=d ** -0.5,
                                                 splits=2, consumers=2, **form))
            expected = ref if pages is quant else reference(args)
            assert relative_error(out.astype(jnp.bfloat16), expected) < 1e-2
        k8, ks8 = jaxattn.quantize_kv(args["key_pages"], jnp.float8_e4m3fn)
        v8, vs8 = jaxattn.quantize_kv(args["value_pages"], jnp.float8_e4m3fn)
        fp8, ks8, vs8 = _past_lengths_poisoned({**args, "key_pages": k8, "value_pages": v8}, ks8, vs8)
        out = jaxattn.paged_attention(**fp8, k_scale=ks8, v_scale=vs8, backend="decode", metadata=md)
        assert relative_error(out, reference(fp8, k_scale=ks8, v_scale=vs8)) < 1e-2  # against the dequantized cache
        two = jaxattn.OperationMetadata(operation_configs={"decode": {"mosaic": 2, "num_stages": 4, "block_kv": 64}})
        out = jaxattn.paged_attention(**fp8, k_scale=ks8, v_scale=vs8, backend="decode", metadata=two)
        assert relative_error(out, reference(fp8, k_scale=ks8, v_scale=vs8)) < 1e-2  # two consumer warpgroups
        for cfg in ({"mosaic": 1, "fp8_dots": 1}, {"mosaic": 2, "num_stages": 4, "fp8_dots": 1}):  # float8 K·Qᵀ
            meta = jaxattn.OperationMetadata(operation_configs={"decode": cfg})
            out = jaxattn.paged_attention(**fp8, k_scale=ks8, v_scale=vs8, backend="decode", metadata=meta)
            assert relative_error(out, reference(fp8, k_scale=ks8, v_scale=vs8)) < 3e-2, cfg
            assert np.isfinite(np.asarray(out, np.float32)).all(), cfg


def test_automatic_split_fills_the_sms_once():
    """One CUDA block per SM: the (sequence, kv head, split) blocks never pass the SMs when the
    pairs are fewer (8 kv heads on 132 SMs: 16 splits, not 17); a batch that fills them is not
    split; `num_splits` is taken as set; each split keeps a share of the steps."""
    from jaxattn_ragged.kernel import DECODE_CONFIG
    from jaxattn_ragged.mosaic_decode import one_wave_splits

    cfg = DECODE_CONFIG.replace(target_programs=132, num_splits=0)
    assert one_wave_splits(1, 8, 1024, cfg) == 16 and 16 * 8 <= 132
    assert one_wave_splits(3, 8, 1024, cfg) == 5  # 120 blocks
    assert one_wave_splits(32, 8, 64, cfg) == 1 and one_wave_splits(17, 8, 64, cfg) == 1
    assert one_wave_splits(1, 8, 40, cfg) == 4  # 40 steps: at most max(4, 40 // 32) splits
    assert one_wave_splits(1, 8, 3, cfg) == 3
    assert one_wave_splits(1, 8, 1024, cfg.replace(num_splits=6)) == 6


def test_tune_tries_the_mosaic_kernel_on_hopper_decode_it_serves():
    """`tuning_space`: the defaults, plus `mosaic=1` for a decode call on a Hopper GPU that the
    kernel serves at the decode defaults' tiles; not for a ragged batch, another GPU, a soft-cap,
    a window, or pages of 4 tokens."""
    import dataclasses

    from jaxattn import Hardware
    from jaxattn.request import AttentionRequest, PagedLayout

    def req(ragged=False, page_size=16, **changes):
        base = AttentionRequest(op="paged_attention", batch=32, q_len=32, kv_len=8192, num_q_heads=32, num_kv_heads=8,
                                head_dim=128, value_head_dim=128, dtype="bfloat16", kv_dtype="bfloat16",
                                mask_kinds=frozenset({"causal"}), kv_seq_lengths=True, needs_grad=False,
                                mode="decode", paged=PagedLayout(32 * 512, page_size, 8192 // page_size, 32, ragged))
        return dataclasses.replace(base, **changes)

    impl, hopper = RaggedPagedAttention(), Hardware.nvidia()
    assert list(impl.tuning_space(req(), hopper)) == [{}, {"mosaic": 1}]
    int8 = req(kv_dtype="int8", kv_scale="per_token")
    assert list(impl.tuning_space(int8, hopper)) == [{}, {"mosaic": 1}]
    a100 = Hardware.nvidia(compute_capability=(8, 0), device_kind="NVIDIA A100-SXM4-80GB")
    for request, hw in ((req(ragged=True), hopper), (req(), a100), (req(logits_soft_cap=True), hopper),
                        (req(mask_kinds=frozenset({"causal", "sliding_window"})), hopper),
                        (req(page_size=4), hopper)):
        assert list(impl.tuning_space(request, hw)) == [{}], (request, hw)
    assert list(RaggedPagedAttention(interpret=True).tuning_space(req(), hopper)) == [{}]


def test_mosaic_switch_refuses_a_device_that_is_not_hopper():
    """A call the kernel would serve, on a device that is not a Hopper GPU (this CPU, dispatched as
    if on an A100): a ValueError naming the device, not a compile error from deep in Mosaic."""
    from jaxattn import Hardware
    from jaxattn_ragged.kernel import DECODE_CONFIG

    args = paged_problem(5, [40, 17], [1, 1], hq=4, hkv=2, d=128, dtype=jnp.bfloat16, page_size=16)
    args = {k: v for k, v in args.items() if k != "cu_q_lens"}
    a100 = Hardware.nvidia(compute_capability=(8, 0), device_kind="NVIDIA A100-SXM4-80GB")
    impl = RaggedPagedAttention(config=DECODE_CONFIG.replace(mosaic=1))
    with pytest.raises(ValueError, match=r"Hopper GPU only \(compute capability 9.x\)") as err:
        run_impl(impl, args, hardware=a100)
    assert "decode calls only" not in str(err.value) and "head_dim" not in str(err.value)


@pytest.mark.gpu
@pytest.mark.skipif(not _on_hopper(), reason="needs a Hopper GPU (compute capability 9.x)")
def test_one_byte_decode_default_gpu():
    """int8 and fp8 decode with no settings, through the public API: the Mosaic kernel runs (its
    custom call is in the program) and gives the dequantized reference's numbers; pages of 16 and
    64, bf16 and fp16 queries, lengths of 0 and 1, partial pages, NaN in the slots past each length."""
    for seed, (ps, names, q_dtype) in enumerate([(16, ("ragged_paged",), jnp.bfloat16),
                                                 (64, ("ragged_paged", "decode"), jnp.bfloat16),
                                                 (16, ("decode",), jnp.float16)]):  # fp16: products in float16
        args = paged_problem(40 + seed, [5000, 1, 77, 0], hq=32, hkv=8, d=128, dtype=q_dtype, page_size=ps)
        for dtype, tol in ((jnp.int8, 1e-2), (jnp.float8_e4m3fn, 3e-2)):  # the queries quantized too
            k, ks = jaxattn.quantize_kv(args["key_pages"], dtype)
            v, vs = jaxattn.quantize_kv(args["value_pages"], dtype)
            quant, ks, vs = _past_lengths_poisoned({**args, "key_pages": k, "value_pages": v}, ks, vs)
            ref = reference(quant, k_scale=ks, v_scale=vs)
            for name in names:
                call = jax.jit(lambda a, ks, vs, name=name: jaxattn.paged_attention(**a, k_scale=ks, v_scale=vs,
                                                                                    backend=name))
                assert "mosaic_gpu" in call.lower(quant, ks, vs).as_text(), (ps, dtype, name)
                err = relative_error(call(quant, ks, vs), ref)
                assert err <= tol, (ps, jnp.dtype(dtype).name, name, err)
