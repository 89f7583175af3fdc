"""``masksub export``: a checkpoint's network reloads in timm alone and gives the checkpoint module's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from conftest import TINY_RESNET, TINY_VIT, make_loader, quiet_trainer
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from masksub_lightning import MaskSubModule
from masksub_lightning.commands import main as cli_main
from masksub_lightning.commands.export import ExportError, export_checkpoint
from masksub_lightning.data import DigitsDataModule

ROOT = Path(__file__).resolve().parents[1]
SHRUNK = {**TINY_VIT, "depth": 1, "embed_dim": 24, "num_heads": 3}


def train(tmp_path, module, callbacks=(), datamodule=None, epochs=1, loader_size=32):
    """A short fit with a CSV logger and a checkpoint per epoch; returns the last checkpoint's path."""
    logger = CSVLogger(tmp_path, name="run")
    checkpoint = ModelCheckpoint(dirpath=None, save_top_k=-1)
    trainer = quiet_trainer(
        max_epochs=epochs,
        limit_train_batches=3,
        limit_val_batches=1,
        logger=logger,
        enable_checkpointing=True,
        callbacks=[checkpoint, *callbacks],
    )
    if datamodule is not None:
        trainer.fit(module, datamodule=datamodule)
    else:
        train_loader = make_loader(n=48, size=loader_size, shuffle=True)
        trainer.fit(module, train_loader, make_loader(n=16, size=loader_size, seed=1))
    return Path(checkpoint.best_model_path or checkpoint.last_model_path)


def module_from(ckpt_path, key="state_dict"):
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    module = MaskSubModule(**ckpt["hyper_parameters"])
    module.load_state_dict(ckpt[key])
    return module.eval()


def test_exported_vit_reloads_in_timm_with_its_kwargs_classes_and_logits(tmp_path):
    data = DigitsDataModule(batch_size=64, img_size=32, mean=(0.25, 0.25, 0.25), std=(0.5, 0.5, 0.5))
    module = MaskSubModule("vit_tiny_patch16_224", 10, model_kwargs=SHRUNK)
    ckpt = train(tmp_path, module, datamodule=data)
    out = export_checkpoint(ckpt, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]

    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["num_classes"] == 10
    args = config["model_args"]
    assert (
        args["embed_dim"] == 24
        and args["depth"] == 1
        and args["patch_size"] == 8
        and args["img_size"] == [32, 32]
    )
    assert config["pretrained_cfg"]["mean"] == [0.25] * 3 and config["pretrained_cfg"]["input_size"] == [
        3,
        32,
        32,
    ]

    rebuilt = timm.create_model(f"local-dir:{out}", pretrained=True).eval()  # nothing else given
    assert rebuilt.num_classes == 10 and len(rebuilt.blocks) == 1 and rebuilt.embed_dim == 24
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(images), module_from(ckpt)(images))

    card = (out / "README.md").read_text()
    assert "sub-branch: `mask` at ratio 0.5" in card and "DigitsDataModule" in card
    assert "weights: raw" in card and 'timm.create_model("local-dir:' in card


def test_ema_weights_by_default_raw_on_request(tmp_path):
    module = MaskSubModule("resnet18", 4, model_kwargs=TINY_RESNET, sub_branch_kwargs={"cell_size": 16})
    ckpt = train(tmp_path, module, callbacks=[EMAWeightAveraging()])
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert "current_model_state" in stored  # Lightning's layout: EMA in state_dict, raw beside it

    ema = timm.create_model(f"local-dir:{export_checkpoint(ckpt, tmp_path / 'ema')}", pretrained=True).eval()
    raw = timm.create_model(f"local-dir:{export_checkpoint(ckpt, tmp_path / 'raw', 'raw')}", pretrained=True)
    raw.eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ema_logits, raw_logits = ema(images), raw(images)
        assert torch.equal(ema_logits, module_from(ckpt)(images))
        assert torch.equal(raw_logits, module_from(ckpt, "current_model_state")(images))
    assert not torch.allclose(ema_logits, raw_logits)
    assert "weights: EMA" in (tmp_path / "ema" / "README.md").read_text()
    # BatchNorm buffers come along (the EMA averages buffers too).
    assert torch.equal(ema.bn1.running_mean, stored["state_dict"]["model.bn1.running_mean"])


def test_the_command_reports_bad_requests(tmp_path, capsys):
    ckpt = train(
        tmp_path, MaskSubModule("vit_small_patch16_224", 4, model_kwargs=TINY_VIT, sub_branch="none")
    )
    with pytest.raises(ExportError, match="holds no EMA weights"):
        export_checkpoint(ckpt, tmp_path / "a", "ema")
    cli_main(["export", str(ckpt), str(tmp_path / "b")])
    assert "exported" in capsys.readouterr().out
    assert (tmp_path / "b" / "model.safetensors").is_file()
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["export", str(ckpt), str(tmp_path / "b")])
    assert exit_info.value.code == 2 and "is not empty" in capsys.readouterr().err
    cli_main(["export", str(ckpt), str(tmp_path / "b"), "--raw", "--overwrite"])
    with pytest.raises(SystemExit):
        cli_main(["export", str(tmp_path / "missing.ckpt"), str(tmp_path / "c")])
    assert "checkpoint file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["export", str(ckpt), str(tmp_path / "d"), "--ema", "--raw"])  # one or the other


