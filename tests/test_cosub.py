"""CoSubModule: the applied gradient against the formula, the two halves, Mixup before duplication, errors."""

from __future__ import annotations

import copy
import inspect
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import AppliedGradients, quiet_trainer, tiny_vit_kwargs
from timm.layers import DropPath
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from masksub_lightning import CoSubModule, MaskSubModule
from masksub_lightning.commands import main
from masksub_lightning.commands.cli import build_cli
from masksub_lightning.data import DigitsDataModule
from masksub_lightning.modules.cosub import _NOT_COSUB_OPTIONS
from masksub_lightning.training.guards import NonFiniteLossError


def cosub_module(num_classes: int = 4, drop_path_rate: float = 0.5, **kw) -> CoSubModule:
    return CoSubModule(
        "vit_tiny_patch16_224",
        num_classes=num_classes,
        model_kwargs=tiny_vit_kwargs(drop_path_rate=drop_path_rate),
        drop_path_profile="constant",
        **kw,
    )


class KeepMaskRecorder:
    """Records, per DropPath module (by name), the per-sample keep mask of every training forward."""

    def __init__(self, model: nn.Module) -> None:
        self.masks: dict[str, list[torch.Tensor]] = {}
        self._handles = [
            module.register_forward_hook(self._hook(name))
            for name, module in model.named_modules()
            if isinstance(module, DropPath)
        ]
        assert self._handles, "the test model has no DropPath"

    def _hook(self, name: str):
        def record(module, args, output):
            if module.training:  # a dropped sample's residual branch is exactly zero
                kept = output.detach().flatten(1).abs().amax(1) > 0
                self.masks.setdefault(name, []).append(kept)

        return record

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class FixedDropPath(nn.Module):
    """Drop path with given per-sample keep masks (one per call, in order): the recorded draws, replayed."""

    def __init__(self, masks: list[torch.Tensor], keep_prob: float) -> None:
        super().__init__()
        self.masks, self.keep_prob = list(masks), keep_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = self.masks.pop(0).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        return x * keep / self.keep_prob


def replay_drop_paths(model: nn.Module, masks: dict[str, list[torch.Tensor]]) -> nn.Module:
    for name, module in list(model.named_modules()):
        if isinstance(module, DropPath):
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            setattr(owner, attr, FixedDropPath(masks[name], 1.0 - module.drop_prob))
    return model


def formula_gradient(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """Gradient of deit's --cosub loss, written out: 0.25 x (two label BCEs + two cross BCEs), one backward."""
    logits = model(torch.cat((images, images)))
    o0, o1 = logits.chunk(2)
    y = F.one_hot(labels, num_classes).float()
    bce = F.binary_cross_entropy_with_logits
    loss = 0.25 * (bce(o0, y) + bce(o1, y) + bce(o0, o1.detach().sigmoid()) + bce(o1, o0.detach().sigmoid()))
    params = dict(model.named_parameters())
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


def one_step(module, images, labels, **trainer_kw):
    capture = AppliedGradients()
    trainer = quiet_trainer(max_steps=1, callbacks=[capture], num_sanity_val_steps=0, **trainer_kw)
    trainer.fit(module, DataLoader(TensorDataset(images, labels), batch_size=len(images)))
    assert trainer.global_step == 1
    return trainer, capture.grads[0]


# ------------------------------------------------------------------------------------------------ the gradient
def test_applied_gradient_is_the_formula_with_the_same_drop_path_draws():
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0, 1])
    module = cosub_module(optimizer="sgd", lr=0.1, weight_decay=0.0)
    before = copy.deepcopy(module.model)
    recorder = KeepMaskRecorder(module.model)
    trainer, grads = one_step(module, images, labels)
    recorder.remove()
    # One forward of the duplicated batch per DropPath: 2 x 6 per-sample draws, and the halves drew differently.
    assert {len(v) for v in recorder.masks.values()} == {1}
    draws = torch.stack([v[0] for v in recorder.masks.values()])  # (slots, 12)
    assert draws.shape == (4, 12)
    assert not torch.equal(draws[:, :6], draws[:, 6:]), "the two submodels of an image should differ"
    reference = formula_gradient(replay_drop_paths(before.train(), recorder.masks), images, labels, 4)
    assert grads.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(grads[name], reference[name], rtol=1e-4, atol=1e-7)
    # The logged parts: train_loss is their mean, i.e. 0.25 x each of the four terms.
    metrics = trainer.callback_metrics
    label, cotrain = metrics["train_loss_label_step"], metrics["train_loss_cotrain_step"]
    assert metrics["train_loss_step"].item() == pytest.approx(((label + cotrain) / 2).item(), rel=1e-6)


def test_the_halves_differ_only_through_drop_path():
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    seen = []

    def run(module):
        handle = module.model.register_forward_hook(
            lambda m, args, out: seen.append((args[0].detach(), out.detach())) if m.training else None
        )
        one_step(module, images, labels)
        handle.remove()
        return seen.pop()

    inputs, logits = run(cosub_module())
    assert inputs.shape[0] == 8 and torch.equal(inputs[:4], inputs[4:]) and torch.equal(inputs[:4], images)
    assert (logits[:4] - logits[4:]).abs().max() > 1e-3
    # Drop path switched off (after construction, which refuses it): the two halves are the same network.
    module = cosub_module()
    for layer in module.model.modules():
        if isinstance(layer, DropPath):
            layer.drop_prob = 0.0
    inputs, logits = run(module)
    torch.testing.assert_close(logits[:4], logits[4:], rtol=0, atol=1e-6)


