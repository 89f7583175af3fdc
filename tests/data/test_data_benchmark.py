"""benchmarks/data_throughput.py --smoke runs and reports both recipe pipelines."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "data_throughput.py"


def test_throughput_smoke(capsys):
    spec = importlib.util.spec_from_file_location("data_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--smoke"])
    assert [r["variant"] for r in rows] == ["deit3-3aug", "rsb-randaug"]
    assert all(r["images"] == 48 and r["rate"] > 0 and r["per_worker"] == r["rate"] for r in rows)
    out = capsys.readouterr().out
    assert "img/s/worker" in out and "deit3-3aug" in out and "rsb-randaug" in out
