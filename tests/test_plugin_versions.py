"""Which core a plugin was built for: a plugin whose `Requires-Dist` on jaxattn excludes the
running core is listed as broken with both versions and never imported; every first-party
plugin pins the core range it was tested with; `jaxattn --version`.

The PEP 440 comparison (`jaxattn.versions`, written because the core depends on no
packaging library) is checked against `packaging`, where the test environment has it.
"""

from __future__ import annotations

import itertools
import json
import pathlib
import sys

import pytest

import jaxattn
from jaxattn import Hardware
from jaxattn.cli import main
from jaxattn.versions import Version, core_mismatch, requirement_on, specifier_allows

ROOT = pathlib.Path(__file__).resolve().parents[1]

PLUGIN = '''
import jaxattn
from jaxattn.backends.xla import XlaAttention

IMPORTED = True

class Pinned(XlaAttention):
    name = "{name}"
    priority = {{"cpu": 0}}

@jaxattn.hookimpl
def jaxattn_register_backends():
    return [Pinned]
'''


def _distribution(root: pathlib.Path, name: str, requires: list[str]) -> str:
    module = f"{name}_attn"
    (root / f"{module}.py").write_text(PLUGIN.format(name=name))
    info = root / f"{module}-2.0.dist-info"
    info.mkdir()
    lines = "".join(f"Requires-Dist: {r}\n" for r in requires)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}-attn\nVersion: 2.0\n{lines}")
    (info / "entry_points.txt").write_text(f"[jaxattn.backends]\n{name} = {module}\n")
    return module


@pytest.fixture
def install(tmp_path, monkeypatch):
    monkeypatch.delenv("JAXATTN_DISABLE_PLUGINS", raising=False)
    modules = []

    def install(name, requires):
        modules.append(_distribution(tmp_path, name, requires))
        if str(tmp_path) not in sys.path:
            sys.path.insert(0, str(tmp_path))
        jaxattn.refresh_backends()

    with jaxattn.hardware.override(Hardware.cpu()):
        yield install
    sys.path.remove(str(tmp_path))
    for module in modules:
        sys.modules.pop(module, None)
    jaxattn.refresh_backends()


def test_a_plugin_built_for_another_core_is_broken_with_both_versions_and_not_imported(install, capsys):
    install("future", ["numpy>=1.24", "jaxattn (>=0.2,<0.3)", "pytest; extra == 'test'"])
    install("current", [f"jaxattn>={jaxattn.__version__},<{int(jaxattn.__version__.split('.')[0]) + 1}"])
    assert "future_attn" not in sys.modules  # never imported
    names = {b.name for b in jaxattn.list_backends()}
    assert "current" in names and "future" not in names
    [broken] = [b for b in jaxattn.broken_plugins() if b.plugin == "future"]
    assert broken.origin == "core version check"
    assert f"future-attn was built for jaxattn>=0.2,<0.3, but this is jaxattn {jaxattn.__version__}" in broken.error

    assert main(["list-backends"]) == 0
    text = capsys.readouterr().out
    assert "broken plugins:" in text and "future (future-attn 2.0) in core version check" in text
    assert main(["list-backends", "--json"]) == 0
    [listed] = [b for b in json.loads(capsys.readouterr().out)["broken"] if b["plugin"] == "future"]
    assert "jaxattn>=0.2,<0.3" in listed["error"]


def test_no_pin_or_a_pin_under_a_marker_is_left_to_pip(install):
    install("unpinned", ["jaxattn"])
    install("marked", ["jaxattn<0.0.1; python_version < '4'"])
    names = {b.name for b in jaxattn.list_backends()}
    assert {"unpinned", "marked"} <= names


def test_every_first_party_plugin_pins_the_core_it_was_tested_with():
    tomllib = pytest.importorskip("tomllib")
    for pyproject in sorted(ROOT.glob("plugins/attn-*/pyproject.toml")):
        deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
        specifier = requirement_on(deps, "jaxattn")
        assert specifier and "<" in specifier, f"{pyproject}: jaxattn needs a version range, got {specifier!r}"
        assert specifier_allows(specifier, jaxattn.__version__), pyproject


def test_version_option(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"jaxattn {jaxattn.__version__}"


VERSIONS = ["0.1", "0.1.0", "0.1.1", "0.2.0", "0.2.0rc1", "0.2.0.dev1", "0.2.0a1.dev2", "0.1.0.post1",
            "0.1.0.post1.dev3", "1.0", "1!0.1", "0.10.3", "0.1.0+local", "0.0.9", "2.0b2", "0.2.0-1"]
SPECIFIERS = [">=0.1,<0.2", "<0.2", ">0.1", ">0.1.0", "==0.1.*", "!=0.1.*", "~=0.1", "~=0.1.0", "~=0.2.0rc1",
              "==0.1", "!=0.1.0", "<=0.2.0rc1", ">=0.2.0.dev0", "<0.2.0rc1", "", ">0.1.0.post0", "===0.1.0",
              "==1!0.1.*", ">=1.0", "==0.2.0.post1"]


def test_specifiers_agree_with_packaging():
    specifiers = pytest.importorskip("packaging.specifiers")
    for spec, version in itertools.product(SPECIFIERS, VERSIONS):
        expected = specifiers.SpecifierSet(spec).contains(version, prereleases=True)
        assert specifier_allows(spec, version) == expected, (spec, version)


def test_requirements_and_bad_input():
    assert requirement_on(["numpy", "JaxAttn (>=0.1, <0.2)"], "jaxattn") == ">=0.1, <0.2"
    assert requirement_on(["jaxattn[flax]>=0.1"], "jaxattn") == ">=0.1"
    assert requirement_on(["jaxattn-flash>=0.1"], "jaxattn") is None
    assert core_mismatch(["jaxattn>=0.1,<0.2"], "x", core_version="0.1.5") == ""
    assert "cannot be read" in core_mismatch(["jaxattn>=zero"], "x", core_version="0.1.0")
    for bad in ("1.0-beta-x", "", "one"):
        with pytest.raises(ValueError, match="version"):
            Version(bad)
    with pytest.raises(ValueError, match="specifier"):
        specifier_allows(">=0.1.*", "0.1")
