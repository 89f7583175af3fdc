"""benchmarks/method_comparison.py runs (``--smoke``) and reports baseline, MaskSub and CoSub side by side.

Timings at this size are noise, so the assertions are on structure and on what is deterministic: peak memory
(CoSub holds the activations of twice the images), the ratios' reference (the baseline is 1), the accuracy runs.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("baseline", "masksub", "cosub")


def test_method_comparison_smoke():
    # CPU, and this checkout's package (not another one installed in the environment).
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "benchmarks/method_comparison.py", "--smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, f"{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
    payload = json.loads(run.stdout.strip().splitlines()[-1])
    assert payload["benchmark"] == "method_comparison" and payload["device"].startswith("cpu")
    cost, accuracy = payload["cost"], payload["accuracy"]
    assert cost["model"] == "tiny-vit" and cost["blocks"] == 2  # --smoke: one fit, 2 measured blocks
    assert cost["baseline"]["time_ratio"] == 1.0 and cost["baseline"]["peak_ratio"] == 1.0
    for method in METHODS:
        row = cost[method]
        assert row["step_s"] > 0 and math.isfinite(row["time_ratio"]) and row["time_ratio"] > 0
        assert len(row["time_ratio_blocks"]) == 2
    # FLOPs are exact: CoSub runs the model on twice the images, MaskSub's sub-branch on half of the tokens.
    assert cost["baseline"]["flop_ratio"] == 1.0 and math.isclose(
        cost["cosub"]["flop_ratio"], 2.0, rel_tol=1e-6
    )
    assert 1.3 < cost["masksub"]["flop_ratio"] < 1.7
    # MaskSub frees its main graph before the sub-branch; CoSub runs 2B images in one graph.
    assert abs(cost["masksub"]["peak_ratio"] - 1) < 0.05
    assert 1.5 < cost["cosub"]["peak_ratio"] < 2.5 and cost["cosub"]["above_start_ratio"] > 1.5
    assert accuracy["epochs"] == 1 and accuracy["seeds"] == 2
    for method in METHODS:
        top1 = accuracy[method]["top1"]
        assert len(top1) == 2 and all(0 <= t <= 100 for t in top1)
        assert math.isclose(accuracy[method]["mean"], sum(top1) / 2)
    for table in ("(a) tiny-vit", "(b) digits val top-1"):
        assert table in run.stdout
