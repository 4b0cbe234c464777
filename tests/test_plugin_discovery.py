"""Third-party plugins: a real distribution on sys.path with an entry point is discovered,
selectable and listed; a broken one is shown as broken while everything else works."""

from __future__ import annotations

import json
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import Hardware
from jaxattn.cli import main

GOOD = '''
import jaxattn

class DoubleScale(jaxattn.OperationImpl):
    """Plain attention that honours the request; lives in a third-party package."""
    name = "thirdparty"
    aliases = ("tp_attn",)
    op = "attention"
    platforms = ("cpu", "gpu")
    priority = {"cpu": 50, "gpu": 50}

    def supports(self, request, hardware):
        reasons = []
        if request.has_bias:
            reasons.append("thirdparty does not take a bias")
        if request.mask_kinds - {"causal"}:
            reasons.append("thirdparty only knows causal masks")
        return jaxattn.Support.from_reasons(reasons)

    def forward_native(self, inputs, metadata):
        import jax, jax.numpy as jnp
        q, k, v = inputs.query, inputs.key, inputs.value
        g = q.shape[2] // k.shape[2]
        k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") * inputs.scale
        if inputs.mask is not None:
            s = jnp.where(inputs.mask.materialize(q.shape[1], k.shape[1]), s, -jnp.inf)
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v, precision="highest"), None

@jaxattn.hookimpl
def jaxattn_register_backends():
    return [DoubleScale]
'''

BROKEN = 'raise ImportError("libfancy.so: cannot open shared object file")\n'

DUPLICATE = '''
import jaxattn
from jaxattn.backends.xla import XlaAttention

class Impostor(XlaAttention):
    pass

@jaxattn.hookimpl
def jaxattn_register_backends():
    return [Impostor()]
'''


def _distribution(root, dist, module, source, ep_name):
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[jaxattn.backends]\n{ep_name} = {module}\n")


@pytest.fixture
def installed_plugins(tmp_path):
    _distribution(tmp_path, "thirdparty-attn", "thirdparty_attn", GOOD, "thirdparty")
    _distribution(tmp_path, "broken-attn", "broken_attn", BROKEN, "broken")
    _distribution(tmp_path, "impostor-attn", "impostor_attn", DUPLICATE, "impostor")
    sys.path.insert(0, str(tmp_path))
    jaxattn.refresh_backends()
    yield
    sys.path.remove(str(tmp_path))
    for name in ("thirdparty_attn", "broken_attn", "impostor_attn"):
        sys.modules.pop(name, None)
    jaxattn.refresh_backends()


def test_third_party_backend_is_discovered_selected_and_correct(installed_plugins):
    infos = {(i.name, i.op): i for i in jaxattn.list_backends()}
    info = infos[("thirdparty", "attention")]
    assert (info.distribution, info.version, info.aliases) == ("thirdparty-attn", "1.2.3", ("tp_attn",))
    assert info.usable and info.priority == {"cpu": 50, "gpu": 50}

    q = jnp.asarray(np.random.default_rng(0).standard_normal((1, 16, 4, 8)), jnp.float32)
    kv = jnp.asarray(np.random.default_rng(1).standard_normal((1, 16, 2, 8)), jnp.float32)
    # On the CPU (pinned: on a GPU the installed first-party kernels outrank it)
    cpu = Hardware.cpu()
    selection = jaxattn.select(q, kv, kv, is_causal=True, hardware=cpu)
    assert selection.name == "thirdparty"  # priority 50 beats xla's 10
    out = jaxattn.attention(q, kv, kv, is_causal=True, backend="tp_attn")
    ref = jaxattn.attention(q, kv, kv, is_causal=True, backend="xla")
    assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) < 1e-5

    # what it does not support goes to xla, and the reason is shown
    selection = jaxattn.select(q, kv, kv, sliding_window=4, hardware=cpu)
    assert selection.name == "xla"
    assert "thirdparty only knows causal masks" in selection.explain()


def test_broken_and_duplicate_plugins_are_recorded_not_fatal(installed_plugins):
    broken = {b.plugin: b for b in jaxattn.broken_plugins()}
    assert "ImportError: libfancy.so" in broken["broken"].error
    assert broken["broken"].distribution == "broken-attn"
    assert "already taken" in broken["impostor"].error and "'xla'" in broken["impostor"].error
    names = {i.name for i in jaxattn.list_backends()}
    assert {"xla", "thirdparty"} <= names
    assert jaxattn.select(jnp.ones((1, 4, 2, 8)), jnp.ones((1, 4, 2, 8)), jnp.ones((1, 4, 2, 8)),
                          backend="xla").backend.__class__.__name__ == "XlaAttention"


def test_list_backends_command_shows_everything(installed_plugins, capsys):
    assert main(["list-backends"]) == 0
    text = capsys.readouterr().out
    assert "thirdparty" in text and "thirdparty-attn 1.2.3" in text
    assert "broken plugins:" in text and "libfancy.so" in text
    assert main(["list-backends", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {b["name"] for b in data["backends"]} >= {"xla", "thirdparty"}
    assert {b["plugin"] for b in data["broken"]} >= {"broken", "impostor"}
