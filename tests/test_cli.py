"""The `masksub` LightningCLI: every config parses, fit -> validate end to end, bad values fail clearly."""

from __future__ import annotations

import builtins
import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from masksub_lightning.callbacks import AlwaysLastCheckpoint
from masksub_lightning.commands import main
from masksub_lightning.commands.cli import build_cli, check_data_fits_model
from masksub_lightning.commands.errors import ConfigError, is_setup_error
from masksub_lightning.training.checkpoint_io import AtomicCheckpointIO

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


def test_the_top_level_configs_are_the_quickstart_pair():
    # Anything else at the top of configs/ would be a recipe without a family folder (and without these tests).
    assert [p.name for p in CONFIGS] == ["quickstart.yaml", "quickstart_baseline.yaml"]


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
        ("--model.init_args.drop_path_profile=cosine", "drop_path_profile must be one of linear, constant"),
        ("--model.init_args.grad_accumulation=0", "grad_accumulation must be a positive int, got 0"),
        (
            "--model.init_args.grad_accumulation=100",  # found when the epoch length is known, before training
            "grad_accumulation=100 is more than the 22 train batches of an epoch",
        ),
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


YAML_MISTAKES = {
    "misspelt key": (
        "model:\n  init_args:\n    sub_ratoi: 0.3\n",
        "model.init_args: option 'sub_ratoi' is not accepted by masksub_lightning.MaskSubModule; "
        "did you mean 'sub_ratio'?",
    ),
    "wrong type": ("model:\n  init_args:\n    lr: fast\n", "model.init_args.lr: expected float, got 'fast'"),
    "trainer type": ("trainer:\n  max_epochs: many\n", "trainer.max_epochs: expected int, got 'many'"),
    "data key": (
        "data:\n  init_args:\n    batch_sise: 8\n",
        "data.init_args: option 'batch_sise' is not accepted by masksub_lightning.data.DigitsDataModule; "
        "did you mean 'batch_size'?",
    ),
    "top-level key": (
        "modle:\n  init_args:\n    lr: 0.1\n",
        "Subcommand 'fit' does not accept option 'modle.init_args.lr'; did you mean 'model'?",
    ),
    "class path": (
        "model:\n  class_path: masksub_lightning.MaskSubModul\n",
        "model: class_path 'masksub_lightning.MaskSubModul' does not name a class; "
        "did you mean 'masksub_lightning.MaskSubModule'?",
    ),
}


@pytest.mark.parametrize("case", list(YAML_MISTAKES))
def test_a_config_mistake_is_one_line(case, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["masksub"])  # else Lightning warns that pytest's argv is ignored
    text, expected = YAML_MISTAKES[case]
    (tmp_path / "mine.yaml").write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(QUICKSTART), "--config", str(tmp_path / "mine.yaml")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"masksub: error: {expected}\n"


