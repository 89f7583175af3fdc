"""Cost of a LUT pre-training step relative to an MAE step: measured time ratio next to the FLOP ratio.

The LUT paper reports 0.46 s vs 0.39 s per iteration (+18%, ViT-B, 8 V100). A LUT step adds to MAE's (one masked
encoder pass + decoder) a second masked student pass (the context view's visible 25%), projector / predictor heads,
two unmasked no-grad teacher passes and the EMA update; the FLOP ratio says what that costs in arithmetic.

    python benchmarks/lut_step_cost.py                       # ViT-S/16 at 224 px, batch 8, CPU
    python benchmarks/lut_step_cost.py --model vit_base_patch16_224 --batch 4
    python benchmarks/lut_step_cost.py --model vit_base_patch16_224 --batch 2 --flops-only   # FLOP ratio only
    python benchmarks/lut_step_cost.py --smoke               # tiny model, seconds (what a test would run)

Each round times one MAE step and one LUT step back to back (order alternating), after warmup steps; the ratio
is the median over rounds. FLOPs: torch's FlopCounterMode over one whole step (forward, backward, optimizer
excluded). Prints a JSON line at the end (``"benchmark": "lut_step_cost"``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from masksub_lightning.modules.pretraining import LUTModule, MAEModule

PAPER_RATIO = 0.46 / 0.39


def build(kind: str, args: argparse.Namespace, kwargs: dict) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    cls = LUTModule if kind == "lut" else MAEModule
    extra = {"proj_hidden_dim": args.proj_hidden} if kind == "lut" else {}
    module = cls(model=args.model, model_kwargs=kwargs, **args.decoder, **extra).train()
    params = [p for p in module.parameters() if p.requires_grad]
    return module, torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95))


def step(module, opt, batch: torch.Tensor) -> None:
    loss = module.compute_losses(batch)["loss"]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if isinstance(module, LUTModule):
        module.update_teacher(0.996)


def flops(module, batch: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        module.compute_losses(batch)["loss"].backward()
    module.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--proj-hidden", type=int, default=4096)
    parser.add_argument("--smoke", action="store_true", help="tiny model, 2 rounds")
    parser.add_argument(
        "--flops-only", action="store_true", help="count FLOPs, time nothing (large models on CPU)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kwargs = {"img_size": args.img_size}
    args.decoder = dict(decoder_dim=512, decoder_depth=8, decoder_num_heads=16)  # MAE's
    if args.smoke:
        kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
        args.decoder = dict(decoder_dim=16, decoder_depth=1, decoder_num_heads=2)
        args.proj_hidden, args.rounds, args.warmup, args.img_size = 64, 2, 1, 32
    torch.manual_seed(0)
    two_views = torch.randn(args.batch, 2, 3, args.img_size, args.img_size)
    mae, mae_opt = build("mae", args, kwargs)
    lut, lut_opt = build("lut", args, kwargs)
    flop_ratio = flops(lut, two_views) / flops(mae, two_views[:, 0])
    if args.flops_only:
        print(
            json.dumps(
                {"benchmark": "lut_step_cost", "model": args.model, "flop_ratio": round(flop_ratio, 3)}
            )
        )
        return

    def timed(module, opt, batch) -> float:
        start = time.perf_counter()
        step(module, opt, batch)
        return time.perf_counter() - start

    for _ in range(args.warmup):
        timed(mae, mae_opt, two_views[:, 0])
        timed(lut, lut_opt, two_views)
    mae_t, lut_t = [], []
    for r in range(args.rounds):
        order = [("mae", mae, mae_opt, two_views[:, 0]), ("lut", lut, lut_opt, two_views)]
        for name, module, opt, batch in order if r % 2 == 0 else order[::-1]:
            (mae_t if name == "mae" else lut_t).append(timed(module, opt, batch))
    ratios = [b / a for a, b in zip(mae_t, lut_t)]
    print(
        json.dumps(
            {
                "benchmark": "lut_step_cost",
                "device": "cpu",
                "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                "torch": torch.__version__,
                "model": args.model,
                "img_size": args.img_size,
                "batch": args.batch,
                "mae_step_s": round(statistics.median(mae_t), 4),
                "lut_step_s": round(statistics.median(lut_t), 4),
                "time_ratio": round(statistics.median(ratios), 3),
                "flop_ratio": round(flop_ratio, 3),
                "paper_time_ratio": round(PAPER_RATIO, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
