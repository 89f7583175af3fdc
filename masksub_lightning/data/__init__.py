"""LightningDataModules for MaskSub training: one base class, thin dataset subclasses.

=====================================  ===============================================================
class                                  data
=====================================  ===============================================================
:class:`ImageClassificationDataModule` base: timm transforms, Mixup / CutMix, repeated aug, loaders
:class:`DigitsDataModule`              scikit-learn's 8x8 digits, in memory (quickstart, no download)
:class:`ImageFolderDataModule`         your own ``train/<class>/`` + ``val/<class>/`` folders
:class:`ImageNetDataModule`            ImageNet-1k (or a class subset via ``class_list``)
:class:`CIFAR10DataModule`, ...100     CIFAR python pickle batches
:class:`Flowers102DataModule`, ...     fine-grained transfer sets in torchvision's layouts, CUB, Dogs
:class:`INaturalistDataModule`         iNaturalist 2018 / 2019 (json) and 2021 (folders)
:class:`PretrainImageFolderDataModule` MAE / LUT pre-training views (also ...ImageNet..., ...Digits...)
=====================================  ===============================================================

Train loaders are torchdata ``StatefulDataLoader`` s that resume mid-epoch exactly from a Lightning checkpoint;
val / test loaders shard without padding under DDP. See :mod:`masksub_lightning.data.base` for the RNGs.
"""

from masksub_lightning.data.base import ImageClassificationDataModule
from masksub_lightning.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from masksub_lightning.data.datasets import (
    BadImageError,
    CorruptImageError,
    ImageListDataset,
    ImageTooSmallError,
    ImageTransformError,
    SampleDataset,
    load_rgb,
)
from masksub_lightning.data.digits import DigitsDataModule
from masksub_lightning.data.finegrained import (
    CUB200DataModule,
    DTDDataModule,
    FGVCAircraftDataModule,
    Flowers102DataModule,
    Food101DataModule,
    OxfordIIITPetDataModule,
    StanfordCarsDataModule,
    StanfordDogsDataModule,
)
from masksub_lightning.data.imagenet import ImageFolderDataModule, ImageNetDataModule
from masksub_lightning.data.inaturalist import INaturalistDataModule
from masksub_lightning.data.pretrain import (
    PretrainDigitsDataModule,
    PretrainImageFolderDataModule,
    PretrainImageNetDataModule,
)
from masksub_lightning.data.samplers import RepeatedAugSampler, ShardedEvalSampler

__all__ = [
    "BadImageError",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CUB200DataModule",
    "CorruptImageError",
    "DTDDataModule",
    "DigitsDataModule",
    "FGVCAircraftDataModule",
    "Flowers102DataModule",
    "Food101DataModule",
    "INaturalistDataModule",
    "ImageClassificationDataModule",
    "ImageFolderDataModule",
    "ImageListDataset",
    "ImageNetDataModule",
    "ImageTooSmallError",
    "ImageTransformError",
    "OxfordIIITPetDataModule",
    "PretrainDigitsDataModule",
    "PretrainImageFolderDataModule",
    "PretrainImageNetDataModule",
    "RepeatedAugSampler",
    "SampleDataset",
    "ShardedEvalSampler",
    "StanfordCarsDataModule",
    "StanfordDogsDataModule",
    "load_rgb",
]
