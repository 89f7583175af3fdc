"""Checkpoint files: atomic writes that survive SIGKILL, a last.ckpt that is always the latest state, safe loading."""

from __future__ import annotations

import builtins
import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from masksub_lightning import MaskSubModule
from masksub_lightning.callbacks import AlwaysLastCheckpoint
from masksub_lightning.training.checkpoint_io import (
    TMP_SUFFIX,
    AtomicCheckpointIO,
    CheckpointLoadError,
    CheckpointSpaceError,
    OutputDirError,
    atomic_torch_save,
    check_output_dir,
    checkpoint_size_estimate,
    checkpoint_size_lower_bound,
    remove_stale_temp_files,
)

TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}
TINY_RESNET = dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 32), stem_width=8)


def temp_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.endswith(TMP_SUFFIX))


# ------------------------------------------------------------------------------------------------ atomic save
KILL_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from masksub_lightning.training.checkpoint_io import AtomicCheckpointIO

    path, mib = sys.argv[1], int(sys.argv[2])
    io = AtomicCheckpointIO()
    big = torch.empty(mib * 2**20 // 4)
    version = 0
    while True:
        big.fill_(float(version))
        io.save_checkpoint({"version": version, "big": big}, path)
        print(version, flush=True)
        version += 1
    """
)


def _partly_written(folder: Path, full_size: int) -> bool:
    """A temporary file exists and holds between 1 byte and half of a checkpoint."""
    for p in temp_files(folder):
        try:
            if 0 < p.stat().st_size < full_size // 2:
                return True
        except FileNotFoundError:  # renamed meanwhile
            pass
    return False


def test_sigkill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    """A real process saving ~200 MB checkpoints in a loop is SIGKILLed while a save is under way."""
    target = tmp_path / "last.ckpt"
    script = tmp_path / "saver.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(target), "200"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        assert proc.stdout.readline().strip() == "0"  # the first checkpoint is complete
        full_size = target.stat().st_size
        deadline = time.monotonic() + 120
        while not _partly_written(tmp_path, full_size):  # the next save is under way, far from done
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    left = temp_files(tmp_path)
    assert len(left) == 1 and left[0].name != target.name and left[0].name.startswith(".last.ckpt.")
    assert left[0].stat().st_size < full_size  # the kill really hit a save in progress
    ckpt = torch.load(target, weights_only=True)
    version = ckpt["version"]
    assert version >= 0 and ckpt["big"].numel() == 200 * 2**20 // 4
    assert bool((ckpt["big"] == float(version)).all())  # a complete, consistent earlier save
    # The writer is dead, so its temporary file is stale: removed at the next start, the checkpoint kept.
    assert remove_stale_temp_files(tmp_path) == [str(left[0])]
    assert temp_files(tmp_path) == [] and target.exists()


def test_a_failed_save_keeps_the_previous_file_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"version": 1, "w": torch.ones(3)}, target)
    with pytest.raises(Exception):  # noqa: B017 - whatever torch.save raises for an unpicklable object
        AtomicCheckpointIO().save_checkpoint({"version": 2, "bad": lambda: None}, target)
    assert torch.load(target, weights_only=True)["version"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_the_temporary_file_is_written_in_the_destination_directory(tmp_path, monkeypatch):
    """Not in $TMPDIR: a rename across file systems would be a copy, which a kill can leave half done."""
    other_tmp = tmp_path / "tmpdir"
    other_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(other_tmp))
    renames = []
    real_replace = os.replace

    def spy(src, dst):
        renames.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    target = tmp_path / "ckpts" / "best.ckpt"
    atomic_torch_save({"w": torch.arange(4)}, target)
    assert len(renames) == 1
    src, dst = renames[0]
    assert dst == target and src.parent == target.parent and src.name.endswith(TMP_SUFFIX)
    assert list(other_tmp.iterdir()) == []
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.arange(4))
    assert (target.stat().st_mode & 0o777) == (0o666 & ~_umask())  # like any file the user creates


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_stale_temp_files_of_dead_writers_are_removed_others_kept(tmp_path):
    from masksub_lightning.training.checkpoint_io import _HOST

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".last.ckpt.{_HOST}-{dead.pid}-abcd1234{TMP_SUFFIX}"
        live = tmp_path / f".last.ckpt.{_HOST}-{alive.pid}-abcd1234{TMP_SUFFIX}"
        other_host = tmp_path / f".last.ckpt.otherhost-{dead.pid}-abcd1234{TMP_SUFFIX}"
        unrelated = tmp_path / "notes.tmp"
        for p in (stale, live, other_host, unrelated):
            p.write_bytes(b"x")
        assert remove_stale_temp_files(tmp_path) == [str(stale)]
        assert live.exists() and other_host.exists() and unrelated.exists()
        old = time.time() - 2 * 24 * 3600  # another host's leftover is removed once it is a day old
        os.utime(other_host, (old, old))
        assert remove_stale_temp_files(tmp_path) == [str(other_host)]
    finally:
        alive.kill()
        alive.wait()


# ----------------------------------------------------------------------------------------------- last.ckpt
class WorseningModel(L.LightningModule):
    """A linear model whose logged ``score`` gets worse every epoch, so only epoch 0 is ever the best."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 2)
        self.train_steps = 0

    def training_step(self, batch, batch_idx):
        self.train_steps += 1
        x, y = batch
        return nn.functional.cross_entropy(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        self.log("score", float(self.current_epoch), batch_size=len(batch[0]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g))
    return DataLoader(data, batch_size=4)  # 4 batches per epoch


def _fit(tmp_path: Path, callback: ModelCheckpoint, model: L.LightningModule | None = None, **trainer_kwargs):
    model = model or WorseningModel()
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        callbacks=[callback],
        plugins=[AtomicCheckpointIO()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **trainer_kwargs,
    )
    trainer.fit(model, _loader(), _loader())
    return trainer, model


@pytest.mark.parametrize(
    ("callback_class", "expected_last_step"),
    [
        (ModelCheckpoint, 4),
        (AlwaysLastCheckpoint, 12),
    ],  # Lightning's last.ckpt is stuck at the best epoch (0)
)
def test_last_ckpt_is_the_latest_state_when_the_metric_stops_improving(
    tmp_path, callback_class, expected_last_step
):
    cb = callback_class(dirpath=tmp_path / "ckpt", monitor="score", mode="min", save_last=True)
    trainer, model = _fit(tmp_path, cb, max_epochs=3)
    assert model.train_steps == trainer.global_step == 12  # 3 epochs x 4 batches
    best = torch.load(cb.best_model_path, weights_only=True)
    assert best["global_step"] == 4  # epoch 0 scored best
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == expected_last_step
    assert temp_files(tmp_path / "ckpt") == []


def test_last_ckpt_covers_a_run_that_stops_mid_epoch(tmp_path):
    cb = AlwaysLastCheckpoint(dirpath=tmp_path / "ckpt", monitor="score", mode="min", save_last=True)
    trainer, model = _fit(
        tmp_path, cb, max_steps=6
    )  # stops after 2 batches of epoch 1, before its validation
    assert trainer.global_step == 6
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 6
    assert torch.equal(last["state_dict"]["layer.weight"], model.layer.weight.detach())


def test_resuming_from_last_continues_where_the_run_stopped(tmp_path):
    cb = AlwaysLastCheckpoint(dirpath=tmp_path / "ckpt", monitor="score", mode="min", save_last=True)
    _fit(tmp_path, cb, max_epochs=2)
    cb2 = AlwaysLastCheckpoint(dirpath=tmp_path / "ckpt", monitor="score", mode="min", save_last=True)
    model = WorseningModel()
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        callbacks=[cb2],
        plugins=[AtomicCheckpointIO()],
        logger=False,
        enable_progress_bar=False,
        max_epochs=3,
    )
    trainer.fit(model, _loader(), _loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert model.train_steps == 4  # only the third epoch ran
    assert trainer.global_step == 12
    assert cb2.best_model_score == 0.0  # the callback state (best so far) came back with the checkpoint


def test_state_key_matches_lightning_modelcheckpoint():
    """Checkpoints written with either class restore the other's best-so-far state."""
    kwargs = {"monitor": "val_acc1", "mode": "max"}
    assert AlwaysLastCheckpoint(**kwargs).state_key == ModelCheckpoint(**kwargs).state_key


# ------------------------------------------------------------------------------------------ output directory
def test_checkpoint_dir_that_cannot_be_created_fails_before_training(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the directory should be")
    cb = AlwaysLastCheckpoint(dirpath=blocker / "ckpt", monitor="score", mode="min", save_last=True)
    model = WorseningModel()
    with pytest.raises(OutputDirError, match=r"checkpoint directory .*not_a_dir/ckpt cannot be created"):
        _fit(tmp_path, cb, model=model, max_epochs=1)
    assert model.train_steps == 0


@pytest.mark.skipif(
    not Path("/sys").is_dir() or (os.access("/sys", os.W_OK) and os.geteuid() != 0), reason="Linux"
)
def test_read_only_location_fails_before_training(tmp_path):
    """/sys refuses new entries even to root (a chmod-ed folder would not stop root)."""
    with pytest.raises(
        OutputDirError, match=r"/sys/masksub-test-ckpt cannot be created: Operation not permitted"
    ):
        check_output_dir("/sys/masksub-test-ckpt", "checkpoint directory")


def test_full_disk_fails_before_training(tmp_path, monkeypatch):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=10))
    cb = AlwaysLastCheckpoint(dirpath=tmp_path / "ckpt", monitor="score", mode="min", save_last=True)
    model = WorseningModel()
    weights = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    with pytest.raises(
        OutputDirError, match=r"has 10 bytes free but a checkpoint of this run takes about 18\.\d KiB"
    ):
        _fit(tmp_path, cb, model=model, max_epochs=1)
    assert model.train_steps == 0 and weights == 40  # 4 x 2 weights + 2 biases, float32: the rest is overhead


@pytest.mark.parametrize(
    ("model", "kwargs", "ema"),
    [
        ("vit_tiny_patch16_224", {"model_kwargs": TINY_VIT}, False),
        (
            "vit_tiny_patch16_224",
            {"model_kwargs": {**TINY_VIT, "embed_dim": 96, "depth": 4, "num_heads": 3}},
            True,
        ),
        (
            "resnet18",
            {"model_kwargs": TINY_RESNET, "optimizer": "sgd", "sub_branch_kwargs": {"cell_size": 16}},
            False,
        ),
    ],
    ids=["vit-adamw", "vit-adamw-ema", "resnet-sgd"],
)
def test_the_size_estimate_is_that_of_a_real_checkpoint(tmp_path, model, kwargs, ema):
    from conftest import make_loader, quiet_trainer
    from lightning.pytorch.callbacks import EMAWeightAveraging

    module = MaskSubModule(model, 4, **kwargs)
    trainer = quiet_trainer(max_steps=2, callbacks=[EMAWeightAveraging()] if ema else [], limit_val_batches=0)
    trainer.fit(module, make_loader(n=32))
    trainer.save_checkpoint(tmp_path / "real.ckpt")  # optimizer state, and the EMA copy when there is one
    actual = (tmp_path / "real.ckpt").stat().st_size
    estimate = checkpoint_size_estimate(module, trainer.callbacks)
    assert 0.9 * actual <= estimate <= 2 * actual, (estimate, actual)
    # What was checked before: the weights alone, a third of the AdamW checkpoint or less.
    assert checkpoint_size_lower_bound(module) < 0.5 * actual


def _fill_up_after(nbytes: int, exc: BaseException):
    """A torch.save that writes ``nbytes`` and then fails as a full disk does."""

    def save(obj, f):
        f.write(b"\0" * nbytes)
        raise exc

    return save


@pytest.mark.parametrize(
    "exc",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4056"),
    ],
    ids=["ENOSPC", "torch-zip-writer"],
)
def test_a_full_disk_while_saving_is_named_and_the_previous_checkpoint_kept(tmp_path, monkeypatch, exc):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"version": 1, "w": torch.ones(3)}, target)
    monkeypatch.setattr(torch, "save", _fill_up_after(1000, exc))
    with pytest.raises(CheckpointSpaceError) as raised:
        AtomicCheckpointIO().save_checkpoint({"version": 2, "w": torch.zeros(3)}, target)
    assert str(raised.value) == (
        f"[Errno 28] no space left on device writing {target}; previous checkpoint intact (the partial file was "
        "removed): free space there or set checkpoint.dirpath to a larger drive, then resume from the last checkpoint"
    )
    monkeypatch.undo()
    assert torch.load(target, weights_only=True)["version"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # the partial temporary file is gone
    check_output_dir(tmp_path / "ok", "x", need_bytes=10)  # enough room: passes


# ---------------------------------------------------------------------------------------------- safe loading
class Payload:
    """Unpickling this runs ``open(marker, "w")``: a stand-in for any code a tampered checkpoint could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def _malicious_checkpoint(path: Path, marker: Path) -> Path:
    module = MaskSubModule("vit_tiny_patch16_224", num_classes=3, model_kwargs=TINY_VIT)
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": L.__version__,
            "payload": Payload(marker),
        },
        path,
    )
    return path


def test_the_payload_runs_under_unsafe_loading(tmp_path, monkeypatch):
    """Control: with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, a load that leaves weights_only unset runs the payload."""
    marker = tmp_path / "pwned"
    evil = _malicious_checkpoint(tmp_path / "evil.ckpt", marker)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    torch.load(evil)
    assert marker.exists()


def test_resume_and_load_from_checkpoint_refuse_a_malicious_checkpoint(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    evil = _malicious_checkpoint(tmp_path / "evil.ckpt", marker)
    monkeypatch.setenv(
        "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1"
    )  # our loaders pass weights_only=True explicitly

    with pytest.raises(CheckpointLoadError, match=r"evil\.ckpt is not a safe checkpoint: .*io\.open"):
        MaskSubModule.load_from_checkpoint(evil)
    assert not marker.exists()

    cb = AlwaysLastCheckpoint(dirpath=tmp_path / "ckpt", monitor="score", mode="min", save_last=True)
    model = WorseningModel()
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        callbacks=[cb],
        plugins=[AtomicCheckpointIO()],
        logger=False,
        enable_progress_bar=False,
        max_epochs=1,
    )
    with pytest.raises(CheckpointLoadError, match="not a safe checkpoint"):
        trainer.fit(model, _loader(), _loader(), ckpt_path=evil)
    assert not marker.exists() and model.train_steps == 0


def test_load_from_checkpoint_round_trip_and_truncated_file(tmp_path):
    module = MaskSubModule("vit_tiny_patch16_224", num_classes=3, model_kwargs=TINY_VIT, sub_ratio=0.25)
    path = tmp_path / "good.ckpt"
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": L.__version__,
        },
        path,
    )
    loaded = MaskSubModule.load_from_checkpoint(path)
    assert loaded.hparams.sub_ratio == 0.25
    for name, value in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    with pytest.raises(TypeError, match="cannot be called on an instance"):
        module.load_from_checkpoint(path)

    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointLoadError, match=r"truncated\.ckpt is not a complete torch checkpoint"):
        AtomicCheckpointIO().load_checkpoint(truncated)


@pytest.mark.slow
def test_two_process_ddp_saves_latest_last_and_fails_together_on_a_bad_dir(tmp_path):
    """Rank 0 writes; a directory problem found on rank 0 stops every rank (no rank left waiting)."""
    common = {
        "accelerator": "cpu",
        "devices": 2,
        "strategy": "ddp_spawn",
        "plugins": [AtomicCheckpointIO()],
        "logger": False,
        "enable_progress_bar": False,
        "num_sanity_val_steps": 0,
        "use_distributed_sampler": True,
    }
    cb = AlwaysLastCheckpoint(dirpath=tmp_path / "ckpt", monitor="score", mode="min", save_last=True)
    L.Trainer(default_root_dir=tmp_path, callbacks=[cb], max_epochs=3, **common).fit(
        WorseningModel(), _loader(), _loader()
    )
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 6  # 3 epochs x (16 samples / 2 ranks / batch 4)
    assert temp_files(tmp_path / "ckpt") == []

    (tmp_path / "blocker").write_text("not a folder")
    bad = AlwaysLastCheckpoint(
        dirpath=tmp_path / "blocker" / "ckpt", monitor="score", mode="min", save_last=True
    )
    started = time.monotonic()
    with pytest.raises(Exception, match="cannot be created"):
        L.Trainer(default_root_dir=tmp_path, callbacks=[bad], max_epochs=1, **common).fit(
            WorseningModel(), _loader(), _loader()
        )
    assert time.monotonic() - started < 120
