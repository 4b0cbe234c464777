"""Fingerprints of flash's Mosaic GPU kernels as lowered for CUDA, on any machine (no GPU):
for a refactor that must leave the kernels as they are, compare the fingerprints before and after.

    python3 plugins/attn-flash/bench/lowering_fingerprint.py /tmp/before.json   # on the old code
    python3 plugins/attn-flash/bench/lowering_fingerprint.py /tmp/after.json    # on the new code
    diff /tmp/before.json /tmp/after.json                                       # empty: the same kernels

Each LOWERED case of tests/test_flash_mosaic_kernels.py is lowered (`jax.jit(...).trace(...).lower(
lowering_platforms=("cuda",))`): the forward, and where its head dims have a Mosaic backward the
backward in the separate-dq form and both fused-dq forms (a config the plugin refuses is recorded as
its error). The module text, Mosaic GPU's serialized kernel inside it, is hashed with source
locations left out (jax's user-frame lookup is stubbed for this process), so moved lines do not
count; the shared-memory layout, the instructions and the kernel's name do. Used on 2026-12-03 for
the named-scratch refactor: all 69 lowerings identical (a swap of two buffers in the forward's
scratch changes all 22 forward fingerprints; moving lines changes none).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import pathlib
import re
import sys

import jax
import jax._src.source_info_util as source_info
import jax.numpy as jnp

# no source locations in the kernels: no tracebacks in locations, and the user-frame lookup stubbed
# before Pallas's Mosaic GPU lowering imports it
jax.config.update("jax_traceback_in_locations_limit", 0)
jax.config.update("jax_include_full_tracebacks_in_locations", False)
source_info.user_frame = lambda *a, **k: None
source_info.user_frames = lambda *a, **k: iter(())

from jaxattn_flash import config as flash_config  # noqa: E402
from jaxattn_flash import gpu_path  # noqa: E402
from jaxattn_flash import mosaic_bwd_kernels as mbk  # noqa: E402
from jaxattn_flash import mosaic_kernels as mk  # noqa: E402

TESTS = pathlib.Path(__file__).resolve().parents[1] / "tests" / "test_flash_mosaic_kernels.py"


class _Unbatched:
    """`custom_vmap` without its batching rule: the fused backward's wrapper, which this jax cannot
    lower for CUDA around a mutable ref; it changes nothing inside the kernel."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)

    def def_vmap(self, rule):
        return rule


def _fingerprint(lowered) -> str:
    return hashlib.sha256(re.sub(r"loc\([^)]*\)", "", lowered.as_text()).encode()).hexdigest()[:16]


def _lowered_cases() -> dict:
    spec = importlib.util.spec_from_file_location("flash_kernel_tests", TESTS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.LOWERED


def fingerprints() -> dict[str, str]:
    """{"fwd CASE" / "bwd CASE FORM": fingerprint or "error TYPE"} for every LOWERED case."""
    jax.custom_batching.custom_vmap = _Unbatched
    found = {}
    for name, case in _lowered_cases().items():
        fields = dict(case)
        passes, cluster = fields.pop("passes", 1), fields.pop("dkv_cluster", 0)
        d = fields.pop("head_dim", 128)
        d_v = fields.pop("value_head_dim", d)
        q = jax.ShapeDtypeStruct((1, 512, 4, d), jnp.bfloat16)
        k = jax.ShapeDtypeStruct((1, 512, 2, d), jnp.bfloat16)
        v = jax.ShapeDtypeStruct((1, 512, 2, d_v), jnp.bfloat16)
        sinks = jax.ShapeDtypeStruct((4,), jnp.float32) if fields.get("sinks") else None
        lengths = jax.ShapeDtypeStruct((1,), jnp.int32)
        ids = jax.ShapeDtypeStruct((1, 512), jnp.int32)
        segments = (ids, ids) if fields.get("segments") else (None, None)
        spec = mk.MosaicSpec(scale=0.1, **fields)
        forward = jax.jit(lambda *a, spec=spec: mk.mosaic_forward(spec, *a)).trace(
            q, k, v, sinks, lengths if spec.q_lengths else None, lengths if spec.kv_lengths else None, *segments)
        found[f"fwd {name}"] = _fingerprint(forward.lower(lowering_platforms=("cuda",)))
        wide = flash_config.wide_backward(d, d_v)
        if not (wide or {d, d_v} <= set(gpu_path.MOSAIC_BWD_HEAD_DIMS)):
            continue
        rows = jax.ShapeDtypeStruct((1, 4, 512), jnp.float32)
        d_out = jax.ShapeDtypeStruct((1, 512, 4, d_v), jnp.bfloat16)
        for fused in [None] if wide else [None, "split", "own"]:
            bspec = mbk.MosaicBwdSpec(scale=0.1, band_lo=fields["band_lo"], band_hi=fields["band_hi"],
                                      soft_cap=fields.get("soft_cap"), chunk=fields.get("chunk"),
                                      kv_lengths=fields.get("kv_lengths", False), segments=spec.segments,
                                      dq_block_kv=32 if wide else 64, passes=passes, cluster=cluster,
                                      fused_dq=fused, stages=2)
            key = f"bwd {name} {fused or 'separate'}"
            try:
                backward = jax.jit(lambda *a, bspec=bspec: mbk.mosaic_backward(bspec, *a)).trace(
                    q, k, v, d_out, rows, rows, lengths if bspec.kv_lengths else None, *segments)
                found[key] = _fingerprint(backward.lower(lowering_platforms=("cuda",)))
            except Exception as err:  # noqa: BLE001 - a refused config is a row too
                found[key] = f"error {type(err).__name__}"
    return found


if __name__ == "__main__":
    result = fingerprints()
    pathlib.Path(sys.argv[1]).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"{len(result)} lowerings, {sum(v.startswith('error') for v in result.values())} refused")
