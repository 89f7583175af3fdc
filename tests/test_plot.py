"""``masksub plot``: metrics.csv parsing, the figures of overlaid runs, the command, no torch import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_VIT, make_loader, quiet_trainer
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from masksub_lightning import MaskSubModule
from masksub_lightning.callbacks import BranchGradients, MaskedInputLoss
from masksub_lightning.commands import main as cli_main
from masksub_lightning.commands.plot import _run_names, find_runs, plot_runs, read_run

ROOT = Path(__file__).resolve().parents[1]

# The layout Lightning's CSVLogger writes: one row per log call, empty cells for the other columns.
CSV = """branch_grad_cosine,branch_grad_norm_main,epoch,lr,step,train_loss_main_epoch,train_loss_main_step,val_acc1
0.25,2.0,0,,0,,,
,,0,0.001,0,,1.5,
,,0,0.0005,1,,1.25,
,,0,,1,,,0.5
,,0,,1,1.375,,
-0.5,4.0,1,,2,,,
,,1,0.0001,2,,1.0,
,,1,,2,,,0.75
,,1,,2,1.0,,
"""


def write_run(folder: Path, text: str = CSV) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.csv").write_text(text)
    return folder


def test_read_run_splits_step_and_epoch_series(tmp_path):
    run = read_run(write_run(tmp_path / "a" / "version_0") / "metrics.csv")
    assert run.steps["branch_grad_norm_main"] == [(0, 2.0), (2, 4.0)]
    assert run.steps["branch_grad_cosine"] == [(0, 0.25), (2, -0.5)]
    assert run.steps["lr"] == [(0, 0.001), (1, 0.0005), (2, 0.0001)]
    assert run.steps["train_loss_main"] == [(0, 1.5), (1, 1.25), (2, 1.0)]
    assert run.epochs["train_loss_main"] == [(1, 1.375), (2, 1.0)]  # x = epoch + 1
    assert run.epochs["val_acc1"] == [(1, 0.5), (2, 0.75)]


def test_runs_are_found_and_named_by_their_shortest_distinct_folders(tmp_path):
    a = write_run(tmp_path / "masksub" / "version_0")
    b = write_run(tmp_path / "baseline" / "version_0")
    assert find_runs([tmp_path]) == [b / "metrics.csv", a / "metrics.csv"]
    assert find_runs([a, a / "metrics.csv"]) == [a / "metrics.csv"]
    assert _run_names([a / "metrics.csv", b / "metrics.csv"]) == ["masksub/version_0", "baseline/version_0"]
    with pytest.raises(ValueError, match="does not exist"):
        find_runs([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"holds no metrics\.csv"):
        find_runs([tmp_path / "empty"])


def test_plot_of_a_real_run_and_a_baseline_writes_every_figure(tmp_path):
    folders = []
    for kind in ("mask", "none"):
        module = MaskSubModule("vit_small_patch16_224", 4, model_kwargs=TINY_VIT, sub_branch=kind)
        logger = CSVLogger(tmp_path / "runs", name=kind)
        callbacks = [BranchGradients(every_n_steps=1), MaskedInputLoss(num_samples=16)]
        trainer = quiet_trainer(max_epochs=2, logger=logger, callbacks=callbacks, log_every_n_steps=1)
        trainer.fit(module, make_loader(n=32), make_loader(n=16, seed=1))
        folders.append(logger.log_dir)
    masksub = read_run(Path(folders[0]) / "metrics.csv")
    assert len(masksub.epochs["train_loss_sub"]) == 2 and len(masksub.steps["branch_grad_cosine"]) == 4

    written = plot_runs(folders, tmp_path / "figures")
    names = ["losses.png", "val_acc1.png", "branch_gradients.png", "masked_input.png", "lr.png"]
    assert [p.name for p in written] == names
    for path in written:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] >= 800
            colors = image.convert("RGB").getcolors(1 << 20)
            assert len(colors) > 20  # lines were drawn, not an empty canvas


def test_the_command_prints_the_figures_and_names_bad_input(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    cli_main(["plot", str(run), "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out.split()
    assert [Path(p).name for p in printed] == ["losses.png", "val_acc1.png", "branch_gradients.png", "lr.png"]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["plot", str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    assert "masksub plot: error: RUN_DIR" in capsys.readouterr().err
    bare = write_run(tmp_path / "bare", "epoch,step,other\n0,0,1.0\n")
    with pytest.raises(SystemExit):
        cli_main(["plot", str(bare)])
    assert "nothing to plot" in capsys.readouterr().err


def test_missing_matplotlib_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="masksub plot needs matplotlib: pip install matplotlib"):
        plot_runs([write_run(tmp_path / "run")], tmp_path)


def test_plot_does_not_import_torch(tmp_path):
    run = write_run(tmp_path / "run")
    code = (
        "import sys\nfrom masksub_lightning.commands import main\n"
        f"main(['plot', {str(run)!r}, '--out', {str(tmp_path)!r}])\n"
        "print('HEAVY', sorted(m for m in ('torch', 'lightning', 'timm') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout


def test_a_cosub_run_gets_its_two_loss_parts_plotted(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from masksub_lightning.commands.plot import _loss_figure

    csv = "epoch,step,train_loss_label_epoch,train_loss_cotrain_epoch\n0,0,0.5,0.25\n1,1,0.4,0.2\n"
    run = read_run(write_run(tmp_path / "cosub" / "version_0", csv) / "metrics.csv", "cosub")
    fig = _loss_figure(Figure, [run])
    lines = {line.get_label(): line.get_xydata().tolist() for line in fig.axes[0].get_lines()}
    assert lines == {"cosub: label": [[1, 0.5], [2, 0.4]], "cosub: co-training": [[1, 0.25], [2, 0.2]]}
