"""Coverage of timm families: what ``sub_branch: mask`` resolves to, which kinds can serve the model, whether one
MaskSub step applies the paper's gradient, and the measured step cost next to the FLOP ratio.

Per family, a tiny instance (shrunken depth and width, a small input where the family allows; no pretrained
weights, no downloads) and four measurements:

* ``mask`` resolves to: ``build_sub_branch("mask", model=...)``, read from the registry (nothing hard-coded here);
* other kinds: every registered kind besides ``mask``, ``none`` and the resolved one whose ``unsupported_reason`` is
  None (``subbranch._kinds_that_can_handle``);
* gradient = formula: one ``MaskSubModule`` training step (SGD, no weight decay) in a Trainer; the gradient the
  optimizer applied is compared with the gradient of ``(L_main + L_sub) / 2`` computed in one backward pass by an
  independent forward of the sub-branch: the zeroed image for ``pixel_mask``, a re-implementation of the kept-token
  forward for ``token_mask`` on timm's ViT and EVA classes (EVA: the rotary embedding gathered at the kept tokens
  too). A kind or class with no independent forward here says "n/a". The check builds the model with
  ``drop_path_rate=0`` (a random drop-path draw cannot be replayed by the reference);
* FLOP ratio and step-time ratio: ``step_cost.measure`` (FLOPs with ``FlopCounterMode``; paired MaskSub / baseline
  steps in one fit, median of the paired ratios, quartiles in brackets), few steps per family.

    python benchmarks/coverage_table.py                         # every family, a few minutes on a CPU
    python benchmarks/coverage_table.py --write docs/method.md  # also replace the table between the markers
    python benchmarks/coverage_table.py --smoke                 # two families, fewer steps
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common as C
import lightning as L
import step_cost
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from masksub_lightning.method.subbranch import (
    MODEL_DEPENDENT_KINDS,
    SUB_BRANCHES,
    _kinds_that_can_handle,
    build_sub_branch,
)
from masksub_lightning.modules.masksub import MaskSubModule

START, END = "<!-- coverage-table:start -->", "<!-- coverage-table:end -->"
NUM_CLASSES = 4
TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


@dataclass(frozen=True)
class Family:
    label: str
    names: str  # the timm names the row stands for
    model: str  # the timm entry point of the tiny instance
    kwargs: dict[str, Any] = field(default_factory=dict)
    img_size: int = 64


FAMILIES = [
    Family("ViT", "`vit_*`", "vit_small_patch16_224", TINY_VIT, 32),
    Family("DeiT-III", "`deit3_*`", "deit3_small_patch16_224", TINY_VIT, 32),
    Family(
        "EVA-02",
        "`eva02_*`",
        "eva02_tiny_patch14_224",
        dict(img_size=28, embed_dim=32, depth=2, num_heads=2),
        28,
    ),
    Family("BEiT", "`beit_*`", "beit_base_patch16_224", TINY_VIT, 32),
    Family("BEiT v2", "`beitv2_*`", "beitv2_base_patch16_224", TINY_VIT, 32),
    Family(
        "Swin",
        "`swin_*`",
        "swin_tiny_patch4_window7_224",
        dict(img_size=64, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4),
    ),
    Family(
        "Swin v2",
        "`swinv2_*`",
        "swinv2_tiny_window8_256",
        dict(img_size=64, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4),
    ),
    Family("ConvNeXt", "`convnext_*`", "convnext_atto", dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))),
    Family(
        "ResNet", "`resnet*`", "resnet18", dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 32), stem_width=8)
    ),
    Family("EfficientNet", "`efficientnet_*`", "efficientnet_b0"),
    Family("RegNet", "`regnet*`", "regnetx_002"),
    Family(
        "Hiera",
        "`hiera_*`",
        "hiera_tiny_224",
        dict(img_size=64, embed_dim=16, num_heads=1, stages=(1, 1, 1, 1)),
    ),
    Family(
        "MaxViT",
        "`maxvit_*`",
        "maxvit_nano_rw_256",
        dict(img_size=64, embed_dim=(32, 32, 64, 64), depths=(1, 1, 1, 1), stem_width=16),
    ),
    Family("FastViT", "`fastvit_*`", "fastvit_t8", dict(layers=(1, 1, 1, 1), embed_dims=(16, 32, 64, 128))),
    Family("MobileNetV3", "`mobilenetv3_*`", "mobilenetv3_small_050"),
    Family("MobileNetV4", "`mobilenetv4_*`", "mobilenetv4_conv_small_050"),
    Family(
        "LeViT",
        "`levit_*`",
        "levit_128s",
        dict(img_size=64, embed_dim=(32, 48, 64), num_heads=(2, 3, 4), depth=(1, 1, 1), key_dim=8),
    ),
]
SMOKE_FAMILIES = ("ViT", "ResNet")


def build_model(family: Family) -> nn.Module:
    return timm.create_model(family.model, num_classes=NUM_CLASSES, **family.kwargs)


def is_package_kind(name: str) -> bool:
    """A kind this package ships (not one a user or a test module registered): the table lists only these."""
    return name in MODEL_DEPENDENT_KINDS or SUB_BRANCHES[name].__module__.startswith("masksub_lightning.")


def kinds_of(model: nn.Module) -> tuple[str, list[str]]:
    """(what ``mask`` resolves to, the other kinds that can handle ``model``): the deterministic columns."""
    resolved = build_sub_branch("mask", 0.5, model=model).name
    able = [k for k in _kinds_that_can_handle(model) if is_package_kind(k)]
    return resolved, [k for k in able if k not in ("mask", "none", resolved)]


# ------------------------------------------------------------------------------------------ gradient reference
class AppliedGradient(L.Callback):
    """The gradient the optimizer applies at the first step (read by a step post-hook, before the update)."""

    def __init__(self) -> None:
        self.grads: dict[str, Tensor] | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        def record(optimizer, args, kwargs) -> None:
            if self.grads is None:
                self.grads = {n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters()}

        self._handle = trainer.optimizers[0].register_step_post_hook(record)

    def on_train_end(self, trainer, pl_module) -> None:
        self._handle.remove()


def _kept(tokens: Tensor, keep: Tensor) -> Tensor:
    return torch.gather(tokens, 1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def vit_kept_tokens_forward(model: nn.Module, images: Tensor, keep: Tensor) -> Tensor:
    """timm VisionTransformer on the prefix tokens plus the kept patch tokens, written out here."""
    tokens = model._pos_embed(model.patch_embed(images))
    p = model.num_prefix_tokens
    x = torch.cat([tokens[:, :p], _kept(tokens[:, p:], keep)], dim=1)
    return model.forward_head(model.norm(model.blocks(model.norm_pre(x))))


def eva_kept_tokens_forward(model: nn.Module, images: Tensor, keep: Tensor) -> Tensor:
    """timm Eva on the kept tokens, with the rotary embedding gathered at the same tokens (per sample)."""
    tokens, rope = model._pos_embed(
        model.patch_embed(images)
    )  # the switch is off: every token, the full rope
    p = model.num_prefix_tokens
    x = model.norm_pre(torch.cat([tokens[:, :p], _kept(tokens[:, p:], keep)], dim=1))
    rope = rope[keep].unsqueeze(1) if rope is not None else None  # (B, 1, kept, dim): broadcast over heads
    for block in model.blocks:
        x = block(x, rope=rope)
    return model.forward_head(model.norm(x))


def _beit_full_bias(owner: nn.Module) -> Tensor:
    """(heads, T, T) relative position bias of a BEiT attention or shared ``rel_pos_bias``, looked up here."""
    table, index = owner.relative_position_bias_table, owner.relative_position_index
    return table[index].permute(2, 0, 1)


def _beit_attention(attn: nn.Module, x: Tensor, bias: Tensor) -> Tensor:
    """timm BEiT attention written out (q / v biases, no k bias), with ``bias`` (B, heads, T, T) added."""
    batch, tokens, dim = x.shape
    qkv_bias = (
        torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
        if attn.q_bias is not None
        else None
    )
    q, k, v = (
        F.linear(x, attn.qkv.weight, qkv_bias)
        .reshape(batch, tokens, 3, attn.num_heads, -1)
        .permute(2, 0, 3, 1, 4)
    )
    weights = ((q * attn.scale) @ k.transpose(-2, -1) + bias).softmax(-1)
    return attn.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, dim))


def beit_kept_tokens_forward(model: nn.Module, images: Tensor, keep: Tensor) -> Tensor:
    """timm Beit on the class token plus the kept patch tokens, every block's bias gathered at those tokens."""
    x = model.patch_embed(images)
    x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
    x = x + model.pos_embed if model.pos_embed is not None else x
    index = torch.cat([torch.zeros_like(keep[:, :1]), keep + 1], dim=1)  # (B, 1 + K): class token first
    x = _kept(x, index)
    shared = _beit_full_bias(model.rel_pos_bias) if model.rel_pos_bias is not None else 0.0
    for block in model.blocks:
        own = _beit_full_bias(block.attn) if block.attn.relative_position_bias_table is not None else 0.0
        bias = torch.as_tensor(own + shared)
        kept_bias = bias[:, index[:, :, None], index[:, None, :]].transpose(0, 1)  # (B, heads, 1 + K, 1 + K)
        gamma_1 = block.gamma_1 if block.gamma_1 is not None else 1.0
        gamma_2 = block.gamma_2 if block.gamma_2 is not None else 1.0
        x = x + gamma_1 * _beit_attention(block.attn, block.norm1(x), kept_bias)
        x = x + gamma_2 * block.mlp(block.norm2(x))
    return model.forward_head(model.norm(x))


