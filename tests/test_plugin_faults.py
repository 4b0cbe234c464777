"""Fault isolation: one installed third-party package per fault a buggy backend can have.

Each package is a real distribution (a dist-info directory with an entry point, put on
sys.path, as pip would leave it), imported by discovery. Each test asserts what is
reported (`broken_plugins()`, `list-backends` text and --json, `explain`) and that `xla`
keeps serving `auto`; the last tests install every fault at once. Every faulty backend
declares a CPU priority far above xla's, so it would be chosen if it were not left out.
"""

from __future__ import annotations

import json
import signal
import sys
import textwrap
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import Hardware
from jaxattn.cli import main


def _backend(name, body="", base="jaxattn.backends.xla.XlaAttention", **attrs):
    """A plugin module with one backend (computing as xla does, unless `base` says otherwise)
    that would win `auto` on the CPU; `body` adds methods, `attrs` replaces declarations."""
    declared = {"name": repr(name), "aliases": "()", "platforms": '("cpu",)', "priority": '{"cpu": 1000}', **attrs}
    lines = "\n".join(f"    {k} = {v}" for k, v in declared.items())
    return f'''
import jaxattn
import jaxattn.backends.xla

class Faulty({base}):
{lines}

    def supports(self, request, hardware):
        return jaxattn.Support.yes()
{textwrap.indent(textwrap.dedent(body), "    ")}

@jaxattn.hookimpl
def jaxattn_register_backends():
    return [Faulty]
'''


# name -> (module source, backend name or "" for a plugin-level fault, origin, error text)
FAULTS = {
    "avail_raises": (_backend("avail_raises", """
        def is_available(self, hardware):
            raise RuntimeError("libdriver.so missing")
        """), "avail_raises", "is_available()", "RuntimeError: libdriver.so missing"),
    "supports_bool": (_backend("supports_bool", """
        def supports(self, request, hardware):
            return True
        """), "supports_bool", "supports()", "TypeError: returned True, not a Support"),
    "priority_int": (_backend("priority_int", priority="5"), "priority_int", "registration",
                     "priority must be a mapping of platform (cpu, gpu, tpu) to int, got 5"),
    "priority_on_raises": (_backend("priority_on_raises", """
        def priority_on(self, platform):
            raise KeyError(platform)
        """), "priority_on_raises", "priority_on()", "KeyError: 'cpu'"),
    "exits": ("import sys\nsys.exit(3)\n", "", "import exits_attn", "SystemExit: 3"),
    "fake_interrupt": ("raise KeyboardInterrupt\n", "", "import fake_interrupt_attn", "KeyboardInterrupt"),
    "unmarked": (_backend("unmarked").replace("@jaxattn.hookimpl\n", ""), "", "registration",
                 "no `jaxattn_register_backends` hook implementation: missing `@jaxattn.hookimpl`?"),
    "named_auto": (_backend("auto"), "auto", "registration",
                   "name 'auto' is reserved: backend='auto' asks the selector to choose"),
    "platform_str": (_backend("platform_str", platforms='"cpu"'), "platform_str", "registration",
                     "platforms must be a non-empty tuple of ('cpu', 'gpu', 'tpu'), got 'cpu'"),
    "no_forward": (_backend("no_forward", base="jaxattn.OperationImpl", platforms='("cpu", "tpu")'),
                   "no_forward", "registration",
        "no forward for platform cpu, tpu: implement forward_native or forward_cpu or forward_tpu"),
    "hook_raises": (_backend("hook_raises").replace("return [Faulty]", "raise OSError('no config')"), "",
                    "jaxattn_register_backends()", "OSError: no config"),
    "not_a_backend": (_backend("not_a_backend").replace("return [Faulty]", "return [object]"), "",
                      "registration", "not an OperationImpl"),
}

FORWARD_RAISES = _backend("forward_raises", """
    def forward_native(self, inputs, metadata):
        raise NotImplementedError("forward_raises: kernel not built for this shape")
    """)


