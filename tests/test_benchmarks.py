"""The benchmark scripts run (``--smoke``: tiny models on CPU) and report sane figures.

Each script runs as a subprocess, as a user runs it; the five start together (most of their time is importing
torch), and every test reads its script's final JSON line. Timings on a shared CPU are noise at this size, so the
assertions are on what is deterministic (FLOP counts, memory, structure) and on times only being positive.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNS = {
    "step_cost": ["benchmarks/step_cost.py", "--smoke"],
    "memory": ["benchmarks/memory.py", "--smoke"],
    "overhead": ["benchmarks/overhead.py", "--smoke"],
    "gpu_throughput": ["benchmarks/gpu_throughput.py", "--smoke", "--peak-flops", "1e12"],
}


@pytest.fixture(scope="module")
def runs() -> dict[str, subprocess.CompletedProcess]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # CPU everywhere, even on a GPU machine
    procs = {
        name: subprocess.Popen(
            [sys.executable, *cmd],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, cmd in RUNS.items()
    }
    done = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


def result(runs, name: str) -> dict:
    run = runs[name]
    assert run.returncode == 0, f"{name} failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
    payload = json.loads(run.stdout.strip().splitlines()[-1])
    assert payload["benchmark"] == name
    assert payload["device"].startswith("cpu")
    return payload


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def by_model(rows: list[dict]) -> dict[str, dict]:
    return {row["model"]: row for row in rows}


def test_step_cost_reports_the_flop_ratio_and_a_time_ratio(runs):
    rows = by_model(result(runs, "step_cost")["results"])
    assert set(rows) == {"tiny-vit", "tiny-resnet"}
    vit, cnn = rows["tiny-vit"], rows["tiny-resnet"]
    # Token masking at r=0.5: the sub-branch runs 1 + 8 of 17 tokens (plus the full patch embedding and head).
    assert vit["masking"] == "TokenMask"
    assert 1.3 < vit["flop_ratio"] < 1.7
    assert 0.3 < vit["sub_over_main_flops"] < 0.7
    # Pixel masking zeroes inputs but runs the whole network: the sub-branch costs exactly one more pass.
    assert cnn["masking"] == "PixelMask"
    assert cnn["flop_ratio"] == pytest.approx(2.0, abs=1e-6)
    for row in rows.values():
        assert positive(row["baseline_step_s"]) and positive(row["masksub_step_s"])
        assert positive(row["time_ratio"])
        assert row["time_ratio_min"] <= row["time_ratio_q1"] <= row["time_ratio"] <= row["time_ratio_q3"]
        assert row["interleave"] == "step" and len(row["time_ratio_pairs"]) == 2 * 4  # 2 rounds x 4 pairs
        assert positive(row["compute_time_ratio"]) and row["baseline_compute_s"] < row["baseline_step_s"]
        assert row["gap"] == pytest.approx(row["time_ratio"] / row["flop_ratio"] - 1)
        assert row["masksub_gflops"] > row["baseline_gflops"] > 0


def test_memory_shows_the_main_graph_freed_before_the_sub_branch(runs):
    rows = by_model(result(runs, "memory")["results"])
    assert set(rows) == {"tiny-vit", "tiny-resnet"}
    for row in rows.values():
        assert positive(row["baseline_peak_mib"]) and positive(row["masksub_peak_mib"])
        assert row["peak_ratio"] == pytest.approx(row["masksub_peak_mib"] / row["baseline_peak_mib"])
        # The main branch of MaskSub is the baseline step's forward/backward: same peak.
        assert row["masksub_main_peak_mib"] == pytest.approx(row["baseline_peak_mib"], rel=0.02)
        # When the sub-branch starts, the main graph is gone: what is live is the step-start state plus the
        # gradients, far below the main-branch peak.
        assert row["masksub_at_sub_start_mib"] < row["baseline_start_mib"] + 2 * row["grad_mib"] + 0.5
        assert row["masksub_at_sub_start_mib"] < 0.6 * row["masksub_main_peak_mib"]
    # A half-length token sequence needs less than the full one: ViT MaskSub's peak is the main branch's.
    vit = rows["tiny-vit"]
    assert vit["masksub_sub_peak_mib"] < vit["masksub_main_peak_mib"]
    assert vit["peak_ratio"] == pytest.approx(1.0, abs=0.01)


def test_overhead_compares_the_same_step(runs):
    (row,) = result(runs, "overhead")["results"]
    assert row["model"] == "tiny-vit" and row["sub_branch"] == "mask"
    assert positive(row["plain_step_s"]) and positive(row["lightning_step_s"])
    assert positive(row["ratio"])
    assert math.isfinite(row["overhead_ms"])
    assert row["interleave"] == "step" and row["pairs"] == 2 * 5  # 2 rounds of 5 measured steps
    assert row["ratio_q1"] <= row["ratio"] <= row["ratio_q3"]


def test_gpu_throughput_smoke_runs_every_variant(runs):
    payload = result(runs, "gpu_throughput")
    assert payload["peak_flops"] == 1e12
    rows = payload["results"]
    variants = {(r["model"], r["variant"]) for r in rows}
    assert variants == {
        (m, v)
        for m in ("tiny-vit", "tiny-resnet")
        for v in ("lightning masksub", "lightning baseline", "plain baseline")
    }
    for r in rows:
        assert positive(r["images_per_s"]) and positive(r["mfu"]) and positive(r["tflops_per_step"])
        assert r["images_per_s"] == pytest.approx(r["batch_size"] / r["step_s"])
        assert r["channels_last"] == (r["model"] == "tiny-resnet")  # auto: CNNs only
    ratios = by_model(payload["ratios"])
    assert 1.3 < ratios["tiny-vit"]["flop_ratio"] < 1.7
    assert ratios["tiny-resnet"]["flop_ratio"] == pytest.approx(2.0, abs=1e-6)


def test_gpu_throughput_refuses_to_run_on_cpu_without_smoke(monkeypatch, capsys):
    # In-process (torch is already imported here): the refusal comes before any work.
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    gpu_throughput = importlib.import_module("gpu_throughput")
    assert gpu_throughput.main(["--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA device" in err and "--smoke" in err


def test_sharded_memory_counts_the_states_of_ddp_and_fsdp2():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    footprint = importlib.import_module("sharded_memory").footprint
    import timm

    params = sum(p.numel() for p in timm.create_model("vit_tiny_patch16_224").parameters())
    one, eight = footprint("vit_tiny_patch16_224", 1), footprint("vit_tiny_patch16_224", 8)
    assert one["parameters"] == params and one["blocks"] == 12  # ViT-Ti: 12 blocks
    assert one["ddp_bytes"] == 16 * params  # fp32 weight, gradient and two AdamW moments
    assert one["fsdp2_state_bytes"] == one["ddp_bytes"]  # one rank holds everything
    # 8 ranks: an eighth of each unit, rounded up per unit (13 units: at most 13 extra elements x 16 bytes).
    assert 0 <= eight["fsdp2_state_bytes"] - eight["ddp_bytes"] / 8 <= 13 * 16
    assert footprint("vit_tiny_patch16_224", 8, "sgd_nomomentum")["ddp_bytes"] == 8 * params