def independent_sub_forward(module: MaskSubModule, images: Tensor) -> Callable[[nn.Module], Tensor] | str:
    """The sub-branch forward of the step just taken, re-implemented; or why there is none ("n/a: ...")."""
    branch, model = module.sub_branch, module.model
    if branch.name == "pixel_mask":
        masked = torch.where(branch.last_mask.unsqueeze(1), torch.zeros_like(images), images)
        return lambda m: m(masked)
    if branch.name in ("token_mask", "beit_token_mask"):
        keep = branch.last_keep_indices
        by_class = {
            "VisionTransformer": vit_kept_tokens_forward,
            "Eva": eva_kept_tokens_forward,
            "Beit": beit_kept_tokens_forward,
        }
        forward = by_class.get(type(model).__name__)
        if forward is not None:
            return lambda m: forward(m, images, keep)
        return f"n/a: no independent token_mask forward for {type(model).__name__}"
    return f"n/a: no independent reference for {branch.name}"


def formula_gradient(model: nn.Module, images: Tensor, labels: Tensor, sub_forward) -> dict[str, Tensor]:
    """Gradient of 0.5 * (CE(o1, y) + soft CE(o2, softmax(o1).detach())) in one backward pass."""
    main = model(images)
    target = main.detach().softmax(-1)
    loss_sub = -(target * sub_forward(model).log_softmax(-1)).sum(-1).mean()
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(0.5 * (F.cross_entropy(main, labels) + loss_sub), list(params.values()))
    return dict(zip(params, grads))