def test_mixup_runs_once_before_the_batch_is_duplicated():
    data = DigitsDataModule(batch_size=8, img_size=32, train_augment=False, mixup_alpha=0.8, cutmix_alpha=1.0)
    module = cosub_module(num_classes=10, drop_path_rate=0.2)
    mixed, forwards, loss_targets, backwards = [], [], [], []
    mix = data.mix
    data.mix = lambda images, targets: mixed.append(mix(images, targets)) or mixed[-1]
    main_loss, manual_backward = module.main_loss, module.manual_backward
    module.main_loss = lambda logits, target: loss_targets.append(target) or main_loss(logits, target)
    module.manual_backward = lambda loss, *a, **k: backwards.append(loss) or manual_backward(loss, *a, **k)
    module.model.register_forward_hook(
        lambda m, args, out: forwards.append(args[0].detach()) if m.training else None
    )
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, data)
    assert trainer.global_step == 3
    assert len(mixed) == len(forwards) == len(backwards) == 3, "one Mixup, one forward, one backward per step"
    for (images, target), inputs, (t0, t1) in zip(
        mixed, forwards, zip(loss_targets[::2], loss_targets[1::2])
    ):
        assert torch.equal(inputs, torch.cat((images, images)))
        assert t0 is target and t1 is target  # both halves are scored against the same mixed target
    assert any(((t > 0).sum(-1) > 1).any() for _, t in mixed), "the targets are mixed (soft)"


# -------------------------------------------------------------------------------------------- logs, checkpoint
def test_a_nonfinite_loss_names_the_cosub_part():
    images = torch.full((4, 3, 32, 32), float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"at step 1 in the label loss \(both submodels against"):
        one_step(cosub_module(), images, torch.tensor([0, 1, 2, 3]))


def test_checkpoint_holds_only_cosub_options_and_loads(tmp_path):
    module = cosub_module(optimizer="sgd")
    trainer, _ = one_step(module, torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    trainer.save_checkpoint(tmp_path / "cosub.ckpt")
    loaded = CoSubModule.load_from_checkpoint(tmp_path / "cosub.ckpt")
    assert not {"sub_branch", "sub_ratio", "sub_branch_kwargs"} & set(loaded.hparams)
    assert loaded.hparams.model_kwargs["drop_path_rate"] == 0.5
    for name, value in module.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value), name


# --------------------------------------------------------------------------------------------------- errors
def test_refuses_a_model_whose_halves_would_be_identical():
    with pytest.raises(
        ValueError,
        match=r"^CoSub needs drop path: model_kwargs.drop_path_rate must be > 0 \(the two halves differ only "
        r"through per-sample drop path; at 0 they are identical\), got every rate of vit_tiny_patch16_224 at "
        r"0.0$",
    ):
        cosub_module(drop_path_rate=0.0)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 4))
    with pytest.raises(
        ValueError,
        match=r"^CoSub needs a model with per-block drop path \(stochastic depth\): its two halves differ only "
        r"through it, and Sequential has no drop_path slots; use a timm ViT / DeiT-III / Swin / ResNet / ConvNeXt$",
    ):
        CoSubModule(plain, num_classes=4)


def test_refuses_a_loss_other_than_bce():
    with pytest.raises(
        ValueError,
        match=r"^CoSub trains with binary cross-entropy \(facebookresearch/deit --cosub replaces the criterion "
        r"by BCEWithLogitsLoss\): loss must be 'bce', got 'ce'$",
    ):
        cosub_module(loss="ce")


def test_has_no_sub_branch_to_switch():
    with pytest.raises(
        TypeError, match="CoSubModule has no sub-branch: its two submodels come from drop path"
    ):
        cosub_module().set_sub_branch("mask")


# ------------------------------------------------------------------------------------------------------ the CLI
DIGITS_COSUB = """
trainer: {max_epochs: 1, limit_train_batches: 2, limit_val_batches: 1, logger: false, enable_progress_bar: false,
          enable_model_summary: false, accelerator: cpu}
model:
  class_path: CoSubModule
  init_args:
    model: vit_tiny_patch16_224
    model_kwargs: {img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2, drop_path_rate: RATE}
data:
  class_path: masksub_lightning.data.DigitsDataModule
  init_args: {batch_size: 8, img_size: 32, train_augment: false, persistent_workers: false}
"""


def test_masksub_fit_trains_a_cosub_config(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["masksub"])  # else Lightning warns that pytest's argv is ignored
    (tmp_path / "cosub.yaml").write_text(DIGITS_COSUB.replace("RATE", "0.1"))
    cli = build_cli(
        ["fit", "--config", str(tmp_path / "cosub.yaml"), f"--trainer.default_root_dir={tmp_path}"]
    )
    assert type(cli.model) is CoSubModule and cli.trainer.global_step == 2
    metrics = cli.trainer.callback_metrics
    assert {"train_loss_label_step", "train_loss_cotrain_step", "val_acc1"} <= set(metrics)


def test_masksub_fit_refuses_a_cosub_model_without_drop_path_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["masksub"])
    (tmp_path / "cosub.yaml").write_text(DIGITS_COSUB.replace("RATE", "0.0"))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(tmp_path / "cosub.yaml"), f"--trainer.default_root_dir={tmp_path}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("masksub: error: CoSub needs drop path: model_kwargs.drop_path_rate must be > 0")
    assert err.count("\n") == 1


def test_takes_every_masksub_option_but_the_sub_branch_and_probe_ones():
    """A recipe block shared with MaskSub (configs/_base/deit3.yaml) must parse for CoSub too: no option may drift."""
    masksub = inspect.signature(MaskSubModule.__init__).parameters
    cosub = inspect.signature(CoSubModule.__init__).parameters
    expected = {k: v.default for k, v in masksub.items() if k not in _NOT_COSUB_OPTIONS}
    expected["loss"] = "bce"  # CoSub's one different default
    assert {k: v.default for k, v in cosub.items()} == expected
