"""decode="gpu": workers read bytes, the main process decodes and augments; same draws as the CPU pipeline.

The device path runs here on the CPU (``decode_device="cpu"``): the same code, torchvision's CPU decoder.
"""

from __future__ import annotations

import importlib.util
import io
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from fake_data import write_cifar10, write_image_folder
from PIL import Image, ImageFilter, ImageOps
from timm.data import auto_augment, random_erasing
from torchvision.transforms import functional as TF

from masksub_lightning.data import CIFAR10DataModule, ImageFolderDataModule
from masksub_lightning.data.datasets import CorruptImageError, seeded_rng
from masksub_lightning.data.gpu_decode import (
    EncodedTrainTransform,
    adjust_brightness,
    adjust_contrast,
    adjust_saturation,
    decode_jpegs,
    draw_params,
    gaussian_blur,
    pil_luma,
    solarize,
)

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_decode.py"
CLASSES = ("a", "b", "c", "d")
DEIT3 = dict(train_crop="simple", auto_augment="3a", color_jitter=0.3)
BASE = dict(batch_size=4, num_workers=0, img_size=32, seed=3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_decode") / "data"
    write_image_folder(root, classes=CLASSES, n_train=3, n_val=1, noise=40)  # .jpg, .png and .JPEG files
    return str(root)


def _dm(folder, decode="gpu", **kwargs):
    extra = dict(decode_device="cpu") if decode == "gpu" else {}
    dm = ImageFolderDataModule(root=folder, decode=decode, **extra, **{**BASE, **kwargs})
    dm.trainer = SimpleNamespace(training=True, world_size=1, global_rank=0)
    dm.setup("fit")
    return dm


def _on_device(dm, batch):
    return dm.on_after_batch_transfer(dm.transfer_batch_to_device(batch, torch.device("cpu"), 0), 0)


def _texture(width=50, height=37, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------------ the same draws


class _Spy:
    """Records what the CPU pipeline's ops do with their draws (it still runs them)."""

    def __init__(self, monkeypatch, pipeline) -> None:
        self.log: dict = {}
        for name in (
            "resized_crop",
            "crop",
            "hflip",
            "adjust_brightness",
            "adjust_contrast",
            "adjust_saturation",
        ):
            monkeypatch.setattr(TF, name, self._wrap(name, getattr(TF, name)))
        spy = self

        class Blur(ImageFilter.GaussianBlur):
            def __init__(self, radius=2):
                spy.log["blur"] = radius
                super().__init__(radius)

        monkeypatch.setattr(auto_augment.ImageFilter, "GaussianBlur", Blur)
        monkeypatch.setattr(random_erasing, "_get_pixels", lambda *a, **k: torch.full(a[2], 1e4))
        for op in [
            o for t in pipeline.transforms[1].transforms for sub in getattr(t, "policy", []) for o in sub
        ]:
            monkeypatch.setattr(op, "aug_fn", self._wrap(op.name, op.aug_fn))

    def _wrap(self, name, fn):
        def recorded(img, *args, **kwargs):
            self.log.setdefault(name, []).append(args)
            return fn(img, *args, **kwargs)

        return recorded

    def run(self, pipeline, img, seed):
        self.log = {}
        with seeded_rng(seed):
            out = pipeline(img)
        erased = (out == 1e4).all(0).nonzero()
        if len(erased):
            (top, left), (bottom, right) = erased.min(0).values.tolist(), erased.max(0).values.tolist()
            self.log["erase"] = [top, left, bottom - top + 1, right - left + 1]
        return self.log


_INTERP = {TF.InterpolationMode.BILINEAR: 0, TF.InterpolationMode.BICUBIC: 1}
_AUG_CODE = {"Solarize": 0, "Desaturate": 1, "GaussianBlurRand": 2}


def _expected(log, crop):
    """The parameters the CPU pipeline's recorded calls imply, in draw_params' terms."""
    exp = {}
    if crop == "rrc":
        (top, left, h, w, _size, interp), *_ = log["resized_crop"]
        exp.update(box=[top, left, h, w], interp=_INTERP[interp])
    else:
        exp["box"] = list(log["crop"][0])  # RandomCrop's crop in the padded, resized image
    exp["flip"] = "hflip" in log
    ops = [n for n in _AUG_CODE if n in log]
    assert len(ops) == 1  # 3-Augment applies exactly one op
    exp["aug"] = _AUG_CODE[ops[0]]
    exp["aug_arg"] = log["blur"] if ops[0] == "GaussianBlurRand" else log[ops[0]][0][0]
    if ops[0] == "Desaturate":
        exp["aug_arg"] = min(1.0, max(0.0, 1.0 - exp["aug_arg"]))  # timm's desaturate turns level into factor
    names = ("adjust_brightness", "adjust_contrast", "adjust_saturation")
    jitter = [(i, log[n][0][0]) for i, n in enumerate(names)]
    exp["jitter"] = [f for _, f in jitter]
    exp["erase"] = log.get("erase", [0, 0, 0, 0])
    return exp


@pytest.mark.parametrize(
    "settings",
    [
        dict(DEIT3, reprob=0.5),
        dict(train_crop="rrc", auto_augment="3a", color_jitter=0.4, train_interpolation="random", reprob=0.5),
    ],
    ids=["deit3-simple", "rrc-random-interp"],
)
def test_draws_equal_the_cpu_pipeline(folder, monkeypatch, settings):
    dm = ImageFolderDataModule(root=folder, **{**BASE, **settings})
    pipeline = dm.build_transform(train=True)
    spy = _Spy(monkeypatch, pipeline)
    ops = EncodedTrainTransform(pipeline, dm.img_size).ops
    seen = {"flip": set(), "aug": set(), "erase": set()}
    for seed in range(40):
        img = _texture(50 + seed % 7, 37 + seed % 5, seed)
        exp = _expected(spy.run(pipeline, img, seed), settings["train_crop"])
        with seeded_rng(seed):
            got = draw_params(ops, img.width, img.height, dm.img_size)
        assert got["box"] == exp["box"]
        if "interp" in exp:
            assert int(got["interp"]) == exp["interp"]
        assert bool(got["flip"]) == exp["flip"]
        assert int(got["aug"]) == exp["aug"] and float(got["aug_arg"]) == pytest.approx(
            exp["aug_arg"], abs=1e-12
        )
        assert got["jitter"] == pytest.approx(exp["jitter"], abs=1e-12)
        assert got["erase"] == exp["erase"]
        seen["flip"].add(exp["flip"])
        seen["aug"].add(exp["aug"])
        seen["erase"].add(exp["erase"][2] > 0)
    # Over 40 seeds every branch of every draw was taken at least once.
    assert seen == {"flip": {False, True}, "aug": {0, 1, 2}, "erase": {False, True}}


def test_jitter_order_is_the_cpu_pipelines(folder, monkeypatch):
    dm = ImageFolderDataModule(root=folder, **{**BASE, "color_jitter": 0.4})
    pipeline = dm.build_transform(train=True)
    order: list[str] = []
    for name in ("adjust_brightness", "adjust_contrast", "adjust_saturation"):
        original = getattr(TF, name)
        monkeypatch.setattr(TF, name, lambda img, f, _n=name, _o=original: (order.append(_n), _o(img, f))[1])
    ops = EncodedTrainTransform(pipeline, dm.img_size).ops
    names = ["adjust_brightness", "adjust_contrast", "adjust_saturation"]
    for seed in range(10):
        order.clear()
        with seeded_rng(seed):
            pipeline(_texture(seed=seed))
        with seeded_rng(seed):
            got = draw_params(ops, 50, 37, dm.img_size)["jitter_order"]
        assert order == [names[i] for i in got if i < 3]


# ------------------------------------------------------------------------------------------- the pixels


def test_colour_ops_equal_pil():
    img = _texture(40, 30, 7)
    x = TF.pil_to_tensor(img).unsqueeze(0)
    for factor in (0.0, 0.63, 1.0, 1.37):
        f = torch.tensor([factor])
        for ours, theirs in (
            (adjust_brightness, TF.adjust_brightness),
            (adjust_contrast, TF.adjust_contrast),
            (adjust_saturation, TF.adjust_saturation),
        ):
            assert torch.equal(ours(x, f)[0], TF.pil_to_tensor(theirs(img, factor))), (ours.__name__, factor)
    assert torch.equal(pil_luma(x)[0], TF.pil_to_tensor(img.convert("L")))
    assert torch.equal(solarize(x, torch.tensor([128]))[0], TF.pil_to_tensor(ImageOps.solarize(img, 128)))
    grey = auto_augment.desaturate(img, 1.0)  # 3-Augment's grayscale: Desaturate at magnitude 10
    assert torch.equal(adjust_saturation(x, torch.tensor([0.0]))[0], TF.pil_to_tensor(grey))


def test_blur_is_close_to_pils():
    smooth = _texture(40, 30, 1).resize((80, 60), Image.BICUBIC)
    x = TF.pil_to_tensor(smooth).unsqueeze(0)
    for sigma in (0.1, 0.8, 2.0):
        ours = gaussian_blur(x, torch.tensor([sigma]))[0].float()
        pil = TF.pil_to_tensor(smooth.filter(ImageFilter.GaussianBlur(sigma))).float()
        diff = (ours - pil).abs()[:, 4:-4, 4:-4]  # away from the borders (edge handling differs)
        assert diff.mean() < 1.0 and diff.max() <= 8, (sigma, diff.mean(), diff.max())
        assert (ours - x[0].float()).abs().mean() > 2 * diff.mean() or sigma == 0.1  # it does blur


@pytest.mark.parametrize("crop", ["simple", "rrc"])
def test_batches_are_close_to_the_cpu_pipelines(folder, crop):
    # No erasing (its noise differs by design) and no blur: what is left is the resampling of the resize.
    settings = dict(train_crop=crop, color_jitter=0.3, auto_augment=None)
    gpu, cpu = _dm(folder, **settings), _dm(folder, decode="cpu", **settings)
    for (encoded, (ref, ref_targets)), _ in zip(
        zip(gpu.train_dataloader(), cpu.train_dataloader()), range(3)
    ):
        images, targets = _on_device(gpu, encoded)
        assert torch.equal(targets, ref_targets)
        levels = ((images - ref) * torch.tensor(gpu.std).view(1, 3, 1, 1) * 255).abs()
        # Measured: mean 0.18-0.24, max 2-5 levels of 255 (torch's antialiased resize vs PIL's).
        assert levels.mean() < 0.5 and levels.max() <= 8, (levels.mean(), levels.max())


def test_a_wrong_crop_would_be_caught(folder):
    # The bound above is tight enough: the same batch with other seeds differs by far more.
    a, b = (
        _dm(folder, decode="cpu", seed=3, color_jitter=None),
        _dm(folder, decode="cpu", seed=4, color_jitter=None),
    )
    x, _ = next(iter(a.train_dataloader()))
    y, _ = next(iter(b.train_dataloader()))
    assert ((x - y) * torch.tensor(a.std).view(1, 3, 1, 1) * 255).abs().mean() > 10


# ------------------------------------------------------------------------- loader, Mixup, resume, formats


def test_order_repeated_aug_mixup_and_state_are_the_cpu_paths(folder):
    settings = dict(DEIT3, repeated_aug=3, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    gpu, cpu = _dm(folder, **settings), _dm(folder, decode="cpu", **settings)
    gpu_loader, cpu_loader = gpu.train_dataloader(), cpu.train_dataloader()
    assert len(gpu_loader) == len(cpu_loader) == 3
    gpu_it, cpu_it = iter(gpu_loader), iter(cpu_loader)
    for _ in range(2):
        _, soft = _on_device(gpu, next(gpu_it))
        _, ref = _on_device(cpu, next(cpu_it))
        assert torch.equal(soft, ref)  # same labels, same Mixup / CutMix draws
    assert gpu.state_dict()["mix_step"] == cpu.state_dict()["mix_step"] == 2
    assert gpu.state_dict()["train_loader"] == cpu.state_dict()["train_loader"]  # the same resume point


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_mid_epoch_gives_the_same_batches(folder, workers):
    settings = dict(DEIT3, reprob=0.5, num_workers=workers, persistent_workers=False)
    full = _dm(folder, **settings)
    expected = [_on_device(full, b) for b in full.train_dataloader()]
    first = _dm(folder, **settings)
    loader = first.train_dataloader()
    it = iter(loader)
    _on_device(first, next(it))
    state = first.state_dict()
    resumed = _dm(folder, **settings)
    resumed.load_state_dict(state)
    rest = [_on_device(resumed, b) for b in resumed.train_dataloader()]
    assert len(rest) == len(expected) - 1
    for (x, y), (ex, ey) in zip(rest, expected[1:]):
        assert torch.equal(x, ex) and torch.equal(y, ey)  # erasing noise included: seeded per sample


def test_png_is_decoded_in_the_worker_and_jpeg_is_not(folder):
    dm = _dm(folder)
    transform = dm.datasets["train"].transform
    png = sorted(Path(folder, "train", "a").glob("*.png"))[0]
    jpg = sorted(Path(folder, "train", "a").glob("*.jpg"))[0]
    payload, _, name = transform(png.read_bytes(), str(png))
    assert name == str(png) and payload.shape == (3, 36, 40)
    assert torch.equal(payload, TF.pil_to_tensor(Image.open(png).convert("RGB")))
    payload, _, _ = transform(jpg.read_bytes(), str(jpg))
    assert payload.dim() == 1 and payload.numpy().tobytes() == jpg.read_bytes()
    # Grey and CMYK JPEGs: grey goes to the device decoder, CMYK is decoded by PIL in the worker.
    for mode, dims in (("L", 1), ("CMYK", 3)):
        buf = io.BytesIO()
        _texture().convert(mode).save(buf, "JPEG")
        payload, _, _ = transform(buf.getvalue(), f"x.{mode}.jpg")
        assert payload.dim() == dims


def test_decode_jpegs_equals_pil_and_is_silent():
    buf = io.BytesIO()
    _texture(64, 48, 2).save(buf, "JPEG", quality=90)
    data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (img,) = decode_jpegs([data], torch.device("cpu"))
    assert caught == []  # torchvision 0.29's DeprecationWarning at every call is silenced
    assert torch.equal(img, TF.pil_to_tensor(Image.open(buf).convert("RGB")))


def test_corrupt_jpeg_data_names_the_file(tmp_path):
    write_image_folder(tmp_path / "d", classes=CLASSES, n_train=3, n_val=1, noise=40)
    bad = tmp_path / "d" / "train" / "b" / "b_0.jpg"
    data = bad.read_bytes()
    bad.write_bytes(data[: data.index(b"\xff\xda") + 40])  # the header parses, the scan data is cut
    dm = _dm(str(tmp_path / "d"), batch_size=12)
    with pytest.raises(CorruptImageError, match=rf"^Cannot decode image file {bad} on cpu \(decode='gpu'\)"):
        _on_device(dm, next(iter(dm.train_dataloader())))


def test_trains_through_lightnings_hooks(folder):
    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, len(CLASSES))
            self.seen = []

        def training_step(self, batch, batch_idx):
            images, targets = batch
            self.seen.append((images.shape, images.dtype, targets.clone()))
            return torch.nn.functional.cross_entropy(self.layer(images.mean((2, 3))), targets)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = ImageFolderDataModule(root=folder, decode="gpu", decode_device="cpu", **{**BASE, **DEIT3})
    model = Recorder()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    ref = _dm(folder, decode="cpu", **DEIT3)
    ref_targets = [t for _, t in ref.train_dataloader()][:2]
    assert [(s, d) for s, d, _ in model.seen] == [(torch.Size([4, 3, 32, 32]), torch.float32)] * 2
    assert all(torch.equal(t, r) for (_, _, t), r in zip(model.seen, ref_targets))


# ------------------------------------------------------------------------------------------------ bad input


def test_gpu_decode_without_cuda_is_one_line(folder, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError) as e:
        ImageFolderDataModule(root=folder, decode="gpu")
    assert str(e.value) == (
        "decode='gpu' needs a CUDA GPU and none is visible: use decode='cpu' "
        "(or decode_device='cpu' to run the batched decode path on the CPU, for tests)"
    )


def test_gpu_decode_on_a_cpu_trainer_fails_at_setup(folder, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    dm = ImageFolderDataModule(root=folder, decode="gpu", **BASE)
    dm.trainer = SimpleNamespace(
        training=True, world_size=1, global_rank=0, strategy=SimpleNamespace(root_device=torch.device("cpu"))
    )
    with pytest.raises(
        ValueError, match=r"^decode='gpu' decodes on the trainer's CUDA device, but the trainer runs"
    ):
        dm.setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(decode="nvjpeg"), r"^decode='nvjpeg' is invalid: allowed: cpu, gpu$"),
        (dict(decode="gpu", decode_device="tpu"), r"^decode_device='tpu' is invalid: allowed: cuda, cpu$"),
        (dict(decode="gpu", decode_device="cpu", fast_decode=True), r"^fast_decode=True is invalid: reduced"),
    ],
)
def test_bad_decode_arguments_fail_at_construction(folder, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImageFolderDataModule(root=folder, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(auto_augment="rand-m9-mstd0.5-inc1"),
            r"^decode='gpu' does not provide the training op RandAugment: use decode='cpu' \(it provides",
        ),
        (
            dict(interpolation="lanczos"),
            r"^decode='gpu' resizes with bilinear / bicubic / nearest, not 'lanczos'$",
        ),
    ],
)
def test_ops_the_device_lacks_fail_at_setup(folder, kwargs, message):
    dm = ImageFolderDataModule(root=folder, decode="gpu", decode_device="cpu", **kwargs)
    with pytest.raises(ValueError, match=message):
        dm.setup("fit")


