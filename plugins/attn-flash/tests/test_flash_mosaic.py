"""The Hopper paths (Mosaic GPU): which calls take them and what reaches the kernels.

These CPU tests ask `gpu_path.choose` (through `FlashAttention.gpu_kernel_for`) with
injected hardware, check the specs `_prepare` hands the kernels, and run the custom_vjp
around the kernel with the Triton forward in its place: Mosaic GPU kernels cannot run in the
interpreter. The kernels' own structure (tile ranges, traces, lowering for CUDA) is in
test_flash_mosaic_kernels.py, their runs on a Hopper GPU in test_flash_mosaic_gpu.py.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jaxattn
from jaxattn import Hardware, OperationMetadata
from jaxattn.pallas_compat import SMEM_PER_BLOCK
from jaxattn_flash import FlashAttention, gpu_path
from jaxattn_flash import config as flash_config
from jaxattn_flash._testing import flash_metadata as _md
from jaxattn_flash._testing import peers_request as _request
from jaxattn_flash._testing import tiles

H100 = Hardware.nvidia()
A100 = Hardware.nvidia(compute_capability=(8, 0), device_kind="NVIDIA A100-SXM4-80GB")
MOSAIC = OperationMetadata(operation_configs={"flash": {"gpu_kernel": "mosaic"}})


@pytest.fixture
def mosaic_importable(monkeypatch):
    monkeypatch.setattr(gpu_path._compat, "mosaic_import_error", lambda: None)


def test_auto_takes_mosaic_on_hopper_only(mosaic_importable):
    impl = FlashAttention()
    for kinds in ({"causal"}, set(), {"full"}, {"causal", "sliding_window"}):
        choice = impl.gpu_kernel_for(_request(mask_kinds=frozenset(kinds)), H100)
        assert choice.kernel == "mosaic", choice
    assert impl.gpu_kernel_for(_request(dtype="float16", kv_dtype="float16", head_dim=64, value_head_dim=64),
                               H100).kernel == "mosaic"
    on_a100 = impl.gpu_kernel_for(_request(), A100)
    assert on_a100.kernel == "triton" and "compute capability 9.x" in on_a100.reason and "8.0" in on_a100.reason
    assert impl.gpu_kernel_for(_request(), H100, _md(gpu_kernel="triton")).kernel == "triton"
    for fields in ({"logits_soft_cap": True}, {"has_sinks": True}, {"kv_seq_lengths": True, "q_seq_lengths": True}):
        assert impl.gpu_kernel_for(_request(**fields), H100).kernel == "mosaic", fields  # the Mosaic forward has these
    # what auto cannot give to Mosaic goes to Triton, with the reason
    dropout = impl.gpu_kernel_for(_request(mask_kinds=frozenset({"causal", "segment"}), dropout=True), H100)
    assert dropout.kernel == "triton" and "has no dropout" in dropout.reason
    # both Mosaic paths take segment ids (packed sequences), and the backward lengths too
    for fields in ({"kv_seq_lengths": True, "q_seq_lengths": True}, {"mask_kinds": frozenset({"causal", "segment"})}):
        assert impl.gpu_kernel_for(_request(**fields), H100).kernel == "mosaic", fields
        assert impl.gpu_backward_for(_request(**fields), H100).kernel == "mosaic", fields


def test_mosaic_paths_take_a_value_head_dim_of_their_own(mosaic_importable, monkeypatch):
    """MLA-like calls (query/key head_dim 192, values 128) and other head_dim pairs: the forward
    takes each of 64/128/192/256, the backward each of 64/128 and pairs of those summing past 256
    (mosaic_bwd_wide.py); auto takes the measured MLA forward and backward and keeps what it has
    no measurement for on Triton, saying so."""
    impl = FlashAttention()
    mosaic = _md(gpu_kernel="mosaic", gpu_backward="mosaic")
    for d, dv in ((64, 128), (128, 64), (192, 128), (256, 128)):
        assert impl.gpu_kernel_for(_request(head_dim=d, value_head_dim=dv), H100, mosaic).kernel == "mosaic"
        assert impl.gpu_backward_for(_request(head_dim=d, value_head_dim=dv), H100, mosaic).kernel == "mosaic"
    with pytest.raises(ValueError, match=r"value head_dim 64/128 \(got 64/192"):  # 256 in all: the narrow kernel's
        impl.gpu_backward_for(_request(head_dim=64, value_head_dim=192), H100, mosaic)
    with pytest.raises(ValueError, match=r"each of 64/128/192/256 when they sum past 256 \(got 256/96"):
        impl.gpu_backward_for(_request(head_dim=256, value_head_dim=96), H100, mosaic)
    with pytest.raises(ValueError, match=r"value head_dim 64/128/192/256 \(got 96/128"):
        impl.gpu_kernel_for(_request(head_dim=96, value_head_dim=128), H100, mosaic)
    mla = _request(head_dim=192, value_head_dim=128)
    assert impl.gpu_kernel_for(mla, H100).kernel == "mosaic"  # AUTO_MOSAIC[(192, "band")]
    assert impl.gpu_backward_for(mla, H100).kernel == "mosaic"  # AUTO_MOSAIC_BWD[(192, "band")]
    monkeypatch.delitem(gpu_path.AUTO_MOSAIC_BWD, (192, "band"))
    mla_bwd = impl.gpu_backward_for(mla, H100)
    assert mla_bwd.kernel == "triton" and "not measured at head_dim 192" in mla_bwd.reason
    monkeypatch.delitem(gpu_path.AUTO_MOSAIC, (192, "band"))
    auto = impl.gpu_kernel_for(mla, H100)
    assert auto.kernel == "triton" and "not measured at head_dim 192, band mask" in auto.reason
    # the shared memory check counts O's own buffer: 192/128 fits with 64-key tiles, not with 128 x 3
    wide = _request(head_dim=192, value_head_dim=128)
    with pytest.raises(ValueError, match="at head_dim 192, value head_dim 128"):
        impl.gpu_kernel_for(wide, H100, _md(gpu_kernel="mosaic", mosaic_block_kv=128, mosaic_stages=3))


def test_triton_backward_pads_head_dims_a_mosaic_forward_hands_it(monkeypatch):
    """After a Mosaic forward of head_dim 192 (MLA) the Triton backward gets unpadded arrays of a
    head_dim it does not tile (Triton's blocks are powers of two; the interpreter would not
    mind): `_flash_bwd` hands its kernels arrays padded to 64 / 32 here and cuts the gradients
    back to head_dim 48 / values 24, equal to the xla reference's."""
    import jax.numpy as jnp

    from jaxattn_flash import backend, triton_vjp

    kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(3), 4)
    q = jax.random.normal(kq, (1, 64, 2, 48), jnp.float32)
    k = jax.random.normal(kk, (1, 64, 2, 48), jnp.float32)
    v = jax.random.normal(kv, (1, 64, 2, 24), jnp.float32)
    d_out = jax.random.normal(kd, (1, 64, 2, 24), jnp.float32)
    blocks = OperationMetadata(operation_configs=tiles(32))
    inputs = jaxattn.validation.build_attention_inputs(
        q, k, v, None, None, metadata=blocks, scale=None, is_causal=True, sliding_window=None, segment_ids=None,
        query_seq_lengths=None, key_value_seq_lengths=None, logits_soft_cap=None, sinks=None, dropout_rate=0.0,
        dropout_rng=None, return_lse=False)
    spec = backend._prepare(inputs, blocks, True, None).spec  # the interpreter's Triton spec
    seen = []
    for name in ("backward_dq", "backward_dkdv"):
        kernel = getattr(triton_vjp, name)
        monkeypatch.setattr(triton_vjp, name, lambda spec, q, k, v, do, *rest, kernel=kernel: (
            seen.append((q.shape[-1], k.shape[-1], v.shape[-1], do.shape[-1])) or kernel(spec, q, k, v, do, *rest)))
    out, lse = jaxattn.attention(q, k, v, is_causal=True, backend="xla", return_lse=True)
    residuals = triton_vjp.Residuals(q, k, v, out, lse)
    dq, dk, dv, *_ = triton_vjp._flash_bwd(spec, residuals, (d_out, jnp.zeros_like(lse)))
    want = jax.vjp(lambda q, k, v: jaxattn.attention(q, k, v, is_causal=True, backend="xla"), q, k, v)[1](d_out)
    assert seen == [(64, 64, 32, 32)] * 2
    for name, got, ref in zip(("dq", "dk", "dv"), (dq, dk, dv), want):
        assert got.shape == ref.shape, name
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-4, atol=2e-5, err_msg=name)


