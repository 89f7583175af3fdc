"""A new module on TrainingModule: the example in docs/architecture.md ("Adding a module"), run as written.

The base gives it gradient accumulation (the mean gradient of the group, one step), clipping on unscaled gradients
under a real GradScaler, the schedule, one log row per step and the non-finite-loss stop; a subclass that forgets
``backprop`` is told so.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import AppliedGradients, make_images, quiet_trainer, tiny_vit_kwargs
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader, TensorDataset

from masksub_lightning.training.guards import NonFiniteLossError

DOC = Path(__file__).resolve().parents[1] / "docs/architecture.md"


def example_module() -> tuple[type, str]:
    """The ``Supervised`` class of the doc's "Adding a module" section, and its source."""
    section = DOC.read_text().split("## Adding a module", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)[1]
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)  # the doc's own code, not a copy of it
    return namespace["Supervised"], code


def make(**kwargs):
    supervised, _ = example_module()
    torch.manual_seed(0)
    return supervised(
        "vit_tiny_patch16_224", num_classes=4, **kwargs
    )  # LayerNorm: micro-batches add up exactly


def loader(batch_size: int, n: int = 16):
    images, labels = make_images(n=n, num_classes=4, size=32)
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size)  # fixed order


@pytest.fixture(autouse=True)
def _tiny_model(monkeypatch):
    """The doc's module builds a full-size model; the tests shrink it as every other test does."""
    from masksub_lightning.models import network

    create = network.create_network
    monkeypatch.setattr(network, "create_network", lambda m, n, kw: create(m, n, {**tiny_vit_kwargs(), **kw}))


def test_the_example_is_a_short_module():
    _, code = example_module()
    assert len(code.strip().splitlines()) <= 50  # issue 19: "a new module ... should be ~50 lines"


def test_accumulation_applies_the_mean_gradient_of_the_group_in_one_step():
    grouped, whole = AppliedGradients(), AppliedGradients()
    kw = dict(optimizer="sgd", lr=0.1, weight_decay=0.0, scheduler="constant")
    quiet_trainer(max_epochs=1, callbacks=[grouped]).fit(
        make(grad_accumulation=2, **kw), loader(batch_size=4)
    )
    quiet_trainer(max_epochs=1, callbacks=[whole]).fit(make(**kw), loader(batch_size=8))
    assert len(grouped.grads) == len(whole.grads) == 2  # 4 micro-batches of 4 = 2 steps of 8
    for a, b in zip(grouped.grads, whole.grads):
        for name in b:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)


def test_clipping_under_a_grad_scaler_applies_the_clip_norm_in_true_units():
    applied = AppliedGradients()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    trainer = quiet_trainer(
        max_steps=2,
        callbacks=[applied],
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
        log_every_n_steps=1,
    )
    trainer.fit(make(grad_clip_norm=1e-3), loader(batch_size=8))
    norms = [
        torch.linalg.vector_norm(torch.stack([g.norm() for g in step.values()])) for step in applied.grads
    ]
    assert [float(n) for n in norms] == pytest.approx([1e-3, 1e-3], rel=1e-3)
    assert float(trainer.callback_metrics["train_grad_norm_step"]) > 1e-2  # the unclipped, unscaled norm


def test_a_nan_loss_stops_the_run_naming_the_step():
    module = make()
    module.training_losses = lambda batch: _nan_loss(module, batch)
    with pytest.raises(NonFiniteLossError, match=r"at step 1 in the training loss"):
        quiet_trainer(max_steps=2).fit(module, loader(batch_size=8))


def _nan_loss(module, batch):
    images, labels = batch
    loss = F.cross_entropy(module.model(images), labels) * float("nan")
    module.backprop(loss)
    return {"loss": loss}


def test_forgetting_backprop_is_named():
    module = make()
    module.training_losses = lambda batch: {"loss": F.cross_entropy(module.model(batch[0]), batch[1])}
    with pytest.raises(
        RuntimeError, match=r"training_losses must back-propagate through self.backprop\(loss\)"
    ):
        quiet_trainer(max_steps=1).fit(module, loader(batch_size=8))
