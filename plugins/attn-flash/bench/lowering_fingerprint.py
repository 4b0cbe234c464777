"""Fingerprints of flash's Mosaic GPU kernels as lowered for CUDA, on any machine (no GPU):
for a refactor that must leave the kernels as they are, compare the fingerprints before and after.

    python3 plugins/attn-flash/bench/lowering_fingerprint.py /tmp/before.json   # on the old code
    python3 plugins/attn-flash/bench/lowering_fingerprint.py /tmp/after.json    # on the new code
    diff /tmp/before.json /tmp/after.json                                       # empty: the same kernels

Each `_testing.MOSAIC_LOWERINGS` case (the lowering test's) is lowered (`jax.jit(...).trace(...).lower(
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
import json
import pathlib
import re
import sys

import jax
import jax._src.source_info_util as source_info

# no source locations in the kernels: no tracebacks in locations, and the user-frame lookup stubbed
# before Pallas's Mosaic GPU lowering imports it
jax.config.update("jax_traceback_in_locations_limit", 0)
jax.config.update("jax_include_full_tracebacks_in_locations", False)
source_info.user_frame = lambda *a, **k: None
source_info.user_frames = lambda *a, **k: iter(())

from jaxattn_flash._testing import MOSAIC_LOWERINGS, Unbatched, mosaic_lowering  # noqa: E402
from jaxattn_flash.config import wide_backward  # noqa: E402


def _fingerprint(fn, args) -> str:
    text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    return hashlib.sha256(re.sub(r"loc\([^)]*\)", "", text).encode()).hexdigest()[:16]


def fingerprints() -> dict[str, str]:
    """{"fwd CASE" / "bwd CASE FORM": fingerprint or "error TYPE"} for every `MOSAIC_LOWERINGS` case."""
    jax.custom_batching.custom_vmap = Unbatched
    found = {}
    for name, fields in MOSAIC_LOWERINGS.items():
        forward, forward_args, backward, _ = mosaic_lowering(fields)
        found[f"fwd {name}"] = _fingerprint(forward, forward_args)
        if backward is None:
            continue
        wide = wide_backward(forward_args[0].shape[-1], forward_args[2].shape[-1])
        for fused in [None] if wide else [None, "split", "own"]:
            _, _, backward, backward_args = mosaic_lowering(fields, fused_dq=fused)
            key = f"bwd {name} {fused or 'separate'}"
            try:
                found[key] = _fingerprint(backward, backward_args)
            except Exception as err:  # noqa: BLE001 - a refused config is a row too
                found[key] = f"error {type(err).__name__}"
    return found


if __name__ == "__main__":
    result = fingerprints()
    pathlib.Path(sys.argv[1]).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"{len(result)} lowerings, {sum(v.startswith('error') for v in result.values())} refused")
