"""litdata shards: same samples as the folder version, DDP sharding, exact resume, clear errors on bad input."""

from __future__ import annotations

import copy
import json
import multiprocessing
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from fake_data import SMALL, decode_labels, write_cifar10, write_image_folder

pytest.importorskip(
    "litdata", reason="needs the 'streaming' extra (also in 'dev'): pip install -e '.[streaming]'"
)

from masksub_lightning.commands import main as cli_main
from masksub_lightning.data import CIFAR10DataModule, ImageFolderDataModule
from masksub_lightning.data.datasets import seeded_rng
from masksub_lightning.data.streaming import (
    SHARD_FORMAT,
    StreamingDataModule,
    _meta_item,
    join,
    optimize_shards,
)

CLASSES = tuple(f"c{i:02d}" for i in range(12))
# Repeated augmentation and a textured image: crops, flips and colour draws must all line up.
AUG = dict(SMALL, batch_size=4, repeated_aug=2, auto_augment="3a", color_jitter=0.3, seed=3)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """An ImageFolder of 12 classes x 2 textured train images (jpg / png / JPEG), and its shards."""
    tmp = tmp_path_factory.mktemp("stream")
    meta = write_image_folder(tmp / "folder", classes=CLASSES, n_train=2, n_val=1, noise=12)
    out = tmp / "shards"
    cli_main(
        ["data", "optimize", "--dataset", "imagefolder", "--root", str(tmp / "folder"), "--out", str(out)]
    )
    return SimpleNamespace(folder=str(tmp / "folder"), out=str(out), meta=meta, tmp=tmp)


def _batches(dm, world=1, rank=0, limit=None, state=None):
    dm.trainer = SimpleNamespace(training=True, world_size=world, global_rank=rank)
    loader = dm.train_dataloader()
    if state is not None:
        loader.load_state_dict(state)
    out = []
    for images, targets in loader:
        out.append((images, targets))
        if limit is not None and len(out) == limit:
            return out, loader.state_dict()
    return out, None


def test_shards_give_the_folder_batches(shards):
    folder = ImageFolderDataModule(root=shards.folder, **AUG)
    stream = StreamingDataModule(root=shards.out, dataset="imagefolder", **AUG)
    assert stream.class_names == list(CLASSES) and stream.meta["splits"] == {"train": 24, "val": 12}
    a, _ = _batches(folder)
    b, _ = _batches(stream)
    assert len(a) == len(b) == 24 // 4
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    val_f = [y for _, y in folder.get_dataset("val")]
    val_s = [y for _, y in stream.get_dataset("val")]
    assert val_f == val_s == shards.meta["labels"]["val"]


def test_two_ranks_see_every_sample_once(shards, tmp_path):
    # One image per class: the decoded colour identifies the sample.
    write_image_folder(tmp_path / "one", classes=CLASSES, n_train=1, n_val=1)
    optimize_shards(ImageFolderDataModule(root=str(tmp_path / "one")), str(tmp_path / "s"), num_workers=2)
    seen = []
    for rank in range(2):
        dm = StreamingDataModule(root=str(tmp_path / "s"), **dict(SMALL, batch_size=3))
        batches, _ = _batches(dm, world=2, rank=rank)
        for images, targets in batches:
            assert torch.equal(decode_labels(images, dm.mean, dm.std), targets)
            seen += targets.tolist()
    assert sorted(seen) == list(range(len(CLASSES)))


def test_resume_continues_the_epoch(shards):
    full, _ = _batches(StreamingDataModule(root=shards.out, **AUG))
    first, state = _batches(StreamingDataModule(root=shards.out, **AUG), limit=2)
    rest, _ = _batches(StreamingDataModule(root=shards.out, **AUG), state=copy.deepcopy(state))
    assert len(first) + len(rest) == len(full)
    for (xa, ya), (xb, yb) in zip(full, first + rest):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


def test_in_memory_dataset_becomes_png_shards(tmp_path):
    write_cifar10(tmp_path / "cifar")
    cifar = CIFAR10DataModule(root=str(tmp_path / "cifar"), **SMALL)
    optimize_shards(cifar, str(tmp_path / "s"), splits=["train", "test"], num_workers=1)
    stream = StreamingDataModule(root=str(tmp_path / "s"), dataset="cifar10", **SMALL)
    plain, shard = cifar.get_dataset("train"), stream.get_dataset("train")
    assert len(plain) == len(shard)
    for i in range(len(plain)):
        with seeded_rng(i):
            a = plain[i]
        with seeded_rng(i):
            b = shard[i]
        assert a[1] == b[1] and torch.equal(a[0], b[0])  # lossless PNG: the same pixels
    assert stream.shard_split("test") == "test"
    with pytest.raises(ValueError, match=r"no 'val' shards .*written: train, test"):
        stream.shard_split("val")