def test_in_memory_dataset_is_refused_at_setup(tmp_path):
    write_cifar10(tmp_path)
    dm = CIFAR10DataModule(root=str(tmp_path), decode="gpu", decode_device="cpu", batch_size=2)
    with pytest.raises(ValueError) as e:
        dm.setup("fit")
    assert str(e.value) == (
        "decode='gpu' needs image files or litdata shards, but CIFAR10DataModule serves ArrayImageDataset items "
        "(images in memory): use decode='cpu'"
    )


# ---------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_nvjpeg_batch_is_close_to_the_cpu_decoder(folder):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    cuda = ImageFolderDataModule(root=folder, decode="gpu", decode_device="cuda", **{**BASE, **DEIT3})
    cpu = _dm(folder, **DEIT3)
    cuda.trainer = cpu.trainer
    cuda.setup("fit")
    for encoded, reference in zip(cuda.train_dataloader(), cpu.train_dataloader()):
        device = torch.device("cuda")
        images, _ = cuda.on_after_batch_transfer(cuda.transfer_batch_to_device(encoded, device, 0), 0)
        ref, _ = _on_device(cpu, reference)
        assert images.device.type == "cuda"
        levels = ((images.cpu() - ref) * torch.tensor(cpu.std).view(1, 3, 1, 1) * 255).abs()
        assert levels.mean() < 2.0, levels.mean()


