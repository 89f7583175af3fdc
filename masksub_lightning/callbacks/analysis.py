"""Analysis callbacks: what MaskSub does during training, cheap enough to leave on.

Three Lightning callbacks for :class:`~masksub_lightning.modules.masksub.MaskSubModule` runs, usable from Python
(``Trainer(callbacks=[...])``) and from YAML::

    trainer:
      callbacks:
        - class_path: masksub_lightning.callbacks.BranchGradients
          init_args: {every_n_steps: 50}
        - masksub_lightning.callbacks.MaskedInputLoss
        - masksub_lightning.callbacks.SubBranchPictures

* :class:`BranchGradients`: the gradient norm of the main-branch loss and of the sub-branch loss, and the cosine
  between the two gradients, every N optimizer steps (the paper's "automatic difficulty control": the sub-branch's
  gradient starts small and grows). It reads ``.grad`` between the two backward passes and never changes it.
* :class:`MaskedInputLoss`: once per epoch, the loss and top-1 of the network on a fixed held-out batch with the
  sub-branch's perturbation applied, against the TRUE labels (and on the clean batch, for reference); baseline runs
  (``sub_branch: none``) get a mask built for their model, so the two are comparable.
* :class:`SubBranchPictures`: a grid of what the sub-branch saw (masked pixels, dropped tokens, replaced regions)
  once per epoch: an image in TensorBoard when a TensorBoard logger is attached, a PNG under the run's log
  directory otherwise.

Values go straight to the trainer's loggers (a ``metrics.csv`` row per measurement for the CSV logger, with the same
``step`` / ``epoch`` columns Lightning writes) and are kept in each callback's ``history`` list.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from timm.layers import DropPath
from torch import Tensor, nn

from masksub_lightning.method.subbranch import (
    DropoutSubBranch,
    DropPathSubBranch,
    SubBranch,
    SwitchablePatchDropout,
    block_dropouts,
    build_sub_branch,
)
from masksub_lightning.training import precision

__all__ = ["BranchGradients", "MaskedInputLoss", "SubBranchPictures"]


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _require_masksub(callback: Callback, pl_module: L.LightningModule) -> None:
    if not hasattr(pl_module, "sub_branch") or not hasattr(pl_module, "model"):
        raise ValueError(
            f"{type(callback).__name__} needs a MaskSubModule (or a subclass), got {type(pl_module).__name__}"
        )


def _log_step(trainer: L.Trainer) -> int:
    """The ``step`` Lightning itself writes for training-step logs (batches that stepped), else global_step."""
    loop = getattr(trainer.fit_loop, "epoch_loop", None)
    return int(getattr(loop, "_batches_that_stepped", trainer.global_step))


def _to_loggers(trainer: L.Trainer, values: dict[str, float], step: int) -> None:
    """One row in every logger, with the epoch column Lightning's own rows carry (rank 0 only: loggers are)."""
    for logger in trainer.loggers:
        logger.log_metrics({**values, "epoch": trainer.current_epoch}, step=step)