def test_auto_without_mosaic_gpu(monkeypatch):
    monkeypatch.setattr(gpu_path._compat, "mosaic_import_error", lambda: "ImportError: no mosaic here")
    choice = FlashAttention().gpu_kernel_for(_request(), H100)
    assert choice.kernel == "triton" and "no mosaic here" in choice.reason


def test_auto_follows_the_measured_rule(mosaic_importable, monkeypatch):
    monkeypatch.setitem(gpu_path.AUTO_MOSAIC, (128, "band"), False)
    choice = FlashAttention().gpu_kernel_for(_request(), H100)
    assert choice.kernel == "triton" and "AUTO_MOSAIC" in choice.reason
    assert FlashAttention().gpu_kernel_for(_request(), H100, _md(gpu_kernel="mosaic")).kernel == "mosaic"


def test_forced_mosaic_says_every_reason(mosaic_importable):
    impl = FlashAttention()
    with pytest.raises(ValueError, match="compute capability 9.x"):
        impl.gpu_kernel_for(_request(), A100, _md(gpu_kernel="mosaic"))
    bad = _request(dtype="float32", kv_dtype="float32", head_dim=96, value_head_dim=96, q_len=200,
                   mask_kinds=frozenset({"causal", "dense", "chunked_causal"}), logits_soft_cap=True,
                   has_sinks=True, q_seq_lengths=True, kv_seq_lengths=True, dropout=True)
    with pytest.raises(ValueError) as err:
        impl.gpu_kernel_for(bad, H100, _md(gpu_kernel="mosaic"))
    text = str(err.value)
    for word in ("gpu_kernel='mosaic'", "float32", "head_dim", "(not dense)", "has no dropout"):
        assert word in text, word
    with pytest.raises(ValueError, match="the Mosaic GPU backward has no bias"):
        impl.gpu_backward_for(_request(has_bias=True), H100, _md(gpu_backward="mosaic"))
    chunked = frozenset({"causal", "chunked_causal"})
    with pytest.raises(ValueError, match="chunks of at least 64 positions"):
        impl.gpu_kernel_for(_request(mask_kinds=chunked, chunk=(32, 0)), H100, _md(gpu_kernel="mosaic"))
    assert impl.gpu_kernel_for(_request(mask_kinds=chunked, chunk=(8192, 0)), H100,
                               _md(gpu_kernel="mosaic")).kernel == "mosaic"
    with pytest.raises(ValueError, match="q_len a multiple of 128"):
        impl.gpu_kernel_for(_request(q_len=200), H100, _md(gpu_kernel="mosaic"))
    with pytest.raises(ValueError, match="does not fit in shared memory"):
        impl.gpu_kernel_for(_request(), H100, _md(gpu_kernel="mosaic", mosaic_stages=4))


