"""Masked-image-modeling pre-training of a timm ViT encoder: MAE and LUT ("Learning with Unmasked Tokens").

The encoder these modules train is exported in the released-MAE layout (``{"model": encoder state dict}``, timm key
names) and fine-tuned by :class:`~masksub_lightning.modules.masksub.MaskSubModule` through ``pretrained_weights``, with or
without MaskSub::

    MAE step   x -> keep a random 25% of the patch tokens (class token kept) -> encoder -> + mask tokens in the
               original order -> decoder -> pixels; loss: per-patch normalised pixels, removed patches only
    LUT step   MAE on view 1, plus a "broader context" loss: view 1 and view 2 are masked with visible sets taken
               from one shuffle (disjoint); predictor(projector(mean of the visible patch tokens)) of each view
               regresses the EMA teacher's projector output of the *other*, unmasked view (2 - 2 cos, symmetric)

Masks follow the package convention (:mod:`masksub_lightning.method.masking`): True = masked (removed).

Export and fine-tune::

    masksub export runs/.../last.ckpt OUT_DIR          # writes OUT_DIR/encoder.pth
    masksub fit --config mae/vit_base --model.init_args.pretrained_weights encoder.pth
"""

from __future__ import annotations

import copy
import math
from functools import partial
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from masksub_lightning.method.masking import num_kept_tokens
from masksub_lightning.modules.base import TrainingModule, check_training_options
from masksub_lightning.training import checkpoint_io, sharding

__all__ = [
    "KeptTokens",
    "LUTModule",
    "MAEDecoder",
    "MAEModule",
    "ProjectionMLP",
    "bc_loss",
    "export_encoder",
    "mae_loss",
    "patchify",
    "shuffle_tokens",
    "sincos_pos_embed_2d",
    "teacher_momentum",
    "visible_split",
]

ENCODER_FILE = "encoder.pth"


# ------------------------------------------------------------------------------------------------ tensor helpers
def sincos_pos_embed_2d(dim: int, grid_hw: tuple[int, int], num_prefix: int = 0) -> Tensor:
    """MAE's fixed 2-D sine-cosine position embedding, (1, num_prefix + H * W, dim); prefix slots are zeros.

    Half of the channels encode the row, half the column; each half is [sin(pos * w), cos(pos * w)] with
    ``w = 1 / 10000 ** (k / (dim / 4))``.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a dim divisible by 4, got {dim}")
    gh, gw = grid_hw
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))

    def encode(pos: Tensor) -> Tensor:
        out = pos.reshape(-1, 1).double() * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    # MAE builds its grid as meshgrid(w, h): the first half encodes the column index, the second the row index.
    emb = torch.cat([encode(cols), encode(rows)], dim=1).float()
    return torch.cat([torch.zeros(num_prefix, dim), emb], dim=0).unsqueeze(0)


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, L, p * p * C), patches in row-major order, pixels as MAE orders them (p, q, c)."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def mae_loss(pred: Tensor, images: Tensor, mask: Tensor, patch_size: int, norm_pix: bool = True) -> Tensor:
    """MAE's reconstruction loss: per-patch MSE averaged over pixels, then over the removed patches only.

    Args:
        pred: (B, L, p * p * C) decoder output.
        images: (B, C, H, W) the (normalised) input images.
        mask: (B, L) bool, True = removed (the loss is taken there only).
        patch_size: p.
        norm_pix: normalise each target patch by its own mean and (unbiased) variance, MAE's default.
    """
    target = patchify(images.float(), patch_size)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as MAE
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)
    weight = mask.to(per_patch.dtype)
    return (per_patch * weight).sum() / weight.sum()


def shuffle_tokens(
    batch_size: int, num_tokens: int, device: Any = None, generator: torch.Generator | None = None
):
    """An independent uniform permutation of the token indices per sample, (B, L) int64 (MAE's noise argsort)."""
    noise = torch.rand(batch_size, num_tokens, device=device, generator=generator)
    return noise.argsort(dim=1)


def visible_split(shuffle: Tensor, num_keep: int, view: int = 0) -> tuple[Tensor, Tensor]:
    """Visible indices and mask of view ``view`` from a shared shuffle: view k keeps ``shuffle[k*K:(k+1)*K]``.

    Different views of the same shuffle never share a visible token.

    Returns:
        (keep indices (B, K) in shuffle order, mask (B, L) bool with True = masked).
    """
    b, num_tokens = shuffle.shape
    if (view + 1) * num_keep > num_tokens:
        raise ValueError(
            f"view {view} with {num_keep} kept tokens needs {(view + 1) * num_keep} of {num_tokens}"
        )
    keep = shuffle[:, view * num_keep : (view + 1) * num_keep]
    mask = torch.ones(b, num_tokens, dtype=torch.bool, device=shuffle.device)
    mask.scatter_(1, keep, False)
    return keep, mask


def bc_loss(online: Tensor, target: Tensor) -> Tensor:
    """``2 - 2 cos(online, target)`` of L2-normalised vectors, averaged over the batch (float32)."""
    online = F.normalize(online.float(), dim=-1)
    target = F.normalize(target.float(), dim=-1)
    return (2 - 2 * (online * target).sum(dim=-1)).mean()


def teacher_momentum(step: int, total_steps: int, base: float) -> float:
    """Cosine EMA momentum from ``base`` at step 0 to 1 at ``total_steps``: ``1 - (1 - base)(cos(pi t/T) + 1)/2``."""
    t = min(max(step, 0), total_steps)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * t / max(total_steps, 1)) + 1.0) / 2.0