def test_a_misspelt_yaml_key_is_the_whole_stderr_of_the_command(tmp_path):
    (tmp_path / "mine.yaml").write_text(QUICKSTART.read_text().replace("sub_ratio:", "sub_ratoi:"))
    run = subprocess.run(
        [sys.executable, "-m", "masksub_lightning", "fit", "--config", str(tmp_path / "mine.yaml")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode == 2
    assert run.stderr == (
        "masksub: error: model.init_args: option 'sub_ratoi' is not accepted by masksub_lightning.MaskSubModule; "
        "did you mean 'sub_ratio'?\n"
    )
    assert not (tmp_path / "runs").exists()


def test_an_unknown_option_is_suggested_and_help_still_prints(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["masksub"])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(QUICKSTART), "--checkpoint.monitr=val_loss"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "masksub: error: unrecognized arguments: --checkpoint.monitr=val_loss; did you mean 'checkpoint.monitor'?\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    assert "--ckpt_path CKPT_PATH" in capsys.readouterr().out


@pytest.mark.parametrize("prefix", ["--trainer.max_epoch", "--trainer.max_step"])
def test_an_abbreviated_option_is_refused_not_completed(capsys, prefix):
    """argparse completes unique prefixes by default: a typo would silently set another option."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(QUICKSTART), prefix, "1", "--print_config"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"masksub: error: unrecognized arguments: {prefix} 1; did you mean '{prefix[2:]}s'?\n"
    )


def test_console_script_exit_codes(tmp_path):
    """The installed `masksub` entry point: 0 on success, non-zero with a one-line message on a bad value."""
    exe = Path(sys.executable).with_name("masksub")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "masksub_lightning"]
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


# ------------------------------------------------------------------------------------------ fast help, no torch
NO_TORCH = """
import sys
from masksub_lightning.commands import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    assert e.code in (0, None), e.code
heavy = sorted(m for m in ("torch", "lightning", "jsonargparse", "timm") if m in sys.modules)
print("HEAVY", heavy)
"""


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["recipes", "--filter", "mae/"]])
def test_help_and_recipes_do_not_import_torch(args):
    run = subprocess.run(
        [sys.executable, "-c", NO_TORCH, *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    assert "HEAVY []" in run.stdout
    if args[0] != "recipes":
        for command in ("fit", "validate", "test", "predict", "recipes"):
            assert f"\n  {command} " in run.stdout
    else:
        assert "mae/vit_huge.yaml" in run.stdout


def test_bare_command_prints_help_and_unknown_command_is_named(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "usage: masksub <command>" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["fitt", "--config", str(QUICKSTART)])
    assert exit_info.value.code == 2
    assert (
        "unknown command 'fitt'; commands: fit, validate, test, predict, recipes" in capsys.readouterr().err
    )


def test_the_cli_writes_checkpoints_atomically_and_keeps_last_current():
    cli = build_cli(["--config", str(QUICKSTART)], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert isinstance(cli.trainer.checkpoint_callback, AlwaysLastCheckpoint)
    assert cli.trainer.checkpoint_callback.save_last is True


# ----------------------------------------------------------------------------------------- resume and errors
@contextlib.contextmanager
def _cwd(path: Path):
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 1-epoch quickstart run: its folder and last.ckpt (3 optimizer steps)."""
    folder = tmp_path_factory.mktemp("trained")
    with _cwd(folder):
        main(["fit", "--config", str(QUICKSTART), *FAST, "--trainer.enable_progress_bar=false"])
    last = folder / "runs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    return folder, last


def _fails(args: list[str], capsys, cwd: Path) -> str:
    """Run the CLI, expect exit 2 with exactly one error line and no traceback; return that line."""
    before = set(cwd.rglob("*.ckpt"))
    with _cwd(cwd), pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("masksub: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert set(cwd.rglob("*.ckpt")) == before  # nothing trained, nothing saved
    return lines[0]


def test_resume_with_conflicting_model_options_names_each_one(trained_run, capsys):
    folder, last = trained_run
    line = _fails(
        [
            "fit",
            "--config",
            str(QUICKSTART),
            "--ckpt_path",
            str(last),
            "--model.init_args.sub_ratio=0.25",
            "--model.init_args.lr=0.01",
            *FAST,
        ],
        capsys,
        folder,
    )
    assert "sub_ratio: checkpoint 0.5, given 0.25; lr: checkpoint 0.002, given 0.01" in line
    assert not (folder / "runs" / "quickstart" / "version_1").exists()  # stopped before any run folder


def test_resume_without_conflicts_continues_the_run(trained_run, tmp_path, capsys):
    # A 2-epoch run keeping every epoch's checkpoint; resumed from the first one with the same settings (another
    # max_epochs would change the LR schedule's length, which is refused: tests/test_schedule_resume.py).
    two_epochs = [*FAST, "--trainer.max_epochs=2", "--trainer.enable_progress_bar=false"]
    keep_all = ["--checkpoint.save_top_k=-1", "--checkpoint.filename=e{epoch}"]
    with _cwd(tmp_path):
        main(["fit", "--config", str(QUICKSTART), *two_epochs, *keep_all])
    first_epoch = tmp_path / "runs" / "quickstart" / "version_0" / "checkpoints" / "e0.ckpt"
    assert torch.load(first_epoch, weights_only=True)["global_step"] == 3
    with _cwd(tmp_path):
        main(
            [
                "fit",
                "--config",
                str(QUICKSTART),
                "--ckpt_path",
                str(first_epoch),
                *two_epochs,
                "--model.init_args.channels_last=true",  # allowed to change: how it runs, not what it trains
            ]
        )
    folder, last = trained_run
    run_dir = tmp_path / "runs" / "quickstart" / "version_1"
    resumed = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 6 and resumed["epoch"] == 1  # epoch 1 only: 3 more steps
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["init_args"]
    assert saved["sub_ratio"] == 0.5 and saved["channels_last"] is True

    # validate builds the checkpoint's model and says which given option it replaced
    with _cwd(folder):
        main(
            [
                "validate",
                "--config",
                str(QUICKSTART),
                "--ckpt_path",
                str(last),
                "--model.init_args.sub_ratio=0.25",
                "--trainer.limit_val_batches=1",
                "--trainer.enable_progress_bar=false",
            ]
        )
    assert "replaced the given sub_ratio: checkpoint 0.5, given 0.25" in capsys.readouterr().err


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_malicious_checkpoint_is_refused_before_it_runs_code(trained_run, tmp_path, capsys, command):
    _, last = trained_run
    ckpt = torch.load(last, weights_only=True)
    marker = tmp_path / "pwned"
    ckpt["payload"] = _Payload(marker)
    evil = tmp_path / "evil.ckpt"
    torch.save(ckpt, evil)
    line = _fails([command, "--config", str(QUICKSTART), "--ckpt_path", str(evil)], capsys, tmp_path)
    assert "evil.ckpt is not a safe checkpoint: it holds a reference to io.open" in line
    assert not marker.exists()


def test_unsafe_pretrained_weights_are_one_line_too(trained_run, tmp_path, capsys):
    _, last = trained_run
    marker = tmp_path / "pwned"
    evil = _weights_only(last, tmp_path).with_name("evil.pth")
    torch.save(
        {"model": torch.load(tmp_path / "weights.pth", weights_only=True), "x": _Payload(marker)}, evil
    )
    args = ["fit", "--config", str(QUICKSTART), *FAST, f"--model.init_args.pretrained_weights={evil}"]
    line = _fails(args, capsys, tmp_path)
    assert line.startswith(
        f"masksub: error: Refused to load {evil}: it holds objects other than tensors and plain containers"
    )
    assert not marker.exists()


def _image_folder(root: Path, empty_class: bool = False) -> Path:
    for split in ("train", "val"):
        for name in ("a", "b"):
            folder = root / split / name
            folder.mkdir(parents=True)
            if empty_class and split == "train" and name == "b":
                continue
            for i in range(2):
                Image.fromarray(np.full((40, 40, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    return root


def test_a_truncated_training_image_ends_the_run_naming_it_and_the_skip_option(tmp_path):
    root = _image_folder(tmp_path / "d")
    bad = root / "train" / "a" / "cut.jpg"
    Image.fromarray(np.full((40, 40, 3), 99, np.uint8)).save(bad)
    bad.write_bytes(bad.read_bytes()[:300])
    data = [*_data("masksub_lightning.data.ImageFolderDataModule", root), "--data.num_workers=2"]
    data.append("--data.batch_size=5")  # one batch of all five train images: the bad one is drawn
    run = subprocess.run(
        [sys.executable, "-m", "masksub_lightning", "fit", "--config", str(QUICKSTART), *FAST, *data],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode == 1  # found while training, in a loader worker: the run failed
    assert "Traceback" not in run.stderr
    (line,) = [line for line in run.stderr.splitlines() if line.startswith("masksub: error:")]
    assert line.startswith(f"masksub: error: Cannot decode image file {bad}: ")
    assert line.endswith("; to skip such files, set bad_samples: skip (--data.init_args.bad_samples skip)")
    assert run.stderr.endswith(f"{line}\n")

    traced = subprocess.run(  # MASKSUB_TRACEBACK=1: the traceback, whose last line is the same message
        [sys.executable, "-m", "masksub_lightning", "fit", "--config", str(QUICKSTART), *FAST, *data],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "MASKSUB_TRACEBACK": "1"},
    )
    assert traced.returncode == 1 and "Traceback" in traced.stderr
    last = traced.stderr.strip().splitlines()[-1]
    assert last == "masksub_lightning.data.datasets.CorruptImageError: " + line.removeprefix(
        "masksub: error: "
    )


def _cub(root: Path) -> Path:
    base = root / "CUB_200_2011"
    (base / "images" / "001.a").mkdir(parents=True)
    (base / "classes.txt").write_text("1 001.a\n2 002.b\n")
    (base / "images.txt").write_text("1 001.a/x.jpg\n2 001.a/y.jpg\n")
    (base / "image_class_labels.txt").write_text("1 1\n2 300\n")  # class 300 of 2
    (base / "train_test_split.txt").write_text("1 1\n2 1\n")
    return root


def _data(class_path: str, root: Path) -> list[str]:
    return [
        f"--data={class_path}",
        f"--data.root={root}",
        "--data.img_size=32",
        "--data.batch_size=2",
        "--data.num_workers=0",
    ]


def _bad_ckpt(last: Path, tmp_path: Path) -> Path:
    ckpt = torch.load(last, weights_only=True)
    ckpt["state_dict"]["model.head.weight"] = ckpt["state_dict"]["model.head.weight"][:, :50]
    torch.save(ckpt, tmp_path / "narrow.ckpt")
    return tmp_path / "narrow.ckpt"


def _weights_only(last: Path, tmp_path: Path) -> Path:
    """The network's state dict alone, as timm / torchvision / MAE release their weights."""
    state = torch.load(last, weights_only=True)["state_dict"]
    torch.save({k.removeprefix("model."): v for k, v in state.items()}, tmp_path / "weights.pth")
    return tmp_path / "weights.pth"


VIT_DYNAMIC = (
    '{"img_size": 32, "patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3, "dynamic_img_size": true}'
)

SETUP_ERRORS = {
    "empty class folder": (
        lambda tmp, last: _data(
            "masksub_lightning.data.ImageFolderDataModule", _image_folder(tmp / "d", True)
        ),
        r"Class folder .*train/b contains no images",
    ),
    "bad annotation label": (
        lambda tmp, last: _data("masksub_lightning.data.CUB200DataModule", _cub(tmp / "cub")),
        r"001.a/y.jpg: label 300 is outside \[1, 2\] \(1 bad label\(s\) in total; 1-based class ids, as in "
        r".*cub/CUB_200_2011/image_class_labels.txt\)$",
    ),
    "checkpoint of another shape": (
        lambda tmp, last: ["--ckpt_path", str(_bad_ckpt(last, tmp))],
        r"the checkpoint does not fit the model: size mismatch for model.head.weight: copying a param with "
        r"shape torch.Size\(\[10, 50\]\) from checkpoint",
    ),
    "plain state dict as ckpt_path": (
        lambda tmp, last: ["--ckpt_path", str(_weights_only(last, tmp))],
        r"^masksub: error: --ckpt_path .*/weights.pth is not a Lightning checkpoint \(no 'state_dict' / "
        r"'pytorch-lightning_version': a plain state dict of weights\?\); to start training from these weights, "
        r"use --model.init_args.pretrained_weights .*/weights.pth instead of --ckpt_path$",
    ),
    "checkpoint of another class count": (
        lambda tmp, last: [
            *_data("masksub_lightning.data.ImageFolderDataModule", _image_folder(tmp / "d")),
            "--ckpt_path",
            str(last),
        ],
        r"has a 10-class head but data.num_classes=2",
    ),
    "num_classes given": (
        lambda tmp, last: ["--model.init_args.num_classes=5"],
        r"model.init_args.num_classes=5 but the data has 10 classes \(data.num_classes, which sets the model's\)",
    ),
    "image size": (
        lambda tmp, last: ["--data.init_args.img_size=64"],
        r"data img_size=64 but the model vit_tiny_patch16_224 takes 32x32 images",
    ),
    "patch size": (
        lambda tmp, last: [f"--model.init_args.model_kwargs={VIT_DYNAMIC}", "--data.init_args.img_size=36"],
        r"data img_size=36 is not a multiple of the model vit_tiny_patch16_224's patch size 8x8",
    ),
    "pixel cells that cannot tile the image": (
        lambda tmp, last: [
            "--model.init_args.model=resnet18",
            '--model.init_args.model_kwargs={"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 32], "stem_width": 8}',
            "--data.init_args.img_size=28",
        ],
        r"^masksub: error: pixel_mask: cell_size=32 cannot mask 28x28 images at ratio 0.5: .* Cell sizes that tile "
        r"28x28 into >= 4 cells: \[14, 7, 4, 2\]; set sub_branch_kwargs.cell_size to one of them",
    ),
    "log dir under a file": (
        lambda tmp, last: [
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.save_dir={_file(tmp)}/runs",
        ],
        r"log directory \(CSVLogger\) .*blocker/runs/lightning_logs/version_0 cannot be created",
    ),
    "checkpoint dir under a file": (
        lambda tmp, last: [f"--checkpoint.dirpath={_file(tmp)}/ckpt"],
        r"checkpoint directory \(checkpoint.dirpath\) .*blocker/ckpt cannot be created",
    ),
}


def _file(tmp: Path) -> Path:
    (tmp / "blocker").write_text("a file, not a folder")
    return tmp / "blocker"


@pytest.mark.parametrize("case", list(SETUP_ERRORS))
def test_setup_errors_end_in_one_line_and_exit_2(case, trained_run, tmp_path, capsys):
    make_args, expected = SETUP_ERRORS[case]
    args = ["fit", "--config", str(QUICKSTART), *FAST, *make_args(tmp_path, trained_run[1])]
    line = _fails(args, capsys, tmp_path)
    assert re.search(expected, line), line
    assert not list(tmp_path.glob("runs/*/version_*"))  # no empty run folder left behind


def test_a_failed_set_up_removes_only_the_run_folder_it_created(trained_run, tmp_path, capsys):
    earlier = tmp_path / "runs" / "quickstart" / "version_0"
    (earlier / "checkpoints").mkdir(parents=True)  # another run's, empty: not this process's to remove
    bad_ckpt = ["--ckpt_path", str(_bad_ckpt(trained_run[1], tmp_path))]  # fails after config.yaml is written
    _fails(["fit", "--config", str(QUICKSTART), *FAST, *bad_ckpt], capsys, tmp_path)
    assert sorted(p.name for p in (tmp_path / "runs" / "quickstart").iterdir()) == ["version_0"]
    assert (earlier / "checkpoints").is_dir()


def test_resuming_clears_a_killed_runs_temporary_file_next_to_the_checkpoint(trained_run, tmp_path, capsys):
    from masksub_lightning.training.checkpoint_io import _HOST, TMP_SUFFIX

    folder = tmp_path / "old_run"
    folder.mkdir()
    last = folder / "last.ckpt"
    last.write_bytes(trained_run[1].read_bytes())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = folder / f".last.ckpt.{_HOST}-{dead.pid}-abcd1234{TMP_SUFFIX}"  # what a SIGKILL mid-save leaves
    live = folder / f".last.ckpt.{_HOST}-{os.getpid()}-abcd1234{TMP_SUFFIX}"  # a running save: kept
    stale.write_bytes(b"\0" * 1000)
    live.write_bytes(b"\0" * 1000)
    with _cwd(tmp_path):  # the same settings: the run is complete, so this restores and ends
        main(["fit", "--config", str(QUICKSTART), *FAST, "--ckpt_path", str(last)])
    assert not stale.exists() and live.exists()
    assert (tmp_path / "runs" / "quickstart" / "version_0" / "checkpoints").is_dir()  # it wrote elsewhere


@pytest.mark.skipif(not Path("/sys").is_dir() or os.geteuid() != 0, reason="needs Linux /sys as root")
def test_read_only_checkpoint_dir_is_reported_before_training(tmp_path, capsys):
    line = _fails(
        ["fit", "--config", str(QUICKSTART), *FAST, "--checkpoint.dirpath=/sys/masksub-ckpt"],
        capsys,
        tmp_path,
    )
    assert line.endswith("/sys/masksub-ckpt cannot be created: Operation not permitted")


def test_class_count_and_head_are_checked_against_the_data():
    from masksub_lightning import MaskSubModule

    kwargs = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}
    module = MaskSubModule("vit_tiny_patch16_224", num_classes=10, model_kwargs=kwargs)
    data = SimpleNamespace(num_classes=5, img_size=32, soft_targets=True)
    with pytest.raises(
        ConfigError, match=r"model num_classes=10 but data.num_classes=5 \(it also sizes the Mixup"
    ):
        check_data_fits_model(module, data)
    module.num_classes = 5  # a head that was not rebuilt
    with pytest.raises(ConfigError, match=r"classifier has 10 outputs but data.num_classes=5"):
        check_data_fits_model(module, data)
    module.num_classes = 10
    check_data_fits_model(module, SimpleNamespace(num_classes=10, img_size=32))  # consistent: passes


def test_the_head_of_a_plain_module_is_checked_against_the_data():
    from torch import nn

    from masksub_lightning import MaskSubModule

    class Net(nn.Module):  # a classifier from outside timm: its head is found by name
        def __init__(self):
            super().__init__()
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))

        def forward(self, x):
            return self.head(x)

    module = MaskSubModule(Net(), num_classes=10, sub_branch="pixel_mask", sub_branch_kwargs={"cell_size": 4})
    module.num_classes = 5
    with pytest.raises(ConfigError, match=r"^the model's classifier has 10 outputs but data.num_classes=5$"):
        check_data_fits_model(module, SimpleNamespace(num_classes=5, img_size=8))


def training_step():  # named like the hook: an error raised under it happened while training
    raise ValueError("bad batch")


def setup():
    raise ValueError("bad option")


def _raised(fn) -> BaseException:
    try:
        fn()
    except BaseException as err:
        return err
    raise AssertionError("did not raise")


def test_setup_errors_are_told_apart_from_training_errors(monkeypatch):
    assert is_setup_error(_raised(setup))
    assert not is_setup_error(_raised(training_step))  # keeps its traceback
    assert not is_setup_error(_raised(lambda: torch.zeros(2) @ torch.zeros(3)))  # a RuntimeError bug
    state_dict = RuntimeError("Error(s) in loading state_dict for M:\n\tsize mismatch for w")
    assert is_setup_error(state_dict)
    monkeypatch.setenv("MASKSUB_TRACEBACK", "1")
    assert not is_setup_error(_raised(setup))


def test_a_diverged_run_ends_in_one_line_and_exit_1(monkeypatch, capsys):
    import masksub_lightning.commands.cli as cli
    from masksub_lightning.training.guards import NonFiniteLossError  # matched by type, not by its name

    def diverge(args):
        raise NonFiniteLossError("non-finite loss (NaN or inf) at step 7 in the sub-branch; stopping")

    monkeypatch.setattr(cli, "build_cli", diverge)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(QUICKSTART)])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == (
        "masksub: error: non-finite loss (NaN or inf) at step 7 in the sub-branch; stopping\n"
    )


def test_a_full_disk_is_reported_before_training(tmp_path, capsys, monkeypatch):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=10))
    line = _fails(["fit", "--config", str(QUICKSTART), *FAST], capsys, tmp_path)
    assert re.search(
        r"checkpoint directory .*runs/quickstart/version_0/checkpoints has 10 bytes free but a "
        r"checkpoint of this run takes about \d+\.\d MiB",
        line,
    ), line


