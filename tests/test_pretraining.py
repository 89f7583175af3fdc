"""MAE / LUT pre-training (masksub_lightning.modules.pretraining), checked against independent computations."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import quiet_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from masksub_lightning.models.weights import load_pretrained
from masksub_lightning.modules.pretraining import (
    LUTModule,
    MAEModule,
    bc_loss,
    export_encoder,
    mae_loss,
    shuffle_tokens,
    teacher_momentum,
    visible_split,
)

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
DECODER = dict(decoder_dim=16, decoder_depth=1, decoder_num_heads=2)


def mae(**kw):
    return MAEModule(model="vit_small_patch16_224", model_kwargs=TINY, **{**DECODER, **kw})


def lut(**kw):
    return LUTModule(
        model="vit_small_patch16_224", model_kwargs=TINY, proj_hidden_dim=32, **{**DECODER, **kw}
    )


def two_view_loader(n=16, batch_size=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    views = torch.randn(n, 2, 3, 32, 32, generator=g)
    return DataLoader(
        TensorDataset(views, torch.zeros(n, dtype=torch.long)), batch_size=batch_size, drop_last=True
    )


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------- masking
def test_visible_split_keeps_mae_count_and_views_are_disjoint():
    shuffle = shuffle_tokens(5, 196)
    keep0, mask0 = visible_split(shuffle, 49, 0)
    keep1, mask1 = visible_split(shuffle, 49, 1)
    assert keep0.shape == (5, 49) and (~mask0).sum(1).tolist() == [49] * 5  # int(196 * 0.25), True = masked
    for b in range(5):
        assert set(keep0[b].tolist()).isdisjoint(keep1[b].tolist())
        assert set(torch.nonzero(~mask0[b]).flatten().tolist()) == set(keep0[b].tolist())
    assert not (~mask0 & ~mask1).any()


def test_encode_drops_tokens_after_the_position_embedding_and_keeps_the_class_token():
    m = mae().eval()
    net = m.model
    x = torch.randn(2, 3, 32, 32)
    # All tokens in order: timm's own forward.
    assert torch.allclose(m.encode(x, torch.arange(16).expand(2, 16)), net.forward_features(x), atol=1e-5)
    # A subset: timm's forward with patch_drop replaced by the same selection.
    keep = torch.tensor([[3, 0, 9, 15], [7, 2, 1, 12]])

    class Select(torch.nn.Module):
        def forward(self, tokens):
            rows = [torch.cat([t[:1], t[1:][k]]) for t, k in zip(tokens, keep)]
            return torch.stack(rows)

    net.patch_drop = Select()
    assert torch.allclose(m.encode(x, keep), net.forward_features(x), atol=1e-5)
    assert m.encode(x, keep).shape == (2, 1 + 4, 32)


def test_decoder_sees_kept_and_mask_tokens_in_the_original_order():
    m = mae().eval()
    x = torch.randn(2, 3, 32, 32)
    shuffle = shuffle_tokens(2, 16)
    keep, mask = visible_split(shuffle, m.num_keep, 0)
    seen = {}
    m.decoder.blocks[0].register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    latent = m.encode(x, keep)
    m.decoder(latent, keep)
    embedded = m.decoder.embed(latent)
    pos = m.decoder.pos_embed[0]
    for b in range(2):
        expected = [embedded[b, 0] + pos[0]]  # class token first
        kept = {int(p): i for i, p in enumerate(keep[b])}
        for p in range(16):
            token = embedded[b, 1 + kept[p]] if p in kept else m.decoder.mask_token[0, 0]
            expected.append(token + pos[1 + p])
            assert bool(mask[b, p]) == (p not in kept)
        assert torch.allclose(seen["x"][b], torch.stack(expected), atol=1e-6)


def test_mae_loss_is_the_norm_pix_mse_of_removed_patches_only():
    g = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 16, 16, generator=g)
    pred = torch.randn(2, 4, 8 * 8 * 3, generator=g)
    mask = torch.tensor([[True, False, True, False], [False, False, False, True]])
    total, count = 0.0, 0
    for b in range(2):
        for p in range(4):
            if not mask[b, p]:
                continue
            r, c = divmod(p, 2)
            patch = (
                images[b, :, 8 * r : 8 * r + 8, 8 * c : 8 * c + 8].permute(1, 2, 0).reshape(-1)
            )  # (p, q, c)
            target = (patch - patch.mean()) / math.sqrt(patch.var(unbiased=True).item() + 1e-6)
            total += ((pred[b, p] - target) ** 2).mean().item()
            count += 1
    assert mae_loss(pred, images, mask, 8).item() == pytest.approx(total / count, rel=1e-5)
    # Without norm_pix: raw pixels.
    raw = sum(
        ((pred[b, p] - images[b, :, 8 * (p // 2) : 8 * (p // 2) + 8, 8 * (p % 2) : 8 * (p % 2) + 8]
          .permute(1, 2, 0).reshape(-1)) ** 2).mean().item()
        for b in range(2) for p in range(4) if mask[b, p]
    )  # fmt: skip
    assert mae_loss(pred, images, mask, 8, norm_pix=False).item() == pytest.approx(raw / count, rel=1e-5)


# ------------------------------------------------------------------------------------------------------- LUT
def test_lut_loss_is_mae_plus_weighted_symmetric_2_minus_2cos(monkeypatch):
    m = lut(bc_weight=0.25)
    m.train()
    views = torch.randn(4, 2, 3, 32, 32)
    shuffle = shuffle_tokens(4, 16)
    monkeypatch.setattr(m, "draw_shuffle", lambda *a, **k: shuffle)
    seen = []
    encode = m.encode
    monkeypatch.setattr(m, "encode", lambda x, keep=None, net=None: seen.append(keep) or encode(x, keep, net))
    losses = m.compute_losses(views)
    keep0, keep1 = seen[0], seen[1]  # the two student views
    assert keep0.shape == keep1.shape == (4, 4)
    assert all(set(a.tolist()).isdisjoint(b.tolist()) for a, b in zip(keep0, keep1))
    assert seen[2] is None and seen[3] is None  # the teacher sees every token

    # By hand: the teacher through timm's own forward; student projections from the visible tokens.
    with torch.no_grad():
        t = m.teacher
        z = [t["projector"](t["model"].forward_features(views[:, v])[:, 1:].mean(1)) for v in (0, 1)]
    p = [m.predictor(m.projector(encode(views[:, v], k)[:, 1:].mean(1))) for v, k in ((0, keep0), (1, keep1))]
    by_hand = 0.5 * (
        (2 - 2 * F.cosine_similarity(p[1], z[0])).mean() + (2 - 2 * F.cosine_similarity(p[0], z[1])).mean()
    )
    assert losses["loss_bc"].item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert losses["loss"].item() == pytest.approx(losses["loss_mae"].item() + 0.25 * by_hand.item(), rel=1e-5)
    assert bc_loss(torch.ones(2, 3), -torch.ones(2, 3)).item() == pytest.approx(4.0)


def test_teacher_gets_no_gradient_stays_in_eval_and_follows_the_ema_formula(tmp_path):
    m = lut(momentum=0.9, lr=1e-2, lr_base_batch_size=None, warmup_epochs=0)
    records = []

    class Watch(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.before = {k: v.clone() for k, v in module.teacher.state_dict().items()}

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            assert not module.teacher.training and module.projector.training
            assert all(p.grad is None and not p.requires_grad for p in module.teacher.parameters())
            student = {f"model.{k}": v for k, v in module.model.state_dict().items()}
            student.update({f"projector.{k}": v for k, v in module.projector.state_dict().items()})
            after = {k: v.clone() for k, v in module.teacher.state_dict().items()}
            student = {k: v.clone() for k, v in student.items()}
            records.append((trainer.global_step, self.before, after, student))

    trainer = quiet_trainer(max_steps=4, callbacks=[Watch()], limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(m, two_view_loader(n=16))
    total = m._total_steps
    assert total == 4 and len(records) == 4
    for step, before, after, student in records:
        mom = 1 - (1 - 0.9) * (math.cos(math.pi * (step - 1) / total) + 1) / 2
        assert mom == pytest.approx(teacher_momentum(step - 1, total, 0.9))
        for key in (
            "model.blocks.0.attn.qkv.weight",
            "projector.net.0.weight",
            "projector.net.1.running_mean",
        ):
            expected = mom * before[key] + (1 - mom) * student[key]
            assert torch.allclose(after[key], expected, atol=1e-6), (step, key)
    assert teacher_momentum(0, 10, 0.996) == pytest.approx(0.996) and teacher_momentum(10, 10, 0.996) == 1.0


def test_teacher_is_checkpointed_and_restored_on_resume(tmp_path):
    m = lut(momentum=0.5, lr=1e-2, lr_base_batch_size=None, warmup_epochs=0)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)

    class StopAfterTheFirstEpoch(Callback):  # the resumed run keeps the same 2-epoch schedule
        def on_train_epoch_end(self, trainer, module):
            trainer.should_stop = True

    quiet_trainer(
        max_epochs=2,
        callbacks=[ckpt, StopAfterTheFirstEpoch()],
        enable_checkpointing=True,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    ).fit(m, two_view_loader())
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    teacher_w = saved["teacher.model.blocks.0.attn.qkv.weight"]
    assert not torch.allclose(teacher_w, saved["model.blocks.0.attn.qkv.weight"])  # a real EMA, not a copy

    seen = {}

    class Check(Callback):
        def on_train_start(self, trainer, module):
            seen["teacher"] = module.teacher["model"].blocks[0].attn.qkv.weight.clone()
            seen["step"] = trainer.global_step

    fresh = lut(momentum=0.5, lr=1e-2, lr_base_batch_size=None, warmup_epochs=0)
    quiet_trainer(max_epochs=2, callbacks=[Check()], limit_val_batches=0, default_root_dir=tmp_path).fit(
        fresh, two_view_loader(), ckpt_path=tmp_path / "last.ckpt"
    )
    assert seen["step"] == 4 and torch.equal(seen["teacher"], teacher_w)


# ------------------------------------------------------------------------------------------- training / export
def test_mae_trains_logs_and_exports_a_loadable_encoder(tmp_path):
    m = mae(lr=1e-2, lr_base_batch_size=None, warmup_epochs=0)
    images = torch.randn(16, 3, 32, 32)
    loader = DataLoader(TensorDataset(images, torch.zeros(16, dtype=torch.long)), batch_size=4)
    trainer = quiet_trainer(max_epochs=1, default_root_dir=tmp_path, limit_val_batches=1)
    trainer.fit(m, loader, loader)
    assert trainer.global_step == 4 and "val_loss" in trainer.callback_metrics
    opt = m.optimizers().optimizer
    assert opt.defaults["betas"] == (0.9, 0.95)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(m.model.cls_token) in decayed and id(m.model.blocks[0].norm1.weight) not in decayed
    assert not m.model.pos_embed.requires_grad  # fixed sin-cos, as MAE

    exported = torch.load(tmp_path / "encoder.pth", weights_only=True)  # written at fit end
    assert set(exported) == {"model"} and not any(k.startswith("decoder") for k in exported["model"])
    ft = timm.create_model("vit_small_patch16_224", num_classes=5, global_pool="avg", **TINY)
    report = load_pretrained(ft, tmp_path / "encoder.pth")
    assert not report.missing_encoder_keys and not report.unexpected_keys
    for key in ("blocks.1.attn.qkv.weight", "patch_embed.proj.weight", "pos_embed", "cls_token"):
        assert torch.equal(ft.state_dict()[key], m.model.state_dict()[key]), key


def test_export_from_a_lut_checkpoint(tmp_path):
    m = lut(lr=1e-2, lr_base_batch_size=None, warmup_epochs=0, export_on_fit_end=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    quiet_trainer(max_steps=2, callbacks=[ckpt], enable_checkpointing=True, limit_val_batches=0).fit(
        m, two_view_loader()
    )
    out = export_encoder(tmp_path / "last.ckpt", tmp_path / "enc.pth")
    sd = torch.load(out, weights_only=True)["model"]
    assert set(sd) == set(m.model.state_dict())
    assert torch.equal(sd["blocks.0.mlp.fc1.weight"], m.model.blocks[0].mlp.fc1.weight)
    assert not (tmp_path / "encoder.pth").exists()


@pytest.mark.parametrize(
    ("factory", "kwargs", "match"),
    [
        (mae, {"mask_ratio": 1.0}, r"mask_ratio must be a number in \(0.0, 1.0\), got 1.0"),
        (mae, {"mask_ratio": -0.1}, "mask_ratio"),
        (lut, {"momentum": 1.5}, r"momentum must be a number in \[0.0, 1.0\], got 1.5"),
        (lut, {"momentum": -0.1}, "momentum"),
        (lut, {"mask_ratio": 0.4}, "disjoint visible sets"),
        (mae, {"decoder_dim": 15}, "divisible"),
    ],
)
def test_bad_config_is_one_value_error(factory, kwargs, match):
    with pytest.raises(ValueError, match=match):
        factory(**kwargs)


def test_non_vit_models_are_refused():
    with pytest.raises(ValueError, match=r"resnet18.*needs a timm VisionTransformer"):
        MAEModule(model="resnet18")
    with pytest.raises(ValueError, match="not a timm model name"):
        LUTModule(model="no_such_vit")


def test_lut_refuses_single_view_batches():
    with pytest.raises(ValueError, match="two-view batches"):
        lut().compute_losses(torch.randn(2, 3, 32, 32))


class _SaveState(Callback):
    def __init__(self, out):
        self.out = out

    def on_train_end(self, trainer, module):
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        torch.save(state, self.out / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_lut_under_ddp_keeps_students_and_teachers_equal_across_ranks(tmp_path):
    """Two CPU processes (gloo), different data per rank: the all-reduced student and its EMA stay identical."""
    from lightning.pytorch.strategies import DDPStrategy

    m = lut(lr=1e-2, lr_base_batch_size=None, warmup_epochs=0, export_on_fit_end=False)
    start = {k: v.clone() for k, v in m.state_dict().items()}
    trainer = quiet_trainer(
        max_steps=2,
        devices=2,
        strategy=DDPStrategy(process_group_backend="gloo", start_method="spawn"),
        callbacks=[_SaveState(tmp_path)],
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(m, two_view_loader(n=32))
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for key in (
        "model.blocks.0.attn.qkv.weight",
        "decoder.pred.weight",
        "teacher.model.blocks.1.mlp.fc1.weight",
    ):
        assert torch.equal(r0[key], r1[key]), key
        assert not torch.equal(r0[key], start[key]), key
