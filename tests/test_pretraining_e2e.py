"""End to end on real data (scikit-learn's digits), CPU: LUT pre-training -> export -> MaskSub fine-tuning.

The same run as ``benchmarks/lut_digits_pipeline.py --seeds 0`` (its defaults): both pre-training losses fall, and
fine-tuning from the LUT encoder beats fine-tuning from scratch at the same budget. A few minutes: slow-marked.
Numbers over several seeds: benchmarks/RESULTS.md, section "LUT pre-training".
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _pipeline():
    spec = importlib.util.spec_from_file_location(
        "lut_digits_pipeline", ROOT / "benchmarks/lut_digits_pipeline.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_lut_pretraining_helps_masksub_finetuning_on_digits(tmp_path):
    pipeline = _pipeline()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        encoder, history = pipeline.pretrain(tmp_path / "pre", seed=0, epochs=30)
        from_lut = pipeline.finetune(tmp_path / "ft_lut", 0, 5, encoder)
        scratch = pipeline.finetune(tmp_path / "ft_scratch", 0, 5, None)
    finally:
        torch.set_num_threads(threads)
    first, last = history[0], history[-1]
    assert last["train_loss_mae"] < 0.8 * first["train_loss_mae"]
    assert last["train_loss_bc"] < 0.8 * first["train_loss_bc"]
    assert set(torch.load(encoder, weights_only=True)) == {"model"}
    assert from_lut > scratch + 0.05, (from_lut, scratch)
