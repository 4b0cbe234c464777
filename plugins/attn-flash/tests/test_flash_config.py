"""`FlashConfig`: flash's typed settings (dicts still accepted) and what `jaxattn tune` tries."""

from __future__ import annotations

import dataclasses

import pytest

from jaxattn import AttentionRequest, Hardware, OperationMetadata
from jaxattn_flash import FlashAttention, FlashConfig, gpu_path
from jaxattn_flash import config as flash_config


def test_dicts_and_configs_are_the_same_settings():
    assert FlashConfig.from_mapping({"block_q": 64, "gpu_kernel": "triton"}) == FlashConfig(block_q=64,
                                                                                          gpu_kernel="triton")
    typed = OperationMetadata(operation_configs={"flash": FlashConfig(block_q=64, num_warps_dkv=2)})
    assert typed.get_operation_config("flash") == {"block_q": 64, "num_warps_dkv": 2}
    tiles = flash_config.resolve(typed.get_operation_config("flash"), 64, 4096, 4096)
    assert tiles["fwd"].block_q == 64 and tiles["dkv"].num_warps == 2


@pytest.mark.parametrize("bad, message", [
    ({"block_q": 48}, r"\['flash'\]\['block_q'\] must be a power of two >= 16, got 48"),
    ({"num_stages_dq": 0}, r"\['flash'\]\['num_stages_dq'\] must be an int >= 1, got 0"),
    ({"gpu_kernel": "cuda"}, r"\['flash'\]\['gpu_kernel'\] must be one of 'auto', 'triton', 'mosaic'"),
    ({"mosaic_block_kv": True}, r"\['mosaic_block_kv'\] must be one of 64, 128, 256, got True"),
    ({"blockq": 64}, r"\['flash'\]: unknown keys \['blockq'\]"),
    ({"mosaic_dq": "fused"}, r"\['mosaic_dq'\] must be one of 'separate', 'split', 'own', got 'fused'"),
    ({"mosaic_value_guard": "none"},
     r"\['mosaic_value_guard'\] must be one of 'flags', 'retry', 'every block', got 'none'"),
])
def test_bad_settings_name_the_key(bad, message):
    with pytest.raises(ValueError, match=message):
        FlashConfig.from_mapping(bad)
    with pytest.raises(ValueError, match=message):
        FlashAttention().validate_config(OperationMetadata(operation_configs={"flash": bad}))


def _request(**changes):
    base = AttentionRequest(batch=4, q_len=4096, kv_len=4096, num_q_heads=32, num_kv_heads=8, head_dim=128,
                            value_head_dim=128, dtype="bfloat16", kv_dtype="bfloat16",
                            mask_kinds=frozenset({"causal"}), needs_grad=True, band=(None, 0))
    return dataclasses.replace(base, **changes)


