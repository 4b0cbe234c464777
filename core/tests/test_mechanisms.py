"""EasyDeL mechanism names wherever a backend name goes; 'not installed' names the package."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import jaxattn
from jaxattn import AttentionMechanisms, Hardware
from jaxattn.mechanisms import MECHANISMS, PROVIDERS

CPU = Hardware.cpu()


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv("JAXATTN_BACKEND", raising=False)


def qkv():
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 16, 2, 8))
    return x, x, x


def test_every_enum_member_is_a_mechanism_or_auto():
    for member in AttentionMechanisms:
        assert member.value == "auto" or member.value in MECHANISMS
        assert member == member.value and str(member) == member.value
    assert AttentionMechanisms.SPLASH is AttentionMechanisms.BLOCKSPARSE  # EasyDeL's alias


@pytest.mark.parametrize("name", ["vanilla", "blockwise", "sdpa", AttentionMechanisms.SDPA,
                                  AttentionMechanisms.REGRESSIVE_DECODE])
def test_mechanisms_select_on_cpu(name):
    sel = jaxattn.select(*qkv(), backend=name, hardware=CPU)
    assert sel.name == "xla"
    with jaxattn.use_backend(name):
        assert jaxattn.select(*qkv(), hardware=CPU).name == "xla"


def test_environment_variable_takes_mechanisms(monkeypatch):
    monkeypatch.setenv("JAXATTN_BACKEND", "vanilla")
    assert jaxattn.select(*qkv(), hardware=CPU).source == "JAXATTN_BACKEND"


def test_a_list_explains_what_it_passed_over():
    text = jaxattn.explain(*qkv(), backend="sdpa", hardware=CPU)
    assert "chosen:   xla" in text and "rejected: cudnn" in text


def test_a_mechanism_without_a_usable_backend_names_reasons_and_packages():
    with pytest.raises(jaxattn.BackendUnavailableError) as err:
        jaxattn.select(*qkv(), backend="flash_attn2", hardware=CPU)
    message = str(err.value)
    assert "flash" in message
    if not jaxattn.default_registry().has("flash"):
        assert "pip install jaxattn-flash" in message


def test_a_backend_that_is_not_installed_names_its_package():
    reg = jaxattn.Registry(group="jaxattn.no_such_group")  # nothing installed in it
    with pytest.raises(ValueError, match=r"'splash' is provided by the jaxattn-splash package \(pip install"):
        reg.get("splash")
    assert set(PROVIDERS) >= {"flash", "splash", "cudnn", "ragged_paged", "decode"}


def test_paged_mechanisms_serve_paged_attention_only():
    with pytest.raises(ValueError, match="does not serve attention; use it with jaxattn.paged_attention"):
        jaxattn.select(*qkv(), backend="ragged_page_attention_v3", hardware=CPU)
    q = jnp.ones((2, 4, 8))
    pages = jnp.ones((6, 4, 2, 8))
    sel = jaxattn.select(q, pages, pages, jnp.asarray([3, 5]), jnp.asarray([[0, 1], [2, 3]]),
                         op="paged_attention", backend="vanilla", hardware=CPU)
    assert sel.name == "xla"