def _distribution(root, name, source):
    module = f"{name}_attn"
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}-attn\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[jaxattn.backends]\n{name} = {module}\n")


@pytest.fixture
def install(tmp_path, monkeypatch):
    """install({name: source}) puts those packages on sys.path; all is undone afterwards."""
    monkeypatch.delenv("JAXATTN_BACKEND", raising=False)
    monkeypatch.delenv("JAXATTN_DISABLE_PLUGINS", raising=False)
    installed = []

    def install(packages):
        for name, source in packages.items():
            _distribution(tmp_path, name, source)
            installed.append(f"{name}_attn")
        sys.path.insert(0, str(tmp_path))
        jaxattn.refresh_backends()

    with jaxattn.hardware.override(Hardware.cpu()):
        yield install
    if str(tmp_path) in sys.path:
        sys.path.remove(str(tmp_path))
    for module in installed:
        sys.modules.pop(module, None)
    jaxattn.refresh_backends()


def _qkv():
    rng = np.random.default_rng(0)
    return tuple(jnp.asarray(rng.standard_normal((1, 8, 2, 8)), jnp.float32) for _ in range(3))


def _xla_serves_auto(run=False):
    """`auto` chooses xla and the call traces (`run`: and computes what xla computes)."""
    q, k, v = _qkv()
    assert jaxattn.select(q, k, v, is_causal=True).name == "xla"
    if not run:
        assert jax.eval_shape(lambda q, k, v: jaxattn.attention(q, k, v, is_causal=True), q, k, v).shape == q.shape
        return
    out = jaxattn.attention(q, k, v, is_causal=True, backend="auto")
    ref = jaxattn.attention(q, k, v, is_causal=True, backend="xla")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def _cli(capsys, *argv):
    assert main(list(argv)) == 0
    return capsys.readouterr().out


EXPLAIN = ("explain", "--q-len", "8", "--q-heads", "2", "--head-dim", "8", "--dtype", "float32")


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_each_fault_is_reported_and_xla_keeps_serving_auto(install, capsys, fault):
    source, backend, origin, error = FAULTS[fault]
    install({fault: source})
    _xla_serves_auto()
    broken = [b for b in jaxattn.broken_plugins() if b.plugin == fault]
    assert len(broken) == 1, jaxattn.broken_plugins()
    b = broken[0]
    assert (b.backend, b.origin, b.distribution, b.version) == (backend, origin, f"{fault}-attn", "0.1")
    assert error in b.error
    text = _cli(capsys, "list-backends")
    assert "broken plugins:" in text and error in text
    data = json.loads(_cli(capsys, "list-backends", "--json"))
    assert {(d["plugin"], d["backend"], d["origin"]) for d in data["broken"]} >= {(fault, backend, origin)}
    assert "xla" in {d["name"] for d in data["backends"]}
    assert f"broken:   {b.describe()}" in _cli(capsys, *EXPLAIN)


def test_a_forward_that_raises_names_the_backend_and_the_way_out(install, capsys, monkeypatch):
    install({"forward_raises": FORWARD_RAISES})
    q, k, v = _qkv()
    with pytest.raises(jaxattn.BackendFailedError) as info:
        jaxattn.attention(q, k, v)
    message = str(info.value)
    assert "backend 'forward_raises', chosen by auto" in message and "kernel not built" in message
    assert "JAXATTN_DISABLE_PLUGINS=forward_raises" in message and "JAXATTN_BACKEND=xla" in message
    assert isinstance(info.value.__cause__, NotImplementedError)
    # no silent fallback on the next call either; forcing it keeps the backend's own error
    with pytest.raises(jaxattn.BackendFailedError):
        jaxattn.attention(q, k, v)
    with pytest.raises(NotImplementedError):
        jaxattn.attention(q, k, v, backend="forward_raises")

    monkeypatch.setenv("JAXATTN_DISABLE_PLUGINS", "forward_raises, xla, nosuch")
    jaxattn.refresh_backends()
    _xla_serves_auto()
    assert jaxattn.default_registry().disabled == {
        "forward_raises": "plugin from forward_raises-attn 0.1",
        "xla": "built in: never disabled", "nosuch": "matches no installed plugin or backend"}
    text = _cli(capsys, "list-backends")
    assert "disabled by JAXATTN_DISABLE_PLUGINS:\n" in text
    assert "\n  forward_raises: plugin from forward_raises-attn 0.1\n" in text
    assert {d["name"] for d in json.loads(_cli(capsys, "list-backends", "--json"))["disabled"]} == {
        "forward_raises", "xla", "nosuch"}
    with pytest.raises(ValueError, match="'forward_raises' is disabled by JAXATTN_DISABLE_PLUGINS"):
        jaxattn.attention(q, k, v, backend="forward_raises")


