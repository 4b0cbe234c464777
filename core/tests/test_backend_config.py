"""Typed per-backend configs: dataclasses that validate, name the bad key, and still accept dicts."""

from __future__ import annotations

from dataclasses import FrozenInstanceError

import jax.numpy as jnp
import pytest

import jaxattn
from jaxattn import OperationMetadata
from jaxattn.backends.xla import XlaConfig


def test_config_objects_and_dicts_mean_the_same():
    assert XlaConfig.from_mapping({"block_q": 64}) == XlaConfig(block_q=64)
    assert XlaConfig.from_mapping(None) == XlaConfig() and XlaConfig().to_dict() == {}
    typed = OperationMetadata(operation_configs={"xla": XlaConfig(block_q=64, block_kv=32)})
    plain = OperationMetadata(operation_configs={"xla": {"block_q": 64, "block_kv": 32}})
    assert typed.get_operation_config("xla") == plain.get_operation_config("xla") == {"block_q": 64, "block_kv": 32}
    assert typed.operation_config("xla", XlaConfig) == plain.operation_config("xla", XlaConfig)
    q = jnp.ones((1, 100, 2, 16))
    assert jnp.allclose(jaxattn.attention(q, q, q, metadata=typed), jaxattn.attention(q, q, q, metadata=plain))
    with pytest.raises(FrozenInstanceError):
        XlaConfig().block_q = 3


@pytest.mark.parametrize("bad, message", [
    ({"block_q": 0}, r"metadata.operation_configs\['xla'\]\['block_q'\] must be an int >= 1, got 0"),
    ({"block_kv": 2.5}, r"\['block_kv'\] must be an int >= 1, got 2.5"),
    ({"block_kv": True}, r"\['block_kv'\] must be an int >= 1, got True"),
    ({"blockq": 64}, r"metadata.operation_configs\['xla'\]: unknown keys \['blockq'\]; known: \['block_kv', 'block_q'"),
])
def test_bad_settings_name_the_key_before_any_kernel_runs(bad, message):
    with pytest.raises(ValueError, match=message):
        XlaConfig.from_mapping(bad)
    q = jnp.ones((1, 8, 2, 16))
    with pytest.raises(ValueError, match=message):
        jaxattn.attention(q, q, q, backend="xla", metadata=OperationMetadata(operation_configs={"xla": bad}))


def test_operation_configs_values_must_be_dicts_or_configs():
    with pytest.raises(ValueError, match=r"operation_configs\['xla'\]: expected a dict or a BackendConfig, got int"):
        OperationMetadata(operation_configs={"xla": 5})
    with pytest.raises(ValueError, match=r"operation_configs\['xla'\]: expected a XlaConfig or a dict"):
        OperationMetadata(operation_configs={"xla": jaxattn.BackendConfig()}).operation_config("xla", XlaConfig)
