"""Pre-training evaluation on CPU, real data: MAE vs LUT encoders by k-NN top-1 and linear-probe top-1.

Data: scikit-learn's digits (1,797 real 8x8 images upsampled to 32 px, DigitsDataModule's stratified split);
model: the small ViT of lut_digits_pipeline.py (patch 4 -> 64 tokens, width 64, 4 blocks). Per seed and method:

1. pre-training (``MAEModule`` on ``views="mae"``, ``LUTModule`` on ``views="lut"``; labels unused), with the
   ``KNNMonitor`` callback on the labelled digits (bank: the train split, queries: the val split, both at the
   eval transform; k=20, T=0.07, class-token features, or with --pool avg the mean patch token) after the last
   epoch;
2. the encoder exported at fit end (``encoder.pth``, released-MAE layout);
3. a linear probe (``MaskSubModule(linear_probe=True)``: BatchNorm1d(affine=False) + linear head on the frozen
   encoder's class token, LARS, weight decay 0, cosine with warmup) from that file; its validation top-1.

MAE and LUT of a seed start from the same seed and run the same epochs, side by side; "untrained" is the same ViT
at its initialisation (MAE's), probed and k-NN-evaluated the same way: the floor both should beat.

    python benchmarks/pretrain_eval.py                      # 3 seeds
    python benchmarks/pretrain_eval.py --smoke              # a tiny run that checks the script

Prints one JSON line per (seed, method), a table of mean +- std, and a final JSON line
(``"benchmark": "pretrain_eval"``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import _common
import lightning as L
import torch
from lut_digits_pipeline import VIT, trainer

from masksub_lightning.callbacks import KNNMonitor
from masksub_lightning.data import DigitsDataModule, PretrainDigitsDataModule
from masksub_lightning.modules.masksub import MaskSubModule
from masksub_lightning.modules.pretraining import LUTModule, MAEModule

METHODS = ("untrained", "mae", "lut")  # untrained: the same ViT at its initialisation, the floor
SMOKE_VIT = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0)


def pretrain(method: str, root: Path, seed: int, args) -> tuple[Path, float]:
    """Pre-train one encoder; returns (encoder.pth, k-NN top-1 after the last epoch)."""
    L.seed_everything(seed, verbose=False)
    common = dict(
        model="vit_small_patch16_224",
        model_kwargs=args.vit,
        decoder_dim=64,
        decoder_depth=2,
        decoder_num_heads=4,
        lr=1.5e-3,
        lr_base_batch_size=None,
        warmup_epochs=min(2, args.pretrain_epochs - 1),
    )
    if method == "lut":  # the ViT-S context weight, as lut_digits_pipeline.py
        module = LUTModule(proj_hidden_dim=256, bc_weight=1.0, momentum=0.99, **common)
    else:
        module = MAEModule(**common)
    img = args.vit["img_size"]
    data = PretrainDigitsDataModule(batch_size=64, img_size=img, views=method, seed=seed)
    monitor = knn_monitor(seed, args)
    trainer(root, args.pretrain_epochs, [monitor]).fit(module, datamodule=data)
    return root / "encoder.pth", monitor.history[-1][1]


def untrained(root: Path, seed: int, args) -> tuple[Path, float]:
    """The reference without pre-training: a freshly initialised encoder (MAE's initialisation), its k-NN top-1."""
    L.seed_everything(seed, verbose=False)
    module = MAEModule(model="vit_small_patch16_224", model_kwargs=args.vit, export_on_fit_end=False)
    fit = trainer(root, 1)
    fit.strategy.connect(module)
    monitor = knn_monitor(seed, args)
    monitor.setup(fit, module, "fit")
    return module.export_encoder(root / "encoder.pth"), monitor.evaluate(fit, module)


def knn_monitor(seed: int, args) -> KNNMonitor:
    labelled = DigitsDataModule(batch_size=64, img_size=args.vit["img_size"], seed=seed)
    return KNNMonitor(
        labelled,
        pool=args.pool,
        every_n_epochs=args.pretrain_epochs,
        k=args.k,
        max_train_samples=args.max_train_samples,
        max_val_samples=args.max_val_samples,
    )


def linear_probe(root: Path, seed: int, encoder: Path, args) -> float:
    L.seed_everything(seed, verbose=False)
    module = MaskSubModule(
        model="vit_small_patch16_224",
        num_classes=10,
        # token: the class token after the final norm (MAE's probe); avg: timm's mean patch token + a fresh
        # fc_norm (MAE's --global_pool probe; the loader drops the encoder's norm, as for fine-tuning)
        model_kwargs={**args.vit, "global_pool": args.pool},
        linear_probe=True,
        sub_branch="none",
        pretrained_weights=str(encoder),
        head_init_std=0.01,
        optimizer="lars",
        lr=args.probe_lr,
        lr_base_batch_size=256,
        weight_decay=0.0,
        warmup_epochs=args.probe_warmup,
        warmup_lr=0.0,
        min_lr=0.0,
    )
    # Digits' training augmentation is a shift of up to one original pixel (no crop of an 8x8 image).
    data = DigitsDataModule(batch_size=64, img_size=args.vit["img_size"], seed=seed)
    fit = trainer(root, args.probe_epochs)
    fit.fit(module, datamodule=data)
    return float(fit.callback_metrics["val_acc1"])


def summary(values: list[float]) -> dict[str, float]:
    return {
        "mean": round(statistics.mean(values), 4),
        "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pretrain-epochs", type=int, default=10)
    parser.add_argument("--probe-epochs", type=int, default=10)
    parser.add_argument("--probe-warmup", type=float, default=1.0)
    # MAE's base lr 0.1 drives ~7,000 LARS steps of batch 16384; these ~220 steps of 64 need a larger one (a LARS
    # step changes a weight matrix by about lr x 0.001 of its norm): 400 x 64 / 256 = 100 (chosen on a random
    # encoder: 0.1 -> 5%, 10 -> 48%, 100 -> 65%, 400 -> 82% val top-1, 1600 -> 82%).
    parser.add_argument("--probe-lr", type=float, default=400.0, help="LARS base lr (x batch 64 / 256)")
    parser.add_argument(
        "--pool",
        choices=["token", "avg"],
        default="token",
        help="features: the class token (MAE's probe) or the mean patch token (what LUT's context loss trains)",
    )
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--max-train-samples", type=int, default=10000)
    parser.add_argument("--max-val-samples", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="one seed, a tiny ViT, 2 + 1 epochs")
    args = parser.parse_args()
    args.vit = VIT
    if args.smoke:
        args.seeds, args.pretrain_epochs, args.probe_epochs, args.probe_warmup = [0], 2, 1, 0.0
        args.vit, args.max_train_samples, args.max_val_samples = SMOKE_VIT, 200, 50
    _common.quiet()
    torch.set_num_threads(args.threads)
    rows, start = [], time.perf_counter()
    for seed in args.seeds:
        for method in METHODS:
            with tempfile.TemporaryDirectory() as tmp:
                encode = untrained if method == "untrained" else partial(pretrain, method)
                encoder, knn = encode(Path(tmp) / "pretrain", seed, args)
                probe = linear_probe(Path(tmp) / "probe", seed, encoder, args)
            rows.append(
                {"seed": seed, "method": method, "knn_top1": round(knn, 4), "probe_top1": round(probe, 4)}
            )
            print(json.dumps(rows[-1]), flush=True)
    results = {
        method: {
            metric: summary([r[metric] for r in rows if r["method"] == method])
            for metric in ("knn_top1", "probe_top1")
        }
        for method in METHODS
    }
    table = [
        {"method": m, **{f"{k}_{s}": v[k][s] for k in v for s in ("mean", "std")}} for m, v in results.items()
    ]
    columns = [
        ("method", "method", "s"),
        ("knn_top1_mean", "k-NN top-1", ".4f"),
        ("knn_top1_std", "+-", ".4f"),
        ("probe_top1_mean", "linear probe top-1", ".4f"),
        ("probe_top1_std", "+-", ".4f"),
    ]
    _common.print_table(f"digits val top-1 over seeds {args.seeds}", table, columns)
    _common.emit_json(
        {
            "benchmark": "pretrain_eval",
            "environment": _common.environment(torch.device("cpu")),
            "args": {k: v for k, v in vars(args).items() if k != "vit"},
            "vit": args.vit,
            "rows": rows,
            "results": results,
            "seconds": round(time.perf_counter() - start, 1),
        }
    )


if __name__ == "__main__":
    main()
