"""Every package builds a wheel and an sdist that install alone and work.

For the core, each plugin and the third-party example: an sdist and a wheel are built with
the packages' own build backend (setuptools, through its PEP 517 hooks, in the test
environment: no build isolation, so nothing is downloaded), then installed with pip
(`--no-deps`) into an empty folder and run by an interpreter that sees only that folder and
the third-party dependencies (jax, numpy, pluggy...), none of the repository's editable
installs: `python -S` with a copy of the environment's site-packages minus every jaxattn
distribution. Each plugin's wheel goes in with the core's wheel alone (plugins never need
each other); the sdists all go in together, built into wheels by pip. `jaxattn list-backends
--json` in each must list exactly the expected distributions' backends and no broken plugin,
and the installed files must hold the package data (py.typed, shipped tuning tables).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

import jaxattn
from jaxattn.versions import requirement_on, specifier_allows

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = {  # distribution -> source folder
    "jaxattn": ROOT / "core",
    "jaxattn-cudnn": ROOT / "plugins" / "attn-cudnn",
    "jaxattn-flash": ROOT / "plugins" / "attn-flash",
    "jaxattn-ragged": ROOT / "plugins" / "attn-ragged",
    "jaxattn-splash": ROOT / "plugins" / "attn-splash",
    "jaxattn-example": ROOT / "examples" / "third_party_backend",
}
DATA = {  # files each installed package must carry beside its modules
    "jaxattn": ["jaxattn/py.typed", "jaxattn/testing/suite.py"],
    "jaxattn-cudnn": ["jaxattn_cudnn/py.typed", "jaxattn_cudnn/tuning/NVIDIA-H200.json"],
    "jaxattn-flash": ["jaxattn_flash/py.typed", "jaxattn_flash/tuning/NVIDIA-H200.json"],
    "jaxattn-ragged": ["jaxattn_ragged/py.typed", "jaxattn_ragged/tuning/NVIDIA-H200.json"],
    "jaxattn-splash": ["jaxattn_splash/py.typed"],
    "jaxattn-example": ["jaxattn_example/py.typed"],
}
BUILD = "import setuptools.build_meta as b, sys; out = sys.argv[1]; b.build_sdist(out); b.build_wheel(out)"
BUILD_LEFTOVERS = shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__")
LIST = "import sys; from jaxattn.cli import main; sys.exit(main(['list-backends', '--json']))"


def _run(*cmd: str, **kwargs) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """distribution -> (sdist, wheel), built in parallel, each from a copy of its folder as a
    fresh clone has it (a build in place would leave build/ and egg-info behind, and reuse them)."""
    out = tmp_path_factory.mktemp("dist")

    def build(name: str) -> None:
        source = out / "src" / name
        shutil.copytree(PACKAGES[name], source, ignore=BUILD_LEFTOVERS)
        _run(sys.executable, "-c", BUILD, str(out / name), cwd=source)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        list(pool.map(build, PACKAGES))
    found = {}
    for name in PACKAGES:
        [sdist] = (out / name).glob("*.tar.gz")
        [wheel] = (out / name).glob("*.whl")
        found[name] = (sdist, wheel)
    return found


@pytest.fixture(scope="module")
def third_party_site(tmp_path_factory):
    """This environment's site-packages without any jaxattn distribution (links, not copies)."""
    site = tmp_path_factory.mktemp("deps")
    source = pathlib.Path(sysconfig.get_paths()["purelib"])
    for entry in source.iterdir():
        name = entry.name.lower()
        if name.startswith(("jaxattn", "__editable__", "_jaxattn")) or name.endswith(".pth"):
            continue
        (site / entry.name).symlink_to(entry)
    return site


def _install_and_list(target: pathlib.Path, files: list[pathlib.Path], deps: pathlib.Path) -> dict:
    _run(sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--target", str(target), *map(str, files))
    env = {**os.environ, "PYTHONPATH": f"{target}{os.pathsep}{deps}", "JAX_PLATFORMS": "cpu"}
    return json.loads(_run(sys.executable, "-S", "-c", LIST, env=env, cwd=target))


def test_versions_and_pins_in_the_built_metadata(dists):
    for name, (_, wheel) in dists.items():
        with zipfile.ZipFile(wheel) as zf:
            [meta] = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
            lines = zf.read(meta).decode().splitlines()
            entry_points = zf.read(meta.replace("METADATA", "entry_points.txt")).decode()
        requires = [line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-Dist:")]
        assert "[jaxattn.backends]" in entry_points, name
        if name == "jaxattn":
            assert f"Version: {jaxattn.__version__}" in lines
            continue
        specifier = requirement_on(requires, "jaxattn")
        assert specifier and specifier_allows(specifier, jaxattn.__version__), (name, requires)


def test_each_wheel_installs_alone_beside_the_core(dists, third_party_site, tmp_path):
    core_wheel = dists["jaxattn"][1]
    jobs = {name: [core_wheel] + ([wheel] if name != "jaxattn" else []) for name, (_, wheel) in dists.items()}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        listings = dict(zip(jobs, pool.map(
            lambda item: _install_and_list(tmp_path / item[0], item[1], third_party_site), jobs.items())))
    for name, listing in listings.items():
        assert listing["broken"] == [], (name, listing["broken"])
        assert {b["distribution"] for b in listing["backends"]} == {"jaxattn", name}
        for path in DATA["jaxattn"] + DATA[name]:
            assert (tmp_path / name / path).is_file(), (name, path)


def test_the_sdists_build_and_install_together(dists, third_party_site, tmp_path):
    listing = _install_and_list(tmp_path, [sdist for sdist, _ in dists.values()], third_party_site)
    assert listing["broken"] == []
    assert {b["distribution"] for b in listing["backends"]} == set(PACKAGES)
    for path in (p for paths in DATA.values() for p in paths):
        assert (tmp_path / path).is_file(), path
