"""The run's device and the scalar collectives (megalm/parallel/device.py): the rules that make the GPU
path work, tested without a GPU (a fake accelerator), plus a source check that no other module hands
its own tensors to a collective."""
from __future__ import annotations

import os
import re

import pytest
import torch

from megalm.parallel import device as dev

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeCudaAccelerator:
    def __init__(self, count: int):
        self.count, self.current = count, None

    def device_name(self, index=None):
        return "cuda" if index is None else f"cuda:{index}"

    def device_count(self):
        return self.count

    def set_device(self, index):
        self.current = index

    def current_device_name(self):
        return f"cuda:{self.current}"

    def communication_backend_name(self):
        return "nccl"


@pytest.fixture
def fake_gpus(monkeypatch):
    def install(count: int) -> FakeCudaAccelerator:
        acc = FakeCudaAccelerator(count)
        monkeypatch.setattr(dev, "_accelerator", lambda: acc)
        monkeypatch.setattr(dev, "_selected", None)
        return acc
    return install


def test_each_local_rank_gets_its_gpu_and_ranks_beyond_share(fake_gpus):
    acc = fake_gpus(8)
    assert dev.select_device(3) == torch.device("cuda", 3) and acc.current == 3
    assert dev.run_device() == torch.device("cuda", 3)
    acc = fake_gpus(1)  # the GPU check: two gloo ranks on one device
    assert dev.select_device(1) == torch.device("cuda", 0) and acc.current == 0


def test_cpu_accelerator_runs_on_cpu(monkeypatch):
    monkeypatch.setattr(dev, "_selected", None)
    assert dev.select_device(5) == torch.device("cpu") == dev.run_device()


def test_backend_follows_accelerator_and_env_override(fake_gpus, monkeypatch):
    fake_gpus(1)
    monkeypatch.delenv(dev.BACKEND_ENV, raising=False)
    assert dev.dist_backend() == "nccl"
    monkeypatch.setenv(dev.BACKEND_ENV, "gloo")
    assert dev.dist_backend() == "gloo"
    monkeypatch.setenv(dev.BACKEND_ENV, "mpi")
    with pytest.raises(ValueError, match="MEGALM_DIST_BACKEND='mpi'"):
        dev.dist_backend()


def test_reduce_scalars_without_process_group_copies_and_returns_cpu_float64():
    src = torch.tensor([1.5, 2.0], dtype=torch.float32)
    out = dev.reduce_scalars(src)
    out += 1
    assert src.tolist() == [1.5, 2.0] and out.dtype == torch.float64 and out.device.type == "cpu"
    assert dev.any_rank(True) and not dev.all_ranks(False)


# Modules whose collectives move model tensors (already on the device by construction): TP/PP comm.
TENSOR_COLLECTIVES = {"megalm/parallel/device.py", "megalm/parallel/comm.py", "megalm/parallel/cross_entropy.py",
                      "megalm/parallel/grid.py",
                      # ZeRO-3's gradient buffer, on the run's device already (DeepSpeed's own tensor)
                      "megalm/training/zero3_reduce_scatter.py"}
COLLECTIVE = re.compile(r"\bdist\.(all_reduce|all_gather\w*|broadcast\w*|reduce_scatter\w*|reduce)\(")


def test_scalar_collectives_go_through_the_device_module():
    offenders = []
    for root in ("megalm", "bench"):
        for dirpath, _, files in os.walk(os.path.join(REPO, root)):
            for name in files:
                rel = os.path.relpath(os.path.join(dirpath, name), REPO)
                if name.endswith(".py") and rel not in TENSOR_COLLECTIVES:
                    for n, line in enumerate(open(os.path.join(REPO, rel)), 1):
                        if COLLECTIVE.search(line):
                            offenders.append(f"{rel}:{n}: {line.strip()}")
    assert not offenders, ("collectives on tensors made outside megalm/parallel/device.py (a CPU tensor "
                           "fails under NCCL): use reduce_scalars/any_rank/all_ranks\n" + "\n".join(offenders))
