"""benchmarks/pretrain_eval.py runs end to end at a tiny size (--smoke) and reports what it claims to."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pretrain_eval_smoke(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # this checkout's package
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "pretrain_eval.py"), "--smoke"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "pretrain_eval"
    rows = result["rows"]
    assert [(r["seed"], r["method"]) for r in rows] == [(0, "untrained"), (0, "mae"), (0, "lut")]
    for row in rows:
        assert round(row["knn_top1"] * 50, 3).is_integer()  # a fraction of the 50 queries of --smoke
        assert 0 <= row["knn_top1"] <= 1 and 0 <= row["probe_top1"] <= 1
    for method in ("untrained", "mae", "lut"):
        row = next(r for r in rows if r["method"] == method)
        assert result["results"][method]["knn_top1"] == {"mean": row["knn_top1"], "std": 0.0}
    assert not list(tmp_path.iterdir()), "the run left files in its working directory"
