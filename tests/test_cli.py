"""The `masksub` LightningCLI: every config parses, fit -> validate end to end, bad values fail clearly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from masksub_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
# The paper recipes under configs/<family>/ are parsed and stepped by tests/test_recipes.py.
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
FAST = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=2",
    "--trainer.log_every_n_steps=1",
]


def test_configs_exist():
    assert QUICKSTART in CONFIGS and ROOT / "configs" / "quickstart_baseline.yaml" in CONFIGS


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_parses_through_the_cli(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["model"]["class_path"].endswith("MaskSubModule")
    assert resolved["data"]["class_path"].startswith("masksub_lightning.data.")


def test_quickstart_and_baseline_differ_only_in_the_sub_branch(capsys):
    resolved = {}
    for name in ("quickstart", "quickstart_baseline"):
        with pytest.raises(SystemExit):
            main(["fit", "--config", str(ROOT / "configs" / f"{name}.yaml"), "--print_config"])
        resolved[name] = yaml.safe_load(capsys.readouterr().out)
    masksub, baseline = resolved["quickstart"], resolved["quickstart_baseline"]
    assert masksub["model"]["init_args"].pop("sub_branch") == "mask"
    assert baseline["model"]["init_args"].pop("sub_branch") == "none"
    assert masksub["model"] == baseline["model"] and masksub["data"] == baseline["data"]
    assert masksub["trainer"]["max_epochs"] == baseline["trainer"]["max_epochs"]


def test_fit_then_validate_the_saved_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the config logs under ./runs
    main(["fit", "--config", str(QUICKSTART), *FAST, "--trainer.enable_progress_bar=false"])
    out = capsys.readouterr().out
    assert "final val_acc1=" in out
    run_dir = tmp_path / "runs" / "quickstart" / "version_0"
    saved = yaml.safe_load(
        (run_dir / "config.yaml").read_text()
    )  # resolved config next to logs + checkpoints
    assert saved["model"]["init_args"]["sub_branch"] == "mask" and saved["trainer"]["max_epochs"] == 1
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train_loss_main_step", "train_loss_sub_step", "val_acc1", "lr"} <= set(header)
    last = run_dir / "checkpoints" / "last.ckpt"
    hparams = torch.load(last, weights_only=True)["hyper_parameters"]
    assert hparams["num_classes"] == 10  # linked from data.num_classes

    main(
        [
            "validate",
            "--config",
            str(QUICKSTART),
            "--ckpt_path",
            str(last),
            "--trainer.limit_val_batches=2",
            "--trainer.enable_progress_bar=false",
        ]
    )
    out = capsys.readouterr().out
    assert "val_acc1" in out


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("--model.init_args.sub_ratio=1.5", "sub_ratio must be in [0, 1), got 1.5"),
        ("--model.init_args.sub_branch=masking", "unknown sub-branch 'masking'; known kinds:"),
        ("--model.init_args.optimizer=adamww", "unknown optimizer 'adamww'"),
    ],
)
def test_bad_values_exit_nonzero_with_a_message_naming_them(override, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(QUICKSTART), override])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err
    assert "Traceback" not in err


def test_unknown_key_is_named(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(QUICKSTART), "--model.init_args.sub_ratioo=0.5"])
    assert exit_info.value.code != 0
    assert "sub_ratioo" in capsys.readouterr().err


def test_console_script_exit_codes(tmp_path):
    """The installed `masksub` entry point: 0 on success, non-zero with a one-line message on a bad value."""
    exe = Path(sys.executable).with_name("masksub")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "masksub_lightning.cli"]
    ok = subprocess.run(
        [*cmd, "fit", "--config", str(QUICKSTART), "--print_config"], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        [*cmd, "fit", "--config", str(QUICKSTART), "--model.init_args.sub_ratio=1.5"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert bad.returncode == 2
    assert "masksub: error: sub_ratio must be in [0, 1), got 1.5" in bad.stderr