def test_interpreter_never_takes_mosaic():
    impl = FlashAttention(interpret=True)
    assert impl.gpu_kernel_for(_request(), H100).kernel == "triton"
    with pytest.raises(ValueError, match="interpreter"):
        impl.gpu_kernel_for(_request(), H100, _md(gpu_kernel="mosaic"))
    q = jax.numpy.ones((1, 128, 2, 64), jax.numpy.float32)
    inputs = jaxattn.validation.build_attention_inputs(
        q, q, q, None, None, metadata=MOSAIC, scale=None, is_causal=True, sliding_window=None, segment_ids=None,
        query_seq_lengths=None, key_value_seq_lengths=None, logits_soft_cap=None, sinks=None, dropout_rate=0.0,
        dropout_rng=None, return_lse=False)
    with pytest.raises(ValueError, match="interpreter"):
        impl(inputs, MOSAIC, Hardware.cpu())  # the call itself refuses, before any kernel runs


def test_gpu_kernel_config_keys():
    assert flash_config.gpu_kernel({}) == "auto"
    with pytest.raises(ValueError, match="gpu_kernel"):
        flash_config.gpu_kernel({"gpu_kernel": "cuda"})
    assert flash_config.mosaic_tiles({}, 128) == flash_config.MOSAIC_DEFAULTS[128]
    assert flash_config.mosaic_tiles({"mosaic_block_kv": 64, "mosaic_stages": 3}, 128) == (64, 3)
    with pytest.raises(ValueError, match="mosaic_block_kv"):
        flash_config.mosaic_tiles({"mosaic_block_kv": 96}, 128)
    with pytest.raises(ValueError, match="mosaic_stages"):
        flash_config.mosaic_tiles({"mosaic_stages": 5}, 128)
    with pytest.raises(ValueError, match="unknown keys"):
        flash_config.gpu_kernel({"gpu_kernels": "auto"})


def test_mosaic_key_tiles_widen_only_without_a_band():
    """head_dim 64 without a band takes key tiles of 256 where they divide kv_len and fit; a
    band (causal, window, chunk), another kv_len, a head_dim without the rule, or the config's
    own tile keeps the measured default."""
    tiles = flash_config.mosaic_tiles
    assert tiles({}, 64, 64, 4096, banded=False) == flash_config.MOSAIC_FULL_DEFAULTS[64] == (256, 2)
    assert tiles({}, 64, 64, 4096, banded=True) == flash_config.MOSAIC_DEFAULTS[64]
    assert tiles({}, 64, 64, 4096 + 128, banded=False) == flash_config.MOSAIC_DEFAULTS[64]
    assert tiles({}, 64, 64, None, banded=False) == flash_config.MOSAIC_DEFAULTS[64]
    assert tiles({}, 128, 128, 4096, banded=False) == flash_config.MOSAIC_DEFAULTS[128]
    # value head_dim 128 beside head_dim 64: 256-key tiles of both would not fit in shared memory
    assert flash_config.mosaic_smem_bytes(64, 256, 2, value_head_dim=128) > SMEM_PER_BLOCK
    assert tiles({}, 64, 128, 4096, banded=False) == flash_config.MOSAIC_DEFAULTS[64]
    assert tiles({"mosaic_block_kv": 64}, 64, 64, 4096, banded=False) == (64, 2)
    # the call's own band decides: the forward's spec and the path's shared-memory check agree
    from jaxattn_flash import backend

    q = jax.random.normal(jax.random.PRNGKey(0), (1, 512, 4, 64), jax.numpy.bfloat16)
    for causal, window, block_kv in ((False, None, 256), (True, None, 128), (False, (64, 64), 128)):
        inputs = jaxattn.validation.build_attention_inputs(
            q, q, q, None, None, metadata=MOSAIC, scale=None, is_causal=causal, sliding_window=window,
            segment_ids=None, query_seq_lengths=None, key_value_seq_lengths=None, logits_soft_cap=None, sinks=None,
            dropout_rate=0.0, dropout_rng=None, return_lse=False)
        assert backend._prepare(inputs, MOSAIC, False, H100).mosaic.block_kv == block_kv, (causal, window)
    # the Triton tiles still resolve with the new keys present
    assert flash_config.resolve({"gpu_kernel": "triton", "mosaic_stages": 2}, 64, 256, 256)["fwd"].block_q == 128


