"""The paths users run at scale: several nodes, SLURM's requeue, and a resume on another world size.

Runs of several processes are real ``masksub fit`` processes: ``torchrun`` launchers (one per simulated node,
static rendezvous on 127.0.0.1) or tasks started with the variables ``srun`` sets; gloo on CPU. The run is a tiny
recipe-like MaskSub run (ViT token masking, drop path, Mixup + CutMix, repeated augmentation 3, EMA) on a 90-image
ImageFolder dataset; ``tests/scale_helpers.py`` records the sample ids, step and learning rate of every batch
each rank trains on, so the tests can count every sample of every epoch across ranks and across a resume.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from scale_helpers import (
    DATA,
    TRAIN_PER_CLASS,
    VAL_PER_CLASS,
    RecordedImageFolder,
    assert_epoch_counts,
    fake_scontrol,
    fit_args,
    lr_per_step,
    read_log,
    run_env,
    samples_per_epoch,
    samples_per_step,
    srun,
    torchrun,
    wait_all,
    write_config,
)
from test_resume import DATA as DIGITS
from test_resume import FAMILIES, FinalWeights, assert_bitwise_equal

from masksub_lightning import MaskSubModule
from masksub_lightning.callbacks import ResumeCheckpoint
from masksub_lightning.commands import main
from masksub_lightning.commands.cli import build_cli
from masksub_lightning.data import DigitsDataModule

sys.path.insert(0, str(Path(__file__).parent / "data"))
from fake_data import write_image_folder

N_TRAIN = 3 * TRAIN_PER_CLASS
REPEATS = DATA["repeated_aug"]
BATCH = DATA["batch_size"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    write_image_folder(root, n_train=TRAIN_PER_CLASS, n_val=VAL_PER_CLASS, noise=60)
    return root


def launch(out: Path, config: Path, nodes: int, per_node: int, *extra: str, signals: str = "", **kw) -> Path:
    """``masksub fit`` on ``nodes`` x ``per_node`` processes (torchrun), writing logs and weights under ``out``."""
    env = run_env(
        MASKSUB_TEST_LOG=str(out / "log{rank}.jsonl"),
        MASKSUB_TEST_WEIGHTS=str(out / "weights{rank}.pt"),
        MASKSUB_TEST_SIGNALS=signals,
    )
    layout = (f"--trainer.devices={per_node}", f"--trainer.num_nodes={nodes}")
    out.mkdir(parents=True, exist_ok=True)
    results = torchrun(fit_args(config, out, *layout, *extra, **kw), nodes, per_node, env)
    (out / "output.txt").write_text("\n".join(text for _, text in results))
    if not signals:
        assert all(code == 0 for code, _ in results), results[0][1][-3000:]
    return out


def weights(out: Path, world: int) -> list[dict]:
    return [torch.load(out / f"weights{rank}.pt", weights_only=True) for rank in range(world)]


def validate_on_one_process(ckpt: Path, folder: Path) -> dict[str, float]:
    """Validation metrics of a checkpoint on one process (the reference for the sharded evaluation)."""
    module = MaskSubModule.load_from_checkpoint(ckpt)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    (metrics,) = trainer.validate(
        module, datamodule=RecordedImageFolder(root=str(folder), **DATA), verbose=False
    )
    return metrics


def assert_evaluation_equal(vals: list[dict], reference: dict[str, float]) -> None:
    """Every rank logged the same final metrics, and they are the one-process ones (top-1 exactly)."""
    final = [v["val"] for v in vals if v["step"] == max(u["step"] for u in vals)]
    assert final and all(f == final[0] for f in final)
    assert final[0]["val_acc1"] == reference["val_acc1"] and final[0]["val_acc5"] == reference["val_acc5"]
    assert final[0]["val_loss"] == pytest.approx(reference["val_loss"], abs=1e-6)


# ------------------------------------------------------------------------------ two nodes (default suite)
@pytest.fixture(scope="module")
def two_nodes(folder, tmp_path_factory) -> Path:
    """2 nodes x 1 process, 2 epochs of 11 steps (global batch 8: 88 of the 90 images); resume.ckpt at step 15."""
    root = tmp_path_factory.mktemp("two_nodes")
    return launch(root / "run", write_config(root / "config.yaml", folder, every=15), 2, 1)


def test_two_nodes_train_every_sample_as_often_as_expected_and_evaluate_like_one_process(two_nodes, folder):
    batches, vals = read_log(two_nodes / "log{rank}.jsonl", 2)
    assert sorted({b["step"] for b in batches}) == list(range(1, 23))  # 2 epochs x 88 // 8 steps
    assert all(len(b["ids"]) == BATCH for b in batches)
    epochs = samples_per_epoch(batches)
    assert sorted(epochs) == [0, 1]
    for counts in epochs.values():
        assert_epoch_counts(counts, N_TRAIN, 2 * BATCH, REPEATS)  # 29 images 3 times, 1 image once
    assert epochs[0] != epochs[1]  # a new order each epoch
    # Each step's global batch is the two ranks' batches; both ranks train every step.
    assert all(sum(c.values()) == 2 * BATCH for c in samples_per_step(batches).values())
    assert_evaluation_equal(vals, validate_on_one_process(two_nodes / "checkpoints" / "last.ckpt", folder))


def test_a_two_process_checkpoint_resumes_on_one_process_with_twice_the_accumulation(
    two_nodes, folder, tmp_path, monkeypatch
):
    """resume.ckpt of step 15 (4 of epoch 1's 11 steps) on 1 process x grad_accumulation 2: the rest of the
    epoch has the uninterrupted run's samples, step for step, and its learning rates; the run ends at step 22."""
    ckpt = two_nodes / "checkpoints" / "resume.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 15
    monkeypatch.setenv("MASKSUB_TEST_LOG", str(tmp_path / "log{rank}.jsonl"))
    args = fit_args(Path(two_nodes.parent / "config.yaml"), tmp_path)[
        3:
    ]  # without "-m masksub_lightning fit"
    cli = build_cli([*args, "--trainer.strategy=auto", "--model.init_args.grad_accumulation=2"], run=False)
    with pytest.warns(UserWarning, match="resuming a checkpoint of 2 processes on 1: the epoch continues"):
        cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=ckpt)
    assert cli.trainer.global_step == 22

    full, _ = read_log(two_nodes / "log{rank}.jsonl", 2)
    resumed, _ = read_log(tmp_path / "log{rank}.jsonl", 1)
    assert sorted({b["step"] for b in resumed}) == list(range(16, 23))
    assert all(sum(b["step"] == s for b in resumed) == 2 for s in range(16, 23))  # two micro-batches a step
    assert samples_per_step(resumed) == samples_per_step(full, after=15)
    assert lr_per_step(resumed) == {s: lr for s, lr in lr_per_step(full).items() if s > 15}
    # Epoch 1 across the resume: every sample as often as in the uninterrupted epoch, none skipped or repeated.
    before = [b for b in full if b["epoch"] == 1 and b["step"] <= 15]
    assert_epoch_counts(samples_per_epoch(before + resumed)[1], N_TRAIN, 2 * BATCH, REPEATS)


