"""Fault injection: SIGKILL a digits `masksub fit` at random points, resume it, compare with an uninterrupted run.

Each trial kills a real ``masksub fit`` process at a seeded random point (before a batch, inside an optimizer step
after both backward passes, after a step, or in the middle of a validation run), resumes it with
``--ckpt_path <checkpoints>/resume.ckpt`` (from scratch when it died before the first save) and compares the final
raw and EMA weights with those of one uninterrupted run, bit for bit (``torch.equal`` on every state-dict tensor).

Setup: tiny ViT (token masking) or tiny ResNet (pixel masking) on scikit-learn's digits at 16 px, Mixup + CutMix,
repeated augmentation 3, random shifts, EMA, ``trainer.deterministic: true``, ``ResumeCheckpoint`` every 2 steps,
3 epochs of 6 steps, CPU.

    python benchmarks/fault_injection.py                      # 20 points, seed 0, ViT token masking
    python benchmarks/fault_injection.py --points 5 --family cnn_pixel_mask --seed 1

Prints one line per trial and ``N/<points> bitwise equal``; exits 1 if any trial differs or fails.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import EMAWeightAveraging

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

FAMILIES = {
    "vit_token_mask": dict(
        model="vit_tiny_patch16_224",
        model_kwargs=dict(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0),
        sub_branch="token_mask",
    ),
    "cnn_pixel_mask": dict(
        model="resnet18",
        model_kwargs=dict(layers=(1, 1, 1, 1), channels=(8, 8, 16, 16), stem_width=8),
        sub_branch="pixel_mask",
        sub_branch_kwargs={"cell_size": 8},
    ),
}


class KillAt(L.Callback):
    """SIGKILL this process at the point named by ``$FAULT_INJECTION_KILL`` (see :func:`kill_points`)."""

    def __init__(self) -> None:
        self.spec = os.environ.get("FAULT_INJECTION_KILL", "")

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


class SaveWeights(L.Callback):
    """At the end of fit, before EMAWeightAveraging copies the average in: raw + EMA weights to a file."""

    def on_train_end(self, trainer, pl_module):
        out = {"raw": {k: v.detach().clone() for k, v in pl_module.state_dict().items()}}
        for cb in trainer.callbacks:
            if isinstance(cb, EMAWeightAveraging) and cb._average_model is not None:
                out["ema"] = {k: v.detach().clone() for k, v in cb._average_model.module.state_dict().items()}
        torch.save(out, os.environ["FAULT_INJECTION_WEIGHTS"])


def kill_points(epochs: int, steps: int, val_batches: int) -> list[str]:
    """Every point KillAt can stop at: 3 per optimizer step plus each batch of each validation run."""
    total = epochs * steps
    points = [f"{hook}:{s}" for s in range(total) for hook in ("batch_start", "before_step")]
    points += [f"batch_end:{s}" for s in range(1, total + 1)]
    points += [f"val:{e * steps}:{b}" for e in range(1, epochs + 1) for b in range(val_batches)]
    return points


def write_config(path: Path, family: str, epochs: int, steps: int, val_batches: int, every: int) -> None:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": epochs,
            "limit_train_batches": steps,
            "limit_val_batches": val_batches,
            "deterministic": True,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [
                {"class_path": "fault_injection.SaveWeights"},
                {"class_path": "lightning.pytorch.callbacks.EMAWeightAveraging", "init_args": {"decay": 0.9}},
                {
                    "class_path": "masksub_lightning.callbacks.ResumeCheckpoint",
                    "init_args": {"every_n_train_steps": every},
                },
                {"class_path": "fault_injection.KillAt"},
            ],
        },
        "model": {
            "class_path": "masksub_lightning.MaskSubModule",
            "init_args": {**FAMILIES[family], "lr": 2e-3, "warmup_epochs": 0.5},
        },
        "data": {
            "class_path": "masksub_lightning.data.DigitsDataModule",
            "init_args": dict(
                batch_size=16,
                img_size=16,
                train_augment=True,
                mixup_alpha=0.8,
                cutmix_alpha=1.0,
                repeated_aug=3,
            ),
        },
    }
    path.write_text(yaml.safe_dump(config))


def masksub_fit(config: Path, root: Path, weights: Path, kill: str = "", ckpt: Path | None = None):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "FAULT_INJECTION_KILL": kill,
        "FAULT_INJECTION_WEIGHTS": str(weights),
    }
    cmd = [sys.executable, "-m", "masksub_lightning", "fit", "--config", str(config)]
    cmd += ["--trainer.default_root_dir", str(root)]
    if ckpt is not None:
        cmd += ["--ckpt_path", str(ckpt)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)


def bitwise_equal(a: dict, b: dict) -> list[str]:
    """Names of the tensors that differ (empty: equal); a missing or extra tensor counts as differing."""
    differ = sorted(set(a) ^ set(b))
    for kind in set(a) & set(b):
        differ += [
            f"{kind}/{k}" for k in a[kind] if k not in b[kind] or not torch.equal(a[kind][k], b[kind][k])
        ]
        differ += [f"{kind}/{k}" for k in b[kind] if k not in a[kind]]
    return differ


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=20, help="kill-and-resume trials")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random kill points")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="vit_token_mask")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per epoch")
    parser.add_argument("--val-batches", type=int, default=3)
    parser.add_argument("--every", type=int, default=2, help="ResumeCheckpoint every_n_train_steps")
    parser.add_argument("--workdir", default=None, help="where runs go (default: a temporary directory)")
    args = parser.parse_args(argv)

    start = time.monotonic()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fault_injection_"))
    work.mkdir(parents=True, exist_ok=True)
    config = work / "config.yaml"
    write_config(config, args.family, args.epochs, args.steps, args.val_batches, args.every)

    done = masksub_fit(config, work / "uninterrupted", work / "uninterrupted.pt")
    if done.returncode != 0:
        print(done.stderr[-4000:], file=sys.stderr)
        raise SystemExit("the uninterrupted run failed")
    reference = torch.load(work / "uninterrupted.pt", weights_only=True)

    points = random.Random(args.seed).sample(
        kill_points(args.epochs, args.steps, args.val_batches), args.points
    )
    equal = 0
    for i, point in enumerate(points):
        t0 = time.monotonic()
        root = work / f"trial{i:02d}"
        killed = masksub_fit(config, root, work / f"trial{i:02d}_unexpected.pt", kill=point)
        if killed.returncode != -signal.SIGKILL:
            print(f"{i:2d} {point:16s} not killed (exit {killed.returncode}): {killed.stderr[-500:]}")
            continue
        ckpt = root / "checkpoints" / "resume.ckpt"
        step = torch.load(ckpt, weights_only=True)["global_step"] if ckpt.exists() else None
        out = work / f"trial{i:02d}.pt"
        resumed = masksub_fit(config, root, out, ckpt=ckpt if step is not None else None)
        if resumed.returncode != 0:
            print(f"{i:2d} {point:16s} resume failed (exit {resumed.returncode}): {resumed.stderr[-1500:]}")
            continue
        differ = bitwise_equal(reference, torch.load(out, weights_only=True))
        equal += not differ
        origin = f"resumed from step {step}" if step is not None else "restarted (no checkpoint yet)"
        verdict = "bitwise equal" if not differ else f"DIFFERS in {len(differ)} tensors, e.g. {differ[:3]}"
        print(f"{i:2d} {point:16s} {origin:30s} {verdict}  ({time.monotonic() - t0:.0f} s)", flush=True)

    wall = time.monotonic() - start
    print(
        f"{equal}/{args.points} bitwise equal to the uninterrupted run ({args.family}, seed {args.seed}, {wall:.0f} s)"
    )
    return 0 if equal == args.points else 1


if __name__ == "__main__":
    raise SystemExit(main())
