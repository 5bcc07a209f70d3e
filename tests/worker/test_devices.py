"""One job, one GPU: a worker process pins itself to the GPU it was given, ``--gpus`` starts one
pinned process per GPU, and the Trainer never sees more than one device.

No GPU here: torch's device count is faked, the way CUDA would report it before it starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from tests.worker.test_packing import spec  # noqa: E402
from worker import devices  # noqa: E402
from worker.devices import DeviceError  # noqa: E402


@pytest.fixture
def node(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A node with ``node.gpus`` GPUs whose CUDA has not started: torch counts what
    CUDA_VISIBLE_DEVICES leaves of them, as NVML does."""

    class Node:
        gpus = 2

        def count(self) -> int:
            visible = os.environ.get(devices.VISIBLE)
            if visible is None:
                return self.gpus
            n = 0
            for part in visible.split(","):  # CUDA stops at the first GPU it does not have
                if not part.isdigit() or int(part) >= self.gpus:
                    break
                n += 1
            return n

    fake = Node()
    monkeypatch.delenv(devices.VISIBLE, raising=False)
    monkeypatch.setattr(devices, "_pinned", None)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: fake.count() > 0)
    monkeypatch.setattr(torch.cuda, "device_count", fake.count)
    return fake


def test_cuda_n_pins_the_process_to_gpu_n(node: Any) -> None:
    assert devices.pin("cuda:1") == "cuda:0"
    assert os.environ[devices.VISIBLE] == "1"
    assert torch.cuda.device_count() == 1
    assert devices.pin("cuda:1") == "cuda:0"  # again: a no-op


def test_pin_counts_within_the_gpus_already_visible(node: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    node.gpus = 4
    monkeypatch.setenv(devices.VISIBLE, "2,3")
    assert devices.pin("cuda:1") == "cuda:0"
    assert os.environ[devices.VISIBLE] == "3"


@pytest.mark.parametrize("setting", ["auto", "cpu", "cuda", "mps"])
def test_settings_without_an_index_pin_nothing(node: Any, setting: str) -> None:
    assert devices.pin(setting) == setting
    assert devices.VISIBLE not in os.environ


def test_a_gpu_the_node_lacks_is_refused_naming_the_setting(node: Any) -> None:
    with pytest.raises(DeviceError, match=r"LORAFLEET_DEVICE=cuda:7: this node has no GPU 7"):
        devices.pin("cuda:7")


def test_a_gpu_past_the_visible_list_is_refused(node: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(devices.VISIBLE, "0,1")
    with pytest.raises(DeviceError, match=r"LORAFLEET_DEVICE=cuda:2: only 2 GPU"):
        devices.pin("cuda:2")


def test_pinning_after_cuda_started_is_refused(node: Any,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(DeviceError, match="LORAFLEET_DEVICE=cuda:1: CUDA started"):
        devices.pin("cuda:1")


@pytest.mark.parametrize(("spec_", "count", "gpus"), [
    ("all", 4, [0, 1, 2, 3]), ("0,2,3", 4, [0, 2, 3]), ("1", 2, [1]), (" 0, 1 ", 2, [0, 1])])
def test_parse_gpus(spec_: str, count: int, gpus: list[int]) -> None:
    assert devices.parse_gpus(spec_, count) == gpus


@pytest.mark.parametrize(("spec_", "count", "message"), [
    ("0,2", 2, r"--gpus '0,2': this node has 2 GPU\(s\) \(0 to 1\), no GPU 2"),
    ("all", 0, "--gpus all: this node has no CUDA GPU"),
    ("0", 0, "this node has no CUDA GPU"),
    ("1,1", 4, "names a GPU twice"),
    ("x", 4, "expected 'all' or GPU indices"),
])
def test_bad_gpus_are_refused_naming_the_flag(spec_: str, count: int, message: str) -> None:
    with pytest.raises(DeviceError, match=message):
        devices.parse_gpus(spec_, count)


def test_one_environment_per_gpu() -> None:
    envs = devices.worker_envs([0, 2], {"PATH": "/bin"}, metrics_port=9101)
    assert [e["LORAFLEET_DEVICE"] for e in envs] == ["cuda:0", "cuda:2"]
    assert [e["LORAFLEET_WORKER_METRICS_PORT"] for e in envs] == ["9101", "9102"]
    assert all(e["PATH"] == "/bin" for e in envs)
    assert "LORAFLEET_WORKER_METRICS_PORT" not in devices.worker_envs([0], {})[0]


def test_worker_gpus_starts_one_named_pinned_process_per_gpu(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from cli import main

    started: list[tuple[list[str], dict[str, str]]] = []

    def supervise(names: list[str], commands: list[list[str]],
                  envs: list[dict[str, str]]) -> int:
        started.extend(zip(commands, envs, strict=True))
        return 0

    monkeypatch.setattr(devices, "gpu_count", lambda: 4)
    monkeypatch.setattr(main, "_supervise", supervise)
    assert main.main(["worker", "--gpus", "1,3", "--hostname", "w@node"]) == 0
    assert [env["LORAFLEET_DEVICE"] for _, env in started] == ["cuda:1", "cuda:3"]
    hostnames = [cmd[cmd.index("--hostname") + 1] for cmd, _ in started]
    assert hostnames == ["w-gpu1@node", "w-gpu3@node"]
    assert all("--gpus" not in cmd for cmd, _ in started)


def test_worker_gpus_naming_a_missing_gpu_exits_with_the_flag(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from cli import main

    monkeypatch.setattr(devices, "gpu_count", lambda: 2)
    monkeypatch.setattr(main, "_supervise", lambda *a: pytest.fail("started workers"))
    assert main.main(["worker", "--gpus", "0,5"]) == 2
    assert "--gpus '0,5'" in capsys.readouterr().err


def test_worker_with_a_missing_gpu_exits_before_celery_starts(tmp_path: Path) -> None:
    """The real command, in a process of its own: on a node without GPU 99 it stops at once,
    naming the setting."""
    env = {**os.environ, "LORAFLEET_DEVICE": "cuda:99",
           "LORAFLEET_DATABASE_URL": f"sqlite:///{tmp_path}/db.sqlite"}
    env.pop(devices.VISIBLE, None)
    done = subprocess.run([sys.executable, "-m", "cli.main", "worker"], env=env,
                          capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 2
    assert "LORAFLEET_DEVICE=cuda:99" in done.stderr


def test_the_trainer_sees_one_device_when_several_are_visible(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An unpinned process on a 4-GPU node: transformers would count 4 and wrap the model in
    nn.DataParallel; the training arguments say one."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda _device: None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    from accelerate.state import AcceleratorState
    from transformers.training_args import ParallelMode

    from worker.training.supervised import training_arguments

    try:
        args = training_arguments(spec(), tmp_path, "cuda:0", has_eval=False)
        assert args.n_gpu == 1
        assert args.parallel_mode == ParallelMode.NOT_PARALLEL  # no DataParallel wrap
        assert args.train_batch_size == args.per_device_train_batch_size
        assert str(args.device) == "cuda:0"
    finally:  # accelerate keeps the (fake) CUDA state process-wide
        AcceleratorState._reset_state(reset_partial_state=True)


def test_4bit_on_a_gpu_worker_without_bitsandbytes_fails_naming_the_setting(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from modelio.loading import ModelLoadError
    from worker.training import model

    real = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ModelLoadError, match="needs the bitsandbytes package") as exc:
        model._quantization_config(spec(quantization="4bit"), "cuda:0")
    assert exc.value.param == "quantization"