def test_a_resume_that_changes_the_global_batch_is_refused_naming_the_setting(two_nodes, tmp_path, capsys):
    args = fit_args(Path(two_nodes.parent / "config.yaml"), tmp_path)[2:]
    ckpt = two_nodes / "checkpoints" / "resume.ckpt"
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--trainer.strategy=auto", "--ckpt_path", str(ckpt)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        "masksub: error: cannot resume on 1 process: the checkpoint's global batch was 8 (batch_size 4 x 2 "
        "processes x grad_accumulation 1), this run's is 4 (batch_size 4 x 1 process x grad_accumulation 1); "
        "set grad_accumulation=2 or batch_size=8 to keep it"
    )


# ------------------------------------------------------------------------------ SLURM (default suite)
class _Interrupt(Exception):
    pass


class _SignalThenStop(L.Callback):
    """At batch start: SIGUSR1 to this process when ``global_step == at``; an exception when ``== stop``."""

    def __init__(self, at: int, stop: int) -> None:
        self.at, self.stop = at, stop

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            os.kill(os.getpid(), signal.SIGUSR1)
        if trainer.global_step == self.stop:
            raise _Interrupt


def _slurm_fit(root: Path, *extra: L.Callback, hold: bool = True) -> dict:
    L.seed_everything(0, verbose=False)
    module = MaskSubModule(**FAMILIES["vit_token_mask"], num_classes=10, lr=2e-3, warmup_epochs=0.5)
    final = FinalWeights()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=3,
        limit_train_batches=5,
        limit_val_batches=2,
        deterministic=True,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        callbacks=[
            final,
            EMAWeightAveraging(decay=0.9),
            ResumeCheckpoint(every_n_train_steps=100, slurm_requeue_at_step_boundary=hold),
            *extra,
        ],
    )
    assert type(trainer._accelerator_connector.cluster_environment).__name__ == "SLURMEnvironment"
    trainer.fit(module, datamodule=DigitsDataModule(**DIGITS))  # no ckpt_path: Lightning looks for hpc_ckpt_*
    return final.weights