# ------------------------------------------------------------------------------------------------------ modules
class MAEDecoder(nn.Module):
    """MAE's light decoder: embed -> shared mask token at removed positions -> fixed sin-cos positions -> blocks.

    Args:
        embed_dim: encoder width D.
        num_patches: L, patch tokens of the grid.
        grid_hw: the patch grid (for the position embedding).
        num_prefix: class / register tokens in front of the patch tokens (decoded, then dropped).
        patch_size: p (the output has p * p * in_chans values per patch).
        in_chans: image channels.
        dim: decoder width (512 in MAE).
        depth: decoder blocks (8).
        num_heads: attention heads (16).
        mlp_ratio: MLP width / dim (4).
    """

    def __init__(
        self,
        embed_dim: int,
        num_patches: int,
        grid_hw: tuple[int, int],
        num_prefix: int,
        patch_size: int,
        in_chans: int = 3,
        dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.num_patches, self.num_prefix = num_patches, num_prefix
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, grid_hw, num_prefix), persistent=False)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(
            *[Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth)]
        )
        self.norm = norm(dim)
        self.pred = nn.Linear(dim, patch_size * patch_size * in_chans)

    def forward(self, tokens: Tensor, keep: Tensor) -> Tensor:
        """``tokens``: (B, P + K, D) encoder output; ``keep``: (B, K) their patch positions -> (B, L, p*p*C)."""
        x = self.embed(tokens)
        prefix, kept = x[:, : self.num_prefix], x[:, self.num_prefix :]
        b, _, dim = kept.shape
        full = self.mask_token.to(kept.dtype).expand(b, self.num_patches, dim)
        # Kept tokens go back to their original positions; every other position holds the mask token.
        full = torch.scatter(full, 1, keep.unsqueeze(-1).expand(-1, -1, dim), kept)
        x = torch.cat([prefix, full], dim=1) + self.pos_embed.to(kept.dtype)
        x = self.norm(self.blocks(x))
        return self.pred(x[:, self.num_prefix :])