def test_the_value_guard_form_comes_from_the_config():
    """A causal call's Mosaic forward guards the values ("retry" by default, the measured form);
    `mosaic_value_guard` picks another; a full mask hides no key and has no guard at all."""
    from jaxattn_flash import backend

    q = jax.random.normal(jax.random.PRNGKey(0), (1, 512, 4, 64), jax.numpy.bfloat16)

    def mosaic_spec(causal, **config):
        md = OperationMetadata(operation_configs={"flash": {"gpu_kernel": "mosaic", **config}})
        inputs = jaxattn.validation.build_attention_inputs(
            q, q, q, None, None, metadata=md, scale=None, is_causal=causal, sliding_window=None,
            segment_ids=None, query_seq_lengths=None, key_value_seq_lengths=None, logits_soft_cap=None, sinks=None,
            dropout_rate=0.0, dropout_rng=None, return_lse=False)
        return backend._prepare(inputs, md, False, H100).mosaic

    assert mosaic_spec(True).guard_values and mosaic_spec(True).guard_form == "retry"
    assert mosaic_spec(True, mosaic_value_guard="flags").guard_form == "flags"
    assert mosaic_spec(True, mosaic_value_guard="every block").guard_form == "every block"
    assert not mosaic_spec(False).guard_values


def test_mosaic_backward_stages_follow_the_head_dim():
    """head_dim 64 (value head_dim the same) runs the Mosaic backward with 3 stages
    (`MOSAIC_BWD_STAGES`); head_dim 128, a value head_dim of its own, or the config's stages keep
    theirs; the config's stages outside 2..4 are refused by name."""
    tiles = flash_config.mosaic_bwd_tiles
    assert flash_config.MOSAIC_BWD_STAGES[64] == 3
    assert tiles({}, 64, 64) == (flash_config.MOSAIC_BWD_DEFAULTS[0], 3)
    assert tiles({}, 64) == (flash_config.MOSAIC_BWD_DEFAULTS[0], 3)
    assert tiles({}, 128, 128) == flash_config.MOSAIC_BWD_DEFAULTS
    assert tiles({}, 64, 128) == flash_config.MOSAIC_BWD_DEFAULTS
    assert tiles({"mosaic_stages_bwd": 2}, 64, 64)[1] == 2
    with pytest.raises(ValueError, match="mosaic_stages_bwd"):
        tiles({"mosaic_stages_bwd": 5}, 64, 64)
    # the backward's spec the backend builds takes them
    from jaxattn_flash import backend

    q = jax.random.normal(jax.random.PRNGKey(0), (1, 512, 4, 64), jax.numpy.bfloat16)
    inputs = jaxattn.validation.build_attention_inputs(
        q, q, q, None, None, metadata=MOSAIC, scale=None, is_causal=True, sliding_window=None,
        segment_ids=None, query_seq_lengths=None, key_value_seq_lengths=None, logits_soft_cap=None, sinks=None,
        dropout_rate=0.0, dropout_rng=None, return_lse=False)
    assert backend._prepare(inputs, MOSAIC, False, H100).spec.mosaic_bwd.stages == 3


@pytest.mark.parametrize("optional", ["none", "lengths", "segments"])
def test_mosaic_wrapper_gives_the_rows_that_see_a_nan_value_nan_gradients(monkeypatch, optional):
    """`gpu_path.flash_mosaic` (the Mosaic forward's custom_vjp), its kernel replaced by the
    Triton forward in the interpreter so it runs on CPU (a kernel that guards values itself, as
    the Mosaic kernel does with `guard_values`), on values holding NaN/inf: the rows that see
    one are NaN in the output and in dq, as with the xla reference, because the poisoned output
    is the backward's residual (found on one H200, where no partitioned path hid it), and dv is
    zero at the keys whose value was non-finite; the primal gives the same output. With sequence
    lengths or segment ids, the wrapper hands them to the kernel and to the backward's residuals."""
    import jax.numpy as jnp
    import numpy as np

    from jaxattn import value_guard
    from jaxattn.testing import nonfinite_problem
    from jaxattn_flash import backend, mosaic_kernels, triton_kernels

    args = nonfinite_problem(0, (2, 128, 4, 2, 32))
    blocks = OperationMetadata(operation_configs=tiles(32))
    q_lens, kv_lens = (jnp.array([128, 100]), jnp.array([90, 128])) if optional == "lengths" else (None, None)
    ids = jnp.asarray(np.repeat([[0] * 50 + [1] * 78], 2, axis=0), jnp.int32) if optional == "segments" else None
    inputs = jaxattn.validation.build_attention_inputs(
        args["query"], args["key"], args["value"], None, None, metadata=blocks, scale=None, is_causal=True,
        sliding_window=None, segment_ids=ids, query_seq_lengths=q_lens, key_value_seq_lengths=kv_lens,
        logits_soft_cap=None, sinks=None, dropout_rate=0.0, dropout_rng=None, return_lse=False)
    spec = backend._prepare(inputs, blocks, True, None).spec  # the Triton path: interpreter, no padding here
    assert spec.q_pad == 128 and spec.interpret and spec.segments == (ids is not None)
    monkeypatch.setattr(mosaic_kernels, "mosaic_forward",
                        lambda mspec, q, k, v, sinks, q_lens, kv_lens, q_seg, kv_seg, bad_keys=None:
                        triton_kernels.forward(spec, q, k, v, sinks, q_seg, kv_seg, q_lens, kv_lens))
    bad = value_guard.bad_keys(inputs.value)
    mspec = mosaic_kernels.MosaicSpec(scale=32 ** -0.5, band_lo=None, band_hi=0, guard_values=True)
    lens = dict(query_seq_lengths=q_lens, key_value_seq_lengths=kv_lens, segment_ids=ids)
    ref_out = jaxattn.attention(**args, is_causal=True, backend="xla", **lens)
    weight = jnp.asarray(np.isfinite(np.asarray(ref_out)).all(-1), jnp.float32)[..., None]
    assert 0 < float(weight.mean()) < 1  # some rows see a NaN value, others do not

    def loss_mosaic(q, k, v):
        out, _ = gpu_path.flash_mosaic(spec, mspec, q, k, v, None, q_lens, kv_lens, ids, ids, bad)
        return jnp.sum(jnp.where(weight > 0, out, 0.0) * weight), out

    def loss_xla(q, k, v):
        out = jaxattn.attention(q, k, v, is_causal=True, backend="xla", **lens)
        return jnp.sum(jnp.where(weight > 0, out, 0.0) * weight)

    (_, out), got = jax.value_and_grad(loss_mosaic, argnums=(0, 1, 2), has_aux=True)(
        args["query"], args["key"], args["value"])
    want = jax.grad(loss_xla, argnums=(0, 1, 2))(args["query"], args["key"], args["value"])
    assert np.array_equal(np.isfinite(np.asarray(out)).all(-1), np.asarray(weight[..., 0]) > 0)
    primal, _ = jax.jit(lambda q, k, v: gpu_path.flash_mosaic(spec, mspec, q, k, v, None, q_lens, kv_lens, ids, ids,
                                                              bad))(
        args["query"], args["key"], args["value"])
    np.testing.assert_array_equal(np.asarray(primal), np.asarray(out))
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        g, w = np.asarray(g), np.asarray(w)
        assert np.array_equal(np.isfinite(g), np.isfinite(w)), f"{name}: non-finite entries differ"
        np.testing.assert_allclose(g[np.isfinite(w)], w[np.isfinite(w)], rtol=2e-4, atol=2e-5, err_msg=name)


