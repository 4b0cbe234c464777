"""pytest plugin (auto-loaded through the `pytest11` entry point) for the conformance suite.

`pytest --pyargs jaxattn.testing.suite --jaxattn-backend NAME [--jaxattn-dtype bfloat16]`
runs every conformance case on the installed backend NAME, one test per case and dtype;
cases the backend rejects are reported as skips with the backend's reasons.
"""

from __future__ import annotations

from typing import Any

import pytest


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("jaxattn")
    group.addoption("--jaxattn-backend", default=None, help="backend to run the conformance suite on")
    group.addoption("--jaxattn-dtype", action="append", default=None,
                    help="dtype(s) to check (default: float32 on CPU, bfloat16 and float16 on GPU/TPU)")
    group.addoption("--jaxattn-op", default="attention", choices=["attention", "paged_attention"],
                    help="which op of the backend to check")


def pytest_generate_tests(metafunc: Any) -> None:
    if "jaxattn_case" not in metafunc.fixturenames:
        return
    from .. import hardware
    from .cases import all_cases
    from .conformance import default_dtypes

    config = metafunc.config
    op = config.getoption("--jaxattn-op")
    dtypes = config.getoption("--jaxattn-dtype") or list(default_dtypes(hardware.current()))
    metafunc.parametrize("jaxattn_case", [c.name for c in all_cases(op)])
    metafunc.parametrize("jaxattn_dtype", dtypes)


@pytest.fixture
def jaxattn_backend(request: Any) -> Any:
    name = request.config.getoption("--jaxattn-backend")
    if not name:
        pytest.skip("no --jaxattn-backend given")
    from ..registry import default_registry

    return default_registry().get(name, request.config.getoption("--jaxattn-op"))