def gradient_check(family: Family, batch_size: int = 4, tol: float = 1e-5) -> str:
    """ "yes (relative error e)", "NO (...)" or "n/a: ..." for one MaskSub step of ``family``'s tiny instance."""
    torch.manual_seed(0)
    images = torch.randn(batch_size, 3, family.img_size, family.img_size)
    labels = torch.arange(batch_size) % NUM_CLASSES
    module = MaskSubModule(
        family.model,
        num_classes=NUM_CLASSES,
        # Drop-path off: the reference cannot replay the step's random drop-path draws (timm's Swin defaults to 0.1).
        model_kwargs={**family.kwargs, "drop_path_rate": 0.0},
        optimizer="sgd",
        lr=0.1,
        weight_decay=0.0,
    )
    before = copy.deepcopy(module.model)
    capture = AppliedGradient()
    trainer = C.make_trainer(torch.device("cpu"), "32-true", 1, [capture])
    trainer.fit(module, DataLoader(TensorDataset(images, labels), batch_size=batch_size))
    sub_forward = independent_sub_forward(module, images)
    if isinstance(sub_forward, str):
        return sub_forward
    reference = formula_gradient(before.train(), images, labels, sub_forward)
    applied = capture.grads
    if applied.keys() != reference.keys():
        return "NO (different parameters)"
    flat = torch.cat([applied[k].flatten() for k in reference])
    ref = torch.cat([reference[k].flatten() for k in reference])
    error = ((flat - ref).norm() / ref.norm()).item()
    if error >= tol:
        return f"NO (relative error {error:.1e})"
    return f"yes (relative error {error:.0e})" if error else "yes (bitwise equal)"