def test_mosaic_forward_only_calls_store_no_lse(monkeypatch):
    """A forward-only call that does not ask for the lse runs the Mosaic forward without its lse
    output (1-2% faster on an H200) and `flash_attention` gives None for it; `return_lse` keeps it;
    a differentiated call makes it for the backward whatever the primal's spec says, and its
    gradients are those of the call with the lse. The kernel is the Triton forward in the
    interpreter (CPU), recording the spec it was handed."""
    import dataclasses

    import jax.numpy as jnp
    import numpy as np

    from jaxattn_flash import backend, mosaic_kernels, triton_kernels

    ks = jax.random.split(jax.random.PRNGKey(7), 3)
    q, k, v = (jax.random.normal(key, (2, 128, 4, 32), jnp.float32) for key in ks)
    blocks = OperationMetadata(operation_configs=tiles(32))
    asked = []

    def inputs_for(return_lse):
        return jaxattn.validation.build_attention_inputs(
            q, k, v, None, None, metadata=blocks, scale=None, is_causal=True, sliding_window=None, segment_ids=None,
            query_seq_lengths=None, key_value_seq_lengths=None, logits_soft_cap=None, sinks=None,
            dropout_rate=0.0, dropout_rng=None, return_lse=return_lse)

    spec = backend._prepare(inputs_for(False), blocks, True, None).spec

    def kernel(mspec, q, k, v, sinks, q_lens, kv_lens, q_seg, kv_seg, bad_keys=None):
        asked.append(mspec.lse)
        out, lse = triton_kernels.forward(spec, q, k, v, sinks, q_seg, kv_seg, q_lens, kv_lens)
        return out, (lse if mspec.lse else None)

    monkeypatch.setattr(mosaic_kernels, "mosaic_forward", kernel)
    with_lse = mosaic_kernels.MosaicSpec(scale=32 ** -0.5, band_lo=None, band_hi=0)
    without = dataclasses.replace(with_lse, lse=False)

    def run(mspec, q=q, k=k, v=v):
        return gpu_path.flash_mosaic(spec, mspec, q, k, v, None, None, None, None, None, None)

    out, placeholder = run(without)
    want_out, want_lse = run(with_lse)
    assert asked == [False, True] and placeholder.shape == want_lse.shape == (2, 4, 128)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want_out))
    asked.clear()

    def loss(mspec):
        return lambda q, k, v: jnp.sum(run(mspec, q, k, v)[0] * jnp.cos(jnp.arange(32.0)))

    got = jax.grad(loss(without), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(with_lse), argnums=(0, 1, 2))(q, k, v)
    assert asked == [True, True]  # the differentiated call's forward makes the lse either way
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    # the backend: the spec it hands the wrapper follows return_lse, and no lse comes back without it
    handed = []
    monkeypatch.setattr(gpu_path, "flash_mosaic", lambda spec, mspec, *args: handed.append(mspec.lse) or (
        q, jnp.zeros((2, 4, 128), jnp.float32)))
    monkeypatch.setattr(backend, "_prepare", lambda inputs, *a: backend._Call(spec, with_lse, q, k, v, None, None,
                                                                               None, None, None))
    assert backend.flash_attention(inputs_for(False), blocks)[1] is None
    assert backend.flash_attention(inputs_for(True), blocks)[1] is not None
    assert handed == [False, True]