def test_room_for_the_weights_but_not_the_optimizer_state_is_reported_before_training(
    tmp_path, capsys, monkeypatch
):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    # The quickstart ViT's weights are 1.2 MiB; its checkpoint with AdamW's two moments is 3.9 MB.
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=2 * 2**20))
    line = _fails(["fit", "--config", str(QUICKSTART), *FAST], capsys, tmp_path)
    assert line.endswith(
        "checkpoints has 2.0 MiB free but a checkpoint of this run takes about 3.8 MiB (weights, optimizer state "
        "and any EMA copy)"
    ), line


@pytest.mark.parametrize(
    ("option", "named"),
    [
        ("--trainer.accumulate_grad_batches=4", "use --model.init_args.grad_accumulation 4"),
        ("--trainer.gradient_clip_val=1.0", "use --model.init_args.grad_clip_norm 1.0"),
        ("--trainer.strategy=fsdp", "use --trainer.strategy fsdp2"),
    ],
)
def test_trainer_options_manual_optimization_cannot_take_name_the_one_to_use(option, named, tmp_path, capsys):
    """Lightning would raise deep in fit (or, for fsdp on a CPU, with its own message): one line before it."""
    line = _fails(["fit", "--config", str(QUICKSTART), *FAST, option], capsys, tmp_path)
    assert named in line, line
    assert not list(tmp_path.glob("runs/*/version_*"))  # stopped before any run folder
