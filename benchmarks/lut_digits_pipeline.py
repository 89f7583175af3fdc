"""End to end on CPU, real data: LUT pre-training -> encoder export -> MaskSub fine-tuning, against scratch.

Data: scikit-learn's digits (1,797 real 8x8 images, upsampled to 32 px; DigitsDataModule's stratified split).
Model: a small ViT (patch 4 -> 64 tokens, width 64, 4 blocks). Per seed:

1. LUT pre-training (``LUTModule`` on ``PretrainDigitsDataModule(views="lut")``, labels unused), logging the
   per-epoch mean of the reconstruction and broader-context losses;
2. export of the encoder in the released-MAE layout (``encoder.pth``, written at fit end);
3. MaskSub fine-tuning (``MaskSubModule(sub_branch="mask", pretrained_weights=encoder.pth)``) and, with the same
   budget and seed, the same fine-tuning from a random initialisation; validation top-1 of both.

    python benchmarks/lut_digits_pipeline.py                 # 3 seeds, ~10 min on one CPU core
    python benchmarks/lut_digits_pipeline.py --seeds 0 --pretrain-epochs 4 --finetune-epochs 2   # quick

Prints a JSON line at the end (``"benchmark": "lut_digits_pipeline"``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from masksub_lightning.data import DigitsDataModule, PretrainDigitsDataModule
from masksub_lightning.modules.masksub import MaskSubModule
from masksub_lightning.modules.pretraining import LUTModule

VIT = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0)


class EpochLosses(Callback):
    """Per-epoch means of the logged training losses."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self.keys, self.history = keys, []

    def on_train_epoch_end(self, trainer, module) -> None:
        metrics = trainer.callback_metrics
        self.history.append({k: round(float(metrics[f"{k}_epoch"]), 4) for k in self.keys})


def trainer(root: Path, epochs: int, callbacks=()) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=list(callbacks),
    )


def pretrain(root: Path, seed: int, epochs: int) -> tuple[Path, list[dict]]:
    L.seed_everything(seed, verbose=False)
    module = LUTModule(
        model="vit_small_patch16_224",
        model_kwargs=VIT,
        decoder_dim=64,
        decoder_depth=2,
        decoder_num_heads=4,
        proj_hidden_dim=256,
        bc_weight=1.0,  # the paper's ViT-S weight
        momentum=0.99,
        lr=1.5e-3,
        lr_base_batch_size=None,
        warmup_epochs=2,
    )
    data = PretrainDigitsDataModule(batch_size=64, img_size=32, views="lut", seed=seed)
    losses = EpochLosses(("train_loss_mae", "train_loss_bc"))
    t = trainer(root, epochs, [losses])
    t.fit(module, datamodule=data)
    return root / "encoder.pth", losses.history


def finetune(root: Path, seed: int, epochs: int, weights: Path | None, lr: float = 1e-3) -> float:
    L.seed_everything(seed, verbose=False)
    module = MaskSubModule(
        model="vit_small_patch16_224",
        num_classes=10,
        model_kwargs={**VIT, "global_pool": "avg", "drop_path_rate": 0.1},
        head_init_std=2e-5,
        pretrained_weights=None if weights is None else str(weights),
        sub_branch="mask",
        sub_ratio=0.5,
        lr=lr,
        layer_decay=0.75,
        warmup_epochs=1,
        weight_decay=0.05,
    )
    data = DigitsDataModule(batch_size=64, img_size=32, seed=seed)
    t = trainer(root, epochs)
    t.fit(module, datamodule=data)
    return float(t.callback_metrics["val_acc1"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--keep", type=Path, default=None, help="keep each seed's encoder.pth here and reuse it when present"
    )
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    start = time.perf_counter()
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            kept = args.keep / f"seed{seed}_{args.pretrain_epochs}ep" if args.keep else None
            if kept is not None and (kept / "encoder.pth").is_file():
                encoder, history = kept / "encoder.pth", json.loads((kept / "history.json").read_text())
            else:
                encoder, history = pretrain(kept or root / "pretrain", seed, args.pretrain_epochs)
                if kept is not None:
                    (kept / "history.json").write_text(json.dumps(history))
            from_lut = finetune(root / "ft_lut", seed, args.finetune_epochs, encoder, args.finetune_lr)
            scratch = finetune(root / "ft_scratch", seed, args.finetune_epochs, None, args.finetune_lr)
        row = {"seed": seed, "pretrain_first": history[0], "pretrain_last": history[-1]}
        row.update(finetune_from_lut=round(from_lut, 4), finetune_from_scratch=round(scratch, 4))
        rows.append(row)
        print(json.dumps(row), flush=True)
    lut = [r["finetune_from_lut"] for r in rows]
    scratch = [r["finetune_from_scratch"] for r in rows]
    print(
        json.dumps(
            {
                "benchmark": "lut_digits_pipeline",
                "device": "cpu",
                "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "rows": rows,
                "mean_from_lut": round(sum(lut) / len(lut), 4),
                "mean_from_scratch": round(sum(scratch) / len(scratch), 4),
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
