"""The third-party example package (examples/third_party_backend) as a user would meet it:
pip installs it, `jaxattn list-backends` lists it, `jaxattn check` passes, and its own tests pass.

The package is installed (from a copy of its folder, so that no build output is left in the
repository) into a temporary folder (not the test environment, where its backend
would join every other test's selection) that is put on `sys.path` for these tests, so its
entry point is discovered exactly as an installed plugin's. Everything runs in this process:
the conformance suite's `xla` reference programs compiled by the core's tests are reused
(the check uses their small base shape).
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import shutil
import subprocess
import sys

import pytest

import jaxattn
from jaxattn import Hardware
from jaxattn.cli import main
from jaxattn.testing import Shape

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "examples" / "third_party_backend"
SMALL = ["--batch", "2", "--seq", "32", "--heads", "4", "--head-dim", "16"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target, source = tmp_path_factory.mktemp("site"), tmp_path_factory.mktemp("src") / PACKAGE.name
    shutil.copytree(PACKAGE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--target", str(target), str(source)], check=True)
    sys.path.insert(0, str(target))
    jaxattn.refresh_backends()
    with jaxattn.hardware.override(Hardware.cpu()):
        yield target
    sys.path.remove(str(target))
    for name in [m for m in sys.modules if m == "jaxattn_example" or m.startswith("jaxattn_example.")]:
        del sys.modules[name]
    jaxattn.refresh_backends()


def test_it_is_listed_with_its_distribution(installed, capsys):
    assert main(["list-backends", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    [info] = [b for b in listing["backends"] if b["name"] == "example_dense"]
    assert (info["distribution"], info["version"], info["usable"]) == ("jaxattn-example", "0.1.0", True)
    assert info["aliases"] == ["dense_example"] and info["priority"]["cpu"] == -1
    assert not [b for b in listing["broken"] if "example" in b["plugin"] + b["distribution"]]


@pytest.fixture(scope="module")
def own_tests(installed):
    """The package's tests/ file, imported as written."""
    path = PACKAGE / "tests" / "test_example_dense.py"
    spec = importlib.util.spec_from_file_location("example_dense_tests", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_it_passes_jaxattn_check_on_every_case_it_claims(own_tests, capsys):
    assert main(["check", "example_dense", *SMALL, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    statuses = {r["case"]: r["status"] for r in report["results"]}
    assert report["ok"] and statuses.pop("dropout") == "rejected"
    assert set(statuses.values()) == {"pass"}
    assert sorted(statuses) == sorted(own_tests.SUPPORTED)  # its own test pins exactly these
    assert own_tests.SHAPE == Shape(batch=2, seq=32, num_heads=4, head_dim=16)  # ... on this shape


def test_its_own_tests_pass(own_tests):
    """Each test of the package's file (plain functions, no fixtures), but its conformance run:
    that is `run_conformance(..., expect_supported=SUPPORTED, shape=SHAPE)`, which the check
    above has just run on the same shape with the same verdicts (a second run would only
    compile every case again)."""
    tests = [getattr(own_tests, name) for name in dir(own_tests) if name.startswith("test_")]
    assert len(tests) == 3
    for test in tests:
        if test.__name__ != "test_conformance_forward_and_gradients":
            test()
