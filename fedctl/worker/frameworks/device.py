"""Device strings shared by the framework adapters: parsing ``cpu`` / ``gpu:N`` / ``cuda:N`` into one value object."""

from __future__ import annotations

import re
from dataclasses import dataclass

from fedctl.errors import BackendUnavailable, ConfigError

_DEVICE_RE = re.compile(r"^(cpu|gpu|cuda)(?::(\d+))?$")


@dataclass(frozen=True)
class Device:
    """A parsed device: ``kind`` is ``"cpu"`` or ``"gpu"``; ``index`` is the GPU ordinal (0 for the CPU)."""

    kind: str
    index: int = 0

    @property
    def is_gpu(self) -> bool:
        return self.kind == "gpu"

    def __str__(self) -> str:
        return f"gpu:{self.index}" if self.is_gpu else "cpu"


def parse_device(device: str) -> Device:
    """Parse a device string.

    Parameters
    ----------
    device:
        ``"cpu"``, ``"gpu"``, ``"gpu:N"``, ``"cuda"`` or ``"cuda:N"`` (case-insensitive; ``cuda`` is an alias of
        ``gpu``; no index means 0).

    Returns
    -------
    Device
        The parsed device.

    Raises
    ------
    ConfigError
        If the string is none of the accepted forms.
    """
    match = _DEVICE_RE.match(str(device).strip().lower())
    if match is None:
        raise ConfigError(f"invalid device {device!r}", "use 'cpu' or 'gpu:N' (e.g. --device gpu:0)")
    kind, index = match.group(1), match.group(2)
    if kind == "cpu":
        if index not in (None, "0"):
            raise ConfigError(f"invalid device {device!r}: the CPU has no index", "use --device cpu")
        return Device("cpu")
    return Device("gpu", int(index or 0))


def require_gpu(device: Device, backend: str, num_gpus: int) -> None:
    """Raise :class:`BackendUnavailable` if ``device`` asks for a GPU that ``backend`` cannot see.

    Parameters
    ----------
    device:
        The parsed device; nothing is checked for the CPU.
    backend:
        The framework name, for the message.
    num_gpus:
        How many GPUs the framework reports.
    """
    if not device.is_gpu or device.index < num_gpus:
        return
    if num_gpus == 0:
        cause = f"{backend} sees no GPU (CPU-only build or no CUDA device)"
    else:
        cause = f"{backend} sees {num_gpus} GPU(s), so gpu:{device.index} does not exist"
    raise BackendUnavailable(
        f"device {device} requested but {cause}",
        f"use --device cpu, or --device gpu:N with N < {max(num_gpus, 1)} on a CUDA build of {backend}",
    )