# -------------------------------------------------------------------------------------------------- script


def test_benchmark_smoke(capsys):
    spec = importlib.util.spec_from_file_location("gpu_decode_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    result = module.main(["--smoke"])
    assert result["before"]["images"] == result["after"]["images"] == 16
    assert result["before"]["per_core"] > 0 and result["after"]["per_core"] > 0
    assert result["before"]["cores_per_gpu"] == pytest.approx(2200 / result["before"]["per_core"])
    out = capsys.readouterr().out
    assert "img/s per core" in out and "cores per GPU" in out


def test_the_fixture_mixes_formats(folder):
    # The loader tests above cover PNG items (decoded in the worker) next to JPEGs (decoded in the main process).
    suffixes = {p.suffix for p in Path(folder, "train").rglob("*") if p.is_file()}
    assert suffixes == {".jpg", ".png", ".JPEG"}


def test_shards_give_the_folder_batches(folder, tmp_path):
    pytest.importorskip("litdata", reason="needs the 'streaming' extra (also in 'dev')")
    from masksub_lightning.data.streaming import StreamingDataModule, optimize_shards

    optimize_shards(
        ImageFolderDataModule(root=folder), str(tmp_path / "s"), splits=["train", "val"], num_workers=1
    )
    shards = StreamingDataModule(
        root=str(tmp_path / "s"), decode="gpu", decode_device="cpu", **{**BASE, **DEIT3}
    )
    shards.trainer = SimpleNamespace(training=True, world_size=1, global_rank=0)
    shards.setup("fit")
    files = _dm(folder, **DEIT3)
    pairs = list(zip(shards.train_dataloader(), files.train_dataloader()))
    assert len(pairs) == 3
    for encoded, reference in pairs:
        x, y = _on_device(shards, encoded)
        ex, ey = _on_device(files, reference)
        assert torch.equal(x, ex) and torch.equal(y, ey)
        assert all(
            ".jpg" in n or ".png" in n or ".JPEG" in n for n in encoded.names
        )  # shard items name files