# ------------------------------------------------------------------------------------------- branch gradients
class BranchGradients(Callback):
    """Per-branch gradient norms and their cosine, every ``every_n_steps`` optimizer steps.

    MaskSub's step backpropagates ``L_main / 2`` and then ``L_sub / 2`` into the same ``.grad``. On a measured step
    this callback copies the gradient after the first backward of each micro-batch (Lightning calls
    ``on_after_backward`` after every ``manual_backward``; MaskSub's first one is the main branch's) and reads the
    whole gradient in ``on_before_optimizer_step``, before the module clips it; the sub-branch's share is the
    difference. Nothing is written into ``.grad``, so training is bitwise the same with and without the callback.
    Logged (and appended to :attr:`history`):

    * ``branch_grad_norm_main``: L2 norm of the gradient of ``L_main`` (not halved; the mean over the micro-batches
      of an accumulation group, as the optimizer step applies it);
    * ``branch_grad_norm_sub``: the same for ``L_sub`` (absent for ``sub_branch: none``);
    * ``branch_grad_cosine``: cosine between the two gradients (absent for ``sub_branch: none``);
    * ``branch_grad_norm_total``: norm of the gradient the optimizer step applies, ``(g_main + g_sub) / 2``,
      before clipping.

    Cost: on a measured step one copy of the gradient and a few reductions (one host sync); nothing on other
    steps. Under DDP the main-branch copy is averaged over ranks on measured steps (one extra all-reduce), so the
    figures describe the synchronised gradient. Mixed-precision loss scaling is undone. FSDP is not supported.

    Args:
        every_n_steps: measure when ``global_step % every_n_steps == 0`` (the first step is measured).
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        _check_positive_int("every_n_steps", every_n_steps)
        self.every_n_steps = every_n_steps
        self.history: list[dict[str, float]] = []
        self._measuring = False
        self._backwards = 0  # backward passes so far in the current micro-batch
        self._before: list[Tensor | None] | None = None  # .grad at the start of a micro-batch inside a group
        self._main: list[Tensor | None] | None = None  # the main branch's summed share in this group

    # Lightning hooks -----------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        _require_masksub(self, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._backwards = 0
        self._measuring = trainer.global_step % self.every_n_steps == 0
        if not self._measuring:
            return
        grads = [p.grad for p in self._params(pl_module)]
        if all(g is None for g in grads):  # the first micro-batch of an optimizer step (zero_grad set None)
            self._before, self._main = None, None
        else:  # inside an accumulation group: what earlier micro-batches left
            self._before = [None if g is None else g.detach().clone() for g in grads]

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._backwards += 1
        if not (self._measuring and self._backwards == 1 and pl_module.sub_branch.active):
            return
        # .grad holds the main branch's share of this micro-batch (plus what earlier micro-batches left), still
        # multiplied by the GradScaler's factor under 16-mixed: undone here, while the factor is known to apply.
        unscale = _inverse_scale(trainer)
        share = []
        for i, p in enumerate(self._params(pl_module)):
            g = None if p.grad is None else p.grad.detach().float()
            before = None if self._before is None else self._before[i]
            if g is not None and before is not None:
                g = g - before
            share.append(None if g is None else g * unscale)
        self._main = share if self._main is None else [_add(a, b) for a, b in zip(self._main, share)]
        self._before = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        """Runs before the module's own hook (which clips): the gradient of the step, unclipped."""
        if not self._measuring:
            return
        self._measuring = False
        params = self._params(pl_module)
        # Lightning unscaled .grad before this hook, except for an optimizer that unscales inside its step.
        unscale = _inverse_scale(trainer) if precision.gradients_are_scaled(trainer, optimizer) else 1.0
        total = [None if p.grad is None else p.grad.detach().float() * unscale for p in params]
        values = {"branch_grad_norm_total": _norm(total)}
        if pl_module.sub_branch.active and self._main is not None:
            main, self._main = self._main, None
            if trainer.world_size > 1:
                main = _all_reduce_mean(trainer, main)
            sub = [_sub(t, m) for t, m in zip(total, main)]
            # .grad holds (g_main + g_sub) / 2: the halves are undone to report each loss's own gradient.
            norm_main, norm_sub = _norm(main), _norm(sub)
            dot = sum((m * s).sum() for m, s in zip(main, sub) if m is not None and s is not None)
            cosine = dot / (norm_main * norm_sub).clamp_min(1e-30) if torch.is_tensor(dot) else dot * 0.0
            values["branch_grad_norm_main"] = 2 * norm_main
            values["branch_grad_norm_sub"] = 2 * norm_sub
            values["branch_grad_cosine"] = cosine
        else:
            values["branch_grad_norm_main"] = values["branch_grad_norm_total"]
        device = params[0].device if params else torch.device("cpu")
        stacked = torch.stack(
            [torch.as_tensor(v, device=device).float().reshape(()) for v in values.values()]
        )
        row = dict(zip(values, stacked.tolist()))  # one host sync, on measured steps only
        step = _log_step(trainer)
        self.history.append({"step": step, "global_step": trainer.global_step, **row})
        _to_loggers(trainer, row, step)

    @staticmethod
    def _params(pl_module: L.LightningModule) -> list[nn.Parameter]:
        return [p for p in pl_module.model.parameters() if p.requires_grad]

    # checkpoint: the history travels with the run so that a resumed run keeps its curve
    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))


