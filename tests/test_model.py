"""Every architecture takes 1-channel images and returns one logit per image."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch

from xray.model import (
    ARCHITECTURES,
    WeightsUnavailableError,
    build_model,
    choose_device,
    explanation_layer,
    gray_stem,
)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_output_is_one_logit_per_image(architecture):
    model = build_model(architecture).eval()
    with torch.no_grad():
        assert model(torch.randn(3, 1, 64, 64)).shape == (3,)
    assert isinstance(explanation_layer(model), torch.nn.Module)


def test_unknown_architecture_and_pretrained_small_cnn_are_refused():
    with pytest.raises(ValueError, match="unknown architecture 'vgg'"):
        build_model("vgg")
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_model("small_cnn", pretrained=True)


def test_device_choice_falls_back_to_cpu_and_honours_a_request():
    assert choose_device("cpu").type == "cpu"
    assert choose_device("auto").type in {"cpu", "cuda", "mps"}


def test_pretrained_efficientnet_loads_shipped_imagenet_weights():
    fresh, pretrained = build_model("efficientnet_lite0"), build_model("efficientnet_lite0", pretrained=True)
    stem = pretrained.backbone._conv_stem.weight
    assert stem.shape[1] == 1, "the stem takes grayscale"
    assert not torch.equal(stem, fresh.backbone._conv_stem.weight)
    # trained filters are far larger than the initialisation's (std about 0.77 against 0.27 summed)
    assert stem.std() > 1.5 * fresh.backbone._conv_stem.weight.std()


def test_pretrained_resnet_loads_torchvision_weights_from_the_hub_cache(tmp_path, monkeypatch):
    """Users with internet get torchvision's ImageNet weights; here the cache is filled by hand, as offline users do."""
    from torchvision import models

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(3)
    imagenet = models.resnet18(weights=None).state_dict()
    cache = tmp_path / "hub" / "checkpoints" / Path(models.ResNet18_Weights.IMAGENET1K_V1.url).name
    cache.parent.mkdir(parents=True)
    torch.save(imagenet, cache)

    model = build_model("resnet18", pretrained=True).eval()

    assert torch.equal(model.backbone.conv1.weight, imagenet["conv1.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(model.backbone.layer4[1].conv2.weight, imagenet["layer4.1.conv2.weight"])
    with torch.no_grad():
        assert model(torch.randn(2, 1, 64, 64)).shape == (2,)


def test_pretrained_resnet_without_internet_says_where_to_put_the_weights(tmp_path, monkeypatch):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsUnavailableError, match=r"resnet34.*copy https://.*resnet34-.*\.pth to .*checkpoints"):
        build_model("resnet34", pretrained=True)


def test_a_two_channel_stem_gives_what_the_grey_stem_gave_on_two_equal_channels():
    """The ImageNet stem's weights carry over: a new input channel starts as a copy of the grey one."""
    grey, double = torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(3, 8, 3)
    double.load_state_dict(grey.state_dict())
    gray_stem(grey)
    gray_stem(double, input_channels=2)
    image = torch.randn(2, 1, 16, 16)
    assert double.weight.shape[1] == 2 and double.in_channels == 2
    assert torch.allclose(double(torch.cat([image, image], dim=1)), grey(image), atol=1e-5)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_architecture_takes_two_channels_when_asked(architecture):
    model = build_model(architecture, input_channels=2).eval()
    with torch.no_grad():
        assert model(torch.randn(3, 2, 64, 64)).shape == (3,)
        with pytest.raises(RuntimeError):
            model(torch.randn(3, 1, 64, 64))
