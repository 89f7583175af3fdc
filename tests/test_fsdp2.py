"""FSDP2 (``--trainer.strategy fsdp2``) on 2 CPU processes (gloo), launched by torchrun as on a cluster.

Each run is ``tests/fsdp2_worker.py``: the same 16 samples in the same global batches of 8, per-rank shares on 2
ranks. Checked: gradients and weights equal one process on the whole batch (the true mean, not gloo's sum; see
pytorch/pytorch#162338), one reduce-scatter per FSDP unit per optimizer step (twice as many without the
gradient-sync switch), LUT equal to DDP (its projector BatchNorm is per rank, so not to one process), a sharded
checkpoint resumed to the uninterrupted run's weights, and FSDP1 refused with one line.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy

from masksub_lightning import MaskSubModule
from masksub_lightning.training import sharding

WORKER = Path(__file__).with_name("fsdp2_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(kind: str, strategy: str, out: Path, *extra: str, processes: int = 2) -> dict:
    """Run the worker (under torchrun for 2 processes); returns rank 0's record."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if strategy == "single":
        command = [sys.executable, str(WORKER)]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={processes}",
            "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}",
            str(WORKER),
        ]
    done = subprocess.run(
        [*command, kind, strategy, str(out), *extra], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    world = 1 if strategy == "single" else processes
    tag = f"{strategy}{world}_rank0" + ("_resumed" if "--resume" in extra else "")
    record = torch.load(out / f"{tag}.pt", weights_only=True)
    record.update(json.loads((out / f"{tag}.json").read_text()))
    return record


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float = 1e-5) -> None:
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=1e-7, msg=name)


def fsdp_units(kind: str) -> int:
    """FSDP units the worker's module is cut into: one per residual block, one root per network."""
    from fsdp2_worker import make_module

    module = make_module(kind)
    nets = [module.model] if kind == "masksub" else [module.model, module.decoder]
    return sum(len(sharding.block_units(net)) + 1 for net in nets)


@pytest.mark.parametrize("kind", ["masksub", pytest.param("mae", marks=pytest.mark.slow)])
def test_fsdp2_equals_one_process_with_one_reduce_scatter_per_unit_and_step(tmp_path, kind):
    single = launch(kind, "single", tmp_path)
    sharded = launch(kind, "fsdp2", tmp_path)
    assert sharded["steps"] == single["steps"] == 4
    for step in range(4):
        assert_same(sharded["grads"][step], single["grads"][step])
    assert_same(sharded["weights"], single["weights"])
    # MaskSub backpropagates twice per step; only the last backward reduce-scatters.
    units = fsdp_units(kind)
    assert [c["reduce_scatter"] for c in sharded["calls"]] == [units] * 4


@pytest.mark.slow
def test_without_the_sync_switch_each_backward_reduce_scatters(tmp_path):
    """The control that shows the count above can fail: MaskSub's two backward passes, each reducing."""
    control = launch("masksub", "fsdp2", tmp_path, "--no-sync-switch")
    assert [c["reduce_scatter"] for c in control["calls"]] == [2 * fsdp_units("masksub")] * 4


@pytest.mark.slow
def test_lut_under_fsdp2_equals_ddp(tmp_path):
    ddp = launch("lut", "ddp", tmp_path)
    sharded = launch("lut", "fsdp2", tmp_path)
    for step in range(4):
        assert_same(sharded["grads"][step], ddp["grads"][step], rtol=1e-4)
    assert_same(sharded["weights"], ddp["weights"], rtol=1e-4)


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_to_the_uninterrupted_weights(tmp_path):
    full = launch("masksub", "fsdp2", tmp_path, "--steps", "6")
    stopped = launch("masksub", "fsdp2", tmp_path, "--steps", "6", "--stop-at", "3")
    checkpoint = tmp_path / "resume.ckpt"
    assert stopped["steps"] == 3 and checkpoint.is_dir()  # one shard file per rank and the metadata
    resumed = launch("masksub", "fsdp2", tmp_path, "--steps", "6", "--resume", str(checkpoint))
    assert resumed["steps"] == 6
    assert_same(resumed["weights"], full["weights"], rtol=1e-6)

    # masksub export: torch unpickles a sharded folder's metadata, so only with --trust-sharded.
    out = tmp_path / "exported"
    refused = subprocess.run(
        [sys.executable, "-m", "masksub_lightning", "export", str(checkpoint), str(out)],
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2 and "--trust-sharded" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not out.exists()
    done = subprocess.run(
        [sys.executable, "-m", "masksub_lightning", "export", str(checkpoint), str(out), "--trust-sharded"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    import timm

    exported = timm.create_model(f"local-dir:{out}", pretrained=True).state_dict()
    assert_same({k: exported[k] for k in stopped["weights"]}, stopped["weights"], rtol=0)


def test_fsdp1_is_refused_with_one_line_naming_fsdp2():
    module = MaskSubModule("vit_tiny_patch16_224", num_classes=4, model_kwargs={"img_size": 32, "depth": 1})
    module._trainer = SimpleNamespace(
        strategy=FSDPStrategy.__new__(FSDPStrategy)
    )  # Lightning needs GPUs for it
    with pytest.raises(
        ValueError, match=r"^strategy 'fsdp' \(FSDPStrategy, FSDP1\).*use --trainer.strategy fsdp2"
    ) as e:
        module.setup("fit")
    assert "\n" not in str(e.value)
