"""Exact resume: a fit stopped anywhere and resumed from its checkpoint ends bitwise equal to an uninterrupted fit.

CPU, ``deterministic=True``, MaskSub with Mixup + CutMix, repeated augmentation 3, random training shifts and EMA.
The fast tests run in this process (interrupted by an exception or a SIGTERM); the slow ones SIGKILL a real
``masksub fit`` process at chosen points (this module's :class:`KillAt` callback, loaded by the CLI through
``--trainer.callbacks``) and resume it with ``--ckpt_path``.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import EMAWeightAveraging

from masksub_lightning import MaskSubModule
from masksub_lightning.callbacks import AlwaysLastCheckpoint, ResumeCheckpoint
from masksub_lightning.data import DigitsDataModule
from masksub_lightning.training.resume import (
    RNG_KEY,
    capture_rng_state,
    set_rng_state,
    stash_rng_states,
)

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent

VIT = dict(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0)
RESNET = dict(layers=(1, 1, 1, 1), channels=(8, 8, 16, 16), stem_width=8)
FAMILIES = {
    "vit_token_mask": dict(model="vit_tiny_patch16_224", model_kwargs=VIT, sub_branch="token_mask"),
    "cnn_pixel_mask": dict(
        model="resnet18", model_kwargs=RESNET, sub_branch="pixel_mask", sub_branch_kwargs={"cell_size": 8}
    ),
}
DATA = dict(
    batch_size=16,
    img_size=16,
    train_augment=True,  # random shifts drawn from torch's RNG in the main process
    mixup_alpha=0.8,
    cutmix_alpha=1.0,
    repeated_aug=3,
)


# ------------------------------------------------------------------------------ callbacks (also used by the CLI)
class KillAt(L.Callback):
    """Test-only: SIGKILL this process at the point named by ``$MASKSUB_TEST_KILL``.

    ``batch_start:<step>`` / ``before_step:<step>`` / ``batch_end:<step>``: when ``trainer.global_step`` equals
    ``<step>`` at that hook (``before_step`` is inside the step: both backward passes done, weights not yet
    updated). ``val:<step>:<batch>``: at validation batch ``<batch>`` of the validation run after ``<step>``
    optimizer steps (never the sanity check).
    """

    def __init__(self) -> None:
        self.spec = os.environ.get("MASKSUB_TEST_KILL", "")

    def _kill_if(self, point: str) -> None:
        if point == self.spec:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._kill_if(f"batch_start:{trainer.global_step}")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._kill_if(f"before_step:{trainer.global_step}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._kill_if(f"batch_end:{trainer.global_step}")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self._kill_if(f"val:{trainer.global_step}:{batch_idx}")


class FinalWeights(L.Callback):
    """Records the raw and the EMA weights at the end of fit (listed before EMAWeightAveraging, so it runs
    before the EMA weights are copied into the model); writes them to ``path`` (``{rank}`` filled in) or to
    ``$MASKSUB_TEST_WEIGHTS`` if set."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self.weights: dict[str, dict[str, torch.Tensor]] = {}

    def on_train_end(self, trainer, pl_module):
        self.weights = {"raw": _cloned(pl_module.state_dict())}
        for cb in trainer.callbacks:
            if isinstance(cb, EMAWeightAveraging) and cb._average_model is not None:
                self.weights["ema"] = _cloned(cb._average_model.module.state_dict())
        path = self.path or os.environ.get("MASKSUB_TEST_WEIGHTS")
        if path:
            torch.save(self.weights, path.format(rank=trainer.global_rank))