def test_bad_inputs_fail_at_construction_with_one_line(shards, tmp_path):
    with pytest.raises(ValueError, match=r"written from ImageFolderDataModule") as e:
        StreamingDataModule(root=shards.out, dataset="imagenet")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"cannot read the shard metadata") as e:
        StreamingDataModule(root="local:" + str(tmp_path / "nowhere"))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"cannot read the shard metadata"):
        StreamingDataModule(root=str(tmp_path / "nowhere"))
    # Metadata of another format version.
    import litdata

    previous = multiprocessing.get_start_method(allow_none=True)
    meta = {"format": SHARD_FORMAT, "version": 999, "dataset": "X", "class_names": ["a"], "splits": {}}
    litdata.optimize(
        fn=_meta_item,
        inputs=[json.dumps(meta)],
        output_dir=join(str(tmp_path / "old"), "meta"),
        num_workers=1,
        chunk_bytes="1MB",
        start_method="fork",  # spawn would re-import torch in the writer (seconds)
        verbose=False,
    )
    multiprocessing.set_start_method(previous, force=True)  # litdata sets it globally
    with pytest.raises(ValueError, match=r"format version 999.*re-run `masksub data optimize`"):
        StreamingDataModule(root=str(tmp_path / "old"))


def test_cli_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(
            ["data", "optimize", "--dataset", "nope", "--root", str(tmp_path), "--out", str(tmp_path / "o")]
        )
    assert e.value.code == 2
    assert "--dataset 'nope' is unknown" in capsys.readouterr().err


def test_url_root_reads_through_the_cache(shards, tmp_path):
    # litdata's "local:" scheme treats a directory as remote storage: chunks are copied into cache_dir, as from s3.
    cache = tmp_path / "cache"
    url = StreamingDataModule(root="local:" + shards.out, cache_dir=str(cache), **AUG)
    plain = StreamingDataModule(root=shards.out, **AUG)
    a, _ = _batches(plain)
    b, _ = _batches(url)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert any(cache.rglob("*.bin"))  # the chunks really came through the download path


def test_benchmark_times_every_installed_path():
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "data_throughput.py"
    spec = importlib.util.spec_from_file_location("data_throughput", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    paths = ["folder", "fast", "shards"] + (["dali"] if module.available("dali") is None else [])
    rows = module.main(["--smoke", "--variants", "rsb-randaug", "--paths", *paths])
    assert [r["path"] for r in rows] == paths
    assert all(r["images"] == 48 and r["rate"] > 0 for r in rows)


def test_fast_decode_reads_shards_like_files(tmp_path):
    # 320x240 JPEGs and 32 px crops: the reduced (1/2 - 1/8) decode path, from bytes in a shard as from a file.
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(8):
        path = tmp_path / "big" / "train" / f"c{i % 2}" / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(path, quality=90)
    optimize_shards(ImageFolderDataModule(root=str(tmp_path / "big")), str(tmp_path / "s"), ["train"], 1)
    kwargs = dict(AUG, auto_augment=None, fast_decode=True)
    a, _ = _batches(ImageFolderDataModule(root=str(tmp_path / "big"), **kwargs))
    b, _ = _batches(StreamingDataModule(root=str(tmp_path / "s"), **kwargs))
    assert len(a) == len(b) == 2
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


class _RecordLabels(L.LightningModule):
    """Writes, per rank and epoch, the labels decoded from the colours of the images it trained on."""

    def __init__(self, out: str, mean, std) -> None:
        super().__init__()
        self.out, self.mean, self.std = out, mean, std
        self.layer = torch.nn.Linear(3, len(CLASSES))
        self.seen: list[int] = []

    def training_step(self, batch, batch_idx):
        images, targets = batch
        assert torch.equal(decode_labels(images, self.mean, self.std), targets)
        self.seen += targets.tolist()
        return torch.nn.functional.cross_entropy(self.layer(images.mean(dim=(2, 3))), targets)

    def on_train_epoch_end(self) -> None:
        path = Path(self.out) / f"rank{self.global_rank}_epoch{self.current_epoch}.json"
        path.write_text(json.dumps(self.seen))
        self.seen = []

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.slow
def test_real_ddp_run_sees_every_shard_sample_once_per_epoch(tmp_path):
    write_image_folder(tmp_path / "one", classes=CLASSES, n_train=1, n_val=1)
    optimize_shards(ImageFolderDataModule(root=str(tmp_path / "one")), str(tmp_path / "s"), num_workers=1)
    dm = StreamingDataModule(root=str(tmp_path / "s"), **dict(SMALL, batch_size=2, num_workers=1))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(_RecordLabels(str(tmp_path), dm.mean, dm.std), datamodule=dm)
    for epoch in (0, 1):
        ranks = [json.loads((tmp_path / f"rank{r}_epoch{epoch}.json").read_text()) for r in (0, 1)]
        assert len(ranks[0]) == len(ranks[1]) == len(CLASSES) // 2
        assert sorted(ranks[0] + ranks[1]) == list(range(len(CLASSES)))