def test_slurm_requeue_signal_saves_at_the_step_boundary_and_the_requeued_job_resumes_exactly(
    tmp_path, monkeypatch
):
    """One SLURM task: SIGUSR1 while step 7 runs -> hpc_ckpt_1.ckpt after step 7 and ``scontrol requeue``; the
    requeued job (same directory, no --ckpt_path) resumes from it and ends bitwise equal to an uninterrupted run."""
    calls = tmp_path / "scontrol.log"
    fake_scontrol(tmp_path / "bin", calls)
    for name, value in [
        ("SLURM_JOB_ID", "4242"),
        ("SLURM_JOB_NAME", "masksub-test"),
        ("SLURM_NTASKS", "1"),
        ("SLURM_NTASKS_PER_NODE", "1"),
        ("SLURM_NNODES", "1"),
        ("SLURM_PROCID", "0"),
        ("SLURM_LOCALID", "0"),
        ("SLURM_NODEID", "0"),
        ("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"),
    ]:
        monkeypatch.setenv(name, value)
    full = _slurm_fit(tmp_path / "full")
    job = tmp_path / "job"
    with pytest.raises(_Interrupt):  # SLURM's kill after the requeue, two steps later
        _slurm_fit(job, _SignalThenStop(at=6, stop=9))
    assert calls.read_text() == "requeue 4242\n"
    (hpc,) = job.glob("hpc_ckpt_*.ckpt")
    saved = torch.load(hpc, weights_only=True)
    assert hpc.name == "hpc_ckpt_1.ckpt" and saved["global_step"] == 7
    assert_bitwise_equal(full, _slurm_fit(job))  # the requeued job: same command, same directory


# ------------------------------------------------------------------------------------------------ slow
@pytest.mark.slow
def test_two_nodes_of_two_processes_equal_one_node_of_four(folder, tmp_path):
    config = write_config(tmp_path / "config.yaml", folder)
    multi = launch(tmp_path / "2x2", config, 2, 2)
    single = launch(tmp_path / "1x4", config, 1, 4)
    for a, b in zip(weights(multi, 4), weights(single, 4)):
        assert_bitwise_equal(a, b)
    batches, vals = read_log(multi / "log{rank}.jsonl", 4)
    reference, reference_vals = read_log(single / "log{rank}.jsonl", 4)
    assert samples_per_step(batches) == samples_per_step(reference) and len(samples_per_step(batches)) == 10
    assert lr_per_step(batches) == lr_per_step(reference)
    for counts in samples_per_epoch(batches).values():
        assert_epoch_counts(counts, N_TRAIN, 4 * BATCH, REPEATS)  # 80 of 90: 26 images 3 times, 1 twice
    assert [v["val"] for v in vals] == [v["val"] for v in reference_vals]
    assert_evaluation_equal(vals, validate_on_one_process(multi / "checkpoints" / "last.ckpt", folder))