# -- the Mosaic GPU backward: which calls take it (CPU), its tile ranges (CPU) --------------------


def test_auto_backward_takes_mosaic_on_hopper_with_soft_cap_and_sinks(mosaic_importable):
    impl = FlashAttention()
    for fields in ({}, {"mask_kinds": frozenset()}, {"logits_soft_cap": True}, {"has_sinks": True},
                   {"mask_kinds": frozenset({"causal", "sliding_window"})},
                   {"head_dim": 64, "value_head_dim": 64, "dtype": "float16", "kv_dtype": "float16"}):
        choice = impl.gpu_backward_for(_request(**fields), H100)
        assert choice.kernel == "mosaic", (fields, choice)
    mla = _request(head_dim=192, value_head_dim=128)  # measured: the wide Mosaic backward
    assert impl.gpu_backward_for(mla, H100).kernel == "mosaic"
    on_a100 = impl.gpu_backward_for(_request(), A100)
    assert on_a100.kernel == "triton" and "compute capability 9.x" in on_a100.reason
    d256 = _request(head_dim=256, value_head_dim=256)
    assert impl.gpu_backward_for(d256, H100).kernel == "mosaic"  # mosaic_bwd_wide.py, measured faster
    assert impl.gpu_backward_for(_request(), H100, _md(gpu_backward="triton")).kernel == "triton"


def test_the_mosaic_backward_says_how_it_makes_dq(mosaic_importable):
    """The choice names the dq form and whether it is deterministic: fused "split" by the measured
    default on a causal call at head_dim 128, the separate kernel under a window, the config's
    form where it names one, the separate 32-key kernel at wide head dims."""
    impl = FlashAttention()
    causal = impl.gpu_backward_for(_request(), H100).reason
    assert "dq: fused 'split'" in causal and "not bitwise deterministic" in causal and "MOSAIC_DQ_DEFAULTS" in causal
    windowed = _request(mask_kinds=frozenset({"causal", "sliding_window"}), band=(-1023, 0))
    text = impl.gpu_backward_for(windowed, H100).reason
    assert "dq: the separate kernel (deterministic)" in text and "MOSAIC_DQ_BOUNDED" in text
    text = impl.gpu_backward_for(_request(), H100, _md(mosaic_dq="separate")).reason
    assert "dq: the separate kernel (deterministic), by mosaic_dq in the flash config" in text
    text = impl.gpu_backward_for(_request(head_dim=64, value_head_dim=64), H100).reason
    assert "dq: fused 'own'" in text
    text = impl.gpu_backward_for(_request(head_dim=256, value_head_dim=256), H100).reason
    assert "dq: the separate kernel (32-key tiles at wide head dims; deterministic)" in text
    assert "dq:" not in impl.gpu_backward_for(_request(), A100).reason  # the Triton backward


def test_auto_backward_follows_the_measured_rule(mosaic_importable, monkeypatch):
    monkeypatch.setitem(gpu_path.AUTO_MOSAIC_BWD, (128, "band"), False)
    choice = FlashAttention().gpu_backward_for(_request(), H100)
    assert choice.kernel == "triton" and "AUTO_MOSAIC_BWD" in choice.reason
    assert FlashAttention().gpu_backward_for(_request(), H100, _md(gpu_backward="mosaic")).kernel == "mosaic"


def test_forced_mosaic_backward_says_every_reason(mosaic_importable):
    impl = FlashAttention()
    bad = _request(dtype="float32", kv_dtype="float32", head_dim=96, value_head_dim=96,
                   mask_kinds=frozenset({"causal", "dense"}), q_seq_lengths=True, has_bias=True)
    with pytest.raises(ValueError) as err:
        impl.gpu_backward_for(bad, A100, _md(gpu_backward="mosaic"))
    text = str(err.value)
    for word in ("gpu_backward='mosaic'", "compute capability 9.x", "float32", "head_dim 64/128", "(not dense)",
                 "has no bias"):
        assert word in text, word
    with pytest.raises(ValueError, match="kv_len a multiple of 128"):
        impl.gpu_backward_for(_request(kv_len=1000), H100, _md(gpu_backward="mosaic"))
    with pytest.raises(ValueError, match="interpreter"):
        FlashAttention(interpret=True).gpu_backward_for(_request(), H100, _md(gpu_backward="mosaic"))
    assert FlashAttention(interpret=True).gpu_backward_for(_request(), H100).kernel == "triton"
    with pytest.raises(ValueError, match="mosaic_block_kv_dq"):
        impl.gpu_backward_for(_request(), H100, _md(mosaic_block_kv_dq=256))
    # head_dim 256 (mosaic_bwd_wide.py): equal value head_dim, the dq settings it takes
    forced = _md(gpu_backward="mosaic")
    for fields, config, words in (
            ({"value_head_dim": 96}, {}, "when they sum past 256 (got 256/96)"),
            ({}, {"mosaic_stages_bwd": 3}, "mosaic_stages_bwd=3 does not fit in shared memory at head_dim 256"),
            ({}, {"mosaic_dq": "own"}, "mosaic_dq='own' does not fit at head_dim 256"),
            ({}, {"mosaic_block_kv_dq": 64}, "mosaic_block_kv_dq does not apply at head_dim 256")):
        request = _request(**{"head_dim": 256, "value_head_dim": 256, **fields})
        with pytest.raises(ValueError) as err:
            impl.gpu_backward_for(request, H100, _md(gpu_backward="mosaic", **config))
        assert words in str(err.value), (fields, config, str(err.value))
    assert impl.gpu_backward_for(_request(head_dim=256, value_head_dim=256), H100, forced).kernel == "mosaic"
    packed = _request(head_dim=256, value_head_dim=256, mask_kinds=frozenset({"causal", "segment"}))
    assert impl.gpu_backward_for(packed, H100, forced).kernel == "mosaic"  # segment ids at 256 too
    with pytest.raises(ValueError, match="gpu_backward"):
        impl.gpu_backward_for(_request(), H100, _md(gpu_backward="cudnn"))


