"""KNNMonitor: weighted k-NN top-1 of an encoder's features on labelled data, cheap enough to leave on.

What a pre-training run (MAE / LUT: no labels, no accuracy) can report about its encoder without a fine-tune::

    every every_n_epochs epochs, and at the fit's last epoch (max_epochs, max_steps or a stop request):
      bank      a fixed random subset (seed) of the labelled data's train split, at most max_train_samples
      queries   a fixed random subset of its val split, at most max_val_samples
      features  both at the data's eval transform, through the module's encoder in eval mode under no_grad:
                pool="token" is the encoder's own pooling (timm ``forward_head(pre_logits=True)``: the class token
                after the final norm for an MAE / LUT encoder, the same features the exported encoder.pth gives);
                pool="avg" the mean of the patch tokens after the final norm (what LUT's context loss pools)
      k-NN      L2-normalised; each query's k most cosine-similar bank samples vote for their label with weight
                exp(similarity / temperature), the class with the largest total wins (ties: the lowest class
                index); InstDisc (Wu et al. 2018) and DINO's eval_knn, whose defaults k=20, T=0.07 are these
      log       knn_top1, the fraction of queries classified correctly (like val_acc1), on_epoch

Under DDP (or FSDP2) each rank encodes its share of both subsets (padded so that every rank runs the same number
of batches, which FSDP2's all-gathers need), the features are gathered to every rank in the single-process order,
and every rank computes the same k-NN top-1; the logged value is that one number.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from masksub_lightning.data.base import ImageClassificationDataModule
from masksub_lightning.modules.base import check_positive

__all__ = ["KNNMonitor", "interleave_ranks", "knn_predict"]

_POOLS = ("token", "avg")


def knn_predict(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 256,
) -> Tensor:
    """Weighted k-NN class of each query: (M,) int64.

    Args:
        bank: (N, D) memory-bank features; bank_labels: (N,) their classes (int64, >= 0).
        queries: (M, D) features to classify.
        k: neighbours per query (at most N).
        temperature: a neighbour's vote weighs exp(cosine similarity / temperature).
        num_classes: classes of the vote (default: the largest bank label + 1).
        chunk_size: queries per similarity block: memory stays (chunk_size, N).
    """
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    num_classes = int(bank_labels.max()) + 1 if num_classes is None else num_classes
    predictions = []
    for chunk in queries.split(chunk_size):
        similarity, neighbours = (chunk @ bank.T).topk(k, dim=1)
        votes = torch.zeros(chunk.shape[0], num_classes, device=chunk.device)
        votes.scatter_add_(1, bank_labels[neighbours], (similarity / temperature).exp())
        predictions.append(votes.argmax(dim=1))  # argmax: the first (lowest) class among equal totals
    return torch.cat(predictions)


def interleave_ranks(gathered: Tensor) -> Tensor:
    """(world, per_rank, ...) from an all-gather of rank r's items r, r + world, ... -> the items in order."""
    return gathered.transpose(0, 1).reshape(-1, *gathered.shape[2:])


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode, then each back in the mode it had (a LUT teacher stays in eval)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class KNNMonitor(L.Callback):
    """Log ``knn_top1``, the weighted k-NN top-1 of the module's encoder features (see the module docstring).

    Args:
        data: a labelled DataModule of the package (``DigitsDataModule``, ``ImageFolderDataModule(root=...)``,
            ``ImageNetDataModule``, ...): its train split is the memory bank, its val split the queries, both at
            its eval transform. Pre-training data has no labels; this is its labelled counterpart.
        every_n_epochs: run after every n-th training epoch (and always after the last one).
        k: neighbours per query (20).
        temperature: vote weight exp(similarity / temperature) (0.07).
        max_train_samples: memory-bank size cap (a fixed random subset).
        max_val_samples: query count cap (a fixed random subset).
        pool: ``token`` (the encoder's own pooling: the class token for MAE / LUT) or ``avg`` (mean patch token).
        batch_size: images per forward pass of the feature extraction.
        num_workers: DataLoader workers of the feature extraction.
        chunk_size: queries per similarity block.
        seed: seed of the two subsets (the same subsets at every evaluation).

    Raises:
        ValueError: a bad option (at construction), a module without a timm encoder under ``model`` or ``k`` above
            the memory-bank size (at setup); one line each.
    """

    def __init__(
        self,
        data: ImageClassificationDataModule,
        every_n_epochs: int = 1,
        k: int = 20,
        temperature: float = 0.07,
        max_train_samples: int = 10000,
        max_val_samples: int = 2000,
        pool: str = "token",
        batch_size: int = 256,
        num_workers: int = 0,
        chunk_size: int = 256,
        seed: int = 0,
    ) -> None:
        for name, value in (
            ("every_n_epochs", every_n_epochs),
            ("k", k),
            ("max_train_samples", max_train_samples),
            ("max_val_samples", max_val_samples),
            ("batch_size", batch_size),
            ("chunk_size", chunk_size),
        ):
            check_positive(f"KNNMonitor: {name}", value, integer=True)
        check_positive("KNNMonitor: temperature", temperature)
        if pool not in _POOLS:
            raise ValueError(f"KNNMonitor: pool must be one of {', '.join(_POOLS)}, got {pool!r}")
        if not callable(getattr(data, "build_dataset", None)) or not callable(
            getattr(data, "build_transform", None)
        ):
            raise ValueError(
                f"KNNMonitor: data must be a labelled DataModule of masksub_lightning.data (build_dataset / "
                f"build_transform), got {type(data).__name__}"
            )
        self.data, self.every_n_epochs, self.k, self.temperature = data, every_n_epochs, k, temperature
        self.max_samples = {"train": max_train_samples, "val": max_val_samples}
        self.pool, self.batch_size, self.num_workers = pool, batch_size, num_workers
        self.chunk_size, self.seed = chunk_size, seed
        self.history: list[tuple[int, float]] = []  # (epoch, knn_top1) of every evaluation
        self._datasets: dict[str, Dataset] = {}
        self._indices: dict[str, list[int]] = {}

    # ------------------------------------------------------------------------------------------------ set-up
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        encoder = getattr(pl_module, "model", None)
        if not all(callable(getattr(encoder, f, None)) for f in ("forward_features", "forward_head")):
            raise ValueError(
                f"KNNMonitor needs a module whose `model` is a timm encoder (forward_features / forward_head); "
                f"{type(pl_module).__name__} has {type(encoder).__name__ if encoder is not None else 'no model'}"
            )
        if self.pool == "avg" and not isinstance(getattr(encoder, "num_prefix_tokens", None), int):
            raise ValueError(
                f"KNNMonitor: pool='avg' needs a ViT encoder (num_prefix_tokens); got {type(encoder).__name__}"
            )
        transform = self.data.build_transform(train=False)
        for split in ("train", "val"):
            dataset = self.data.build_dataset(split, transform)
            g = torch.Generator().manual_seed(self.seed)
            order = torch.randperm(len(dataset), generator=g)[: self.max_samples[split]]
            self._datasets[split], self._indices[split] = dataset, sorted(order.tolist())
        bank = len(self._indices["train"])
        if self.k > bank:
            raise ValueError(
                f"KNNMonitor: k={self.k} is more than the {bank} memory-bank samples; use k <= {bank} or more "
                "training samples (max_train_samples)"
            )

    # ------------------------------------------------------------------------------------------------- hooks
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if (epoch + 1) % self.every_n_epochs and not self._last_epoch(trainer):
            return
        top1 = self.evaluate(trainer, pl_module)
        self.history.append((epoch, top1))
        # Every rank holds the same number; sync_dist only keeps Lightning's distributed logging contract.
        pl_module.log(
            "knn_top1", torch.tensor(top1), on_step=False, on_epoch=True, sync_dist=True, batch_size=1
        )

    @staticmethod
    def _last_epoch(trainer: L.Trainer) -> bool:
        max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
        if max_epochs is not None and max_epochs > 0 and trainer.current_epoch + 1 >= max_epochs:
            return True
        return bool(trainer.should_stop) or (max_steps is not None and 0 < max_steps <= trainer.global_step)

    # -------------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        """k-NN top-1 of the module's current encoder on the two subsets (call on every rank)."""
        with _eval_mode(pl_module):
            bank, bank_labels = self._features(trainer, pl_module, "train")
            queries, labels = self._features(trainer, pl_module, "val")
        num_classes = int(torch.cat([bank_labels, labels]).max()) + 1
        predicted = knn_predict(
            bank, bank_labels, queries, self.k, self.temperature, num_classes, self.chunk_size
        )
        return float((predicted == labels).float().mean())

    def _features(
        self, trainer: L.Trainer, pl_module: L.LightningModule, split: str
    ) -> tuple[Tensor, Tensor]:
        """(features, labels) of the split's subset, gathered from every rank in the subset's order."""
        world, rank = trainer.world_size, trainer.global_rank
        indices = self._indices[split]
        mine = indices[rank::world]
        per_rank = math.ceil(len(indices) / world)
        padding = per_rank - len(mine)  # repeats of a sample, labelled -1 below and dropped after the gather
        subset = Subset(self._datasets[split], mine + (mine or indices)[:1] * padding)
        # A private generator: iterating a loader draws a seed, which must not move the training RNG streams.
        loader = DataLoader(
            subset, batch_size=self.batch_size, num_workers=self.num_workers, generator=torch.Generator()
        )
        features, labels = [], []
        for images, target in loader:
            with trainer.precision_plugin.forward_context():
                features.append(self._embed(pl_module, images.to(pl_module.device)).float())
            labels.append(torch.as_tensor(target).to(pl_module.device, torch.int64))
        features, labels = torch.cat(features), torch.cat(labels)
        labels[len(mine) :] = -1
        if world > 1:
            features = interleave_ranks(pl_module.all_gather(features))
            labels = interleave_ranks(pl_module.all_gather(labels))
        keep = labels >= 0
        return features[keep], labels[keep]

    def _embed(self, pl_module: L.LightningModule, images: Tensor) -> Tensor:
        encoder = pl_module.model
        encode = getattr(pl_module, "encode", None)  # MAE / LUT: the forward their training step runs
        tokens = encode(images) if callable(encode) else encoder.forward_features(images)
        if self.pool == "avg":
            return tokens[:, encoder.num_prefix_tokens :].mean(dim=1)
        return encoder.forward_head(tokens, pre_logits=True)
