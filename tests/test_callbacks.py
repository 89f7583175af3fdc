"""Analysis callbacks: values against independent computations, training unchanged, logged series, pictures."""

from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_RESNET, TINY_VIT, make_images, make_loader, quiet_trainer
from lightning.pytorch.loggers import CSVLogger, Logger
from PIL import Image

from masksub_lightning import MaskSubModule
from masksub_lightning.callbacks import BranchGradients, MaskedInputLoss, SubBranchPictures
from masksub_lightning.data import DigitsDataModule
from masksub_lightning.method.subbranch import SwitchablePatchDropout


def vit(sub_branch="mask", **kw):
    return MaskSubModule("vit_small_patch16_224", 4, model_kwargs=TINY_VIT, sub_branch=sub_branch, **kw)


def resnet(sub_branch="mask", **kw):
    kw.setdefault("sub_branch_kwargs", {"cell_size": 16})
    return MaskSubModule("resnet18", 4, model_kwargs=TINY_RESNET, sub_branch=sub_branch, **kw)


class RecordMicroBatches(L.Callback):
    """The RNG state and the batch right before each training step of the first optimizer step."""

    def __init__(self):
        self.inputs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0:
            self.inputs.append((torch.get_rng_state(), batch[0].clone(), batch[1].clone()))


def flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("accumulation", [1, 2])
def test_branch_gradients_match_autograd_of_each_loss(accumulation):
    module = vit(grad_accumulation=accumulation)
    initial = copy.deepcopy(module)
    record, probe = RecordMicroBatches(), BranchGradients(every_n_steps=1)
    quiet_trainer(max_steps=1, callbacks=[record, probe]).fit(module, make_loader(n=64))
    assert len(record.inputs) == accumulation

    # Independent: each loss's gradient on its own with autograd.grad, the sub-branch drawing the same mask.
    params = [p for p in initial.model.parameters() if p.requires_grad]
    initial.train()
    main, sub = torch.zeros(sum(p.numel() for p in params)), None
    for rng, images, labels in record.inputs:
        torch.set_rng_state(rng)
        logits = initial.model(images)
        loss_main = initial.main_loss(logits, labels)
        loss_sub = initial.sub_loss(initial.sub_branch_forward(images), logits.detach())
        g_main = torch.autograd.grad(loss_main, params, retain_graph=True)
        g_sub = torch.autograd.grad(loss_sub, params, allow_unused=True)
        g_sub = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_sub)]
        main = main + flat(g_main) / accumulation
        sub = flat(g_sub) / accumulation if sub is None else sub + flat(g_sub) / accumulation

    (row,) = probe.history
    assert row["global_step"] == 0
    assert row["branch_grad_norm_main"] == pytest.approx(main.norm().item(), rel=1e-4)
    assert row["branch_grad_norm_sub"] == pytest.approx(sub.norm().item(), rel=1e-4)
    assert row["branch_grad_cosine"] == pytest.approx(F.cosine_similarity(main, sub, dim=0).item(), abs=1e-4)
    assert row["branch_grad_norm_total"] == pytest.approx(((main + sub) / 2).norm().item(), rel=1e-4)


def test_branch_gradients_of_a_baseline_log_the_main_gradient_only():
    module = vit("none")
    initial = copy.deepcopy(module)
    record, probe = RecordMicroBatches(), BranchGradients(every_n_steps=1)
    quiet_trainer(max_steps=1, callbacks=[record, probe]).fit(module, make_loader(n=16))
    _, images, labels = record.inputs[0]
    initial.train()
    grads = torch.autograd.grad(
        initial.main_loss(initial.model(images), labels), list(initial.model.parameters())
    )
    (row,) = probe.history
    assert set(row) == {"step", "global_step", "branch_grad_norm_main", "branch_grad_norm_total"}
    assert row["branch_grad_norm_main"] == pytest.approx(flat(grads).norm().item(), rel=1e-4)


def _all_callbacks():
    return [
        BranchGradients(every_n_steps=1),
        MaskedInputLoss(num_samples=16),
        SubBranchPictures(num_images=2),
    ]