class KeptTokens(nn.Module):
    """Sits in a timm ViT's ``patch_drop`` slot: keeps the prefix tokens and the patch tokens at ``keep``.

    ``keep`` ((B, K) patch indices, or None for all) is set around each call by :meth:`MAEModule.encode`, so the
    encoder runs through its own ``forward_features`` (the one forward FSDP2 needs to know about).
    """

    def __init__(self, num_prefix: int) -> None:
        super().__init__()
        self.num_prefix = num_prefix
        self.keep: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.keep is None:
            return x
        prefix, patches = x[:, : self.num_prefix], x[:, self.num_prefix :]  # (B, P, D), (B, L, D)
        kept = torch.gather(patches, 1, self.keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        return torch.cat([prefix, kept], dim=1)


class ProjectionMLP(nn.Module):
    """LUT's projector / predictor: Linear(no bias) -> BatchNorm1d -> ReLU -> Linear(no bias)."""

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim or in_dim, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _mae_init(module: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform Linear weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm) and module.weight is not None:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class _Trainable(nn.Module):
    """The trained networks under one module, for the optimizer.

    No ``no_weight_decay()``: as in MAE's pre-training, weight decay spares 1-D parameters and biases only.
    """

    def __init__(self, **nets: nn.Module) -> None:
        super().__init__()
        for name, net in nets.items():
            self.add_module(name, net)


def _check_number(name: str, value: Any, low: float, high: float, low_open=False, high_open=False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")


# -------------------------------------------------------------------------------------------------- MAEModule
class MAEModule(TrainingModule):
    """MAE pre-training of any timm ViT (``vit_*``, ``deit*``, ... any ``VisionTransformer``) as a LightningModule.

    Batches are ``images`` or ``(images, labels)`` (labels are ignored): images (B, 3, H, W). Validation logs
    ``val_loss``: the reconstruction loss under masks drawn from a generator seeded by the batch index (the same
    masks every epoch, and the training random streams are untouched).

    Args:
        model: timm ViT name; built with ``num_classes=0`` and ``model_kwargs``.
        model_kwargs: extra ``timm.create_model`` arguments (img_size, patch_size, depth, ...).
        num_classes: unused (pre-training has no labels); the CLI links the data's class count here.
        mask_ratio: fraction of patch tokens removed, in (0, 1); kept = ``int(L * (1 - ratio))``.
        norm_pix_loss: regress per-patch normalised pixels (MAE's default).
        decoder_dim: decoder width (MAE: 512).
        decoder_depth: decoder blocks (MAE: 8).
        decoder_num_heads: decoder attention heads (MAE: 16).
        decoder_mlp_ratio: decoder MLP ratio (MAE: 4).
        fixed_pos_embed: the encoder's position embedding is MAE's fixed 2-D sin-cos (not trained); False keeps
            timm's learned one.
        optimizer: timm optimizer name.
        lr: base learning rate; multiplied by ``global batch / lr_base_batch_size`` when that is set (MAE: blr
            1.5e-4 at 256).
        lr_base_batch_size: batch size ``lr`` refers to; None uses ``lr`` as given.
        weight_decay: weight decay of the weight matrices (not of 1-D parameters and biases).
        optimizer_kwargs: extra optimizer arguments; None: MAE's ``betas: [0.9, 0.95]`` for ``adamw``.
        scheduler: per-step schedule (``cosine`` ...).
        warmup_epochs: linear warmup length in epochs (MAE: 40).
        warmup_lr: learning rate at the first warmup step.
        min_lr: learning rate at the end.
        grad_clip_norm: clip the gradient's global norm; None for none.
        grad_accumulation: micro-batches per optimizer step.
        nonfinite_loss: ``stop`` (default) or ``skip`` a step whose loss is NaN / inf (as ``MaskSubModule``).
        export_on_fit_end: write the encoder in the released-MAE layout to ``<checkpoint dir>/encoder.pth``
            (or ``<default_root_dir>/encoder.pth``) when fitting ends.
        compile: ``torch.compile`` the encoder in place.

    Raises:
        ValueError: a bad argument (one line naming it, its value and what is allowed).
    """

    def __init__(
        self,
        model: str = "vit_base_patch16_224",
        model_kwargs: dict[str, Any] | None = None,
        num_classes: int | None = None,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        decoder_mlp_ratio: float = 4.0,
        fixed_pos_embed: bool = True,
        optimizer: str = "adamw",
        lr: float = 1.5e-4,
        lr_base_batch_size: int | None = 256,
        weight_decay: float = 0.05,
        optimizer_kwargs: dict[str, Any] | None = None,
        scheduler: str = "cosine",
        warmup_epochs: float = 40.0,
        warmup_lr: float = 0.0,
        min_lr: float = 0.0,
        grad_clip_norm: float | None = None,
        grad_accumulation: int = 1,
        nonfinite_loss: str = "stop",
        export_on_fit_end: bool = True,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_training_options(self.hparams)
        _check_number("mask_ratio", mask_ratio, 0.0, 1.0, low_open=True, high_open=True)
        for name, value in (
            ("decoder_dim", decoder_dim),
            ("decoder_depth", decoder_depth),
            ("decoder_num_heads", decoder_num_heads),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if decoder_dim % decoder_num_heads:
            raise ValueError(
                f"decoder_dim={decoder_dim} must be divisible by decoder_num_heads={decoder_num_heads}"
            )

        self.num_classes = num_classes
        self.model = self._build_encoder(model, model_kwargs or {})
        enc = self.model
        self.patch_size = int(enc.patch_embed.patch_size[0])
        self.grid_hw = tuple(int(g) for g in enc.patch_embed.grid_size)
        self.num_patches = self.grid_hw[0] * self.grid_hw[1]
        self.num_prefix = int(enc.num_prefix_tokens)
        self.num_keep = num_kept_tokens(self.num_patches, mask_ratio)
        self.decoder = MAEDecoder(
            enc.embed_dim,
            self.num_patches,
            self.grid_hw,
            self.num_prefix,
            self.patch_size,
            int(enc.patch_embed.proj.in_channels),
            decoder_dim,
            decoder_depth,
            decoder_num_heads,
            decoder_mlp_ratio,
        )
        self._init_mae_weights(fixed_pos_embed)

    @staticmethod
    def _build_encoder(name: Any, kwargs: dict[str, Any]) -> VisionTransformer:
        if not isinstance(name, str) or not timm.is_model(name):
            raise ValueError(
                f"model={name!r} is not a timm model name; use a ViT such as 'vit_base_patch16_224'"
            )
        failure = None
        try:
            encoder = timm.create_model(name, num_classes=0, **kwargs)
        except TypeError as err:  # e.g. ViT arguments (img_size, patch_size) given to a CNN
            failure = str(err)
        if (
            failure is not None
        ):  # raised outside the handler: the CLI shows the innermost error, i.e. this one
            raise ValueError(
                f"model={name!r} could not be built with model_kwargs={kwargs!r} ({failure}); MAE / LUT "
                "pre-training needs a timm VisionTransformer (vit_*, deit_*, ...)"
            )
        if not isinstance(encoder, VisionTransformer):
            raise ValueError(
                f"model={name!r} builds a {type(encoder).__name__}; MAE / LUT pre-training needs a timm "
                "VisionTransformer (vit_*, deit_*, ...) whose patch tokens can be dropped before the blocks"
            )
        if encoder.pos_embed is None or getattr(encoder, "dynamic_img_size", False):
            raise ValueError(f"model={name!r}: needs a fixed-size absolute position embedding")
        if isinstance(encoder.norm, nn.Identity):
            raise ValueError(
                f"model={name!r} with global_pool={encoder.global_pool!r} has no final norm; pre-train without "
                "global_pool='avg' (fine-tuning sets it)"
            )
        ps = encoder.patch_embed.patch_size
        if ps[0] != ps[1]:
            raise ValueError(f"model={name!r}: needs square patches, got {tuple(ps)}")
        if not isinstance(encoder.patch_drop, nn.Identity):
            raise ValueError(
                f"model={name!r}: MAE / LUT choose the kept tokens themselves; drop patch_drop_rate"
            )
        encoder.patch_drop = KeptTokens(encoder.num_prefix_tokens)  # no parameters: the state dict is timm's
        return encoder

    def _init_mae_weights(self, fixed_pos_embed: bool) -> None:
        enc = self.model
        self.model.apply(_mae_init)
        self.decoder.apply(_mae_init)
        w = enc.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear layer
        for token in (enc.cls_token, getattr(enc, "reg_token", None), self.decoder.mask_token):
            if token is not None:
                nn.init.normal_(token, std=0.02)
        if fixed_pos_embed:
            slots = 0 if enc.no_embed_class else self.num_prefix
            enc.pos_embed.data.copy_(sincos_pos_embed_2d(enc.embed_dim, self.grid_hw, slots))
            enc.pos_embed.requires_grad_(False)

    # ------------------------------------------------------------------------------------------ forward
    def encode(
        self, images: Tensor, keep: Tensor | None = None, net: VisionTransformer | None = None
    ) -> Tensor:
        """Encoder output (B, P + K, D) after the final norm, on the prefix tokens and the ``keep`` patch tokens.

        timm's own ``forward_features``: position embeddings are added first, then the encoder's ``patch_drop``
        slot (a :class:`KeptTokens`) removes the patch tokens outside ``keep`` (prefix tokens always stay);
        ``keep=None`` encodes every token.
        """
        net = self.model if net is None else net
        net.patch_drop.keep = keep
        try:
            return net.forward_features(images)
        finally:
            net.patch_drop.keep = None

    def forward(self, images: Tensor) -> Tensor:
        """Encoder features of the whole (unmasked) image, (B, P + L, D)."""
        return self.encode(images)

    def draw_shuffle(self, batch_size: int, device: Any, generator: torch.Generator | None = None) -> Tensor:
        return shuffle_tokens(batch_size, self.num_patches, device, generator)

    def mae_step(self, images: Tensor, shuffle: Tensor) -> tuple[Tensor, Tensor]:
        """(reconstruction loss, encoder output of the visible tokens) of view 0 of ``shuffle``."""
        keep, mask = visible_split(shuffle, self.num_keep, view=0)
        latent = self.encode(images, keep)
        pred = self.decoder(latent, keep)
        return mae_loss(pred, images, mask, self.patch_size, self.hparams.norm_pix_loss), latent

    def compute_losses(self, batch: Any) -> dict[str, Tensor]:
        """The training losses of a batch; ``loss`` is the one back-propagated."""
        images = self._images(batch)
        loss, _ = self.mae_step(images, self.draw_shuffle(images.shape[0], images.device))
        return {"loss": loss}

    def _images(self, batch: Any) -> Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        if images.dim() == 5:  # two-view batches (LUT data): MAE uses the first view
            images = images[:, 0]
        return images

    # ---------------------------------------------------------------------------------------- optimization
    loss_part_names = {
        "loss": "reconstruction loss",
        "loss_mae": "reconstruction loss",
        "loss_bc": "context loss",
    }

    def training_losses(self, batch: Any) -> dict[str, Tensor]:
        losses = self.compute_losses(batch)
        self.backprop(losses["loss"])
        return losses

    def trainable_networks(self) -> dict[str, nn.Module]:
        """The networks the optimizer trains (by attribute name)."""
        return {"model": self.model, "decoder": self.decoder}

    def optimizer_target(self) -> nn.Module:
        return _Trainable(**self.trainable_networks())

    def optimizer_defaults(self) -> dict[str, Any]:
        return {"betas": (0.9, 0.95)} if self.hparams.optimizer.lower() == "adamw" else {}  # MAE's

    def shard(self, mesh: Any) -> None:
        """FSDP2: the encoders run through ``forward_features`` (not ``forward``), which FSDP2 is told about."""
        for encoder in self.encoders():
            trained = encoder is self.model  # a teacher never runs a backward: free its weights after forward
            sharding.shard_network(
                encoder,
                mesh,
                forward_methods=["forward_features"],
                reshard_after_forward=None if trained else True,
            )
        sharding.shard_network(self.decoder, mesh)

    def encoders(self) -> list[VisionTransformer]:
        """The encoders ``encode`` runs (LUT adds its teacher's)."""
        return [self.model]

    # ------------------------------------------------------------------------------------------- evaluation
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images = self._images(batch)
        # A private generator: the same masks every epoch, and the training RNG streams are not moved.
        g = torch.Generator(device=images.device).manual_seed(batch_idx)
        loss, _ = self.mae_step(images, self.draw_shuffle(images.shape[0], images.device, g))
        self.log("val_loss", loss, on_epoch=True, prog_bar=True, batch_size=images.shape[0], sync_dist=True)

    # ---------------------------------------------------------------------------------------------- export
    def encoder_state_dict(self) -> dict[str, Tensor]:
        """The encoder's weights with timm key names (float32, on the CPU)."""
        return {k: v.detach().float().cpu().clone() for k, v in _uncompiled(self.model).state_dict().items()}

    def export_encoder(self, path: str | Path) -> Path:
        """Write ``{"model": encoder state dict}`` (the released-MAE layout) to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        checkpoint_io.atomic_torch_save({"model": self.encoder_state_dict()}, path)
        return path

    def on_fit_end(self) -> None:
        if not self.hparams.export_on_fit_end or not self.trainer.is_global_zero:
            return
        callback = self.trainer.checkpoint_callback
        folder = getattr(callback, "dirpath", None) or self.trainer.default_root_dir
        path = self.export_encoder(Path(folder) / ENCODER_FILE)
        self.print(f"exported the pre-trained encoder (released-MAE layout) to {path}")


def _uncompiled(net: nn.Module) -> nn.Module:
    return getattr(net, "_orig_mod", net)


# -------------------------------------------------------------------------------------------------- LUTModule
class LUTModule(MAEModule):
    """LUT pre-training: MAE plus the broader-context loss on the unmasked tokens, with an EMA teacher.

    Batches are ``views`` or ``(views, labels)`` with views (B, 2, 3, H, W): view 0 is the MIM view, view 1 the
    context view (``masksub_lightning.data.pretrain`` makes them). The two views are masked with visible sets taken
    from one shuffle, so they never share a visible position. Loss::

        L = mae_weight * L_mae(view 0) + bc_weight * (d(p_1, z_0) + d(p_0, z_1)) / 2,   d = 2 - 2 cos
        p_v = predictor(projector(mean of view v's visible patch tokens))          student, masked
        z_v = teacher.projector(mean of view v's patch tokens)                     teacher, unmasked, no grad

    The teacher is an exponential moving average of the student's encoder and projector (the parts of the student
    it runs), kept in eval mode, updated after every optimizer step with a momentum that follows a cosine from
    ``momentum`` to 1 over the run (:func:`teacher_momentum`). It is part of the state dict, so checkpoints carry
    it and a resumed run continues with the saved teacher.

    Args:
        bc_weight: weight of the broader-context loss (paper: 1.0 for ViT-S, 0.25 for ViT-B).
        mae_weight: weight of the reconstruction loss (1.0).
        momentum: the teacher's EMA momentum at the first step, in [0, 1] (0.996).
        proj_hidden_dim: hidden width of projector and predictor (4096).
        proj_dim: output width of the projector (None: the encoder width, as the public code).
        **kwargs: the :class:`MAEModule` arguments.
    """

    def __init__(
        self,
        bc_weight: float = 0.25,
        mae_weight: float = 1.0,
        momentum: float = 0.996,
        proj_hidden_dim: int = 4096,
        proj_dim: int | None = None,
        **kwargs: Any,
    ) -> None:
        _check_number("momentum", momentum, 0.0, 1.0)
        _check_number("bc_weight", bc_weight, 0.0, math.inf)
        _check_number("mae_weight", mae_weight, 0.0, math.inf)
        for name, value in (("proj_hidden_dim", proj_hidden_dim), ("proj_dim", proj_dim)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        super().__init__(**kwargs)
        if 2 * self.num_keep > self.num_patches:
            raise ValueError(
                f"mask_ratio={self.hparams.mask_ratio} keeps {self.num_keep} of {self.num_patches} patch tokens "
                "per view; LUT's two views need disjoint visible sets, so at most half can be kept (mask_ratio >= 0.5)"
            )
        dim = self.model.embed_dim
        self.projector = ProjectionMLP(dim, proj_hidden_dim, proj_dim)
        self.predictor = ProjectionMLP(proj_dim or dim, proj_hidden_dim, proj_dim or dim)
        self.teacher = nn.ModuleDict(
            {"model": copy.deepcopy(self.model), "projector": copy.deepcopy(self.projector)}
        )
        self.teacher.requires_grad_(False)
        self.teacher.eval()

    def train(self, mode: bool = True) -> LUTModule:
        super().train(mode)
        self.teacher.eval()  # Lightning switches the module to train mode each epoch; the teacher stays in eval
        return self

    def trainable_networks(self) -> dict[str, nn.Module]:
        return {**super().trainable_networks(), "projector": self.projector, "predictor": self.predictor}

    def encoders(self) -> list[VisionTransformer]:
        return [self.model, self.teacher["model"]]

    def shard(self, mesh: Any) -> None:
        super().shard(mesh)
        sharding.shard_network(self.projector, mesh)
        sharding.shard_network(self.predictor, mesh)
        sharding.shard_network(self.teacher["projector"], mesh, reshard_after_forward=True)

    def _views(self, batch: Any) -> Tensor:
        views = batch[0] if isinstance(batch, (tuple, list)) else batch
        if views.dim() != 5 or views.shape[1] != 2:
            raise ValueError(
                f"LUTModule needs two-view batches (B, 2, C, H, W), got a tensor of shape {tuple(views.shape)}; "
                "use a data module with views='lut' (masksub_lightning.data.pretrain)"
            )
        return views

    def pooled(self, tokens: Tensor) -> Tensor:
        """Mean of the patch tokens (class / register tokens excluded)."""
        return tokens[:, self.num_prefix :].mean(dim=1)

    @torch.no_grad()
    def teacher_targets(self, view: Tensor) -> Tensor:
        """The teacher's projection of an unmasked view."""
        tokens = self.encode(view, None, net=self.teacher["model"])
        return self.teacher["projector"](self.pooled(tokens))

    def compute_losses(self, batch: Any) -> dict[str, Tensor]:
        views = self._views(batch)
        v0, v1 = views[:, 0], views[:, 1]
        shuffle = self.draw_shuffle(views.shape[0], views.device)
        loss_mae, latent0 = self.mae_step(v0, shuffle)
        keep1, _ = visible_split(shuffle, self.num_keep, view=1)
        latent1 = self.encode(v1, keep1)
        p0 = self.predictor(self.projector(self.pooled(latent0)))
        p1 = self.predictor(self.projector(self.pooled(latent1)))
        z0, z1 = self.teacher_targets(v0), self.teacher_targets(v1)
        loss_bc = (bc_loss(p1, z0) + bc_loss(p0, z1)) / 2  # each student view against the other teacher view
        hp = self.hparams
        return {
            "loss": hp.mae_weight * loss_mae + hp.bc_weight * loss_bc,
            "loss_mae": loss_mae,
            "loss_bc": loss_bc,
        }

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        m = teacher_momentum(self.global_step - 1, self._total_steps, self.hparams.momentum)
        self.update_teacher(m)
        self.log("teacher_momentum", torch.tensor(m), on_step=True, on_epoch=False, batch_size=1)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, for parameters and float buffers."""
        for name, student in (("model", _uncompiled(self.model)), ("projector", self.projector)):
            teacher = self.teacher[name]
            t_params, s_params = list(teacher.parameters()), list(student.parameters())
            torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)
            for t, s in zip(teacher.buffers(), student.buffers()):
                if t.is_floating_point():
                    t.lerp_(s, 1.0 - momentum)
                else:
                    t.copy_(s)


# ----------------------------------------------------------------------------------------------------- export
def export_encoder(source: str | Path | MAEModule, path: str | Path) -> Path:
    """Write the pre-trained encoder of a module or a Lightning checkpoint as ``{"model": state dict}``.

    The file is what facebookresearch/mae releases (timm key names, encoder only), so
    ``MaskSubModule(pretrained_weights=path)`` and the ``mae/`` fine-tuning recipes load it.

    Args:
        source: an :class:`MAEModule` / :class:`LUTModule`, or the path of one's Lightning checkpoint.
        path: output file (``.pth``).
    """
    if isinstance(source, MAEModule):
        return source.export_encoder(path)
    ckpt = checkpoint_io.load_checkpoint_file(str(source))
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise ValueError(f"{source} is not a Lightning checkpoint (no 'state_dict')")
    prefix = "model."
    encoder = {k[len(prefix) :]: v.float() for k, v in state.items() if k.startswith(prefix)}
    encoder = {k.replace("_orig_mod.", ""): v for k, v in encoder.items()}
    if not encoder or not any(k.startswith(("decoder.", "teacher.")) for k in state):
        raise ValueError(f"{source} is not an MAEModule / LUTModule checkpoint (no encoder and decoder keys)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint_io.atomic_torch_save({"model": encoder}, path)
    return path