@pytest.mark.slow
def test_slurm_job_of_two_nodes_requeues_once_at_a_step_boundary_and_resumes_exactly(folder, tmp_path):
    """The signal reaches the two tasks at different steps (6 and 7): one hpc checkpoint after step 7, written
    by both, one requeue; the tasks are SIGKILLed at step 9 and the requeued job resumes bitwise exactly."""
    config = write_config(tmp_path / "config.yaml", folder, every=100)
    calls = tmp_path / "scontrol.log"
    bin_dir = tmp_path / "bin"
    fake_scontrol(bin_dir, calls)

    def job(out: Path, **per_rank: dict) -> list[tuple[int, str]]:
        out.mkdir(exist_ok=True)
        env = run_env(
            MASKSUB_TEST_LOG=str(out / "log{rank}.jsonl"), MASKSUB_TEST_WEIGHTS=str(out / "w{rank}.pt")
        )
        args = fit_args(config, out, "--trainer.devices=1", "--trainer.num_nodes=2")
        return wait_all(srun(args, 2, 1, env, "4242", bin_dir, **per_rank))

    assert all(code == 0 for code, _ in job(tmp_path / "full"))
    killed = job(
        tmp_path / "job",
        rank0={"MASKSUB_TEST_SIGNALS": "USR1@6,KILL@9"},
        rank1={"MASKSUB_TEST_SIGNALS": "USR1@7,KILL@9"},
    )
    assert [code for code, _ in killed] == [-signal.SIGKILL] * 2, killed[0][1][-3000:]
    assert calls.read_text() == "requeue 4242\n"
    (hpc,) = (tmp_path / "job").glob("hpc_ckpt_*.ckpt")
    assert torch.load(hpc, weights_only=True)["global_step"] == 7
    requeued = job(tmp_path / "job")
    assert all(code == 0 for code, _ in requeued), requeued[0][1][-3000:]
    assert f"Restoring states from the checkpoint path at {hpc}" in requeued[0][1]
    for rank in (0, 1):
        full = torch.load(tmp_path / "full" / f"w{rank}.pt", weights_only=True)
        assert_bitwise_equal(full, torch.load(tmp_path / "job" / f"w{rank}.pt", weights_only=True))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("world", "accumulation", "new_world", "change"),
    [
        (4, 1, 2, "--model.init_args.grad_accumulation=2"),
        (2, 2, 4, "--model.init_args.grad_accumulation=1"),
        (4, 1, 2, "--data.init_args.batch_size=8"),
    ],
    ids=["4_to_2_accumulation", "2_to_4_accumulation", "4_to_2_batch_size"],
)
def test_a_run_killed_mid_epoch_resumes_on_another_world_size(
    folder, tmp_path, world, accumulation, new_world, change
):
    """Global batch 16 (5 steps an epoch), resume.ckpt every 4 steps, SIGKILL at step 9 -> resumed from step 8,
    3 steps into epoch 1, on the other world size with the global batch kept: the uninterrupted run's samples,
    step for step, and its learning rates; the epoch as a whole has every sample as often as expected.

    Both a changed grad_accumulation and a changed batch_size run through ``masksub`` itself.
    """
    config = write_config(
        tmp_path / "config.yaml", folder, every=4, model={"grad_accumulation": accumulation}
    )
    full = launch(tmp_path / "full", config, 1, world)
    cut = launch(tmp_path / "cut", config, 1, world, signals="KILL@9")
    ckpt = cut / "checkpoints" / "resume.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 8
    resumed = launch(tmp_path / "resumed", config, 1, new_world, change, "--ckpt_path", str(ckpt))
    assert (
        f"resuming a checkpoint of {world} processes on {new_world}" in (resumed / "output.txt").read_text()
    )

    reference, _ = read_log(full / "log{rank}.jsonl", world)
    before, _ = read_log(cut / "log{rank}.jsonl", world)
    after, _ = read_log(resumed / "log{rank}.jsonl", new_world)
    assert sorted({b["step"] for b in after}) == [9, 10]
    assert samples_per_step(before, until=8) == samples_per_step(reference, until=8)
    assert samples_per_step(after) == samples_per_step(reference, after=8)
    assert lr_per_step(after) == {s: lr for s, lr in lr_per_step(reference).items() if s > 8}
    epoch = [b for b in before if b["epoch"] == 1 and b["step"] <= 8] + after
    assert_epoch_counts(samples_per_epoch(epoch)[1], N_TRAIN, 16, REPEATS)
