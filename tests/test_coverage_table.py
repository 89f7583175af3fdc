"""docs/method.md's coverage table says what the code does: regenerated columns must equal the doc's."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest
import torch

from masksub_lightning import MaskSubModule
from masksub_lightning.method.subbranch import SUB_BRANCHES, UnsupportedModelError, build_sub_branch

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs/method.md"
RESOLVED, OTHERS, GRADIENT = (
    "`mask` resolves to",
    "other kinds that can serve it",
    "one step = formula gradient",
)


@pytest.fixture(scope="module")
def table():
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmark scripts import their helpers by name
    return importlib.import_module("coverage_table")


@pytest.fixture(scope="module")
def doc_rows(table):
    return {row["family"]: row for row in table.parse_table(DOC.read_text())}


def kinds(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def test_every_family_is_listed_with_measured_figures(table, doc_rows):
    assert list(doc_rows) == [f.label for f in table.FAMILIES]
    for family, row in doc_rows.items():
        assert float(row["FLOP ratio"]) > 1.0, family
        ratio = re.fullmatch(r"(\d+\.\d+) \[(\d+\.\d+), (\d+\.\d+)\]", row["step-time ratio [q1, q3]"])
        assert ratio is not None, (family, row["step-time ratio [q1, q3]"])
        median, q1, q3 = map(float, ratio.groups())
        assert 0 < q1 <= median <= q3, family
    header = DOC.read_text().split(table.START, 1)[1].splitlines()[1]
    assert (
        header.startswith("Generated ")
        and "`python benchmarks/coverage_table.py --write docs/method.md`" in header
    )


def test_resolved_kind_and_other_kinds_match_the_doc(table, doc_rows):
    for family in table.FAMILIES:
        resolved, others = table.kinds_of(table.build_model(family))
        row = doc_rows[family.label]
        assert kinds(row[RESOLVED]) == [resolved], family.label
        assert kinds(row[OTHERS]) == others, family.label


def test_every_other_kind_refuses_at_setup_in_one_line_naming_the_listed_kinds(table, doc_rows):
    for family in table.FAMILIES:
        model = table.build_model(family)
        row = doc_rows[family.label]
        able = {"mask", "none", *kinds(row[RESOLVED]), *kinds(row[OTHERS])}
        for kind in sorted({k for k in SUB_BRANCHES if table.is_package_kind(k)} - able):
            with pytest.raises(UnsupportedModelError) as caught:
                build_sub_branch(kind, 0.5, model=model).setup(model)
            message = str(caught.value)
            assert "\n" not in message and message.startswith(f"sub-branch {kind!r} cannot handle ")
            listed = message.split("Kinds that can handle this model: ", 1)[1].split(", ")
            assert {k for k in listed if table.is_package_kind(k)} == able, (family.label, kind)


def test_module_construction_refuses_an_unsupported_kind_early():
    with pytest.raises(
        UnsupportedModelError, match=r"^sub-branch 'dropout' cannot handle ResNet: .*droppath"
    ):
        MaskSubModule(
            "resnet18",
            num_classes=4,
            model_kwargs=dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 32), stem_width=8),
            sub_branch="dropout",
        )


@pytest.mark.parametrize("label", ["ViT", "EVA-02", "ResNet"])
def test_gradient_check_holds_and_matches_the_doc(table, doc_rows, label):
    family = next(f for f in table.FAMILIES if f.label == label)
    verdict = table.gradient_check(family)
    assert verdict.startswith("yes ("), verdict
    assert doc_rows[label][GRADIENT].split(" (")[0] == "yes"


def test_gradient_check_fails_against_a_wrong_reference(table, monkeypatch):
    """The check can fail: with the unmasked image as the 'sub-branch' forward, the gradients differ."""
    monkeypatch.setattr(table, "independent_sub_forward", lambda module, images: lambda m: m(images))
    resnet = next(f for f in table.FAMILIES if f.label == "ResNet")
    assert table.gradient_check(resnet).startswith("NO (relative error")


def test_no_reference_says_n_a(table):
    module = MaskSubModule(
        "vit_small_patch16_224", num_classes=4, model_kwargs=table.TINY_VIT, sub_branch="droppath"
    )
    assert (
        table.independent_sub_forward(module, torch.zeros(1, 3, 32, 32))
        == "n/a: no independent reference for droppath"
    )


def test_smoke_run_writes_only_between_the_markers(table, tmp_path, capsys):
    target = tmp_path / "page.txt"
    target.write_text(f"before\n{table.START}\nold\n{table.END}\nafter\n")
    assert table.main(["--smoke", "--steps", "1", "--write", str(target)]) == 0
    text = target.read_text()
    assert text.startswith(f"before\n{table.START}\nGenerated ") and text.endswith(f"{table.END}\nafter\n")
    rows = table.parse_table(text)
    assert [r["family"] for r in rows] == ["ViT", "ResNet"]
    assert [kinds(r[RESOLVED]) for r in rows] == [["token_mask"], ["pixel_mask"]]
    assert float(rows[1]["FLOP ratio"]) == 2.0  # pixel masking runs the whole network twice
    with pytest.raises(SystemExit, match="expected one"):
        table.replace_between_markers("no markers", "x")
