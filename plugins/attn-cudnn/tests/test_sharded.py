"""The cudnn backend under a mesh: the core runs it in shard_map with AttnShardingRules.

On CPU the translation runs in emulate mode; each shard sees its local batch and heads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import jaxattn
from jaxattn.request import AttentionRequest
from jaxattn.sharding import run_sharded
from jaxattn.testing import build_inputs
from jaxattn_cudnn.backend import CudnnAttention

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices (on CPU: the root conftest.py)")


@pytest.mark.parametrize("hkv", [4, 1])
def test_emulated_cudnn_under_shard_map_matches_unsharded(hkv):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((4, 64, 4, 32)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((4, 64, hkv, 32)), jnp.float32)
    ids = jnp.asarray(np.sort(rng.integers(0, 3, (4, 64)), axis=1), jnp.int32)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("dp", "tp"))
    meta = jaxattn.OperationMetadata(mesh=mesh)
    args = {"query": q, "key": k, "value": k, "is_causal": True, "segment_ids": ids,
            "key_value_seq_lengths": jnp.asarray([64, 40, 64, 17], jnp.int32)}
    inputs = build_inputs("attention", args, meta)
    request = AttentionRequest.from_inputs(inputs, mode="prefill")
    impl = CudnnAttention(emulate=True)
    assert impl.supports(request, jaxattn.Hardware.cpu()), impl.supports(request, jaxattn.Hardware.cpu())
    out, _ = jax.jit(lambda x: run_sharded(impl, x, request, meta, jaxattn.Hardware.cpu()))(inputs)
    want = jaxattn.attention(q, k, k, is_causal=True, segment_ids=ids,
                             key_value_seq_lengths=args["key_value_seq_lengths"], backend="xla")
    err = float(jnp.linalg.norm(out - want) / jnp.linalg.norm(want))
    assert err < 1e-4, err
