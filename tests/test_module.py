"""MaskSubModule: the applied gradient, losses, evaluation, checkpoints and errors."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import TINY_RESNET, AppliedGradients, make_loader, quiet_trainer, tiny_vit_kwargs
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from masksub_lightning import MaskSubLoss, MaskSubModule

GradCapture = AppliedGradients  # the gradient the optimizer is about to apply (after both backward passes)


def vit_module(**kw):
    return MaskSubModule("vit_tiny_patch16_224", num_classes=4, model_kwargs=tiny_vit_kwargs(), **kw)


def resnet_module(**kw):
    return MaskSubModule("resnet18", num_classes=4, model_kwargs=dict(TINY_RESNET), **kw)


def run_one_step(module, images, labels):
    """One training step; returns (weights before the step, applied gradient)."""
    before = copy.deepcopy(module.model)
    capture = GradCapture()
    trainer = quiet_trainer(max_steps=1, callbacks=[capture], num_sanity_val_steps=0)
    trainer.fit(module, DataLoader(TensorDataset(images, labels), batch_size=len(images)))
    assert trainer.global_step == 1
    return before, capture.grads[0]


def vit_with_kept_tokens(model, images, keep):
    """Independent re-implementation of the ViT sub-branch forward for given kept patch indices."""
    tokens = model._pos_embed(model.patch_embed(images))
    p = model.num_prefix_tokens
    patches = torch.gather(tokens[:, p:], 1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    x = torch.cat([tokens[:, :p], patches], dim=1)
    x = model.norm(model.blocks(model.norm_pre(x)))
    return model.forward_head(x)


def reference_gradient(model, images, labels, sub_forward):
    """Gradient of 0.5 * (L_main + L_sub), the formula of the paper, in one backward pass."""
    main = model(images)
    loss_main = F.cross_entropy(main, labels)
    target = main.detach().softmax(-1)
    loss_sub = -(target * sub_forward(model).log_softmax(-1)).sum(-1).mean()
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(0.5 * (loss_main + loss_sub), list(params.values()))
    return dict(zip(params, grads))


def assert_relative_error_below(grads, reference, tol=1e-5):
    assert grads.keys() == reference.keys()
    flat = torch.cat([grads[k].flatten() for k in reference])
    ref = torch.cat([reference[k].flatten() for k in reference])
    assert ref.norm() > 0
    rel = ((flat - ref).norm() / ref.norm()).item()
    assert rel < tol, rel
    for k in reference:  # every tensor, not just the total
        torch.testing.assert_close(grads[k], reference[k], rtol=1e-4, atol=1e-7)


def test_vit_token_masking_applies_the_formula_gradient():
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0, 1])
    module = vit_module(sub_branch="mask", sub_ratio=0.5, optimizer="sgd", lr=0.1, weight_decay=0.0)
    before, grads = run_one_step(module, images, labels)
    keep = module.sub_branch.last_keep_indices
    assert keep.shape == (6, 8)
    reference = reference_gradient(
        before.train(), images, labels, lambda m: vit_with_kept_tokens(m, images, keep)
    )
    assert_relative_error_below(grads, reference)


def test_cnn_pixel_masking_applies_the_formula_gradient():
    images, labels = torch.randn(6, 3, 64, 64), torch.tensor([0, 1, 2, 3, 0, 1])
    module = resnet_module(
        sub_branch="mask", sub_ratio=0.5, sub_branch_kwargs={"cell_size": 16}, optimizer="sgd"
    )
    before, grads = run_one_step(module, images, labels)
    mask = module.sub_branch.last_mask  # (B, H, W) True = masked
    assert mask.shape == (6, 64, 64) and mask.float().mean().item() == 0.5
    masked_images = torch.where(mask.unsqueeze(1), torch.zeros_like(images), images)
    reference = reference_gradient(before.train(), images, labels, lambda m: m(masked_images))
    assert_relative_error_below(grads, reference)


def test_none_is_plain_supervised_training():
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0, 1])
    module = vit_module(sub_branch="none", optimizer="sgd")
    before, grads = run_one_step(module, images, labels)
    params = dict(before.train().named_parameters())
    reference = dict(
        zip(params, torch.autograd.grad(F.cross_entropy(before(images), labels), list(params.values())))
    )
    assert_relative_error_below(grads, reference)


def test_step_advances_global_step_and_the_schedule():
    module = vit_module(lr=1e-2, warmup_epochs=1, warmup_lr=1e-4, min_lr=1e-5, scheduler="cosine")
    lrs = []

    class LRs(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            lrs.append(optimizer.param_groups[-1]["lr"])

    trainer = quiet_trainer(max_epochs=3, callbacks=[LRs()], num_sanity_val_steps=0)
    trainer.fit(module, make_loader(n=64, batch_size=16))  # 4 steps per epoch, 12 in all
    assert trainer.global_step == 12
    # timm's per-step schedule: linear warmup from warmup_lr over 4 steps (one epoch), then cosine over all 12.
    warmup = [1e-4 + t * (1e-2 - 1e-4) / 4 for t in range(4)]
    cosine = [1e-5 + 0.5 * (1e-2 - 1e-5) * (1 + math.cos(math.pi * t / 12)) for t in range(4, 12)]
    assert lrs == pytest.approx(warmup + cosine, rel=1e-9)


def test_epoch_interval_moves_the_lr_once_per_epoch():
    module = vit_module(lr=1e-2, warmup_epochs=1, warmup_lr=1e-4, min_lr=1e-5, lr_interval="epoch")
    lrs = []

    class LRs(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            lrs.append(optimizer.param_groups[-1]["lr"])

    trainer = quiet_trainer(max_epochs=4, callbacks=[LRs()], num_sanity_val_steps=0)
    trainer.fit(module, make_loader(n=32, batch_size=16))  # 2 steps per epoch
    cosine = [1e-5 + 0.5 * (1e-2 - 1e-5) * (1 + math.cos(math.pi * e / 4)) for e in (1, 2, 3)]
    per_epoch = [1e-4, *cosine]
    assert lrs == pytest.approx([lr for lr in per_epoch for _ in range(2)], rel=1e-9)


# ------------------------------------------------------------------------------------------------------ losses
def test_bce_targets_binarised_for_main_and_soft_sigmoid_for_sub():
    crit = MaskSubLoss("bce")
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    mixed = torch.tensor([[0.7, 0.3, 0.0]])
    expected_main = F.binary_cross_entropy_with_logits(logits, torch.tensor([[1.0, 1.0, 0.0]]))
    torch.testing.assert_close(crit.main(logits, mixed), expected_main)
    torch.testing.assert_close(
        crit.main(logits, torch.tensor([0])),
        F.binary_cross_entropy_with_logits(logits, torch.tensor([[1.0, 0.0, 0.0]])),
    )
    target = crit.sub_target(logits)
    torch.testing.assert_close(target, logits.sigmoid())
    assert target.dtype == torch.float32 and not target.requires_grad
    sub_logits = torch.tensor([[0.1, 0.2, -0.3]])
    # never re-thresholded: the sub loss uses the sigmoid probabilities as given
    torch.testing.assert_close(
        crit.sub(sub_logits, target), F.binary_cross_entropy_with_logits(sub_logits, logits.sigmoid())
    )


def test_ce_soft_targets_and_label_smoothing():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, 0.0]])
    crit = MaskSubLoss("ce", label_smoothing=0.1)
    torch.testing.assert_close(
        crit.main(logits, torch.tensor([0, 1])),
        F.cross_entropy(logits, torch.tensor([0, 1]), label_smoothing=0.1),
    )
    soft = torch.tensor([[0.6, 0.4, 0.0], [0.0, 0.5, 0.5]])
    torch.testing.assert_close(crit.main(logits, soft), -(soft * logits.log_softmax(-1)).sum(-1).mean())
    torch.testing.assert_close(crit.sub_target(logits.bfloat16()), logits.bfloat16().float().softmax(-1))
    assert crit.sub_target(logits.bfloat16()).dtype == torch.float32


def test_bce_step_uses_sigmoid_target():
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    module = vit_module(
        loss="bce", sub_branch="dropout", sub_ratio=0.0, optimizer="sgd"
    )  # p=0: sub = main graph
    before, grads = run_one_step(module, images, labels)
    model = before.train()
    main = model(images)
    loss = 0.5 * (
        F.binary_cross_entropy_with_logits(main, F.one_hot(labels, 4).float())
        + F.binary_cross_entropy_with_logits(model(images), main.detach().sigmoid())
    )
    params = dict(model.named_parameters())
    assert_relative_error_below(grads, dict(zip(params, torch.autograd.grad(loss, list(params.values())))))


# -------------------------------------------------------------------------------------------------- evaluation
def test_validation_test_and_predict_never_use_the_sub_branch():
    module = vit_module()
    calls = []
    original = module.sub_branch.forward
    module.sub_branch.forward = lambda *a: calls.append(1) or original(*a)
    loader = make_loader(n=32, batch_size=8)
    trainer = quiet_trainer()
    trainer.validate(module, loader)
    (test_metrics,) = trainer.test(module, loader)
    preds = trainer.predict(module, loader)
    assert calls == []
    images = next(iter(loader))[0]
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(preds[0]["probs"], module.model(images).softmax(-1))
    assert 0.0 <= test_metrics["test_acc1"] <= test_metrics["test_acc5"] <= 1.0


# ------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize(
    ("family", "kind", "ratio"),
    [
        ("vit", "mask", 0.5),
        ("vit", "dropout", 0.3),
        ("vit", "droppath", 0.3),
        ("vit", "none", 0.5),
        ("resnet", "mask", 0.5),
        ("resnet", "droppath", 0.3),
        ("resnet", "none", 0.5),
    ],
)
def test_short_training_lowers_the_loss(family, kind, ratio):
    extra = {"proj_drop_rate": 0.0} if family == "vit" else {}
    make = vit_module if family == "vit" else resnet_module
    module = make(sub_branch=kind, sub_ratio=ratio, lr=2e-3, weight_decay=0.0, scheduler="constant")
    del extra
    losses = []

    class Record(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            losses.append(float(trainer.callback_metrics["train_loss_main_epoch"]))

    trainer = quiet_trainer(max_epochs=5, callbacks=[Record()], num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, make_loader(n=64, batch_size=16, shuffle=True))
    assert len(losses) == 5
    assert losses[-1] < 0.7 * losses[0], losses


def test_bf16_mixed_step_is_finite_and_targets_are_float32():
    module = vit_module(grad_clip_norm=1.0)
    seen = {}
    original = module.main_loss

    def spy(main_logits, target):
        seen.setdefault("dtypes", []).append(main_logits.dtype)
        return original(main_logits, target)

    module.main_loss = spy
    trainer = quiet_trainer(max_steps=2, precision="bf16-mixed", num_sanity_val_steps=0)
    trainer.fit(module, make_loader(n=32, batch_size=8))
    assert torch.bfloat16 in seen["dtypes"]  # autocast reached the network
    assert torch.isfinite(trainer.callback_metrics["train_loss_sub"]) and trainer.global_step == 2


def test_gradient_clipping_bounds_the_applied_norm():
    capture = GradCapture()
    module = vit_module(grad_clip_norm=0.01, optimizer="sgd")
    quiet_trainer(max_steps=1, callbacks=[capture], num_sanity_val_steps=0).fit(
        module, make_loader(n=16, batch_size=8)
    )
    norm = torch.cat([g.flatten() for g in capture.grads[0].values()]).norm()
    assert norm.item() == pytest.approx(0.01, rel=1e-3)


# ------------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_loads_and_training_resumes_with_optimizer_and_schedule(tmp_path):
    loader = make_loader(n=32, batch_size=8)  # 4 steps per epoch
    kw = dict(lr=1e-2, warmup_epochs=1, scheduler="cosine")
    full = vit_module(**kw)
    lrs_full = []

    class LRs(L.Callback):
        def __init__(self, out):
            self.out = out

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.out.append(optimizer.param_groups[-1]["lr"])

    quiet_trainer(max_epochs=4, callbacks=[LRs(lrs_full)], num_sanity_val_steps=0).fit(full, loader)

    class StopAfterTwoEpochs(L.Callback):  # an interrupted run of the same 4-epoch schedule
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = trainer.current_epoch == 1

    first = vit_module(**kw)
    trainer = quiet_trainer(max_epochs=4, callbacks=[StopAfterTwoEpochs()], num_sanity_val_steps=0)
    trainer.fit(first, loader)
    ckpt = tmp_path / "half.ckpt"
    assert trainer.global_step == 8
    trainer.save_checkpoint(ckpt)

    loaded = MaskSubModule.load_from_checkpoint(ckpt, weights_only=True)
    for k, v in first.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[k], v, rtol=0, atol=0)
    assert loaded.hparams.lr == 1e-2 and loaded.sub_branch.name == "token_mask"  # what "mask" is on a ViT

    saved_state = torch.load(ckpt, weights_only=True)["optimizer_states"][0]["state"]
    restored = {}

    class CheckRestore(L.Callback):
        def on_train_start(self, trainer, pl_module):
            state = trainer.optimizers[0].state_dict()["state"]
            restored["equal"] = all(
                torch.equal(state[i]["exp_avg"], saved_state[i]["exp_avg"]) for i in saved_state
            )

    lrs_resumed = []
    resumed = vit_module(**kw)
    trainer2 = quiet_trainer(
        max_epochs=4, callbacks=[LRs(lrs_resumed), CheckRestore()], num_sanity_val_steps=0
    )
    trainer2.fit(resumed, loader, ckpt_path=ckpt)
    assert restored["equal"]
    assert trainer2.global_step == 16
    assert lrs_resumed == pytest.approx(lrs_full[8:], rel=1e-9)


# -------------------------------------------------------------------------------------------------- bad input
def test_bad_arguments_are_rejected_when_the_module_is_built():
    with pytest.raises(ValueError, match=r"unknown sub-branch 'mask50'.*known kinds"):
        vit_module(sub_branch="mask50")
    with pytest.raises(ValueError, match=r"sub_ratio must be in \[0, 1\), got 1.5"):
        vit_module(sub_ratio=1.5)
    with pytest.raises(ValueError, match=r"'dropout' cannot handle ResNet.*mask, .*droppath"):
        resnet_module(sub_branch="dropout", sub_ratio=0.2)
    head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 7))
    head.num_classes = 7
    with pytest.raises(ValueError, match=r"head has 7 outputs but num_classes=4"):
        MaskSubModule(head, num_classes=4, sub_branch="pixel_mask")
    with pytest.raises(ValueError, match=r"unknown timm model 'vit_tinyy'"):
        MaskSubModule("vit_tinyy", num_classes=4)
    with pytest.raises(ValueError, match=r"unknown optimizer 'adamww'"):
        vit_module(optimizer="adamww")
    with pytest.raises(ValueError, match=r"unknown scheduler 'cosin'"):
        vit_module(scheduler="cosin")
    with pytest.raises(ValueError, match=r"loss must be 'ce' or 'bce', got 'mse'"):
        vit_module(loss="mse")
    with pytest.raises(ValueError, match=r"lr_interval must be 'step' or 'epoch', got 'batch'"):
        vit_module(lr_interval="batch")


def test_any_nn_module_works():
    net = timm.create_model("resnet18", num_classes=4, **TINY_RESNET)
    module = MaskSubModule(net, num_classes=4, sub_branch="pixel_mask")
    assert "model" not in module.hparams
    trainer = quiet_trainer(max_steps=2, num_sanity_val_steps=0)
    trainer.fit(module, make_loader(n=16, batch_size=8))
    assert trainer.global_step == 2


# ---------------------------------------------------------------------------------------------- optimizer, metrics
def test_weight_decay_excludes_norms_biases_position_embeddings_and_tokens():
    from masksub_lightning.training.optim import build_optimizer

    module = vit_module()

    opt = build_optimizer(module.model, "adamw", 1e-3, 0.05, layer_decay=0.5)
    names = {id(p): n for n, p in module.model.named_parameters()}
    decay_of = {names[id(p)]: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    scale_of = {names[id(p)]: g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    assert set(decay_of) == set(names.values())  # every parameter is optimised exactly once
    for name, wd in decay_of.items():
        no_decay = name.endswith(".bias") or "norm" in name or name in ("pos_embed", "cls_token")
        assert wd == (0.0 if no_decay else 0.05), name
    # layer decay: the head learns at the full LR, earlier blocks progressively slower
    assert scale_of["head.weight"] == 1.0
    assert scale_of["blocks.1.mlp.fc1.weight"] == 0.5 and scale_of["blocks.0.mlp.fc1.weight"] == 0.25
    assert scale_of["patch_embed.proj.weight"] == scale_of["pos_embed"] == 0.125


def test_validation_top1_is_plain_accuracy():
    module = vit_module()
    loader = make_loader(n=48, batch_size=16, num_classes=4)
    (metrics,) = quiet_trainer().validate(module, loader)
    module.eval()
    with torch.no_grad():
        correct = sum((module.model(x).argmax(-1) == y).sum().item() for x, y in loader)
    assert metrics["val_acc1"] == pytest.approx(correct / 48)  # micro average over samples, not per class


def test_custom_kind_trains_through_the_module():
    import contextlib

    from masksub_lightning import SUB_BRANCHES, SubBranch, register_sub_branch

    @register_sub_branch("test_noise")
    class Noise(SubBranch):
        @contextlib.contextmanager
        def perturbed(self, model, images):
            yield images + self.ratio * torch.randn_like(images)

    try:
        module = vit_module(sub_branch="test_noise", sub_ratio=0.3)
        trainer = quiet_trainer(max_steps=2, num_sanity_val_steps=0)
        trainer.fit(module, make_loader(n=16, batch_size=8))
        assert isinstance(module.sub_branch, Noise) and torch.isfinite(
            trainer.callback_metrics["train_loss_sub"]
        )
    finally:
        SUB_BRANCHES.pop("test_noise")


def test_no_weight_decay_list_replaces_the_models_own_without_layer_decay():
    from masksub_lightning.training.optim import build_optimizer

    model = vit_module().model
    optimizer = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.05, no_weight_decay=["cls_token"])
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay_of[id(model.cls_token)] == 0.0
    assert decay_of[id(model.pos_embed)] == 0.05  # in timm's own list, not in the given one
    assert decay_of[id(model.blocks[0].attn.qkv.bias)] == 0.0  # 1-D: never decayed