@pytest.mark.parametrize(
    "build", [vit, resnet, lambda: vit("none")], ids=["vit-token", "resnet-pixel", "vit-none"]
)
def test_callbacks_leave_training_bitwise_unchanged(build, tmp_path):
    results = []
    for callbacks in ([], _all_callbacks()):
        L.seed_everything(0, verbose=False)
        module = build()
        logger = CSVLogger(tmp_path, name=f"run{len(results)}")
        trainer = quiet_trainer(max_epochs=2, callbacks=callbacks, logger=logger, limit_train_batches=3)
        trainer.fit(module, make_loader(n=48, shuffle=True), make_loader(n=16, seed=1))
        results.append({k: v.clone() for k, v in module.state_dict().items()})
    assert results[0].keys() == results[1].keys()  # nothing installed by an evaluation stays behind
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), name


def test_masked_input_loss_matches_a_direct_evaluation():
    module = resnet()  # pixel mask: the mask the evaluation used is the sub-branch's last_mask
    images, labels = make_images(16, 4, seed=3)
    callback = MaskedInputLoss(batch=(images, labels), num_samples=12, clean=True)
    quiet_trainer(max_epochs=1, callbacks=[callback], limit_train_batches=2).fit(module, make_loader(n=32))
    (row,) = callback.history
    mask = module.sub_branch.last_mask
    assert mask.shape == (12, 32, 32) and mask.float().mean().item() == pytest.approx(0.5)
    module.eval()
    with torch.no_grad():
        clean = module.model(images[:12])
        masked = module.model(images[:12].masked_fill(mask[:, None], 0.0))
    assert row["clean_input_loss"] == pytest.approx(F.cross_entropy(clean, labels[:12]).item(), rel=1e-5)
    assert row["masked_input_loss"] == pytest.approx(F.cross_entropy(masked, labels[:12]).item(), rel=1e-5)
    assert row["masked_input_acc1"] == pytest.approx((masked.argmax(-1) == labels[:12]).float().mean().item())
    # The same masks at every evaluation, and BatchNorm statistics untouched by it.
    stats = {k: v.clone() for k, v in module.state_dict().items() if "running" in k}
    again = callback.evaluate(module)
    assert again == callback.evaluate(module) == pytest.approx({k: row[k] for k in again})
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in stats.items())


def test_masked_input_loss_of_a_baseline_masks_tokens_for_the_evaluation_only():
    module = vit("none")
    callback = MaskedInputLoss(num_samples=16, clean=True)
    quiet_trainer(max_epochs=1, callbacks=[callback], limit_train_batches=2).fit(
        module, make_loader(n=32), make_loader(n=16, seed=1)
    )
    (row,) = callback.history
    assert not isinstance(module.model.patch_drop, SwitchablePatchDropout)  # torn down again
    assert row["masked_input_loss"] != row["clean_input_loss"]
    # Masking half the tokens of an input: the output differs from the clean one, at the configured ratio.
    with torch.no_grad():
        module.eval()
        clean = F.cross_entropy(module.model(make_images(16, 4, seed=1)[0]), make_images(16, 4, seed=1)[1])
    assert row["clean_input_loss"] == pytest.approx(clean.item(), rel=1e-5)


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_callbacks_on_a_digits_run_log_their_series(tmp_path):
    data = DigitsDataModule(batch_size=64, img_size=32, train_augment=False, seed=0)
    module = MaskSubModule(
        "vit_tiny_patch16_224",
        num_classes=10,
        model_kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0),
        lr=2e-3,
    )
    callbacks = [
        BranchGradients(every_n_steps=2),
        MaskedInputLoss(num_samples=64),
        SubBranchPictures(num_images=4),
    ]
    logger = CSVLogger(tmp_path, name="digits")
    trainer = quiet_trainer(
        max_epochs=2, limit_train_batches=5, limit_val_batches=2, callbacks=callbacks, logger=logger
    )
    trainer.fit(module, datamodule=data)
    rows = _read_csv(Path(logger.log_dir) / "metrics.csv")

    grads = [r for r in rows if r["branch_grad_norm_main"]]
    assert [int(r["step"]) for r in grads] == [0, 2, 4, 6, 8]  # every 2nd of the 10 optimizer steps
    assert [int(r["epoch"]) for r in grads] == [0, 0, 0, 1, 1]
    for r in grads:
        assert float(r["branch_grad_norm_main"]) > 0 and float(r["branch_grad_norm_sub"]) > 0
        assert -1.0 <= float(r["branch_grad_cosine"]) <= 1.0
    masked = [r for r in rows if r["masked_input_loss"]]
    assert [int(r["epoch"]) for r in masked] == [0, 1]
    assert all(0 <= float(r["masked_input_acc1"]) <= 1 for r in masked)

    pictures = callbacks[2].saved
    assert [p.name for p in pictures] == ["epoch_000.png", "epoch_001.png"]
    with Image.open(pictures[0]) as image:  # 4 columns x 2 rows of 32 px images, 2 px padding
        assert image.size == (4 * 34 + 2, 2 * 34 + 2)


