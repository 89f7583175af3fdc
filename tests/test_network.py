"""masksub_lightning.models.network: the classifier head's width, for timm models and plain modules alike."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import TINY_RESNET, TINY_VIT
from torch import nn

from masksub_lightning import MaskSubModule
from masksub_lightning.models.network import create_network, head_width


class Plain(nn.Module):
    """A classifier from outside timm: no get_classifier(), no num_classes attribute."""

    def __init__(self, head: nn.Module, attr: str = "head") -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        setattr(self, attr, head)
        self.attr = attr

    def forward(self, x):
        return getattr(self, self.attr)(self.body(x))


@pytest.mark.parametrize(
    ("head", "attr", "width"),
    [
        (nn.Sequential(nn.Flatten(), nn.Linear(8, 10)), "head", 10),
        (nn.Conv2d(8, 6, 1), "classifier", 6),
        (nn.Sequential(nn.Flatten(), nn.Linear(8, 32), nn.ReLU(), nn.Sequential(nn.Linear(32, 3))), "fc", 3),
        (nn.Identity(), "head", None),
    ],
    ids=["sequential", "conv", "nested", "identity"],
)
def test_head_width_of_plain_modules(head, attr, width):
    assert head_width(Plain(head, attr)) == width


def test_head_width_of_timm_models():
    assert head_width(timm.create_model("vit_tiny_patch16_224", num_classes=7, **TINY_VIT)) == 7
    assert head_width(timm.create_model("resnet18", num_classes=3, **TINY_RESNET)) == 3
    assert head_width(timm.create_model("convnext_atto", num_classes=5)) == 5  # head.fc inside a head block
    assert head_width(timm.create_model("resnet18", num_classes=0, **TINY_RESNET)) is None


def test_a_plain_module_whose_head_does_not_fit_num_classes_is_refused():
    net = Plain(nn.Sequential(nn.Flatten(), nn.Linear(8, 10)))
    with pytest.raises(ValueError, match=r"^the model's classifier head has 10 outputs but num_classes=5"):
        MaskSubModule(net, num_classes=5, sub_branch="pixel_mask")
    module = MaskSubModule(Plain(nn.Sequential(nn.Flatten(), nn.Linear(8, 5))), 5, sub_branch="pixel_mask")
    assert module(torch.zeros(2, 3, 32, 32)).shape == (2, 5)


def test_a_timm_model_without_a_head_is_checked_by_its_class_count():
    net = timm.create_model("resnet18", num_classes=0, **TINY_RESNET)
    with pytest.raises(ValueError, match=r"has 0 outputs but num_classes=4"):
        create_network(net, 4, {})
