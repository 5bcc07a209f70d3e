"""Which GPU a worker process trains on: one process, one GPU, pinned before CUDA starts.

A worker given ``LORAFLEET_DEVICE=cuda:N`` narrows ``CUDA_VISIBLE_DEVICES`` to that GPU before
CUDA initialises, so the process sees exactly one device, ``cuda:0``. Only pinning makes this
hold for everything in the process: transformers' ``TrainingArguments`` puts the model on
``cuda:0`` and counts every visible GPU in ``n_gpu``, and with more than one it wraps the model
in ``nn.DataParallel``, which would split a packed row's sample boundaries from its tokens.

``lorafleet worker --gpus all|0,2,3`` starts one such process per GPU (:func:`worker_envs`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

# torch's own variable, not a lorafleet setting: CUDA reads it once, when it initialises.
VISIBLE = "CUDA_VISIBLE_DEVICES"
_CUDA_INDEX = re.compile(r"cuda:(\d+)")

_pinned: str | None = None  # the LORAFLEET_DEVICE this process pinned itself to


class DeviceError(ValueError):
    """A device setting that names a GPU this node does not have, or comes too late."""


def cuda_index(setting: str) -> int | None:
    """``N`` of a ``cuda:N`` setting; None for ``auto``, ``cpu``, ``cuda``, ``mps``."""
    match = _CUDA_INDEX.fullmatch(setting.strip())
    return int(match.group(1)) if match else None


def visible_after_pin(visible: str | None, index: int) -> str:
    """``CUDA_VISIBLE_DEVICES`` that leaves GPU ``index`` (counted among the GPUs visible now,
    as CUDA counts them) alone visible.

    Raises:
        DeviceError: fewer than ``index + 1`` GPUs are listed in ``visible``.
    """
    if visible is None:
        return str(index)
    listed = [v.strip() for v in visible.split(",") if v.strip()]
    if index >= len(listed):
        raise DeviceError(
            f"LORAFLEET_DEVICE=cuda:{index}: only {len(listed)} GPU(s) are visible to this "
            f"worker ({VISIBLE}={visible!r}); use cuda:0 to cuda:{max(len(listed) - 1, 0)}")
    return listed[index]


def pin(setting: str) -> str:
    """Pin this process to the GPU that ``setting`` (``LORAFLEET_DEVICE``) names; returns the
    device to train on: ``cuda:0`` after pinning to ``cuda:N``, else ``setting`` unchanged.

    Call it before anything initialises CUDA; calling it again with the same setting is a
    no-op.

    Raises:
        DeviceError: the GPU does not exist here, or CUDA was initialised before the pin.
    """
    global _pinned
    index = cuda_index(setting)
    if index is None:
        return setting
    if _pinned == setting:
        return "cuda:0"
    import torch

    if torch.cuda.is_initialized():
        if index == 0 and torch.cuda.device_count() == 1:
            return "cuda:0"
        raise DeviceError(
            f"LORAFLEET_DEVICE={setting}: CUDA started in this process before the worker could "
            "pin it to that GPU; start the worker with `lorafleet worker` (or set "
            f"{VISIBLE}={index} and LORAFLEET_DEVICE=cuda:0)")
    # Read here, not through Settings: CUDA's variable, set by the container runtime or the user.
    os.environ[VISIBLE] = visible_after_pin(os.environ.get(VISIBLE), index)
    # Counted after pinning: before CUDA starts, torch counts what the variable leaves visible
    # (a GPU index past the last one leaves none).
    if torch.cuda.device_count() < 1:
        raise DeviceError(
            f"LORAFLEET_DEVICE={setting}: this node has no GPU {index} (or no CUDA driver); "
            "use an index that `nvidia-smi -L` lists, or 'auto'")
    _pinned = setting
    return "cuda:0"


def parse_gpus(spec: str, count: int) -> list[int]:
    """The GPU indices of ``lorafleet worker --gpus``: ``all`` or a list such as ``0,2,3``.

    Raises:
        DeviceError: a malformed list, a repeated GPU, or one this node (``count`` GPUs) lacks.
    """
    spec = spec.strip()
    if spec == "all":
        if count < 1:
            raise DeviceError("--gpus all: this node has no CUDA GPU")
        return list(range(count))
    try:
        gpus = [int(part) for part in spec.split(",")]
    except ValueError:
        raise DeviceError(f"--gpus {spec!r}: expected 'all' or GPU indices such as 0,2,3") from None
    if len(set(gpus)) != len(gpus):
        raise DeviceError(f"--gpus {spec!r} names a GPU twice; one worker process per GPU")
    missing = [g for g in gpus if g < 0 or g >= count]
    if missing:
        raise DeviceError(
            f"--gpus {spec!r}: this node has {count} GPU(s) (0 to {count - 1}), "
            f"no GPU {', '.join(map(str, missing))}" if count else
            f"--gpus {spec!r}: this node has no CUDA GPU")
    return gpus


def worker_envs(gpus: list[int], base: Mapping[str, str], *,
                metrics_port: int | None = None) -> list[dict[str, str]]:
    """The environment of each worker process that ``--gpus`` starts: ``LORAFLEET_DEVICE``
    names its GPU (the process pins itself to it) and, when workers serve /metrics on a fixed
    port, each gets a port of its own (``metrics_port + i``)."""
    envs = []
    for i, gpu in enumerate(gpus):
        env = {**base, "LORAFLEET_DEVICE": f"cuda:{gpu}"}
        if metrics_port:
            env["LORAFLEET_WORKER_METRICS_PORT"] = str(metrics_port + i)
        envs.append(env)
    return envs


def gpu_count() -> int:
    """CUDA GPUs visible to this process (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