class ImageSink(Logger):
    """A logger whose experiment has add_image, like TensorBoard's."""

    def __init__(self):
        super().__init__()
        self.images = []

    name, version = "sink", 0

    @property
    def experiment(self):
        return self

    def add_image(self, tag, image, global_step):
        self.images.append((tag, image, global_step))

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_pictures_go_to_an_image_logger_and_show_the_mask(tmp_path):
    sink = ImageSink()
    pictures = SubBranchPictures(num_images=3, mask_color=(0.0, 1.0, 0.0))
    module = resnet()
    trainer = quiet_trainer(
        max_epochs=1, limit_train_batches=1, callbacks=[pictures], logger=sink, default_root_dir=tmp_path
    )
    trainer.fit(module, make_loader(n=16))
    assert pictures.saved == []  # logged, not written
    ((tag, grid, step),) = sink.images
    assert tag == "sub_branch_inputs" and step == 1 and grid.shape == (3, 70, 3 * 34 + 2)

    # Bottom row: exactly the masked pixels painted in the mask colour.
    images = torch.rand(2, 3, 8, 8)
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[0, :4] = True
    grid = pictures.grid(images, mask)
    bottom = grid[:, 2 + 8 + 2 : 2 + 8 + 2 + 8, 2 : 2 + 8]
    assert torch.equal(bottom[:, :4], torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1).expand(3, 4, 8))
    top = grid[:, 2:10, 2:10]
    assert torch.allclose(bottom[:, 4:], top[:, 4:])


def test_bad_arguments_are_refused_at_construction():
    with pytest.raises(ValueError, match="every_n_steps must be a positive int, got 0"):
        BranchGradients(every_n_steps=0)
    with pytest.raises(ValueError, match="ratio must be in"):
        MaskedInputLoss(ratio=1.0)
    with pytest.raises(ValueError, match="kind='none'"):
        MaskedInputLoss(kind="none")
    with pytest.raises(ValueError, match="mask_color"):
        SubBranchPictures(mask_color=(2, 0, 0))


@pytest.mark.slow
def test_overhead_benchmark_smoke_run_reports_its_figures():
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "benchmarks/callback_overhead.py", "--smoke"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads(done.stdout.strip().splitlines()[-1])
    assert payload["benchmark"] == "callback_overhead"
    (step,) = payload["steps"]
    assert step["pairs"] == 4 and step["step_s"] > 0 and step["ratio_default"] > 0
    assert 0 < payload["digits"]["hooks_fraction"] < 1


def test_callbacks_are_configured_from_yaml(tmp_path):
    from masksub_lightning.commands.cli import build_cli

    config = tmp_path / "callbacks.yaml"
    config.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: masksub_lightning.callbacks.BranchGradients\n"
        "      init_args: {every_n_steps: 7}\n"
        "    - class_path: masksub_lightning.callbacks.MaskedInputLoss\n"
        "      init_args: {num_samples: 32, clean: true}\n"
        "    - class_path: masksub_lightning.callbacks.SubBranchPictures\n"
    )
    quickstart = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    cli = build_cli(["--config", str(quickstart), "--config", str(config)], run=False)
    found = {type(c).__name__: c for c in cli.trainer.callbacks}
    assert found["BranchGradients"].every_n_steps == 7
    assert found["MaskedInputLoss"].num_samples == 32 and found["MaskedInputLoss"].clean
    assert "SubBranchPictures" in found