def test_disabling_a_backend_by_name_keeps_the_rest_of_its_plugin(install, monkeypatch):
    two = _backend("first").replace("return [Faulty]", "return [Faulty, type('Second', (Faulty,), {'name': 'second'})]")
    monkeypatch.setenv("JAXATTN_DISABLE_PLUGINS", "first")
    install({"two": two})
    names = {i.name for i in jaxattn.list_backends()}
    assert "second" in names and "first" not in names
    assert jaxattn.default_registry().disabled["first"] == "backend first (attention) of plugin two"


def test_a_real_interrupt_during_import_is_not_swallowed(install, capsys, monkeypatch):
    handler = signal.getsignal(signal.SIGINT)
    install({"interrupted": "import signal\nsignal.raise_signal(signal.SIGINT)\n"})
    with pytest.raises(KeyboardInterrupt):
        jaxattn.list_backends()
    assert signal.getsignal(signal.SIGINT) is handler
    with pytest.raises(KeyboardInterrupt):  # nothing half-discovered is kept: it discovers again
        jaxattn.list_backends()
    monkeypatch.setenv("JAXATTN_DISABLE_PLUGINS", "interrupted")
    jaxattn.refresh_backends()
    _xla_serves_auto()
    assert "interrupted: plugin from interrupted-attn 0.1" in _cli(capsys, "list-backends")


def test_a_keyboard_interrupt_raised_in_another_thread_is_the_plugins(install):
    install({"fake_interrupt": FAULTS["fake_interrupt"][0]})
    found = []
    thread = threading.Thread(target=lambda: found.append(jaxattn.broken_plugins()))
    thread.start()
    thread.join()
    assert [(b.plugin, b.error) for b in found[0]] == [("fake_interrupt", "KeyboardInterrupt")]
    _xla_serves_auto()


def test_every_fault_at_once(install, capsys, monkeypatch):
    install({**{name: source for name, (source, *_) in FAULTS.items()}, "forward_raises": FORWARD_RAISES})
    q, k, v = _qkv()
    with pytest.raises(jaxattn.BackendFailedError, match="JAXATTN_DISABLE_PLUGINS=forward_raises"):
        jaxattn.attention(q, k, v, backend="auto")
    explained = _cli(capsys, *EXPLAIN)
    assert "chosen:   forward_raises for differentiated and forward-only calls (by auto" in explained
    text = _cli(capsys, "list-backends")
    data = json.loads(_cli(capsys, "list-backends", "--json"))
    assert {b.plugin for b in jaxattn.broken_plugins()} == set(FAULTS)
    assert {d["plugin"] for d in data["broken"]} == set(FAULTS)
    for b in jaxattn.broken_plugins():
        assert b.describe() in text and f"broken:   {b.describe()}" in explained

    monkeypatch.setenv("JAXATTN_DISABLE_PLUGINS", "forward_raises")
    jaxattn.refresh_backends()
    _xla_serves_auto(run=True)
    assert "chosen:   xla for differentiated and forward-only calls (by auto" in _cli(capsys, *EXPLAIN)
    assert {d["plugin"] for d in json.loads(_cli(capsys, "list-backends", "--json"))["broken"]} == set(FAULTS)