def _cloned(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def assert_bitwise_equal(expected: dict, actual: dict) -> None:
    """Every tensor of every state dict equal bit for bit (torch.equal), with the differing names listed."""
    assert expected.keys() == actual.keys()
    for kind in expected:
        assert expected[kind].keys() == actual[kind].keys(), kind
        differ = [k for k in expected[kind] if not torch.equal(expected[kind][k], actual[kind][k])]
        assert not differ, f"{kind} weights differ from the uninterrupted run: {differ}"


# ----------------------------------------------------------------------------------------------- unit tests
def test_rng_states_round_trip_and_load_with_weights_only(tmp_path):
    state = capture_rng_state()
    first = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.save({RNG_KEY: [state]}, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)[RNG_KEY][0]
    torch.rand(5), np.random.rand(5), random.random()  # move every stream on
    set_rng_state(loaded)
    again = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(first[0], again[0])
    assert np.array_equal(first[1], again[1])
    assert first[2] == again[2]


def test_world_size_change_warns_and_keeps_fresh_streams():
    class FakeTrainer:
        world_size, global_rank = 1, 0

    module = MaskSubModule(**FAMILIES["vit_token_mask"], num_classes=10)
    module._trainer = FakeTrainer()
    two_ranks = {RNG_KEY: [capture_rng_state(), capture_rng_state()]}
    with pytest.warns(UserWarning, match="RNG states of 2 rank"):
        stash_rng_states(module, two_ranks)
    assert module._masksub_rng_pending is None
    stash_rng_states(module, {RNG_KEY: two_ranks[RNG_KEY][:1]})
    assert module._masksub_rng_pending is two_ranks[RNG_KEY][0]


def test_resume_checkpoint_rejects_bad_intervals():
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="every_n_train_steps must be a positive int"):
            ResumeCheckpoint(every_n_train_steps=bad)


# ----------------------------------------------------------------------------------- in-process resume
class _Interrupt(Exception):
    pass


class _StopAt(L.Callback):
    """Interrupts the fit after optimizer step ``step``: by an exception, or by a SIGTERM to this process."""

    def __init__(self, step: int, how: str) -> None:
        self.step, self.how = step, how

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            if self.how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)  # Lightning stops at the end of this batch
            else:
                raise _Interrupt


def _fit(
    root: Path,
    family: str,
    stop: L.Callback | None = None,
    ckpt: Path | None = None,
    every: int = 3,
    last: bool = False,
    **module_kw,
) -> dict:
    L.seed_everything(0, verbose=False)
    module = MaskSubModule(
        **FAMILIES[family], num_classes=10, **{"lr": 2e-3, "warmup_epochs": 0.5, **module_kw}
    )
    data = DigitsDataModule(**DATA)
    weights = FinalWeights()
    callbacks = [
        weights,
        EMAWeightAveraging(decay=0.9),
        ResumeCheckpoint(every_n_train_steps=every, dirpath=str(root)),
    ]
    if last:  # what `masksub fit` uses: best by val_acc1, last.ckpt at every validation end
        callbacks.append(
            AlwaysLastCheckpoint(dirpath=str(root), monitor="val_acc1", mode="max", save_last=True)
        )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=3,
        limit_train_batches=5,
        limit_val_batches=2,
        deterministic=True,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        callbacks=[*callbacks, *([stop] if stop else [])],
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt)
    return weights.weights


def test_resume_mid_epoch_is_bitwise_exact(tmp_path):
    """Stopped after step 7 of 15 (epoch 2 of 3); resume.ckpt is from step 6, mid-epoch, after a validation."""
    full = _fit(tmp_path / "full", "vit_token_mask")
    with pytest.raises(_Interrupt):
        _fit(tmp_path / "cut", "vit_token_mask", stop=_StopAt(7, "exception"))
    ckpt = tmp_path / "cut" / "resume.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    assert saved["global_step"] == 6 and len(saved[RNG_KEY]) == 1
    assert "current_model_state" in saved  # EMA in state_dict, raw weights here: both travel
    resumed = _fit(tmp_path / "resumed", "vit_token_mask", ckpt=ckpt)
    assert set(full) == {"raw", "ema"}
    assert_bitwise_equal(full, resumed)
    # The check can fail: the weights did change after the checkpoint's step.
    assert not torch.equal(saved["current_model_state"]["model.cls_token"], full["raw"]["model.cls_token"])