def test_a_cli_run_exports_with_its_config_and_val_top1(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the quickstart config logs to ./runs
    overrides = [
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "2",
        "--trainer.limit_val_batches",
        "1",
    ]
    cli_main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), *overrides])
    (ckpt,) = (tmp_path / "runs" / "quickstart").glob("version_*/checkpoints/last.ckpt")
    cli_main(["export", str(ckpt), "exported"])
    out = tmp_path / "exported"
    assert (out / "config.yaml").read_text() == (ckpt.parent.parent / "config.yaml").read_text()
    metrics = (ckpt.parent.parent / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    val = [row.split(",")[header.index("val_acc1")] for row in metrics[1:]]
    (top1,) = [float(v) for v in val if v]
    card = (out / "README.md").read_text()
    assert f"validation top-1 at that epoch: {top1:.4f}" in card
    assert "masksub fit --config config.yaml" in card
    assert "masksub_lightning.data.DigitsDataModule" in card
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert model.num_classes == 10 and model.embed_dim == 96


def test_swin_mask_token_stays_out_of_the_export(tmp_path):
    swin_kwargs = dict(img_size=64, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4)
    module = MaskSubModule(
        "swin_tiny_patch4_window7_224", 4, model_kwargs=swin_kwargs, sub_branch="mask_token"
    )
    ckpt = train(tmp_path, module, datamodule=None, loader_size=64)
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert "model.patch_embed.masksub_mask_token" in stored  # trained, in the checkpoint ...
    out = export_checkpoint(ckpt, tmp_path / "export")
    rebuilt = timm.create_model(f"local-dir:{out}", pretrained=True).eval()  # ... but not in the timm model
    assert not hasattr(rebuilt.patch_embed, "masksub_mask_token")
    assert json.loads((out / "config.json").read_text())["model_args"]["depths"] == [1, 1]
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt(images), module_from(ckpt)(images))


def _pretraining_checkpoint(tmp_path, module, views: bool, class_path: str | None = None) -> Path:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    shape = (8, 2, 3, 32, 32) if views else (8, 3, 32, 32)
    data = TensorDataset(torch.randn(*shape), torch.zeros(8, dtype=torch.long))
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = quiet_trainer(
        max_steps=1, callbacks=[checkpoint], enable_checkpointing=True, limit_val_batches=0
    )
    trainer.fit(module, DataLoader(data, batch_size=4))
    path = tmp_path / "ckpt" / "last.ckpt"
    if class_path is not None:  # what `masksub fit` records: the checkpoint is recognised by it too
        ckpt = torch.load(path, weights_only=True)
        ckpt["hyper_parameters"]["_class_path"] = class_path
        torch.save(ckpt, path)
    return path


PRETRAINING = {"model": "vit_small_patch16_224", "model_kwargs": SHRUNK, "export_on_fit_end": False}
DECODER = {"decoder_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2}


@pytest.mark.parametrize("kind", ["MAEModule", "LUTModule"])
def test_a_pre_training_checkpoint_exports_its_encoder(tmp_path, capsys, kind):
    from masksub_lightning import pretraining
    from masksub_lightning.models.weights import load_pretrained

    if kind == "MAEModule":
        module = pretraining.MAEModule(**PRETRAINING, **DECODER)
        ckpt = _pretraining_checkpoint(tmp_path, module, views=False)
    else:
        module = pretraining.LUTModule(**PRETRAINING, **DECODER, proj_hidden_dim=32)
        ckpt = _pretraining_checkpoint(tmp_path, module, views=True, class_path="masksub_lightning.LUTModule")
    out = tmp_path / "exported"
    cli_main(["export", str(ckpt), str(out)])
    assert capsys.readouterr().out == (
        f"exported the pre-trained encoder of {ckpt} to {out / 'encoder.pth'} (timm key names, no decoder or "
        f"classifier): fine-tune from it with --model.init_args.pretrained_weights {out / 'encoder.pth'}\n"
    )
    encoder = torch.load(out / "encoder.pth", weights_only=True)["model"]
    assert set(encoder) == set(module.model.state_dict())
    classifier = timm.create_model("vit_small_patch16_224", num_classes=3, **SHRUNK)
    report = load_pretrained(classifier, out / "encoder.pth")
    assert not report.missing_encoder_keys and not report.unexpected_keys


def test_weights_that_do_not_fit_name_the_first_missing_and_unexpected_key(tmp_path):
    ckpt_path = train(
        tmp_path, MaskSubModule("vit_tiny_patch16_224", 4, model_kwargs=SHRUNK, sub_branch="none")
    )
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt["state_dict"]["model.fc_norm.weight"] = ckpt["state_dict"].pop("model.norm.weight")
    torch.save(ckpt, tmp_path / "renamed.ckpt")
    with pytest.raises(ExportError) as raised:
        export_checkpoint(tmp_path / "renamed.ckpt", tmp_path / "out")
    assert str(raised.value) == (
        f"the weights of {tmp_path / 'renamed.ckpt'} do not fit vit_tiny_patch16_224 as the checkpoint describes "
        "it: 1 missing key(s), the first 'norm.weight'; 1 unexpected key(s), the first 'fc_norm.weight'"
    )
