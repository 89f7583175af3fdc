"""KNNMonitor (masksub_lightning/callbacks/knn.py): the weighted k-NN top-1 and the callback around it.

* ``knn_predict`` against a brute-force computation written here (Python loops over every bank sample), on random
  features, on a vote tie and on a case where the exp(similarity / T) weights outvote the majority;
* the callback on a tiny MAE pre-training run on digits: the epochs it evaluates at, the value it logs (against
  the brute force on features extracted here from the final encoder), the training modes it restores and the
  training RNG stream it leaves alone;
* the rank interleaving of the DDP gather; bad options as one line.
"""

from __future__ import annotations

import json
import math
import sys
from unittest import mock

import lightning as L
import pytest
import torch
from torch import nn

from masksub_lightning.callbacks.knn import KNNMonitor, interleave_ranks, knn_predict
from masksub_lightning.commands.cli import build_cli
from masksub_lightning.data import DigitsDataModule, PretrainDigitsDataModule
from masksub_lightning.modules.pretraining import MAEModule

TINY_VIT = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def brute_force(bank, bank_labels, queries, k, temperature, num_classes):
    """Each query: cosine similarity to every bank sample, the k largest, exp(s / T) summed per class, the
    largest total (lowest class on a tie). Plain Python over floats, independent of knn_predict."""
    bank, queries = bank.double().tolist(), queries.double().tolist()

    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    bank = [unit(v) for v in bank]
    predictions = []
    for q in (unit(v) for v in queries):
        sims = [(sum(a * b for a, b in zip(q, v)), int(y)) for v, y in zip(bank, bank_labels.tolist())]
        nearest = sorted(sims, key=lambda s: -s[0])[:k]
        totals = [0.0] * num_classes
        for s, y in nearest:
            totals[y] += math.exp(s / temperature)
        predictions.append(max(range(num_classes), key=lambda c: (totals[c], -c)))
    return predictions


@pytest.mark.parametrize(("k", "temperature", "chunk_size"), [(1, 0.07, 256), (5, 0.07, 7), (20, 0.5, 3)])
def test_knn_predict_equals_brute_force_on_random_features(k, temperature, chunk_size):
    g = torch.Generator().manual_seed(k)
    centres = torch.randn(4, 8, generator=g)
    bank_labels = torch.randint(0, 4, (60,), generator=g)
    bank = centres[bank_labels] + 0.8 * torch.randn(60, 8, generator=g)
    query_labels = torch.randint(0, 4, (25,), generator=g)
    queries = centres[query_labels] + 0.8 * torch.randn(25, 8, generator=g)
    got = knn_predict(bank, bank_labels, queries, k, temperature, 4, chunk_size)
    assert got.tolist() == brute_force(bank, bank_labels, queries, k, temperature, 4)
    # Scaling a feature vector changes nothing (cosine similarity).
    assert torch.equal(
        knn_predict(bank * 3.0, bank_labels, queries * 0.1, k, temperature, 4, chunk_size), got
    )


def test_knn_vote_tie_goes_to_the_lowest_class_and_weights_beat_the_majority():
    def at(deg):
        return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]

    # Two neighbours at +-30 degrees (the same similarity) of classes 3 and 1, the rest far away: a tie.
    bank = torch.tensor([at(30), at(-30), at(150), at(180)])
    labels = torch.tensor([3, 1, 0, 2])
    query = torch.tensor([at(0)])
    assert knn_predict(bank, labels, query, k=2, temperature=0.07).tolist() == [1]
    assert brute_force(bank, labels, query, 2, 0.07, 4) == [1]
    # One close neighbour of class 0 (cos 0.99) against two farther ones of class 1 (cos 0.5): at T=0.07 the
    # weights exp(s / T) decide (e^14.1 > 2 e^7.1); at T=10 they are nearly equal and the majority wins.
    bank = torch.tensor([at(math.degrees(math.acos(0.99))), at(60), at(-60)])
    labels = torch.tensor([0, 1, 1])
    assert knn_predict(bank, labels, query, k=3, temperature=0.07).tolist() == [0]
    assert knn_predict(bank, labels, query, k=3, temperature=10.0).tolist() == [1]
    assert brute_force(bank, labels, query, 3, 0.07, 2) == [0]
    assert brute_force(bank, labels, query, 3, 10.0, 2) == [1]


def test_interleave_ranks_restores_the_single_process_order():
    # Two ranks, five items: rank 0 holds items 0, 2, 4; rank 1 holds 1, 3 and one padding entry (-1).
    gathered = torch.tensor([[0, 2, 4], [1, 3, -1]])
    assert interleave_ranks(gathered).tolist() == [0, 1, 2, 3, 4, -1]
    features = torch.arange(12.0).reshape(2, 3, 2)  # (world, per_rank, D)
    assert interleave_ranks(features)[1].tolist() == features[1, 0].tolist()


