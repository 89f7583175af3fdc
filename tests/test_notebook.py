"""The quickstart notebook: it runs end to end, shows real results, and matches its source script.

``notebooks/quickstart.py`` (jupytext "percent" format: ``# %%`` code cells, ``# %% [markdown]`` cells of
``# ``-prefixed lines) is the reviewable source; ``notebooks/quickstart.ipynb`` is generated from it, with outputs
cleared. After editing the script, regenerate the notebook with::

    python tests/test_notebook.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "notebooks" / "quickstart.py"
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
EPOCHS_VAR = "MASKSUB_NOTEBOOK_EPOCHS"

_CELL_MARKER = re.compile(r"^# %%(?P<title>[^\[]*)(?:\[(?P<kind>\w+)\])?\s*$")
_KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}


def build_notebook(source: str) -> nbformat.NotebookNode:
    """A notebook (outputs cleared) from a percent-format script: one cell per ``# %%`` marker.

    Lines before the first marker (the jupytext ``# ---`` header) are not part of the notebook. Markdown cell
    lines lose their leading ``# `` (or ``#``); leading and trailing blank lines of every cell are dropped.
    """
    cells: list[tuple[str, list[str]]] = []
    for line in source.splitlines():
        marker = _CELL_MARKER.match(line)
        if marker:
            kind = marker.group("kind") or "code"
            if kind not in ("code", "markdown", "md"):
                raise ValueError(f"unsupported cell kind {kind!r} in {line!r}")
            cells.append(("markdown" if kind in ("markdown", "md") else "code", []))
        elif cells:
            cells[-1][1].append(line)

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = dict(_KERNELSPEC)
    nb.metadata["language_info"] = {"name": "python"}
    for kind, lines in cells:
        if kind == "markdown":
            bad = [x for x in lines if x and not x.startswith("#")]
            if bad:
                raise ValueError(f"markdown cell line without a leading '#': {bad[0]!r}")
            lines = [x[2:] if x.startswith("# ") else x[1:] for x in lines]
        text = "\n".join(lines).strip("\n")
        if not text.strip():
            continue
        new_cell = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        cell = new_cell(text)
        cell.pop("id", None)  # ids are random; leave them out so regenerating gives the same file
        nb.cells.append(cell)
    nb.nbformat, nb.nbformat_minor = 4, 4  # the last minor version without mandatory cell ids
    return nb


def write_notebook(path: Path = NOTEBOOK, source: Path = SOURCE) -> None:
    nb = build_notebook(source.read_text())
    nbformat.validate(nb)
    path.write_text(nbformat.writes(nb) + "\n")


# ---------------------------------------------------------------------------------------------- static checks
def test_notebook_matches_its_source_script():
    on_disk = nbformat.read(NOTEBOOK, as_version=4)
    expected = build_notebook(SOURCE.read_text())
    got = [(c.cell_type, c.source) for c in on_disk.cells]
    want = [(c.cell_type, c.source) for c in expected.cells]
    assert got == want, (
        f"{NOTEBOOK.name} is out of sync with {SOURCE.name}: run `python tests/test_notebook.py` to regenerate it"
    )
    assert on_disk.metadata.kernelspec.name == "python3"


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "clear the notebook's outputs"


def test_epochs_can_be_overridden_from_the_environment():
    # The run below relies on this line to keep the test short.
    assert re.search(
        rf'^EPOCHS = int\(os\.environ\.get\("{EPOCHS_VAR}", "\d+"\)\)$', SOURCE.read_text(), re.M
    )


# ------------------------------------------------------------------------------------------------ execution
def _text_outputs(nb: nbformat.NotebookNode) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream" and out.name == "stdout":
                parts.append(out.text)
            elif out.output_type in ("execute_result", "display_data") and "text/plain" in out.data:
                parts.append(out.data["text/plain"])
    return "\n".join(parts)


def test_notebook_runs_and_reports_both_runs(tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv(EPOCHS_VAR, "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError if any cell fails

    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    text = _text_outputs(nb)
    assert "EPOCHS=1," in text, "the environment variable did not reach the notebook"

    finals = dict(re.findall(r"^final val_acc1 (\w+)=(\S+)$", text, re.M))
    assert set(finals) == {"masksub", "baseline"}, text
    for name, value in finals.items():
        assert 0.0 <= float(value) <= 1.0, f"{name}: {value}"
        # Also reported per run, from the same logged metric.
        assert re.search(
            rf"sub_branch='{'mask' if name == 'masksub' else 'none'}'.*val_acc1={value}$", text, re.M
        )
    # Even one epoch learns something on the digits (chance is 0.10).
    assert max(float(v) for v in finals.values()) > 0.15

    # The masks shown are the ones the sub-branches applied, at the configured ratio.
    fractions = re.findall(r"masked fraction (\d\.\d+)", text)
    assert [float(f) for f in fractions] == [0.5, 0.5], text

    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 2, "expected the curves figure and the mask grid"
    assert all(len(o.data["image/png"]) > 1000 for o in images)


# ------------------------------------------------------------------ the other notebooks (same format, tiny runs)
#: Notebooks besides the quickstart: name -> what their executed text must show (regexes).
OTHER_NOTEBOOKS = {
    "custom_subbranch": [
        r"^timm ViT with the 'square' sub-branch: SquareSubBranch\(ratio=0\.25\), val_acc1=(0\.\d+|1\.0+)$",
        r"^torchvision ResNet-18 with the 'square' sub-branch: val_acc1=(0\.\d+|1\.0+)$",
        r"^hidden fraction 0\.25$",
    ],
    "analysis": [
        *(
            rf"^final val_acc1 {arm} mean=0\.\d+ std=0\.\d+ n=\d+$"
            for arm in (
                "baseline",
                "MaskSub_r=0.25",
                "MaskSub_r=0.5",
                "MaskSub_r=0.75",
                "DropSub_p=0.2",
                "PathSub_p=0.2",
            )
        ),
        r"^sub/main gradient ratio: first quarter \d+\.\d+, last quarter \d+\.\d+$",
    ],
    "finetune": [
        r"^wrote 1437 train and 360 val PNG files under ",
        r"^loaded pretrained weights from .*upstream\.safetensors: Loaded 54/56 model tensors",
        r"^sub_branch='mask': \d+ epochs in \d+ s, final val_acc1=(0\.\d+|1\.0+)$",
        r"^sub_branch='none': \d+ epochs in \d+ s, final val_acc1=(0\.\d+|1\.0+)$",
        r"^\['README\.md', 'config\.json', 'model\.safetensors'\]$",
        r"^reloaded: VisionTransformer, num_classes=10, \(3, 32, 32\)$",
        r"^max \|logit difference\| on 360 val images: 0$",
    ],
}
#: The environment of the tiny runs: each notebook takes a few seconds (EPOCHS / SEEDS / ... parameter cells).
TINY = {"EPOCHS": "1", "SEEDS": "2", "LIMIT_BATCHES": "3", "PRETRAIN_STEPS": "5"}


@pytest.mark.parametrize("name", sorted(OTHER_NOTEBOOKS))
def test_other_notebook_matches_its_source_and_has_no_outputs(name):
    source, notebook = ROOT / "notebooks" / f"{name}.py", ROOT / "notebooks" / f"{name}.ipynb"
    on_disk = nbformat.read(notebook, as_version=4)
    nbformat.validate(on_disk)
    want = [(c.cell_type, c.source) for c in build_notebook(source.read_text()).cells]
    assert [(c.cell_type, c.source) for c in on_disk.cells] == want, (
        f"{notebook.name} is out of sync with {source.name}: run `python tests/test_notebook.py` to regenerate it"
    )
    assert all(c.outputs == [] for c in on_disk.cells if c.cell_type == "code"), (
        "clear the notebook's outputs"
    )


def _execute(
    name: str, tmp_path: Path, monkeypatch, env: dict[str, str]
) -> tuple[nbformat.NotebookNode, str]:
    """Run notebooks/<name>.ipynb in tmp_path with MASKSUB_NOTEBOOK_<key>=value set; (notebook, its stdout)."""
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    for var, value in env.items():
        monkeypatch.setenv(f"MASKSUB_NOTEBOOK_{var}", value)
    monkeypatch.setenv("MASKSUB_NOTEBOOK_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("MASKSUB_FIGURES_DIR", str(tmp_path / "figures"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=1800, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError if any cell fails
    return nb, _text_outputs(nb)


def _check_outputs(name: str, nb: nbformat.NotebookNode, text: str, tmp_path: Path) -> None:
    for pattern in OTHER_NOTEBOOKS[name]:
        assert re.search(pattern, text, re.M), f"{pattern!r} not in:\n{text}"
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= {"analysis": 3, "custom_subbranch": 1, "finetune": 0}[name]
    if name == "analysis":
        written = sorted(p.name for p in (tmp_path / "figures").iterdir())
        assert written == [
            "analysis_difficulty_control.png",
            "analysis_losses.png",
            "analysis_mask_ratio.png",
        ]
    if name == "finetune":
        _check_finetune_export(text, tmp_path / "work")


def _check_finetune_export(text: str, work: Path) -> None:
    """The exported folder, loaded with timm alone and fed the val PNGs through a hand-written preprocessing,
    scores the val top-1 that the notebook's MaskSub run logged."""
    import json

    import numpy as np
    import timm
    import torch
    from PIL import Image

    logged = float(re.search(r"^final val_acc1 masksub=(\S+)$", text, re.M).group(1))
    reported = re.search(r"^reloaded model's val top-1: (\S+) \(training run logged (\S+)\)$", text, re.M)
    assert reported and reported.group(1) == reported.group(2) == f"{logged:.4f}", text

    export = work / "export" / "masksub"
    config = json.loads((export / "config.json").read_text())
    assert config["num_classes"] == 10 and config["architecture"] == "vit_tiny_patch16_224"
    cfg = config["pretrained_cfg"]
    mean, std = torch.tensor(cfg["mean"]).view(3, 1, 1), torch.tensor(cfg["std"]).view(3, 1, 1)
    model = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
    val = work / "digits_folders" / "val"
    classes = sorted(p.name for p in val.iterdir())
    assert classes == [f"digit_{d}" for d in range(10)]
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((val / name).glob("*.png")):
            rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
            images.append((torch.from_numpy(rgb).permute(2, 0, 1) - mean) / std)
            labels.append(label)
    # The same tensors as the training run's evaluation (ImageFolderDataModule as the notebook builds it): the
    # exported mean / std are the ones the network was trained with.
    from masksub_lightning.data import ImageFolderDataModule

    data = ImageFolderDataModule(
        root=str(val.parent), batch_size=len(labels), num_workers=0, img_size=32, eval_crop_pct=1.0
    )
    data.setup("validate")
    reference, reference_labels = next(iter(data.val_dataloader()))
    assert reference_labels.tolist() == labels
    torch.testing.assert_close(torch.stack(images), reference, atol=1e-5, rtol=0)
    with torch.no_grad():
        predictions = model(torch.stack(images)).argmax(1)
    top1 = (predictions == torch.tensor(labels)).float().mean().item()
    assert len(labels) == 360
    assert top1 == pytest.approx(logged, abs=1e-4)


@pytest.mark.parametrize("name", sorted(OTHER_NOTEBOOKS))
def test_other_notebook_runs_at_a_tiny_size(name, tmp_path, monkeypatch):
    nb, text = _execute(name, tmp_path, monkeypatch, TINY)
    assert re.search(r"^EPOCHS=1, ", text, re.M), "the environment variables did not reach the notebook"
    _check_outputs(name, nb, text, tmp_path)


def test_analysis_runs_on_a_local_cifar10_copy(tmp_path, monkeypatch):
    """MASKSUB_NOTEBOOK_CIFAR10 switches the analysis to CIFAR-10 in its real on-disk format (a tiny fake copy)."""
    sys.path.insert(0, str(ROOT / "tests" / "data"))
    from fake_data import _cifar_batch, _pickle

    base = tmp_path / "cifar" / "cifar-10-batches-py"
    for b in range(1, 6):
        _pickle(base / f"data_batch_{b}", _cifar_batch([i % 10 for i in range(64)], "labels"))
    _pickle(base / "test_batch", _cifar_batch([i % 10 for i in range(64)], "labels"))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _pickle(base / "batches.meta", {"label_names": names, "num_cases_per_batch": 64, "num_vis": 3072})
    nb, text = _execute("analysis", tmp_path, monkeypatch, {**TINY, "CIFAR10": str(tmp_path / "cifar")})
    assert f"data: CIFAR-10 from {tmp_path / 'cifar'}" in text
    _check_outputs("analysis", nb, text, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["quickstart", *sorted(OTHER_NOTEBOOKS)])
def test_notebook_runs_at_its_full_size(name, tmp_path, monkeypatch):
    """The notebooks at their default sizes (minutes each): the runs learn the digits."""
    nb, text = _execute(name, tmp_path, monkeypatch, {})
    if name == "quickstart":
        finals = [float(v) for v in re.findall(r"^final val_acc1 \w+=(\S+)$", text, re.M)]
    else:
        _check_outputs(name, nb, text, tmp_path)
        finals = [float(v) for v in re.findall(r"val_acc1[ =](?:\S+ mean=)?(0\.\d+|1\.0+)", text)]
    assert len(finals) >= 2, text
    assert min(finals) > 0.3, text  # chance is 0.10


if __name__ == "__main__":
    write_notebook()
    print(f"wrote {NOTEBOOK.relative_to(ROOT)} from {SOURCE.relative_to(ROOT)}", file=sys.stderr)
    for other in OTHER_NOTEBOOKS:
        source = ROOT / "notebooks" / f"{other}.py"
        write_notebook(ROOT / "notebooks" / f"{other}.ipynb", source)
        print(f"wrote notebooks/{other}.ipynb from notebooks/{other}.py", file=sys.stderr)