def test_tuning_space_is_small_and_per_call(monkeypatch):
    space = flash_config.tuning_space(_request(), mosaic_by_default=True)
    fence = {"mosaic_fence": True}  # a masked Mosaic forward without a cap: the softmax's fence
    assert space == [{}, {"gpu_kernel": "triton"}, fence, {"launch_passes_dkv": 1}]
    training = [{}, {"gpu_kernel": "triton"}, fence, {"gpu_backward": "triton"}, {"mosaic_poly_exp2_bwd": 2},
                {"mosaic_dq": "separate"}, {"launch_cluster_dkv": 1}]  # causal GQA: dk/dv clusters vs the grid
    assert flash_config.tuning_space(_request(), mosaic_by_default=True, mosaic_backward_by_default=True) == training
    assert flash_config.tuning_space(_request(needs_grad=False), mosaic_by_default=True,
                                     mosaic_backward_by_default=True) == [{}, {"gpu_kernel": "triton"}, fence]
    unmasked = _request(needs_grad=False, mask_kinds=frozenset(), band=None)  # the fence was level there
    assert flash_config.tuning_space(unmasked, mosaic_by_default=True) == [{}, {"gpu_kernel": "triton"}]
    assert flash_config.tuning_space(_request(num_kv_heads=32), mosaic_by_default=False) == [{}]  # MHA
    assert flash_config.tuning_space(_request(needs_grad=False), mosaic_by_default=False) == [{}]
    capped = _request(needs_grad=False, logits_soft_cap=True)  # the exp2 split, on the Mosaic forward only
    assert flash_config.tuning_space(capped, mosaic_by_default=True) == [
        {}, {"gpu_kernel": "triton"}, {"mosaic_poly_exp2": 3, "mosaic_poly_degree": 3},
        {"mosaic_poly_exp2": 4, "mosaic_poly_degree": 3}]
    assert flash_config.tuning_space(capped, mosaic_by_default=False) == [{}]
    assert flash_config.tuning_space(_request(mask_kinds=frozenset(), band=None), mosaic_by_default=False) == [{}]
    assert FlashAttention().tuning_space(_request(), Hardware.cpu()) == ({},)
    for settings in flash_config.tuning_space(_request(), mosaic_by_default=True):
        FlashConfig.from_mapping(settings)  # every entry is valid
    # on Hopper both Mosaic paths are the defaults: tune tries each Triton one
    monkeypatch.setattr(gpu_path._compat, "mosaic_import_error", lambda: None)
    h100_space = FlashAttention().tuning_space(_request(), Hardware.nvidia())
    assert list(h100_space) == training
    # without Mosaic GPU: the Triton backward's launch order is what varies
    monkeypatch.setattr(gpu_path._compat, "mosaic_import_error", lambda: "ImportError: none here")
    assert FlashAttention().tuning_space(_request(), Hardware.nvidia()) == [{}, {"launch_passes_dkv": 1}]


def test_mosaic_dq_defaults_per_head_dim_and_split_needs_head_dim_128():
    """dq inside the dk/dv kernel by default where measured faster (H200: "split" at head_dim 128,
    "own" at 64); "separate" (deterministic) on request; "split" cannot tile head_dim 64."""
    assert flash_config.mosaic_fused_dq({}, 128) == "split"
    assert flash_config.mosaic_fused_dq({}, 64) == "own"
    assert flash_config.mosaic_fused_dq({"mosaic_dq": "separate"}, 128) is None
    assert flash_config.mosaic_fused_dq({"mosaic_dq": "own"}, 128) == "own"
    with pytest.raises(ValueError, match=r"mosaic_dq='split' needs head_dim 128.*got head_dim 64.*'own' or 'separate'"):
        flash_config.mosaic_fused_dq({"mosaic_dq": "split"}, 64)


def test_a_window_or_chunks_take_the_separate_dq_kernel_at_head_dim_128():
    """Where every row sees few key blocks, the fused forms' float32 dQ fill and cast cost more than
    the separate kernel's second pass (H200: window 1024 fwd+bwd 7% faster); head_dim 64 was not
    measured there and keeps "own"; the config's `mosaic_dq` still wins."""
    assert not flash_config.bounds_keys(None, None)  # causal (band_hi only) or full
    assert flash_config.bounds_keys(-1023, None) and flash_config.bounds_keys(None, 8192)
    assert flash_config.mosaic_fused_dq({}, 128, bounded=True) is None
    assert flash_config.mosaic_fused_dq({}, 64, bounded=True) == "own"
    assert flash_config.mosaic_fused_dq({"mosaic_dq": "split"}, 128, bounded=True) == "split"
    # `jaxattn tune` tries the other form: the fused one where the separate kernel is the default
    windowed = _request(band=(-1023, 0), mask_kinds=frozenset({"causal", "sliding_window"}))
    chunked = _request(chunk=(8192, 0), mask_kinds=frozenset({"chunked_causal"}))
    for request in (windowed, chunked):
        space = flash_config.tuning_space(request, mosaic_by_default=True, mosaic_backward_by_default=True)
        assert {"mosaic_dq": "split"} in space and {"mosaic_dq": "separate"} not in space


