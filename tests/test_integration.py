"""A real-format DataModule (ImageNet ImageFolder layout, DeiT-III-style pipeline) trains the MaskSub module."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from conftest import quiet_trainer, tiny_vit_kwargs

from masksub_lightning import MaskSubModule
from masksub_lightning.data import ImageNetDataModule

sys.path.insert(0, str(Path(__file__).parent / "data"))
from fake_data import write_imagenet


def test_imagenet_layout_with_mixup_and_repeated_aug_trains_masksub(tmp_path):
    info = write_imagenet(tmp_path)
    data = ImageNetDataModule(
        root=str(tmp_path),
        batch_size=4,
        num_workers=0,
        img_size=32,
        train_crop="simple",
        auto_augment="3a",
        color_jitter=0.3,
        mixup_alpha=0.8,
        cutmix_alpha=1.0,
        repeated_aug=3,
        eval_crop_pct=1.0,
        pin_memory=False,
    )
    assert data.num_classes == info["num_classes"] == 4
    module = MaskSubModule(
        "vit_tiny_patch16_224",
        num_classes=data.num_classes,
        model_kwargs=tiny_vit_kwargs(),
        loss="bce",
        optimizer="lamb",
        lr=3e-3,
        weight_decay=0.03,
        warmup_epochs=1,
    )
    seen = []
    original = module.main_loss

    def spy(main_logits, target):
        if module.training:  # evaluation uses main_loss too, on hard labels
            seen.append(target)
        return original(main_logits, target)

    module.main_loss = spy

    class Losses(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen.append(float(trainer.callback_metrics["train_loss_sub_epoch"]))

    trainer = quiet_trainer(max_epochs=2, num_sanity_val_steps=0, callbacks=[Losses()])
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 4  # 8 images (x3 repeats, same epoch length) / batch 4, drop_last, 2 epochs
    targets = [t for t in seen if isinstance(t, torch.Tensor)]
    assert targets and all(t.shape == (4, 4) and t.is_floating_point() for t in targets)  # mixed soft labels
    torch.testing.assert_close(targets[0].sum(-1), torch.ones(4))
    assert all(torch.isfinite(torch.tensor(x)) for x in seen if isinstance(x, float))
    assert 0.0 <= float(trainer.callback_metrics["val_acc1"]) <= 1.0
