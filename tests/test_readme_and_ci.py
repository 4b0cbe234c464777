"""README.md tells the truth about how to install and test; CI runs exactly that."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _commands(text: str) -> list[str]:
    return [line for line in re.findall(r"```bash\n(.*?)```", text, re.S) for line in line.splitlines()
            if line and not line.startswith("#")]


def test_readme_has_the_two_setup_commands():
    commands = _commands((ROOT / "README.md").read_text())
    assert len(commands) == 2
    run, test = commands
    assert "jaxattn list-backends" in run and "jaxattn bench" in run
    assert "pytest" in test


def test_ci_installs_every_plugin_the_readme_lists():
    test = _commands((ROOT / "README.md").read_text())[1]
    plugins = sorted(p.name for p in (ROOT / "plugins").glob("attn-*") if (p / "pyproject.toml").exists())
    for name in plugins:
        assert f"plugins/{name}" in test, f"README test command does not install {name}"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "blocks[1]" in ci  # CI runs the README's second command verbatim


def test_every_plugin_has_readme_and_benchmarks():
    for plugin in (ROOT / "plugins").glob("attn-*"):
        if (plugin / "pyproject.toml").exists():
            assert (plugin / "README.md").exists(), plugin.name
