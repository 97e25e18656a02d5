"""Grad-CAM: which parts of the X-ray pushed the model towards PNEUMONIA, as a PNG overlay.

Plain Grad-CAM keeps the regions whose weighted activations are above zero. That zero is not
the model's decision boundary: the head's bias and the package's calibration move it, and a
confident PNEUMONIA answer could show an empty map. Here each cell of the final feature map is
scored as the logit the image would get if every cell looked like it, and the map keeps what
lies above the logit of the decision threshold: the regions that, on their own, would be
called PNEUMONIA. For the global-average-pooled linear heads used here that score is exact.

It takes the model-size pixels (`Predictor.decode`), the same the prediction sees: the full-size
upload is never kept, so the overlay shows what the model saw, enlarged for display.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image

from xray.inference import Prediction, Predictor
from xray.model import explanation_layer
from xray.preprocessing import normalise

DISPLAY_SIDE = 512
BORDER_FRACTION = 0.12  # the image border band of the shortcut measure (issue 11)


def forward_with_gradients(predictor: Predictor, inputs: torch.Tensor):
    """Logits, the final feature maps and the gradients of the summed logits on them (images are independent)."""
    captured: dict[str, torch.Tensor] = {}
    layer = explanation_layer(predictor.model)

    def keep(module, arguments, output):
        features = arguments[0]
        captured["activations"] = features
        features.register_hook(lambda gradient: captured.__setitem__("gradients", gradient))

    with predictor.lock, torch.enable_grad():
        handle = layer.register_forward_hook(keep)
        try:
            predictor.model.eval()
            logits = predictor.model(inputs.contiguous(memory_format=torch.channels_last))
            predictor.model.zero_grad(set_to_none=True)
            logits.sum().backward()
        finally:
            handle.remove()
    return logits.detach(), captured["activations"].detach(), captured["gradients"].detach()


def grad_cam(predictor: Predictor, pixels: np.ndarray) -> tuple[np.ndarray, Prediction]:
    """A heatmap in [0, 1] at model input size, and the prediction for the same forward pass, from model-size pixels."""
    logits, activations, gradients = forward_with_gradients(predictor, normalise(pixels, predictor.preprocessing))
    logit, activations, gradients = logits[0], activations[0], gradients[0]
    weights = gradients.mean(dim=(1, 2), keepdim=True)
    evidence = (weights * activations).sum(dim=0)
    cell_logits = logit + evidence.numel() * (evidence - evidence.mean())
    cam = torch.relu(cell_logits - predictor.threshold_logit())
    cam = torch.nn.functional.interpolate(cam[None, None], size=pixels.shape, mode="bilinear", align_corners=False)
    cam = cam[0, 0]
    peak = float(cam.max())
    heatmap = (cam / peak).numpy() if peak > 0 else np.zeros(pixels.shape, dtype=np.float32)
    probability = float(predictor.calibrated(logit))
    return heatmap, predictor.to_prediction(probability)


def overlay(pixels: np.ndarray, heatmap: np.ndarray, opacity: float = 0.45) -> bytes:
    """The model-size X-ray, enlarged to about DISPLAY_SIDE pixels a side, with the heatmap blended over it, as PNG."""
    scale = max(1, DISPLAY_SIDE // max(pixels.shape))
    base = Image.fromarray(pixels, mode="L")
    base = base.resize((base.width * scale, base.height * scale), Image.Resampling.BILINEAR)
    resized = np.asarray(Image.fromarray((heatmap * 255).astype(np.uint8)).resize(base.size, Image.Resampling.BILINEAR))
    colours = colormaps["jet"](resized / 255.0)[..., :3]
    gray = np.asarray(base, dtype=np.float32)[..., None] / 255.0
    weight = opacity * (resized[..., None] / 255.0)
    blended = (gray * (1 - weight) + colours * weight) * 255
    buffer = io.BytesIO()
    Image.fromarray(blended.clip(0, 255).astype(np.uint8), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def explain(predictor: Predictor, pixels: np.ndarray) -> tuple[bytes, Prediction]:
    """PNG overlay and prediction for one X-ray's model-size pixels."""
    heatmap, prediction = grad_cam(predictor, pixels)
    return overlay(pixels, heatmap), prediction


def evidence_maps(predictor: Predictor, pixels: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Plain Grad-CAM (ReLU of gradient-weighted activations) for a batch of uint8 images, N x H x W.

    Unlike `grad_cam` it is not cut at the decision threshold, so a confident NORMAL image still
    shows where its evidence for PNEUMONIA lies; used to measure where the model looks.
    """
    maps = []
    for start in range(0, len(pixels), batch_size):
        chunk = pixels[start : start + batch_size]
        _, activations, gradients = forward_with_gradients(predictor, normalise(chunk, predictor.preprocessing))
        weights = gradients.mean(dim=(2, 3), keepdim=True)
        cam = torch.relu((weights * activations).sum(dim=1, keepdim=True))
        cam = torch.nn.functional.interpolate(cam, size=chunk.shape[-2:], mode="bilinear", align_corners=False)
        maps.append(cam[:, 0].numpy())
    return np.concatenate(maps) if maps else np.empty((0, *pixels.shape[-2:]), dtype=np.float32)


def border_mask(height: int, width: int, fraction: float = BORDER_FRACTION) -> np.ndarray:
    """True in the outer `fraction` of the image on every side."""
    rows, columns = round(height * fraction), round(width * fraction)
    mask = np.ones((height, width), dtype=bool)
    mask[rows : height - rows, columns : width - columns] = False
    return mask


def border_share(maps: np.ndarray, fraction: float = BORDER_FRACTION) -> np.ndarray:
    """Per map, the share of its mass in the outer `fraction` of the image; NaN for an empty map."""
    mask = border_mask(*maps.shape[-2:], fraction)
    total = maps.sum(axis=(1, 2))
    inside = (maps * mask).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, inside / np.where(total > 0, total, 1), np.nan)


def shortcut_measure(predictor: Predictor, pixels: np.ndarray, labels: np.ndarray,
                     fraction: float = BORDER_FRACTION) -> dict[str, float]:  # fmt: skip
    """Mean share of Grad-CAM mass in the border band, over all images and per class.

    The band covers 1 - (1 - 2 * fraction)^2 of the area (42% at 12%): a map spread evenly over
    the image scores that, a model looking at the lungs scores less, one reading the border more.
    """
    shares = border_share(evidence_maps(predictor, pixels), fraction)
    labels = np.asarray(labels)
    result = {"fraction": fraction, "uniform_share": float(border_mask(*pixels.shape[-2:], fraction).mean()),
              "share": float(np.nanmean(shares)) if np.isfinite(shares).any() else float("nan"),
              "empty_maps": int(np.isnan(shares).sum())}  # fmt: skip
    for value, name in enumerate(("normal", "pneumonia")):
        chosen = shares[labels == value]
        result[f"share_{name}"] = float(np.nanmean(chosen)) if np.isfinite(chosen).any() else float("nan")
    return result