def _inverse_scale(trainer: L.Trainer) -> float:
    """1 / the GradScaler's current factor (1 without one). Constant within an optimizer step."""
    scaler = precision.grad_scaler(trainer)
    return 1.0 if scaler is None else 1.0 / float(scaler.get_scale())


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def _sub(total: Tensor | None, main: Tensor | None) -> Tensor | None:
    if total is None:
        return None if main is None else -main
    return total if main is None else total - main


def _norm(tensors: list[Tensor | None]) -> Tensor:
    present = [t for t in tensors if t is not None]
    return torch.nn.utils.get_total_norm(present) if present else torch.zeros(())


def _all_reduce_mean(trainer: L.Trainer, tensors: list[Tensor | None]) -> list[Tensor | None]:
    """Average a list of per-parameter tensors over ranks (None = zeros; every rank has the same parameters)."""
    like = next(t for t in tensors if t is not None)
    flat = torch.cat([t.reshape(-1) for t in tensors if t is not None] or [like.new_zeros(0)])
    present = torch.tensor([t is not None for t in tensors], device=like.device, dtype=torch.float32)
    flat = trainer.strategy.reduce(flat, reduce_op="mean")
    if bool((trainer.strategy.reduce(present, reduce_op="mean") != present).any()):
        raise RuntimeError("BranchGradients: ranks disagree on which parameters have a main-branch gradient")
    out, offset = [], 0
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        out.append(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


# -------------------------------------------------------------------------------------------- masked-input loss
@contextlib.contextmanager
def _modes_restored(model: nn.Module) -> Iterator[None]:
    """Put every submodule's training flag back on exit (the ones present on entry)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _perturbation_layers(model: nn.Module, branch: SubBranch) -> list[nn.Module]:
    """Layers a sub-branch acts through that act only in training mode (token drop, dropout / drop-path kinds)."""
    layers: list[nn.Module] = [m for m in model.modules() if isinstance(m, SwitchablePatchDropout)]
    if isinstance(branch, DropoutSubBranch):
        layers += block_dropouts(model)
    if isinstance(branch, DropPathSubBranch):
        layers += [m for m in model.modules() if isinstance(m, DropPath)]
    return layers


def _fork_rng(device: torch.device) -> contextlib.AbstractContextManager:
    """Random draws inside leave the training streams (CPU and this CUDA device) as they were."""
    if device.type != "cuda":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(
        devices=[device.index if device.index is not None else torch.cuda.current_device()]
    )


class MaskedInputLoss(Callback):
    """Loss and top-1 on a fixed held-out batch under the sub-branch's perturbation, against the true labels.

    At the end of every ``every_n_epochs``-th training epoch the network runs on the same held-out images perturbed
    the way the sub-branch perturbs them (with the same masks every time: the draws come from the seed ``seed``,
    in a fork of the random streams, so training is unaffected), and with ``clean=True`` also on the images as they
    are. BatchNorm statistics and the recipe's own dropout / drop-path stay in evaluation mode. Logged and kept in
    :attr:`history`: ``masked_input_loss``, ``masked_input_acc1`` (and ``clean_input_loss``, ``clean_input_acc1``):
    cross-entropy and top-1 against the hard labels.

    Cost: one forward pass of ``num_samples`` images per epoch (two with ``clean``); on the digits quickstart (22
    steps per epoch) about 1.5% of the run at the defaults, negligible on epochs of hundreds of steps.

    For ``sub_branch: none`` (the baseline), or with ``kind`` given, a sub-branch of that kind is built for the
    model, set up before the evaluation and torn down after it, so MaskSub and baseline runs are measured alike.

    Args:
        kind: the perturbation: None uses the module's own sub-branch (``"mask"`` at ``ratio`` for a baseline);
            a name builds that kind (``mask``, ``pixel_mask``, ``dropout``, ...).
        ratio: mask ratio / drop probability of a built kind; None: the module's ``sub_ratio``.
        num_samples: held-out images used (taken from the start of the validation loader, or of ``batch``).
        every_n_epochs: measure at the end of every n-th epoch.
        seed: seed of the perturbation's random draws.
        batch: optional ``(images, labels)`` to use instead of the validation loader.
        clean: also evaluate the unperturbed images (the reference on the same batch; doubles the cost).
    """

    def __init__(
        self,
        kind: str | None = None,
        ratio: float | None = None,
        num_samples: int = 256,
        every_n_epochs: int = 1,
        seed: int = 0,
        batch: tuple[Tensor, Tensor] | None = None,
        clean: bool = False,
    ) -> None:
        _check_positive_int("num_samples", num_samples)
        _check_positive_int("every_n_epochs", every_n_epochs)
        if ratio is not None and (isinstance(ratio, bool) or not 0.0 <= ratio < 1.0):
            raise ValueError(f"ratio must be in [0, 1) or None, got {ratio!r}")
        if kind is not None and kind == "none":
            raise ValueError("kind='none' has no perturbation; use None (the module's own) or a kind name")
        self.kind, self.ratio = kind, ratio
        self.num_samples, self.every_n_epochs, self.seed = num_samples, every_n_epochs, seed
        self._given, self.clean = batch, clean
        self._batch: tuple[Tensor, Tensor] | None = None
        self.history: list[dict[str, float]] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _require_masksub(self, pl_module)
        if self.kind is not None:  # an unknown name or an unsupported model fails now, not after an epoch
            build_sub_branch(self.kind, self.ratio or 0.5, model=pl_module.model)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        row = self.evaluate(pl_module)
        step = _log_step(trainer)
        self.history.append({"epoch": trainer.current_epoch, "step": step, **row})
        _to_loggers(trainer, row, step)

    def held_out_batch(self, pl_module: L.LightningModule) -> tuple[Tensor, Tensor]:
        """The fixed held-out images and hard labels (read once, kept on the module's device)."""
        if self._batch is None:
            if self._given is not None:
                images, labels = self._given
            else:
                # A new loader iterator draws its base seed from torch's RNG: keep the training stream intact.
                with torch.random.fork_rng(devices=[]):
                    images, labels = self._read_val(pl_module.trainer)
            images, labels = images[: self.num_samples], labels[: self.num_samples]
            if labels.is_floating_point():
                labels = labels.argmax(-1)
            self._batch = (images.to(pl_module.device), labels.to(pl_module.device))
        return self._batch

    def _read_val(self, trainer: L.Trainer) -> tuple[Tensor, Tensor]:
        loaders = trainer.val_dataloaders
        if loaders is None and trainer.datamodule is not None:
            loaders = trainer.datamodule.val_dataloader()
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        if loaders is None:
            raise ValueError("MaskedInputLoss needs a validation loader, or batch=(images, labels)")
        images, labels, count = [], [], 0
        for batch in loaders:
            images.append(batch[0])
            labels.append(batch[1])
            count += batch[0].shape[0]
            if count >= self.num_samples:
                break
        return torch.cat(images), torch.cat(labels)

    @torch.no_grad()
    def evaluate(self, pl_module: L.LightningModule) -> dict[str, float]:
        """Perturbed (and with ``clean``, clean) loss / top-1 on the held-out batch, now."""
        images, labels = self.held_out_batch(pl_module)
        model = pl_module.model
        images = pl_module._to_memory_format(images) if hasattr(pl_module, "_to_memory_format") else images
        own = pl_module.sub_branch
        if self.kind is None and own.active and (self.ratio is None or self.ratio == own.ratio):
            branch = own
        else:
            ratio = self.ratio if self.ratio is not None else (own.ratio if own.active else 0.5)
            branch = build_sub_branch(self.kind or "mask", ratio, model=model)
        # A kind of another class than the module's own is installed for the evaluation only (e.g. the token
        # switch on a baseline ViT); the module's own kind is already installed and must stay so.
        install = type(branch) is not type(own)
        row = {}
        with _modes_restored(model), _fork_rng(images.device):
            # Evaluation mode: BatchNorm statistics frozen, the recipe's own dropout / drop-path off.
            model.eval()
            if self.clean:
                row.update(_scores("clean_input", model(images), labels))
            if install:
                branch.setup(model)
            try:
                for layer in _perturbation_layers(model, branch):
                    layer.training = True  # at the main branch's rate except inside the sub-branch's context
                torch.manual_seed(self.seed)  # the same masks at every evaluation
                row.update(_scores("masked_input", branch.forward(model, images), labels))
            finally:
                if install:
                    branch.teardown(model)
        return row


def _scores(prefix: str, logits: Tensor, labels: Tensor) -> dict[str, float]:
    logits = logits.float()
    return {
        f"{prefix}_loss": float(F.cross_entropy(logits, labels)),
        f"{prefix}_acc1": float((logits.argmax(-1) == labels).float().mean()),
    }


# ------------------------------------------------------------------------------------------- sub-branch inputs
class SubBranchPictures(Callback):
    """A grid of the sub-branch's inputs, once every ``every_n_epochs`` epochs.

    Taken from the first training batch of the epoch (after Mixup / CutMix, exactly what the sub-branch saw) and the
    sub-branch's ``last_mask``: top row the images, bottom row the same images with the masked pixels (zeroed
    cells, dropped tokens, replaced regions) painted in ``mask_color``. Logged as ``sub_branch_inputs`` to every
    logger with an ``add_image`` experiment (TensorBoard); when there is none, saved as
    ``<log_dir>/sub_branch_inputs/epoch_<NNN>.png``. Kinds without a pixel mask (dropout, droppath, none) produce
    nothing. The images are un-normalised with the DataModule's ``mean`` / ``std`` when it has them, else per image.

    Args:
        num_images: images in the grid (the batch's first ones).
        every_n_epochs: produce a grid at every n-th epoch.
        mask_color: RGB in [0, 1] of the masked pixels.
    """

    def __init__(
        self,
        num_images: int = 8,
        every_n_epochs: int = 1,
        mask_color: tuple[float, float, float] = (0.9, 0.1, 0.1),
    ) -> None:
        _check_positive_int("num_images", num_images)
        _check_positive_int("every_n_epochs", every_n_epochs)
        if len(mask_color) != 3 or not all(0.0 <= c <= 1.0 for c in mask_color):
            raise ValueError(f"mask_color must be 3 values in [0, 1], got {mask_color!r}")
        self.num_images, self.every_n_epochs, self.mask_color = num_images, every_n_epochs, tuple(mask_color)
        self.saved: list[Path] = []
        self._said = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx != 0 or trainer.current_epoch % self.every_n_epochs:
            return
        _require_masksub(self, pl_module)
        mask = pl_module.sub_branch.last_mask if pl_module.sub_branch.active else None
        if mask is None:
            if not self._said:
                rank_zero_info(f"SubBranchPictures: {pl_module.sub_branch!r} has no pixel mask; no pictures")
                self._said = True
            return
        images = batch[0][: self.num_images].detach()
        grid = self.grid(images, mask[: self.num_images], getattr(trainer, "datamodule", None))
        self.publish(trainer, grid)

    def grid(self, images: Tensor, mask: Tensor, datamodule: Any = None) -> Tensor:
        """(3, H', W') float grid in [0, 1]: the images above, the masked images below."""
        from torchvision.utils import make_grid

        images = images.float().cpu()
        mean, std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)
        if mean is not None and std is not None and len(mean) == images.shape[1]:
            shown = images * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
        else:
            low = images.amin(dim=(1, 2, 3), keepdim=True)
            high = images.amax(dim=(1, 2, 3), keepdim=True)
            shown = (images - low) / (high - low).clamp_min(1e-12)
        shown = shown.clamp(0, 1)
        if shown.shape[1] == 1:
            shown = shown.expand(-1, 3, -1, -1)
        mask = mask.cpu().unsqueeze(1)
        color = torch.tensor(self.mask_color).view(1, 3, 1, 1)
        masked = torch.where(mask, color, shown[:, :3])
        return make_grid(torch.cat([shown[:, :3], masked]), nrow=shown.shape[0], padding=2, pad_value=1.0)

    def publish(self, trainer: L.Trainer, grid: Tensor) -> None:
        logged = False
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image("sub_branch_inputs", grid, global_step=trainer.global_step)
                logged = True
        if logged or trainer.global_rank != 0:
            return
        from torchvision.utils import save_image

        root = Path(trainer.log_dir or trainer.default_root_dir)
        path = root / "sub_branch_inputs" / f"epoch_{trainer.current_epoch:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
        self.saved.append(path)