# ------------------------------------------------------------------------------------------------- one family
def step_cost_args(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(
        compile=False,
        channels_last=False,
        sub_ratio=0.5,
        interleave="step",
        rounds=args.rounds,
        warmup=args.warmup,
        steps=args.steps,
        precision="32-true",
    )


def measure_family(family: Family, args: argparse.Namespace) -> dict[str, Any]:
    """Every column of one row; a family timm cannot build (or run) at this size says so in ``error``."""
    row: dict[str, Any] = {"family": family.label, "names": family.names, "model": family.model}
    row["instance"] = f"{family.model} @ {family.img_size} px"
    try:
        model = build_model(family)
        row["parameters"] = sum(p.numel() for p in model.parameters())
        row["resolved"], row["other_kinds"] = kinds_of(model)
        row["gradient"] = gradient_check(family)
        spec = C.ModelSpec(family.model, dict(family.kwargs), family.img_size, NUM_CLASSES, args.batch_size)
        cost = step_cost.measure(spec, step_cost_args(args), torch.device("cpu"))
    except (
        Exception
    ) as error:  # recorded in the table: the honest outcome for a family built oddly at this size
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        return row
    for key in ("flop_ratio", "time_ratio", "time_ratio_q1", "time_ratio_q3", "baseline_step_s"):
        row[key] = cost[key]
    return row


# ---------------------------------------------------------------------------------------------------- markdown
def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| family | timm names | tiny instance | `mask` resolves to | other kinds that can serve it "
        "| one step = formula gradient | FLOP ratio | step-time ratio [q1, q3] |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r and "resolved" not in r:
            cells = [
                r["family"],
                r["names"],
                f"`{r['instance']}`",
                f"not built: {r['error']}",
                "",
                "",
                "",
                "",
            ]
        elif "error" in r:
            cells = [r["family"], r["names"], f"`{r['instance']}`", f"`{r['resolved']}`", "", "", "", ""]
            cells[5] = f"failed: {r['error']}"
        else:
            cells = [
                r["family"],
                r["names"],
                f"`{r['instance']}`",
                f"`{r['resolved']}`",
                ", ".join(f"`{k}`" for k in r["other_kinds"]) or "-",
                r["gradient"],
                f"{r['flop_ratio']:.3f}",
                f"{r['time_ratio']:.3f} [{r['time_ratio_q1']:.3f}, {r['time_ratio_q3']:.3f}]",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_table(text: str) -> list[dict[str, str]]:
    """The rows of the table between the markers in ``text``, as column header -> cell text."""
    body = text.split(START, 1)[1].split(END, 1)[0]
    table = [line for line in body.splitlines() if line.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in table[2:]]


def replace_between_markers(text: str, block: str) -> str:
    """``text`` with everything between the start and end markers replaced by ``block``."""
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.DOTALL)
    if len(pattern.findall(text)) != 1:
        raise SystemExit(f"expected one {START} ... {END} block, found {len(pattern.findall(text))}")
    return pattern.sub(lambda _: f"{START}\n{block}\n{END}", text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", action="append", help="family label (repeatable; default: all)")
    parser.add_argument("--write", type=Path, help="markdown file whose coverage-table block is replaced")
    parser.add_argument("--batch-size", type=int, default=8, help="batch of the step-cost fits")
    C.add_common_args(parser, rounds=1, warmup=2, steps=10)
    args = parser.parse_args(argv)
    if args.smoke:
        args.family = args.family or list(SMOKE_FAMILIES)
        args.steps = min(args.steps, 2)
    known = {f.label: f for f in FAMILIES}
    unknown = [name for name in args.family or () if name not in known]
    if unknown:
        parser.error(f"unknown family {unknown[0]!r}; known: {', '.join(known)}")
    args.families = [known[name] for name in args.family] if args.family else FAMILIES
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = C.setup_run(args)
    env = C.environment(device)
    command = "python benchmarks/coverage_table.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:])
    )
    print(
        f"coverage table | {env['device']} | torch {env['torch']} timm {env['timm']} | {command}", flush=True
    )
    rows = []
    for family in args.families:
        start = time.perf_counter()
        rows.append(measure_family(family, args))
        print(f"done {family.label} in {time.perf_counter() - start:.1f} s: {rows[-1]}", flush=True)
    table = markdown_table(rows)
    print("\n" + table + "\n", flush=True)
    if args.write:
        header = (
            f"Generated {env['date']} by `{command}` on {env['device']} ({env['cpu_cores']} cores, "
            f"{env['torch_threads']} torch thread; torch {env['torch']}, timm {env['timm']}); step-time ratios: "
            f"{args.rounds} round x {args.steps} paired steps of batch {args.batch_size}, fp32."
        )
        args.write.write_text(replace_between_markers(args.write.read_text(), f"{header}\n\n{table}"))
        print(f"wrote the table into {args.write}", flush=True)
    C.emit_json({"benchmark": "coverage_table", **env, "args": {"command": command}, "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