@pytest.mark.parametrize("config, segments, kernel", [
    ({"mosaic_stages_bwd": 4}, False, "dk/dv kernel"),  # "split" dQ (the default at 128): 264,408 bytes
    ({"mosaic_stages_bwd": 3}, True, "dk/dv kernel"),  # fits without segment ids (231,600), not with them
    ({"mosaic_dq": "own"}, True, "dk/dv kernel"),  # "own" keeps all of dQ's columns: 233,640 with ids
    ({"mosaic_dq": "separate", "mosaic_block_kv_dq": 128, "mosaic_stages_bwd": 3}, False, "dq kernel")])
def test_backward_tiles_over_shared_memory_are_refused_before_tracing(mosaic_importable, config, segments, kernel):
    """Configs of the head_dim 128 backward whose kernels Mosaic GPU's lowering would refuse (by
    `dkdv_smem_bytes` / `dq_smem_bytes`, which test_flash_mosaic_kernels holds to the lowering):
    forced, the plugin names the kernel, the settings and the bytes; on `auto` the Triton
    backward serves the call and says why. One stage fewer, or no segment ids, fits."""
    impl = FlashAttention()
    kinds = frozenset({"causal", "segment"}) if segments else frozenset({"causal"})
    request = _request(mask_kinds=kinds)
    with pytest.raises(ValueError) as err:
        impl.gpu_backward_for(request, H100, _md(gpu_backward="mosaic", **config))
    text = str(err.value)
    assert f"backward's {kernel} needs" in text and "bytes of shared memory" in text and "more than 232448" in text
    assert ("segment ids" in text) == segments
    choice = impl.gpu_backward_for(request, H100, _md(**config))
    assert choice.kernel == "triton" and kernel in choice.reason
    if segments:
        fits, request = config, _request()
    else:
        fits = dict(config, mosaic_stages_bwd=config["mosaic_stages_bwd"] - 1)
    assert impl.gpu_backward_for(request, H100, _md(gpu_backward="mosaic", **fits)).kernel == "mosaic"


def test_the_shared_memory_check_follows_the_windows_dq_form(mosaic_importable):
    """A window makes "separate" dQ the default at head_dim 128 (`MOSAIC_DQ_BOUNDED`): 3 stages with
    segment ids then fit (the dk/dv kernel holds no dQ buffer), where causal alone's "split" does not."""
    impl = FlashAttention()
    forced = _md(gpu_backward="mosaic", mosaic_stages_bwd=3)
    packed = frozenset({"causal", "segment"})
    with pytest.raises(ValueError, match="mosaic_dq='split', segment ids"):
        impl.gpu_backward_for(_request(mask_kinds=packed), H100, forced)
    windowed = _request(mask_kinds=packed | {"sliding_window"}, band=(-1023, 0))
    assert impl.gpu_backward_for(windowed, H100, forced).kernel == "mosaic"


