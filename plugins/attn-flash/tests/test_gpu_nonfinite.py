"""GPU tests of the non-finite semantics (root README, "Semantics") on flash's compiled
kernels: Triton forward and backward, the Mosaic GPU forward with its in-kernel value guard, and
the Mosaic GPU backward after either forward.

Run on a CUDA machine: `pytest -m gpu plugins/attn-flash/tests/test_gpu_nonfinite.py`.
The same checks run on CPU through the Pallas interpreter in tests/test_nonfinite_backends.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import CausalMask, ChunkedCausalMask, OperationMetadata
from jaxattn.testing import assert_same_nonfinite, nonfinite_problem
from jaxattn_flash._testing import on_hopper as _on_hopper

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")]

SHAPE = (2, 256, 4, 2, 64)  # batch, seq, q heads, kv heads, head_dim: Mosaic-sized (multiples of 128)
SEGMENTS = jnp.asarray(np.repeat([[0] * 100 + [1] * 156], 2, axis=0), jnp.int32)
MASKS = {
    "full": {},
    "causal": {"is_causal": True},
    "fully_masked_rows": {"mask": CausalMask(-40)},
    "window": {"is_causal": True, "sliding_window": 50},
    "chunked": {"mask": ChunkedCausalMask(96)},
    "segments_causal": {"is_causal": True, "segment_ids": SEGMENTS},
    "kv_lengths": {"key_value_seq_lengths": jnp.array([90, 200]), "query_seq_lengths": jnp.array([256, 170])},
}
MOSAIC_MASKS = ["full", "causal", "fully_masked_rows", "window", "chunked", "kv_lengths", "segments_causal"]
TOL = dict(rtol=3e-2, atol=3e-2)


def _check(kernel: str, mask: str, shape=SHAPE, dtype=jnp.bfloat16, **config) -> None:
    meta = OperationMetadata(operation_configs={"flash": {"gpu_kernel": kernel, **config}})
    for seed in range(3):
        args = nonfinite_problem(seed, shape, dtype=dtype)
        got = jaxattn.attention(**args, **MASKS[mask], return_lse=True, backend="flash", metadata=meta)
        ref_args = {name: x.astype(jnp.float32) for name, x in args.items()}
        want = jaxattn.attention(**ref_args, **MASKS[mask], return_lse=True, backend="xla")
        assert_same_nonfinite(*got, *want, f"flash {kernel} {mask} seed {seed}", **TOL)


@pytest.mark.parametrize("mask", list(MASKS))
def test_triton_forward_keeps_non_finite_values_to_their_rows(mask):
    _check("triton", mask)


@pytest.mark.skipif(not _on_hopper(), reason="needs a Hopper GPU (compute capability 9.x)")
@pytest.mark.parametrize("mask", MOSAIC_MASKS)
def test_mosaic_forward_keeps_non_finite_values_to_their_rows(mask):
    _check("mosaic", mask)


@pytest.mark.skipif(not _on_hopper(), reason="needs a Hopper GPU (compute capability 9.x)")
@pytest.mark.parametrize("form", ["flags", "every block"])
@pytest.mark.parametrize("mask", ["causal", "fully_masked_rows", "window"])
def test_mosaic_forward_guard_forms_that_are_not_the_default(mask, form):
    """The default ("retry", every test above) runs each block unguarded and again, guarded, where its
    output holds a non-finite value; the two other forms guard by a pass over v or in every block."""
    _check("mosaic", mask, mosaic_value_guard=form)


@pytest.mark.skipif(not _on_hopper(), reason="needs a Hopper GPU (compute capability 9.x)")
@pytest.mark.parametrize("head_dim,dtype", [(256, jnp.bfloat16), (128, jnp.float16)])
@pytest.mark.parametrize("mask", ["causal", "window", "kv_lengths"])
def test_mosaic_forward_guard_at_other_head_dims_and_dtypes(mask, head_dim, dtype):
    """The guard cleans value tiles in 64-key x 128-column chunks: two column chunks at 256."""
    _check("mosaic", mask, SHAPE[:4] + (head_dim,), dtype)


@pytest.mark.parametrize("kernel", ["triton", "mosaic", "triton+mosaic_bwd", "mosaic+mosaic_bwd"])
def test_backward_keeps_non_finite_values_to_their_rows(kernel):
    """`kernel`: the forward, and `+mosaic_bwd` where the Mosaic GPU backward runs."""
    if "mosaic" in kernel and not _on_hopper():
        pytest.skip("needs a Hopper GPU")
    mask = MASKS["causal"]
    args = nonfinite_problem(0, SHAPE, dtype=jnp.bfloat16)
    ref_args = {name: x.astype(jnp.float32) for name, x in args.items()}
    bad_rows = ~np.isfinite(np.asarray(jaxattn.attention(**ref_args, **mask, backend="xla"))).all(-1)
    weight = jnp.asarray(~bad_rows, jnp.float32)[..., None]
    forward, _, backward = kernel.partition("+")
    config = {"gpu_kernel": forward, "gpu_backward": "mosaic" if backward else "triton"}
    meta = OperationMetadata(operation_configs={"flash": config})

    def grads(backend, a, metadata=None):
        def loss(q, k, v):
            out = jaxattn.attention(q, k, v, **mask, backend=backend, metadata=metadata).astype(jnp.float32)
            return jnp.sum(jnp.where(weight > 0, out, 0.0) * weight)
        return jax.grad(loss, argnums=(0, 1, 2))(a["query"], a["key"], a["value"])

    got, want = grads("flash", args, meta), grads("xla", ref_args)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        g, w = np.asarray(g, np.float32), np.asarray(w)
        assert np.array_equal(np.isfinite(g), np.isfinite(w)), f"{kernel} {name}: non-finite entries differ"
        np.testing.assert_allclose(g[np.isfinite(w)], w[np.isfinite(w)], rtol=5e-2, atol=5e-2, err_msg=name)
