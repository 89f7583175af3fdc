"""benchmarks/step_cost.py on a BEiT v2 (``--smoke --model tiny-beit``): ``mask`` resolves to the BEiT token drop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_step_cost_measures_the_beit_token_mask():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}  # this checkout's package, CPU
    run = subprocess.run(
        [sys.executable, "benchmarks/step_cost.py", "--smoke", "--model", "tiny-beit"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    (row,) = json.loads(run.stdout.strip().splitlines()[-1])["results"]
    assert row["model"] == "tiny-beit" and row["masking"] == "BeitTokenMask"
    # 1 + 8 of 17 tokens in the sub-branch (plus the full patch embedding and head): about half the main branch.
    assert 0.3 < row["sub_over_main_flops"] < 0.7 and 1.3 < row["flop_ratio"] < 1.7
    assert row["baseline_step_s"] > 0 and row["masksub_step_s"] > 0 and row["time_ratio"] > 0