# ------------------------------------------------------------------------------------------------ the callback
def tiny_mae() -> MAEModule:
    return MAEModule(
        model="vit_small_patch16_224",
        model_kwargs=TINY_VIT,
        decoder_dim=16,
        decoder_depth=1,
        decoder_num_heads=2,
        lr=1e-3,
        lr_base_batch_size=None,
        warmup_epochs=0,
        export_on_fit_end=False,
    )


def trainer(epochs: int, callbacks, tmp_path, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **kwargs,
    )


def labelled() -> DigitsDataModule:
    return DigitsDataModule(img_size=16, batch_size=32)


def extract(module: MAEModule, data: DigitsDataModule, split: str, indices: list[int]) -> torch.Tensor:
    """The class token after the final norm, computed here with timm's forward of the bare encoder."""
    dataset = data.build_dataset(split, data.build_transform(train=False))
    images = torch.stack([dataset[i][0] for i in indices])
    labels = torch.tensor([int(dataset[i][1]) for i in indices])
    encoder = module.model.eval()
    with torch.no_grad():
        return encoder.forward_features(images)[:, 0], labels


def test_monitor_logs_at_every_n_epochs_and_the_last_one_with_the_brute_force_value(tmp_path):
    L.seed_everything(0, verbose=False)
    data = labelled()
    monitor = KNNMonitor(
        data, every_n_epochs=2, k=5, max_train_samples=120, max_val_samples=40, batch_size=50
    )
    module = tiny_mae()
    fit = trainer(3, [monitor], tmp_path)
    fit.fit(module, datamodule=PretrainDigitsDataModule(img_size=16, batch_size=16, views="mae"))
    assert [epoch for epoch, _ in monitor.history] == [1, 2]  # epoch 2 (of 0..2) is the last one
    assert module.training and module.model.training  # train mode given back after each evaluation
    # The subsets: fixed random ones of the requested sizes.
    assert len(monitor._indices["train"]) == 120 and len(monitor._indices["val"]) == 40
    assert len(set(monitor._indices["train"])) == 120
    bank, bank_labels = extract(module, data, "train", monitor._indices["train"])
    queries, labels = extract(module, data, "val", monitor._indices["val"])
    expected = brute_force(bank, bank_labels, queries, 5, 0.07, 10)
    top1 = sum(p == y for p, y in zip(expected, labels.tolist())) / len(expected)
    assert monitor.history[-1][1] == pytest.approx(top1, abs=1e-9)
    assert float(fit.callback_metrics["knn_top1"]) == pytest.approx(top1, abs=1e-6)


def test_monitor_restores_modes_and_leaves_the_training_rng_alone(tmp_path):
    data = labelled()
    monitor = KNNMonitor(data, k=3, max_train_samples=30, max_val_samples=10)
    module = tiny_mae()
    module.decoder.eval()  # a submodule in eval mode stays so
    fit = trainer(1, [], tmp_path)
    fit.strategy.connect(module)
    monitor.setup(fit, module, "fit")
    torch.manual_seed(5)
    state = torch.get_rng_state()
    value = monitor.evaluate(fit, module)
    assert torch.equal(torch.get_rng_state(), state), "the evaluation drew from the global RNG"
    assert module.model.training and not module.decoder.training
    assert monitor.evaluate(fit, module) == value  # the same subsets and eval features every time


def test_monitor_with_max_steps_evaluates_once_at_the_end(tmp_path):
    data = labelled()
    monitor = KNNMonitor(data, every_n_epochs=10, k=3, max_train_samples=30, max_val_samples=10)
    trainer(5, [monitor], tmp_path, max_steps=3).fit(
        tiny_mae(), datamodule=PretrainDigitsDataModule(img_size=16, batch_size=16, views="mae")
    )
    assert [epoch for epoch, _ in monitor.history] == [
        1
    ]  # steps 1-2 in epoch 0, step 3 ends the fit in epoch 1


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"k": 0}, "KNNMonitor: k must be a positive int, got 0"),
        ({"every_n_epochs": 0}, "KNNMonitor: every_n_epochs must be a positive int, got 0"),
        ({"temperature": -1.0}, "KNNMonitor: temperature must be a positive number, got -1.0"),
        ({"max_val_samples": 0}, "KNNMonitor: max_val_samples must be a positive int, got 0"),
        ({"pool": "gem"}, "KNNMonitor: pool must be one of token, avg, got 'gem'"),
    ],
)
def test_bad_options_are_one_line(option, message):
    with pytest.raises(ValueError, match=f"^{message}$".replace("(", r"\(").replace(")", r"\)")):
        KNNMonitor(labelled(), **option)