def test_resume_from_the_end_of_an_epoch_with_a_per_epoch_schedule(tmp_path):
    """resume.ckpt after the last batch of epoch 1, before its validation and epoch end (LR moved per epoch)."""
    kw = dict(every=5, lr_interval="epoch", warmup_epochs=1)
    full = _fit(tmp_path / "full", "vit_token_mask", **kw)
    with pytest.raises(_Interrupt):
        _fit(tmp_path / "cut", "vit_token_mask", stop=_StopAt(7, "exception"), **kw)
    ckpt = tmp_path / "cut" / "resume.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 5
    assert_bitwise_equal(full, _fit(tmp_path / "resumed", "vit_token_mask", ckpt=ckpt, **kw))


def test_resume_from_last_ckpt_written_at_a_validation_end(tmp_path):
    """last.ckpt (after epoch 2's validation, step 10) is as exact a resume point as resume.ckpt."""
    kw = dict(lr_interval="epoch", warmup_epochs=1)
    full = _fit(tmp_path / "full", "vit_token_mask", **kw)
    with pytest.raises(_Interrupt):
        _fit(tmp_path / "cut", "vit_token_mask", stop=_StopAt(12, "exception"), last=True, **kw)
    ckpt = tmp_path / "cut" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 10
    assert_bitwise_equal(full, _fit(tmp_path / "resumed", "vit_token_mask", ckpt=ckpt, **kw))


class _SigtermAt(L.Callback):
    """Sends this process a SIGTERM during validation batch 0 after step 5, or after micro-batch 2."""

    def __init__(self, where: str) -> None:
        self.where = where

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self.where == "validation" and trainer.global_step == 5 and not trainer.sanity_checking:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.where == "accumulation" and batch_idx == 2:  # first micro-batch of the second group
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize(
    ("where", "module_kw", "message", "step"),
    [
        ("validation", {}, "SIGTERM during validation", 3),
        ("accumulation", {"grad_accumulation": 2}, "inside a gradient-accumulation group", None),
    ],
)
def test_sigterm_off_a_step_boundary_writes_no_resume_checkpoint(tmp_path, where, module_kw, message, step):
    with pytest.warns(UserWarning, match=message), pytest.raises(SystemExit):
        _fit(tmp_path, "vit_token_mask", stop=_SigtermAt(where), **module_kw)
    ckpt = tmp_path / "resume.ckpt"
    if step is None:
        assert not ckpt.exists()
    else:  # the periodic one from before stays the one to resume from
        assert torch.load(ckpt, weights_only=True)["global_step"] == step


@pytest.mark.slow
def test_sigterm_saves_at_the_step_boundary_and_resumes_exactly(tmp_path):
    full = _fit(tmp_path / "full", "cnn_pixel_mask")
    with pytest.raises(SystemExit):  # Lightning's SIGTERMException
        _fit(tmp_path / "cut", "cnn_pixel_mask", stop=_StopAt(8, "sigterm"))
    ckpt = tmp_path / "cut" / "resume.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 8  # not 6: written on SIGTERM
    assert_bitwise_equal(full, _fit(tmp_path / "resumed", "cnn_pixel_mask", ckpt=ckpt))


# --------------------------------------------------------------------------- killed `masksub fit` processes
STEPS_PER_EPOCH = 6