def test_the_dq_choice_names_what_chose_it():
    """`explain`'s dq line quotes the table that set the form; a head_dim no table names falls to
    "separate" and says so rather than citing a measurement that does not exist."""
    choice = flash_config.mosaic_dq_choice
    assert choice({"mosaic_dq": "own"}, 128, bounded=True) == ("own", "mosaic_dq in the flash config")
    assert choice({}, 128, bounded=True) == ("separate", "a window or chunks bound the keys (MOSAIC_DQ_BOUNDED)")
    assert choice({}, 64, bounded=True) == ("own", "the measured default at head_dim 64 (MOSAIC_DQ_DEFAULTS)")
    mode, why = choice({}, 96)
    assert mode == "separate" and "no fused form measured at head_dim 96" == why
    assert flash_config.mosaic_dq_default(96) == "separate" and flash_config.mosaic_fused_dq({}, 96) is None


def test_softcap_without_max_only_where_the_cap_bounds_exp2():
    """bfloat16 with a cap whose exp2 summed over the keys stays under 2**96 (30 at 128k keys,
    50 at 32k); not float16 (p would pass 65504), not a cap of 100, not without a cap, not when
    `mosaic_softcap_running_max` asks for the running max."""
    import jax.numpy as jnp

    without_max = flash_config.softcap_without_max
    assert without_max({}, 30.0, jnp.bfloat16, 131072) and without_max({}, 50.0, jnp.bfloat16, 32768)
    assert not without_max({}, 30.0, jnp.float16, 4096)
    assert not without_max({}, 100.0, jnp.bfloat16, 128)
    assert not without_max({}, 60.0, jnp.bfloat16, 1 << 20)
    assert not without_max({}, None, jnp.bfloat16, 4096)
    assert not without_max({"mosaic_softcap_running_max": True}, 30.0, jnp.bfloat16, 4096)
    with pytest.raises(ValueError, match="mosaic_softcap_running_max"):
        flash_config.validate({"mosaic_softcap_running_max": 1})


def test_poly_exp2_only_under_bounded_logits():
    """The exp2 split (`mosaic_exp2`) takes bounded soft-capped logits only: 0 without them
    whatever the config says; with them the config's count (0 turns it off), else the default.
    Counts outside 0..8 and non-ints are refused by name."""
    every = flash_config.mosaic_poly_exp2
    assert every({}, bounded_logits=False) == 0 and every({"mosaic_poly_exp2": 2}, bounded_logits=False) == 0
    assert every({}, bounded_logits=True) == flash_config.MOSAIC_POLY_EXP2 > 0
    assert every({"mosaic_poly_exp2": 0}, bounded_logits=True) == 0
    assert every({"mosaic_poly_exp2": 8}, bounded_logits=True) == 8
    for bad in (-1, 9, True, 2.0):
        with pytest.raises(ValueError, match="mosaic_poly_exp2"):
            flash_config.validate({"mosaic_poly_exp2": bad})
    assert flash_config.mosaic_poly_degree({}) == flash_config.MOSAIC_POLY_DEGREE
    assert flash_config.mosaic_poly_degree({"mosaic_poly_degree": 3}) == 3
    for bad in (1, 4, True, 2.0):
        with pytest.raises(ValueError, match="mosaic_poly_degree"):
            flash_config.validate({"mosaic_poly_degree": bad})
    # the backward's split: off unless asked for (it wins on short rows only), with or without a cap
    assert flash_config.mosaic_poly_exp2_bwd({}) == 0
    assert flash_config.mosaic_poly_exp2_bwd({"mosaic_poly_exp2_bwd": 3}) == 3
    for bad in (-1, 9, True, 2.0):
        with pytest.raises(ValueError, match="mosaic_poly_exp2_bwd"):
            flash_config.validate({"mosaic_poly_exp2_bwd": bad})
    # the softmax's fence: off unless asked for; a bool, not 1 or "yes"
    assert flash_config.mosaic_fence({}) is False and flash_config.mosaic_fence({"mosaic_fence": True}) is True
    for bad in (1, "yes", 0.0):
        with pytest.raises(ValueError, match="mosaic_fence"):
            flash_config.validate({"mosaic_fence": bad})
