"""Test-only pieces for runs of several processes: sample-id accounting, launchers, a tiny recipe-like config.

Loaded by ``masksub fit`` through class paths (``scale_helpers.RecordedImageFolder``, ``scale_helpers.SampleLog``),
so ``tests/`` must be on ``PYTHONPATH`` of the launched processes (:func:`run_env` puts it there).

Sample-id accounting: :class:`RecordedImageFolder` notes every training index its dataset serves (loader workers
off, so in the training process), and :class:`SampleLog` writes, per rank, one JSON line per training batch:
the epoch, the optimizer step the batch belongs to, the learning rate it is trained with and its sample ids.
Lines are flushed as they are written, so a SIGKILLed run leaves the batches it trained on.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import lightning as L
import yaml

from masksub_lightning.data import ImageFolderDataModule

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent

VIT = dict(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0)
#: 90 training images (3 classes x 30), 21 validation images (3 x 7: not a multiple of 2, 4 or 8 ranks).
TRAIN_PER_CLASS, VAL_PER_CLASS = 30, 7
DATA = dict(
    batch_size=4,
    num_workers=0,
    img_size=16,
    color_jitter=None,
    mixup_alpha=0.8,
    cutmix_alpha=1.0,
    repeated_aug=3,
    seed=0,
)


# ------------------------------------------------------------------------------------------ accounting
class _Recording:
    """A dataset that notes the indices it serves (in this process)."""

    def __init__(self, dataset: Any, served: list[int]) -> None:
        self.dataset, self.served = dataset, served

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        self.served.append(int(index))
        return self.dataset[index]


class RecordedImageFolder(ImageFolderDataModule):
    """ImageFolderDataModule whose train dataset notes the sample ids it serves (``self.served``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.served: list[int] = []

    def build_dataset(self, split, transform):
        dataset = super().build_dataset(split, transform)
        return _Recording(dataset, self.served) if split == "train" else dataset


class SampleLog(L.Callback):
    """Writes one JSON line per training batch (and per validation) to ``$MASKSUB_TEST_LOG`` ({rank} filled in).

    Batch lines: ``epoch``, ``step`` (the optimizer step the batch is part of, 1-based), ``lr`` (the learning
    rate that step applies) and ``ids``. Validation lines: ``val`` with the epoch's metrics and ``step``.
    """

    def __init__(self) -> None:
        self.path = os.environ.get("MASKSUB_TEST_LOG", "")
        self._file: Any = None

    def _write(self, trainer: L.Trainer, record: dict[str, Any]) -> None:
        if not self.path:
            return
        if self._file is None:
            self._file = open(self.path.format(rank=trainer.global_rank), "a")  # noqa: SIM115 (kept open)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        served = trainer.datamodule.served
        lr = trainer.optimizers[0].param_groups[-1]["lr"]
        record = dict(epoch=trainer.current_epoch, step=trainer.global_step + 1, lr=lr, ids=list(served))
        served.clear()
        self._write(trainer, record)

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
        self._write(trainer, dict(val=metrics, step=trainer.global_step, epoch=trainer.current_epoch))


class SignalAt(L.Callback):
    """Sends this process signals at chosen steps: ``$MASKSUB_TEST_SIGNALS`` = ``"USR1@6,KILL@9"``.

    Each is sent at ``on_train_batch_start`` when ``trainer.global_step`` equals the step (the batch of the next
    step is fetched, nothing of it trained yet).
    """

    def __init__(self) -> None:
        pairs = [item.split("@") for item in os.environ.get("MASKSUB_TEST_SIGNALS", "").split(",") if item]
        self.signals = [(getattr(signal, f"SIG{name}"), int(step)) for name, step in pairs]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for signum, step in self.signals:
            if trainer.global_step == step:
                os.kill(os.getpid(), signum)


def read_log(path_pattern: str | Path, world: int) -> tuple[list[dict], list[dict]]:
    """(batch records, validation records) of all ranks, each record with its ``rank``."""
    batches, vals = [], []
    for rank in range(world):
        path = Path(str(path_pattern).format(rank=rank))
        for line in path.read_text().splitlines():
            record = {**json.loads(line), "rank": rank}
            (vals if "val" in record else batches).append(record)
    return batches, vals


def samples_per_step(batches: list[dict], until: int | None = None, after: int | None = None) -> dict:
    """{optimizer step: Counter of sample ids over all ranks and micro-batches}, optionally cut to a step range."""
    steps: dict[int, Counter] = defaultdict(Counter)
    for b in batches:
        if (until is None or b["step"] <= until) and (after is None or b["step"] > after):
            steps[b["step"]].update(b["ids"])
    return dict(steps)


def lr_per_step(batches: list[dict]) -> dict[int, float]:
    """{optimizer step: learning rate}; every rank and micro-batch of a step must agree."""
    lrs: dict[int, set[float]] = defaultdict(set)
    for b in batches:
        lrs[b["step"]].add(b["lr"])
    assert all(len(v) == 1 for v in lrs.values()), lrs
    return {k: v.pop() for k, v in sorted(lrs.items())}


def samples_per_epoch(batches: list[dict]) -> dict[int, Counter]:
    epochs: dict[int, Counter] = defaultdict(Counter)
    for b in batches:
        epochs[b["epoch"]].update(b["ids"])
    return dict(epochs)


def assert_epoch_counts(counts: Counter, dataset_size: int, global_batch: int, repeats: int) -> None:
    """One epoch of the repeated-augmentation sampler: whole global batches of ``repeats`` copies per image.

    The epoch is the first ``L = (N // global_batch) * global_batch`` positions of a stream in which every
    image appears ``repeats`` times in a row: ``L // repeats`` images ``repeats`` times, and the image cut by the
    epoch's end ``L % repeats`` times (the sampler's documented truncation).
    """
    length = dataset_size // global_batch * global_batch
    assert sum(counts.values()) == length
    expected = Counter({repeats: length // repeats, **({length % repeats: 1} if length % repeats else {})})
    assert Counter(counts.values()) == expected, counts


# ---------------------------------------------------------------------------------------------- launch
def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_env(**extra: str) -> dict[str, str]:
    """The environment of a launched run: tests/ importable, one thread per process, extra variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASKSUB_TEST_"))}
    path = [str(TESTS_DIR), str(REPO), os.environ.get("PYTHONPATH", "")]
    return {**env, "PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1", **extra}


def write_config(
    path: Path, data_root: Path, every: int = 3, model: dict | None = None, **trainer: Any
) -> Path:
    """A recipe-like tiny MaskSub config: ViT token masking, drop path, Mixup + CutMix, repeated augmentation 3,
    EMA; ``resume.ckpt`` every ``every`` optimizer steps."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "strategy": "ddp",
            "max_epochs": 2,
            "deterministic": True,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [
                {"class_path": "scale_helpers.SampleLog"},
                {"class_path": "test_resume.FinalWeights"},
                {"class_path": "lightning.pytorch.callbacks.EMAWeightAveraging", "init_args": {"decay": 0.9}},
                {
                    "class_path": "masksub_lightning.callbacks.ResumeCheckpoint",
                    "init_args": {"every_n_train_steps": every},
                },
                {"class_path": "scale_helpers.SignalAt"},
            ],
            **trainer,
        },
        "model": {
            "class_path": "masksub_lightning.MaskSubModule",
            "init_args": {
                "model": "vit_tiny_patch16_224",
                "model_kwargs": {**VIT, "drop_path_rate": 0.1},
                "sub_branch": "token_mask",
                "lr": 2e-3,
                "warmup_epochs": 0.5,
                **(model or {}),
            },
        },
        "data": {
            "class_path": "scale_helpers.RecordedImageFolder",
            "init_args": {"root": str(data_root), **DATA},
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


def fit_args(config: Path, root: Path, *extra: str) -> list[str]:
    """``-m masksub_lightning fit`` arguments of a run of ``config`` writing under ``root``."""
    return [
        "-m",
        "masksub_lightning",
        "fit",
        "--config",
        str(config),
        "--trainer.default_root_dir",
        str(root),
        *extra,
    ]


def fake_scontrol(bin_dir: Path, log: Path) -> Path:
    """An ``scontrol`` that appends its arguments to ``log`` (put ``bin_dir`` first on PATH)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\n')
    script.chmod(0o755)
    return script


def slurm_vars(job_id: str, nodes: int, per_node: int, rank: int, port: int, bin_dir: Path) -> dict[str, str]:
    """What ``srun`` sets for task ``rank`` of a job of ``nodes`` x ``per_node`` tasks (Lightning reads these)."""
    return {
        "SLURM_JOB_ID": job_id,
        "SLURM_JOB_NAME": "masksub-test",  # not "bash" / "interactive", which Lightning treats as no SLURM
        "SLURM_NTASKS": str(nodes * per_node),
        "SLURM_NTASKS_PER_NODE": str(per_node),
        "SLURM_NNODES": str(nodes),
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank % per_node),
        "SLURM_NODEID": str(rank // per_node),
        "SLURM_NODELIST": "127.0.0.1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    }


def srun(
    args: list[str],
    nodes: int,
    per_node: int,
    env: dict[str, str],
    job_id: str,
    bin_dir: Path,
    **per_rank: dict,
) -> list[subprocess.Popen]:
    """Start the tasks of a simulated SLURM job step: one process per task, ``srun``'s variables set by hand.

    ``per_rank``: ``rank<r>={...}`` extra variables of one task.
    """
    port = free_port()
    procs = []
    for rank in range(nodes * per_node):
        task_env = {
            **env,
            **slurm_vars(job_id, nodes, per_node, rank, port, bin_dir),
            **per_rank.get(f"rank{rank}", {}),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, *args],
                env=task_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float = 600) -> list[tuple[int, str]]:
    """(return code, output) of every process."""
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [(p.returncode, out) for p, out in zip(procs, outputs)]


def torchrun(
    args: list[str], nodes: int, per_node: int, env: dict[str, str], timeout: float = 600
) -> list[tuple[int, str]]:
    """``torchrun`` with one launcher per node on this machine (static rendezvous at 127.0.0.1); (code, output)."""
    port = free_port()
    launchers = []
    for node in range(nodes):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={nodes}",
            f"--nproc_per_node={per_node}",
        ]
        cmd += [f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}", *args]
        launchers.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    return wait_all(launchers, timeout)