def _config(tmp_path: Path, family: str) -> Path:
    spec = FAMILIES[family]
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 3,
            "limit_train_batches": STEPS_PER_EPOCH,
            "limit_val_batches": 3,
            "deterministic": True,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [
                {"class_path": "test_resume.FinalWeights"},
                {"class_path": "lightning.pytorch.callbacks.EMAWeightAveraging", "init_args": {"decay": 0.9}},
                {
                    "class_path": "masksub_lightning.callbacks.ResumeCheckpoint",
                    "init_args": {"every_n_train_steps": 2},
                },
                {"class_path": "test_resume.KillAt"},
            ],
        },
        "model": {
            "class_path": "masksub_lightning.MaskSubModule",
            "init_args": {**spec, "lr": 2e-3, "warmup_epochs": 0.5},
        },
        "data": {"class_path": "masksub_lightning.data.DigitsDataModule", "init_args": DATA},
    }
    path = tmp_path / f"{family}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _masksub_fit(config: Path, root: Path, weights: Path, kill: str = "", ckpt: Path | None = None):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "MASKSUB_TEST_KILL": kill,
        "MASKSUB_TEST_WEIGHTS": str(weights),
    }
    cmd = [sys.executable, "-m", "masksub_lightning", "fit", "--config", str(config)]
    cmd += ["--trainer.default_root_dir", str(root)]
    if ckpt is not None:
        cmd += ["--ckpt_path", str(ckpt)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


# (kill point, global step of the resume.ckpt left behind). 6 steps per epoch, resume.ckpt every 2 steps.
KILL_POINTS = [
    ("before_step:3", 2),  # first epoch, inside step 4 (after both backward passes, before the update)
    ("batch_start:9", 8),  # second epoch, batch 4 fetched and mixed, not yet trained on
    ("val:12:1", 12),  # second epoch's validation, batch 2 (resume.ckpt from the epoch's last step)
]


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sigkilled_cli_run_resumes_bitwise_exact(tmp_path, family):
    config = _config(tmp_path, family)
    done = _masksub_fit(config, tmp_path / "full", tmp_path / "full.pt")
    assert done.returncode == 0, done.stderr[-3000:]
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    for kill, step in KILL_POINTS:
        root = tmp_path / kill.replace(":", "_")
        killed = _masksub_fit(config, root, tmp_path / "never.pt", kill=kill)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        ckpt = root / "checkpoints" / "resume.ckpt"
        assert torch.load(ckpt, weights_only=True)["global_step"] == step
        out = tmp_path / f"{root.name}.pt"
        resumed = _masksub_fit(config, root, out, ckpt=ckpt)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert_bitwise_equal(full, torch.load(out, weights_only=True))
    assert not (tmp_path / "never.pt").exists()


# ------------------------------------------------------------------------------------------ two DDP ranks
class _StopAfter(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        trainer.should_stop = trainer.should_stop or trainer.global_step == self.step


def _ddp_fit(root: Path, stop: int | None = None, ckpt: Path | None = None) -> list[dict]:
    """Run :func:`_ddp_fit_here` in a fresh interpreter: forking DDP workers from a process that has already run
    autograd (any earlier test) fails ("Unable to handle autograd's threading in combination with fork")."""
    call = f"_ddp_fit_here({str(root)!r}, {stop!r}, {str(ckpt) if ckpt else None!r})"
    code = (
        f"import sys; sys.path.insert(0, {str(TESTS_DIR)!r}); from test_resume import _ddp_fit_here; {call}"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600)
    return [torch.load(Path(root) / f"weights_rank{r}.pt", weights_only=True) for r in (0, 1)]


def _ddp_fit_here(root: str, stop: int | None = None, ckpt: str | None = None) -> None:
    from lightning.pytorch.strategies import DDPStrategy

    root = Path(root)

    L.seed_everything(0, verbose=False)
    module = MaskSubModule(**FAMILIES["vit_token_mask"], num_classes=10, lr=2e-3, warmup_epochs=0.5)
    data = DigitsDataModule(**DATA)
    callbacks = [
        FinalWeights(str(root / "weights_rank{rank}.pt")),
        EMAWeightAveraging(decay=0.9),
        ResumeCheckpoint(every_n_train_steps=3, dirpath=str(root)),
        *([_StopAfter(stop)] if stop else []),
    ]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(start_method="fork", process_group_backend="gloo"),  # spawn cannot pickle EMA
        max_epochs=2,
        limit_train_batches=5,
        limit_val_batches=2,
        deterministic=True,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt)


@pytest.mark.slow
def test_two_rank_ddp_resume_restores_each_ranks_streams(tmp_path):
    full = _ddp_fit(tmp_path / "full")
    _ddp_fit(tmp_path / "cut", stop=7)  # resume.ckpt from step 6, mid-epoch 2
    saved = torch.load(tmp_path / "cut" / "resume.ckpt", weights_only=True)
    assert saved["global_step"] == 6
    states = saved[RNG_KEY]
    assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])  # ranks draw apart
    resumed = _ddp_fit(tmp_path / "resumed", ckpt=tmp_path / "cut" / "resume.ckpt")
    for rank in (0, 1):
        assert_bitwise_equal(full[rank], resumed[rank])