def test_prepare_hands_the_backward_spec_to_the_kernels(mosaic_importable):
    """On Hopper (injected) a soft-capped causal call runs the Mosaic forward with the cap and
    carries the Mosaic backward's spec; forcing Triton leaves each out. Segment ids and lengths
    reach both specs and the backward's residuals (a backward spec without `segments` once gave
    wrong gradients on an H200 while the forward was right)."""
    from jaxattn_flash import backend

    q = jax.random.normal(jax.random.PRNGKey(0), (1, 256, 4, 128), jax.numpy.bfloat16)
    k = jax.random.normal(jax.random.PRNGKey(1), (1, 256, 2, 128), jax.numpy.bfloat16)

    def prepare(config, sliding_window=None, **optional):
        md = _md(**config)
        optional = {"segment_ids": None, "query_seq_lengths": None, "key_value_seq_lengths": None, **optional}
        inputs = jaxattn.validation.build_attention_inputs(
            q, k, k, None, None, metadata=md, scale=None, is_causal=True, sliding_window=sliding_window, **optional,
            logits_soft_cap=30.0, sinks=None, dropout_rate=0.0, dropout_rng=None, return_lse=False)
        return backend._prepare(inputs, md, False, H100)

    call = prepare({})
    assert call.mosaic is not None and call.mosaic.soft_cap == 30.0 and not call.mosaic.sinks
    assert prepare({"gpu_kernel": "triton"}).mosaic is None
    bspec = call.spec.mosaic_bwd
    assert bspec is not None and bspec.soft_cap == 30.0 and (bspec.band_lo, bspec.band_hi) == (None, 0)
    assert bspec.scale == pytest.approx(128 ** -0.5)
    assert (bspec.dq_block_kv, bspec.stages) == flash_config.MOSAIC_BWD_DEFAULTS
    tuned = prepare({"mosaic_block_kv_dq": 128, "mosaic_stages_bwd": 3}).spec.mosaic_bwd
    assert (tuned.dq_block_kv, tuned.stages) == (128, 3)
    assert prepare({"gpu_backward": "triton"}).spec.mosaic_bwd is None
    # a bfloat16 soft-cap of 30 bounds exp2: no running max, unless the config keeps it
    assert call.mosaic.bounded_logits and not prepare({"mosaic_softcap_running_max": True}).mosaic.bounded_logits
    # ... and part of its exp2 goes to the FMA pipe; with the running max (logits unbounded) none
    assert call.mosaic.poly_exp2 == flash_config.MOSAIC_POLY_EXP2
    assert call.mosaic.poly_degree == flash_config.MOSAIC_POLY_DEGREE
    assert prepare({"mosaic_poly_degree": 3}).mosaic.poly_degree == 3
    assert bspec.poly_exp2 == 0  # the backward's split only when asked for, with the same degree
    split = prepare({"mosaic_poly_exp2_bwd": 2, "mosaic_poly_degree": 3}).spec.mosaic_bwd
    assert (split.poly_exp2, split.poly_degree) == (2, 3)
    assert prepare({"mosaic_softcap_running_max": True, "mosaic_poly_exp2": 2}).mosaic.poly_exp2 == 0
    assert prepare({"mosaic_poly_exp2": 0}).mosaic.poly_exp2 == 0
    assert not call.mosaic.fence and prepare({"mosaic_fence": True}).mosaic.fence  # the softmax's fence
    assert bspec.fused_dq == "split"  # head_dim 128: dq inside the dk/dv kernel
    q256 = jax.random.normal(jax.random.PRNGKey(2), (1, 256, 4, 256), jax.numpy.bfloat16)
    kv256 = jax.random.normal(jax.random.PRNGKey(3), (1, 256, 2, 256), jax.numpy.bfloat16)
    md = _md(gpu_backward="mosaic")
    wide = backend._prepare(jaxattn.validation.build_attention_inputs(
        q256, kv256, kv256, None, None, metadata=md, scale=None, is_causal=True, sliding_window=None,
        segment_ids=None, query_seq_lengths=None, key_value_seq_lengths=None, logits_soft_cap=None, sinks=None,
        dropout_rate=0.0, dropout_rng=None, return_lse=False), md, False, H100)
    assert (wide.spec.mosaic_bwd.dq_block_kv, wide.spec.mosaic_bwd.fused_dq) == (32, None)  # mosaic_bwd_wide
    # causal GQA: the dk/dv launch passes where they were measured to gain (the Triton kernel and
    # the wide Mosaic one), the plain order in the 128-key Mosaic kernel; the config key wins
    assert (call.spec.dkdv_passes, bspec.passes, wide.spec.mosaic_bwd.passes) == (4, 1, 4)
    assert prepare({"launch_passes_dkv": 3}).spec.mosaic_bwd.passes == 3
    # launch clusters (launch_order.clustered_order): causal forward, causal GQA in the 128-key
    # dk/dv kernel; the wide kernel keeps its passes
    assert (call.mosaic.cluster, bspec.cluster, wide.spec.mosaic_bwd.cluster) == (4, 8, 1)
    assert prepare({"launch_passes_dkv": 3}).spec.mosaic_bwd.cluster == 1
    clustered = prepare({"launch_cluster_fwd": 4, "launch_cluster_dkv": 8})
    assert (clustered.mosaic.cluster, clustered.spec.mosaic_bwd.cluster) == (4, 8)
    with pytest.raises(ValueError, match=r"\['launch_cluster_dkv'\] must be an int from 1 to 64"):
        prepare({"launch_cluster_dkv": 0})
    assert prepare({"mosaic_dq": "separate"}).spec.mosaic_bwd.fused_dq is None  # the deterministic kernel
    # a window bounds every row's keys: the separate dq kernel by default (config.MOSAIC_DQ_BOUNDED)
    assert prepare({}, sliding_window=64).spec.mosaic_bwd.fused_dq is None
    assert prepare({"mosaic_dq": "split"}, sliding_window=64).spec.mosaic_bwd.fused_dq == "split"
    assert not (bspec.segments or bspec.kv_lengths or call.mosaic.segments or call.mosaic.kv_lengths)
    # segment ids and lengths reach both Mosaic specs and ride with the call, unpadded
    ids = jax.numpy.asarray(np.repeat([[0] * 100 + [1] * 156], 1, axis=0), jax.numpy.int32)
    lens = jax.numpy.array([200])
    call = prepare({}, segment_ids=ids, query_seq_lengths=lens, key_value_seq_lengths=lens)
    assert call.mosaic.segments and call.mosaic.q_lengths and call.mosaic.kv_lengths
    assert call.spec.mosaic_bwd.segments and call.spec.mosaic_bwd.kv_lengths
    assert call.q_seg.shape == call.kv_seg.shape == (1, 256) and call.kv_lens is not None
    residuals = call.residuals(q, jax.numpy.zeros((1, 4, 256)))
    assert residuals.q_seg is call.q_seg and residuals.kv_lens is call.kv_lens  # for the backward
