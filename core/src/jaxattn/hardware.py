"""`Hardware`: the facts about the machine that backends check in `supports()`.

Detected once per process (the first time a backend is selected) and injectable, so that
tests can ask "what would be chosen on an H100 with cuDNN 9.1?" on a CPU machine. The
injection (`override`) is context-local, so a what-if in one thread leaves the others alone.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace

import jax

from ._compat import cudnn_version

PLATFORMS = ("cpu", "gpu", "tpu")


@dataclass(frozen=True)
class Hardware:
    """What a backend may rely on: platform, chip, and library versions.

    `platform` is one of "cpu", "gpu", "tpu". `gpu_vendor` is "nvidia" or "amd" on a GPU.
    `compute_capability` is e.g. (9, 0) on an H100; `cudnn_version` is an integer as cuDNN
    reports it (9.8.0 -> 90800); `tpu_generation` is e.g. 5 for v5e/v5p.
    """

    platform: str = "cpu"
    device_kind: str = "cpu"
    device_count: int = 1
    gpu_vendor: str | None = None
    compute_capability: tuple[int, int] | None = None
    cudnn_version: int | None = None
    tpu_generation: int | None = None

    def __post_init__(self) -> None:
        if self.platform not in PLATFORMS:
            raise ValueError(f"platform must be one of {PLATFORMS}, got {self.platform!r}")

    @property
    def is_cuda(self) -> bool:
        return self.platform == "gpu" and self.gpu_vendor == "nvidia"

    @property
    def is_rocm(self) -> bool:
        return self.platform == "gpu" and self.gpu_vendor == "amd"

    @property
    def is_hopper(self) -> bool:
        """An NVIDIA GPU of compute capability 9.x: what kernels written for wgmma and TMA need."""
        cc = self.compute_capability
        return self.is_cuda and cc is not None and cc[0] == 9

    def with_(self, **changes: object) -> Hardware:
        """A copy with some fields changed (for tests and what-if questions)."""
        return replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def cpu(cls) -> Hardware:
        return cls()

    @classmethod
    def nvidia(
        cls,
        compute_capability: tuple[int, int] = (9, 0),
        cudnn_version: int | None = 90800,
        device_kind: str = "NVIDIA H100 80GB HBM3",
        device_count: int = 1,
    ) -> Hardware:
        """An NVIDIA GPU description, for tests and what-if questions."""
        return cls(
            platform="gpu",
            device_kind=device_kind,
            device_count=device_count,
            gpu_vendor="nvidia",
            compute_capability=compute_capability,
            cudnn_version=cudnn_version,
        )

    @classmethod
    def tpu(cls, generation: int = 5, device_kind: str = "TPU v5 lite") -> Hardware:
        return cls(platform="tpu", device_kind=device_kind, tpu_generation=generation)


def _tpu_generation(device_kind: str) -> int | None:
    match = re.search(r"tpu\s*v?(\d+)", device_kind.lower())  # "TPU v5 lite", "TPU v6e", "TPU7x"
    return int(match.group(1)) if match else None


def detect() -> Hardware:
    """Read the hardware of JAX's default backend."""
    devices = jax.devices()
    device = devices[0]
    platform = device.platform
    kind = getattr(device, "device_kind", platform)
    if platform in ("cuda", "rocm", "gpu"):
        vendor = "amd" if platform == "rocm" or "AMD" in kind else "nvidia"
        capability = None
        raw = getattr(device, "compute_capability", None)
        if raw:
            major, _, minor = str(raw).partition(".")
            capability = (int(major), int(minor or 0))
        return Hardware(
            platform="gpu",
            device_kind=kind,
            device_count=len(devices),
            gpu_vendor=vendor,
            compute_capability=capability,
            cudnn_version=cudnn_version() if vendor == "nvidia" else None,
        )
    if platform == "tpu":
        return Hardware(
            platform="tpu",
            device_kind=kind,
            device_count=len(devices),
            tpu_generation=_tpu_generation(kind),
        )
    return Hardware(platform="cpu", device_kind=kind, device_count=len(devices))


# Context-local: a what-if question asked in one thread (or asyncio task) never changes
# the hardware that the real calls of another thread select for.
_override: contextvars.ContextVar[Hardware | None] = contextvars.ContextVar("jaxattn_hardware", default=None)


@functools.lru_cache(maxsize=1)
def _detected() -> Hardware:
    return detect()


def current() -> Hardware:
    """The hardware selection uses: an override active in this context, else the detected one."""
    hardware = _override.get()
    return hardware if hardware is not None else _detected()


@contextlib.contextmanager
def override(hardware: Hardware) -> Iterator[Hardware]:
    """Pretend to run on `hardware` inside the block (selection and `list-backends`).

    The override is context-local (a `contextvars.ContextVar`): it applies to the code in
    the block, in this thread or task, and not to other threads running at the same time.
    """
    if not isinstance(hardware, Hardware):
        raise ValueError(f"hardware must be a jaxattn.Hardware, got {type(hardware).__name__}")
    token = _override.set(hardware)
    try:
        yield hardware
    finally:
        _override.reset(token)