def test_no_data_module_and_no_encoder_and_a_too_small_bank_are_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"^KNNMonitor: data must be a labelled DataModule .* got list$"):
        KNNMonitor([1, 2, 3])

    class NoEncoder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(2, 2)

    monitor = KNNMonitor(labelled())
    with pytest.raises(
        ValueError,
        match=r"^KNNMonitor needs a module whose `model` is a timm encoder .*NoEncoder has no model$",
    ):
        monitor.setup(trainer(1, [], tmp_path), NoEncoder(), "fit")
    monitor = KNNMonitor(labelled(), k=20, max_train_samples=10)
    with pytest.raises(ValueError, match=r"^KNNMonitor: k=20 is more than the 10 memory-bank samples"):
        monitor.setup(trainer(1, [], tmp_path), tiny_mae(), "fit")


# --------------------------------------------------------------------------------------------- two processes
class SaveMonitorResult(L.Callback):
    """After the monitor (listed before this one): rank 0 writes its k-NN top-1 and the weights it measured."""

    def __init__(self, monitor: KNNMonitor, path) -> None:
        self.monitor, self.path = monitor, path

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0:
            torch.save({"top1": self.monitor.history[-1][1], "state": pl_module.state_dict()}, self.path)


@pytest.mark.slow
def test_two_ranks_give_the_single_process_value(tmp_path):
    """ddp_spawn on gloo, 2 ranks, 31 bank samples and 13 queries (uneven shares, so padding is dropped): the
    value every rank computes from the gathered features equals one process's on the same weights."""
    data = labelled()
    options = dict(k=5, max_train_samples=31, max_val_samples=13, batch_size=4)
    monitor = KNNMonitor(data, **options)
    out = tmp_path / "rank0.pt"
    fit = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[monitor, SaveMonitorResult(monitor, out)],
    )
    fit.fit(tiny_mae(), datamodule=PretrainDigitsDataModule(img_size=16, batch_size=8, views="mae"))
    saved = torch.load(out, weights_only=True)
    module = tiny_mae()
    module.load_state_dict(saved["state"])
    single = trainer(1, [], tmp_path)
    single.strategy.connect(module)
    alone = KNNMonitor(data, **options)
    alone.setup(single, module, "fit")
    assert saved["top1"] == alone.evaluate(single, module)
    assert saved["top1"] * 13 == pytest.approx(
        round(saved["top1"] * 13), abs=1e-5
    )  # a share of the 13 queries


def test_the_monitor_from_the_command_line(tmp_path):
    """`masksub fit` builds the monitor and its labelled DataModule from a class_path (as a YAML recipe would)."""
    monitor = {
        "class_path": "masksub_lightning.callbacks.KNNMonitor",
        "init_args": {
            "data": {"class_path": "masksub_lightning.data.DigitsDataModule", "init_args": {"img_size": 16}},
            "k": 3,
            "max_train_samples": 30,
            "max_val_samples": 10,
        },
    }
    args = [
        "fit",
        "--model=masksub_lightning.MAEModule",
        "--model.init_args.model=vit_small_patch16_224",
        f"--model.init_args.model_kwargs={json.dumps(TINY_VIT)}",
        "--model.init_args.decoder_dim=16",
        "--model.init_args.decoder_depth=1",
        "--model.init_args.decoder_num_heads=2",
        "--model.init_args.warmup_epochs=0",
        "--model.init_args.export_on_fit_end=false",
        "--data=masksub_lightning.data.PretrainDigitsDataModule",
        "--data.init_args.img_size=16",
        "--data.init_args.views=mae",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=1",
        "--trainer.limit_val_batches=1",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--checkpoint.monitor=knn_top1",  # the best checkpoint by k-NN top-1
        "--checkpoint.mode=max",
        "--trainer.callbacks+=" + json.dumps(monitor),
    ]
    with mock.patch.object(sys, "argv", ["masksub"]):
        cli = build_cli(args)
    built = next(c for c in cli.trainer.callbacks if isinstance(c, KNNMonitor))
    assert isinstance(built.data, DigitsDataModule) and built.data.img_size == 16 and built.k == 3
    assert [epoch for epoch, _ in built.history] == [0]
    assert float(cli.trainer.callback_metrics["knn_top1"]) == pytest.approx(built.history[0][1], abs=1e-6)
    best = cli.trainer.checkpoint_callback.best_model_score
    assert best is not None and float(best) == pytest.approx(built.history[0][1], abs=1e-6)
