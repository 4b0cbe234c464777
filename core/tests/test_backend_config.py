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


def test_choices_are_values_of_their_own_type():
    """`check_choice` takes a listed value of the listed type only: 64.0 or True equal 64 or 1 in
    Python but are not a tile size or a mode, and reach a kernel as the wrong type."""
    from dataclasses import dataclass

    from jaxattn import BackendConfig

    @dataclass(frozen=True)
    class Choices(BackendConfig):
        backend = "choices"
        tile: int | None = None
        form: str | None = None

        def __post_init__(self) -> None:
            self.check_choice("tile", (64, 128))
            self.check_choice("form", ("split", "separate"))

    assert Choices(tile=64, form="split").tile == 64 and Choices().form is None
    for bad in ({"tile": 64.0}, {"tile": 32}, {"form": "own"}, {"form": 1}):
        key, value = next(iter(bad.items()))
        with pytest.raises(ValueError, match=rf"\['{key}'\] must be one of .*, got {value!r}"):
            Choices.from_mapping(bad)
    with pytest.raises(ValueError, match=r"\['tile'\] must be one of 64, 128, got True"):
        Choices.from_mapping({"tile": True})


def test_operation_configs_values_must_be_dicts_or_configs():
    with pytest.raises(ValueError, match=r"operation_configs\['xla'\]: expected a dict or a BackendConfig, got int"):
        OperationMetadata(operation_configs={"xla": 5})
    with pytest.raises(ValueError, match=r"operation_configs\['xla'\]: expected a XlaConfig or a dict"):
        OperationMetadata(operation_configs={"xla": jaxattn.BackendConfig()}).operation_config("xla", XlaConfig)
