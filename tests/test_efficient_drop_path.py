"""efficient_drop_path: each residual branch runs on the samples timm's DropPath keeps, with timm's draws.

Reference = the same network with timm's own ``DropPath`` (a deep copy before the switch), the same seed, fp32.
Forward outputs come out equal; gradients are compared with ``allclose``, not bitwise: the branch's matmuls run
on fewer rows (the GEMM's blocking and the weight gradient's sum over rows change: timm adds the dropped rows'
exact zeros, we never compute them) and ``index_add`` replaces the multiply-add of the residual.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
from conftest import make_loader, quiet_trainer, tiny_vit_kwargs
from timm.layers import DropPath
from timm.models.vision_transformer import Block
from torch import nn

from masksub_lightning import MaskSubModule
from masksub_lightning.models.efficient_drop_path import (
    EfficientDropPathBlock,
    disable_efficient_drop_path,
    enable_efficient_drop_path,
)
from masksub_lightning.models.network import drop_path_rates, set_drop_path_profile

ROOT = Path(__file__).resolve().parents[1]
VIT = "vit_small_patch16_224"


def vit_pair(rate=0.5, profile="constant", init_values=0.1, depth=3):
    """(timm's network, the same weights with the switch on)."""
    kwargs = tiny_vit_kwargs(depth=depth, drop_path_rate=rate, init_values=init_values)
    reference = timm.create_model(VIT, num_classes=4, **kwargs)
    set_drop_path_profile(reference, profile, rate)
    efficient = copy.deepcopy(reference)
    assert enable_efficient_drop_path(efficient) == depth
    return reference, efficient


def run(model, images, seed):
    """Logits, the CPU RNG state after the forward, and the gradients of a fixed loss."""
    torch.manual_seed(seed)
    logits = model(images)
    state = torch.get_rng_state()
    model.zero_grad(set_to_none=True)
    (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    return logits.detach(), state, {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same_step(ref_run, eff_run):
    (ref_logits, ref_state, ref_grads), (logits, state, grads) = ref_run, eff_run
    assert torch.equal(state, ref_state), "the RNG stream advanced differently from timm's"
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def branch_batch_sizes(model):
    """Records the batch size each block's MLP runs on, in call order (eager models only)."""
    sizes = []

    def record(module, args, out):
        sizes.append(args[0].shape[0])

    for block in model.blocks:
        block.mlp.register_forward_hook(record)
    return sizes


def timm_kept_counts(model):
    """Records how many samples each timm DropPath after an MLP keeps (rows not multiplied by zero)."""
    counts = []

    def record(module, args, out):
        counts.append(int((out.flatten(1) != 0).any(1).sum()))

    for block in model.blocks:
        if isinstance(block.drop_path2, DropPath):
            block.drop_path2.register_forward_hook(record)
    return counts


# ------------------------------------------------------------------------------------------ equivalence
@pytest.mark.parametrize(
    "rate, profile, init_values",
    [(0.5, "constant", 0.1), (0.3, "linear", None), (0.6, "constant", None), (0.2, "linear", 1e-4)],
)
def test_outputs_gradients_and_rng_stream_equal_timm(rate, profile, init_values):
    reference, efficient = vit_pair(rate, profile, init_values)
    images = torch.randn(8, 3, 32, 32)
    for seed in range(3):
        assert_same_step(run(reference, images, seed), run(efficient, images, seed))


def test_branches_run_on_the_kept_samples_only():
    reference, efficient = vit_pair(rate=0.5, depth=4)
    kept, sizes = timm_kept_counts(reference), branch_batch_sizes(efficient)
    images = torch.randn(16, 3, 32, 32)
    for seed in range(3):
        run(reference, images, seed)
        run(efficient, images, seed)
    assert len(kept) == len(sizes) == 12
    assert sizes == [max(k, 2) for k in kept]  # at least two rows (padding scaled by 0)
    assert sum(sizes) < 0.75 * 16 * 12, f"no compute was skipped: {sizes}"


def test_linear_profile_first_block_has_no_draw_and_runs_every_sample():
    reference, efficient = vit_pair(rate=0.3, profile="linear")
    assert drop_path_rates(efficient)[:2] == [0.0, 0.0]  # timm built nn.Identity slots in block 0
    sizes = branch_batch_sizes(efficient)
    images = torch.randn(8, 3, 32, 32)
    assert_same_step(run(reference, images, 1), run(efficient, images, 1))
    assert sizes[0] == 8


@pytest.mark.parametrize("drop_prob", [1.0, 1e-9], ids=["all-dropped", "none-dropped"])
def test_all_dropped_and_none_dropped_batches(drop_prob):
    reference, efficient = vit_pair(rate=0.5)
    for model in (reference, efficient):
        for module in model.modules():
            if isinstance(module, DropPath):
                module.drop_prob = drop_prob
    sizes = branch_batch_sizes(efficient)
    images = torch.randn(8, 3, 32, 32)
    ref_run, eff_run = run(reference, images, 0), run(efficient, images, 0)
    assert_same_step(ref_run, eff_run)
    assert sizes == ([2, 2, 2] if drop_prob == 1.0 else [8, 8, 8])
    if (
        drop_prob == 1.0
    ):  # every block is skipped, yet each of its parameters gets a (zero) gradient, as in timm
        grads = eff_run[2]
        assert all(torch.count_nonzero(grads[n]) == 0 for n in grads if n.startswith("blocks."))


def test_per_sample_attention_mask_travels_with_the_rows():
    reference, efficient = vit_pair(rate=0.5, depth=2)
    tokens = torch.randn(6, 17, 32)
    mask = torch.randn(6, 1, 17, 17)
    for seed in range(3):
        torch.manual_seed(seed)
        expected = reference.blocks[1](tokens, attn_mask=mask)
        torch.manual_seed(seed)
        torch.testing.assert_close(
            efficient.blocks[1](tokens, attn_mask=mask), expected, rtol=1e-5, atol=1e-6
        )


def test_eval_is_timm_exactly_and_draws_nothing():
    reference, efficient = vit_pair(rate=0.5)
    reference.eval()
    efficient.eval()
    images = torch.randn(4, 3, 32, 32)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with torch.no_grad():
        assert torch.equal(efficient(images), reference(images))
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("init_values", [None, 0.1], ids=["bf16-branch", "fp32-branch-after-layer-scale"])
def test_bf16_autocast_matches_timm_and_its_scaling_dtype(init_values):
    # Without LayerScale the branch output is bf16 and timm rounds 1 / (1 - p) to bf16; with it, fp32.
    reference, efficient = vit_pair(rate=0.4, init_values=init_values)
    images = torch.randn(8, 3, 32, 32)
    outputs = []
    for model in (reference, efficient):
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs.append((model(images).float(), torch.get_rng_state()))
    (expected, ref_state), (logits, state) = outputs
    assert torch.equal(state, ref_state)
    torch.testing.assert_close(logits, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_cuda_bf16_step_matches_timm_and_advances_the_cuda_generator_alike():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    reference, efficient = (m.cuda() for m in vit_pair(rate=0.5, init_values=None))
    images = torch.randn(16, 3, 32, 32, device="cuda")
    results = []
    for model in (reference, efficient):
        torch.cuda.manual_seed(5)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(images).float()
        state = torch.cuda.get_rng_state()
        model.zero_grad(set_to_none=True)
        logits.sum().backward()
        results.append((logits.detach(), state, {n: p.grad.float() for n, p in model.named_parameters()}))
    (expected, ref_state, ref_grads), (logits, state, grads) = results
    assert torch.equal(state, ref_state)
    torch.testing.assert_close(logits, expected, rtol=2e-2, atol=2e-2)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=5e-2, atol=5e-3, msg=name)


# ---------------------------------------------------------------------------------------- in the module
def module_pair(sub_branch, profile="constant", **kwargs):
    options = dict(
        num_classes=4,
        model_kwargs=tiny_vit_kwargs(depth=3, drop_path_rate=0.4, init_values=0.1),
        drop_path_profile=profile,
        sub_branch=sub_branch,
        **kwargs,
    )
    torch.manual_seed(0)
    reference = MaskSubModule(VIT, **options)
    torch.manual_seed(0)
    efficient = MaskSubModule(VIT, efficient_drop_path=True, **options)
    return reference, efficient


def both_branches(module, images, seed):
    """Main and sub-branch logits of one micro-batch (as training_losses runs them), RNG state, gradients."""
    module.train()
    torch.manual_seed(seed)
    main = module.model(images)
    sub = module.sub_branch_forward(images) if module.sub_branch.active else main
    state = torch.get_rng_state()
    module.zero_grad(set_to_none=True)
    (main.sum() + (sub * torch.linspace(-1, 1, 4)).sum()).backward()
    grads = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}
    return torch.cat([main.detach(), sub.detach()]), state, grads


@pytest.mark.parametrize(
    "sub_branch, profile",
    [("token_mask", "constant"), ("droppath", "linear"), ("droppath", "constant"), ("none", "linear")],
)
def test_masksub_branches_equal_timm(sub_branch, profile):
    reference, efficient = module_pair(sub_branch, profile, sub_ratio=0.5)
    assert all(type(b) is EfficientDropPathBlock for b in efficient.model.blocks)
    images = torch.randn(8, 3, 32, 32)
    for seed in range(2):
        assert_same_step(both_branches(reference, images, seed), both_branches(efficient, images, seed))


def test_droppath_sub_branch_runs_fewer_rows_at_its_higher_rate():
    _, efficient = module_pair("droppath", "linear", sub_ratio=0.9)
    sizes = branch_batch_sizes(efficient.model)
    images = torch.randn(32, 3, 32, 32)
    both_branches(efficient, images, 0)
    main, sub = sizes[:3], sizes[3:]
    assert main[0] == 32  # linear profile: block 0 at rate 0 in the main branch
    assert sum(sub) < sum(main) and max(sub) < 32, f"main {main}, sub-branch at 0.9 {sub}"


def test_state_dict_and_modules_stay_timms_and_teardown_restores_the_classes():
    reference, efficient = vit_pair(rate=0.5)
    names = [(n, type(m)) for n, m in reference.named_modules()]
    assert efficient.state_dict().keys() == reference.state_dict().keys()
    assert [n for n, _ in efficient.named_modules()] == [n for n, _ in names]
    assert disable_efficient_drop_path(efficient) == 3
    assert [(n, type(m)) for n, m in efficient.named_modules()] == names
    assert all(type(b) is Block for b in efficient.blocks)
    plain = MaskSubModule(VIT, num_classes=4, model_kwargs=tiny_vit_kwargs(drop_path_rate=0.2))
    assert all(type(b) is Block for b in plain.model.blocks)


def test_deep_copy_keeps_the_switch():
    _, efficient = vit_pair()
    assert all(type(b) is EfficientDropPathBlock for b in copy.deepcopy(efficient).blocks)


# ------------------------------------------------------------------------------------------- bad input
def test_model_without_supported_blocks_is_refused_at_construction():
    with pytest.raises(ValueError) as caught:
        MaskSubModule("resnet18", num_classes=4, sub_branch="none", efficient_drop_path=True)
    message = str(caught.value)
    assert message == (
        "efficient_drop_path=True cannot handle ResNet: its drop-path slots sit in BasicBlock blocks; "
        "supported: timm vision_transformer.Block, timm vision_transformer.ResPostBlock"
    )
    with pytest.raises(ValueError, match=r"cannot handle Sequential: Sequential has no drop-path slots"):
        enable_efficient_drop_path(nn.Sequential(nn.Flatten(), nn.Linear(3, 4)))
    with pytest.raises(ValueError, match=r"^efficient_drop_path must be true or false, got 'yes'$"):
        MaskSubModule(VIT, num_classes=4, model_kwargs=tiny_vit_kwargs(), efficient_drop_path="yes")


# ------------------------------------------------------------------------------------------ torch.compile
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mask", "droppath"])
def test_compiled_training_does_not_recompile_when_the_kept_count_changes(kind):
    # At p = 0.5 on 8 samples the kept count of each of the 4 drop-paths per branch is Binomial(8, 0.5): over 8
    # steps it takes most values of 2..8 (counts 0 and 1 run 2 rows), so a shape-specialised graph would recompile.
    torch._dynamo.reset()
    kwargs = tiny_vit_kwargs(drop_path_rate=0.5)
    module = MaskSubModule(
        VIT,
        num_classes=4,
        model_kwargs=kwargs,
        drop_path_profile="constant",
        sub_branch=kind,
        compile=True,
        efficient_drop_path=True,
    )
    graphs = []  # no hooks in the network: they would change what is compiled

    class CountGraphs(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])

    trainer = quiet_trainer(
        max_steps=8, callbacks=[CountGraphs()], num_sanity_val_steps=0, limit_val_batches=0
    )
    trainer.fit(module, make_loader(n=64, batch_size=8))
    assert graphs[1] > 0, "nothing was compiled"
    assert graphs[-1] == graphs[1], f"graphs compiled after warm-up: {graphs}"


# ---------------------------------------------------------------------------------------------- benchmark
def test_benchmark_smoke(tmp_path):
    result = subprocess.run(
        [sys.executable, "benchmarks/efficient_drop_path.py", "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    rows = payload["results"]
    assert {(r["model"], r["rate"]) for r in rows} == {("tiny-vit", p) for p in (0.1, 0.5)}
    for row in rows:
        assert 0.0 < row["expected_ratio"] < 1.0
        assert row["time_ratio"]["median"] > 0.0
        assert (
            len(row["time_ratio"]["rounds"]) == payload["args"]["rounds"] * payload["args"]["steps"]
        )  # pairs
