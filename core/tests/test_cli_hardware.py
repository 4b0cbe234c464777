"""The jaxattn command and hardware detection."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest

import jaxattn
from jaxattn import Hardware
from jaxattn.cli import main


def test_list_backends_table_and_json(capsys):
    assert main(["list-backends"]) == 0
    text = capsys.readouterr().out
    assert "xla" in text and "paged_attention" in text and "usable here" in text
    assert main(["list-backends", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    xla = [b for b in data["backends"] if b["name"] == "xla" and b["op"] == "attention"][0]
    assert xla["usable"] and xla["distribution"] in ("jaxattn", "jaxattn ") and xla["aliases"] == []


def test_explain_shows_choice_and_rejections(capsys):
    assert main(["explain", "--causal", "--window", "128,0", "--kv-heads", "2", "--segments", "--platform", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "chosen:   xla" in text and "sliding_window" in text and "segment" in text
    assert main(["explain", "--backend", "nope"]) == 1
    assert "no attention backend named 'nope'" in capsys.readouterr().err
    assert main(["explain", "--paged", "--q-len", "1", "--kv-len", "4096", "--platform", "gpu"]) == 0
    assert "paged_attention" in capsys.readouterr().out


def test_bench_prints_a_table(capsys):
    assert main(["bench", "--q-len", "64", "--q-heads", "2", "--head-dim", "16", "--dtype", "float32",
                 "--repeats", "1", "--inner", "1", "--backends", "xla"]) == 0
    out = capsys.readouterr()
    assert "fwd+bwd TFLOP/s" in out.out and "xla" in out.out
    assert "1/1" in out.err  # progress indicator


def test_check_runs_the_conformance_suite(capsys):
    assert main(["check", "xla", "--cases", "causal,gqa", "--dtype", "float32", "--seq", "64", "--head-dim", "64"]) == 0
    text = capsys.readouterr().out
    assert "pass     causal" in text and "2 pass" in text


# Child processes run on the CPU: on a GPU the parent already holds most of its memory.
CHILD_ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def test_console_script_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "jaxattn.cli", "list-backends"], capture_output=True, text=True,
                            env=CHILD_ENV)
    assert result.returncode == 0, result.stderr
    assert "xla" in result.stdout


def test_hardware_is_detected_once_and_overridable():
    hw = jaxattn.hardware.current()
    assert hw.platform == jax.default_backend().replace("cuda", "gpu")
    assert hw is jaxattn.hardware.current()
    fake = Hardware.nvidia(compute_capability=(8, 0), cudnn_version=90100)
    with jaxattn.hardware.override(fake):
        assert jaxattn.hardware.current() is fake
        assert fake.is_cuda and not fake.is_rocm and not fake.is_hopper
    assert Hardware.nvidia(compute_capability=(9, 0)).is_hopper
    assert not Hardware.cpu().is_hopper and not Hardware.nvidia(compute_capability=None).is_hopper
    assert not Hardware.nvidia().with_(gpu_vendor="amd").is_hopper
    assert jaxattn.hardware.current() is hw
    assert Hardware.tpu(6).tpu_generation == 6
    with pytest.raises(ValueError, match="platform must be one of"):
        Hardware(platform="npu")
    with pytest.raises(ValueError, match="hardware must be a jaxattn.Hardware"):
        with jaxattn.hardware.override("gpu"):
            pass


def test_tpu_generation_is_parsed_from_device_kind():
    from jaxattn.hardware import _tpu_generation

    assert _tpu_generation("TPU v5 lite") == 5
    assert _tpu_generation("TPU v4") == 4
    assert _tpu_generation("TPU v6e") == 6
    assert _tpu_generation("TPU7x") == 7
    assert _tpu_generation("cpu") is None


def test_pytest_plugin_runs_the_suite_for_a_named_backend():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--pyargs", "jaxattn.testing.suite",
         "--jaxattn-backend", "xla", "--jaxattn-dtype", "float32", "-k", "causal or segment_ids"],
        capture_output=True, text=True, env=CHILD_ENV,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 passed" in result.stdout  # causal, causal_q_lt_kv, causal_top_left, chunked_causal, segment_ids
