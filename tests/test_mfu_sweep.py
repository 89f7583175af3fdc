"""benchmarks/mfu_sweep.py: runs on CPU at a tiny size, and its MFU is model FLOPs / step time / peak."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
PEAK = 2e9  # a made-up peak FLOP/s for the CPU runs


@pytest.fixture
def sweep(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("mfu_sweep")


def tiny_vit_step_flops(batch_size: int) -> float:
    """FLOPs of one plain training step of the ``tiny-vit`` preset, counted without the benchmark's helpers.

    Attention runs as explicit matmuls (timm's ``fused_attn`` off), which the stock counter sees; the fused SDPA
    kernel the benchmark runs also recomputes the attention scores (q @ k^T) in its backward, one more batched
    matmul per block, added here by formula.
    """
    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
    model = timm.create_model("vit_small_patch16_224", num_classes=10, **kwargs).train()
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    images, labels = torch.randn(batch_size, 3, 32, 32), torch.randint(0, 10, (batch_size,))
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(images), labels).backward()
    tokens, heads, head_dim = 16 + 1, 2, 16
    recompute = kwargs["depth"] * 2 * batch_size * heads * tokens * tokens * head_dim
    return counter.get_total_flops() + recompute


def test_mfu_is_counted_flops_over_step_time_over_peak(sweep, monkeypatch, capsys):
    """A fake clock (0.5 s per baseline step, 0.8 s per MaskSub step): every figure follows by arithmetic."""
    fake = {False: 0.5, True: 0.8}
    monkeypatch.setattr(sweep, "time_variant", lambda module, *a, **k: fake[module.sub_branch.active])
    assert sweep.main(["--smoke", "--model", "tiny-vit", "--peak-flops", str(PEAK)]) == 0
    out = capsys.readouterr().out
    payload = json.loads(out.strip().splitlines()[-1])
    rows = {(r["setting"], r["variant"]): r for r in payload["results"]}
    assert set(rows) == {
        (s, v) for s in ("reference", "batch 32", "foreach AdamW") for v in ("baseline", "masksub")
    }

    for batch, setting in ((16, "reference"), (32, "batch 32")):
        base = rows[setting, "baseline"]
        flops = tiny_vit_step_flops(batch)
        assert base["tflops_per_step"] * 1e12 == pytest.approx(flops, rel=1e-9)
        assert base["step_s"] == 0.5 and base["images_per_s"] == batch / 0.5
        assert base["mfu"] == pytest.approx(flops / 0.5 / PEAK, rel=1e-9)
        masked = rows[setting, "masksub"]
        assert masked["mfu"] == pytest.approx(masked["tflops_per_step"] * 1e12 / 0.8 / PEAK, rel=1e-12)
        # The sub-branch runs 1 + 8 of the 17 tokens: more than none, less than a second full pass.
        assert 1.3 * flops < masked["tflops_per_step"] * 1e12 < 1.7 * flops
        # The printed table carries the same figure.
        line = next(s for s in out.splitlines() if re.match(rf"\s*tiny-vit\s+{setting}\s+baseline\s", s))
        assert line.split()[-1] == f"{flops / 0.5 / PEAK:.1%}"

    # Same time per step, twice the batch: the batch-32 setting is the best of each variant.
    assert {(r["setting"], r["variant"]) for r in payload["best"]} == {
        ("batch 32", "baseline"),
        ("batch 32", "masksub"),
    }


def test_smoke_runs_on_cpu_and_names_why_a_setting_is_skipped():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "benchmarks/mfu_sweep.py", "--smoke", "--peak-flops", str(PEAK)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    payload = json.loads(run.stdout.strip().splitlines()[-1])
    assert payload["benchmark"] == "mfu_sweep" and payload["device"].startswith("cpu")
    measured = {(r["family"], r["setting"]) for r in payload["results"]}
    assert ("tiny-resnet", "channels-last off") in measured and ("tiny-vit", "batch 32") in measured
    for r in payload["results"]:
        assert r["step_s"] > 0
        assert r["mfu"] == pytest.approx(r["tflops_per_step"] * 1e12 / r["step_s"] / PEAK, rel=1e-12)
    reasons = {(s["family"], s["setting"]): s["reason"] for s in payload["skipped"]}
    assert reasons["tiny-vit", "SDPA cudnn"] == "CUDA-only: the cudnn SDPA kernel needs a GPU"
    assert reasons["tiny-vit", "TF32 off"] == "CUDA-only: TF32 is a GPU tensor-core format"
    assert reasons["tiny-resnet", "compile default"].startswith("not on CPU")
    assert ("tiny-resnet", "SDPA flash") not in reasons | dict.fromkeys(measured)  # no attention: not offered
    assert "MFU sweep: one knob changed" in run.stdout and "Best setting per family" in run.stdout


def test_refuses_to_run_on_cpu_without_smoke(sweep, capsys):
    assert sweep.main(["--device", "cpu"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_settings_change_one_knob_each(sweep):
    import _common as C

    vit = sweep.Family(C.PRESETS["tiny-vit"], sweep.Setting(256, "default"), attention=True)
    settings = dict(sweep.settings_for(vit))
    base = settings.pop("reference")
    assert list(settings) == [
        "batch 512",
        "SDPA cudnn",
        "eager",
        "compile max-autotune-no-cudagraphs",
        "foreach AdamW",
        "TF32 off",
        "SDPA flash",
        "SDPA efficient",
    ]
    for setting in settings.values():
        changed = [k for k in vars(base) if getattr(setting, k) != getattr(base, k)]
        assert len(changed) == 1, changed
