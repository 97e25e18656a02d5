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


def grad_cam(predictor: Predictor, pixels: np.ndarray) -> tuple[np.ndarray, Prediction]:
    """A heatmap in [0, 1] at model input size, and the prediction for the same forward pass, from model-size pixels."""
    inputs = normalise(pixels, predictor.preprocessing).requires_grad_(False)
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
            logit = predictor.model(inputs)[0]
            predictor.model.zero_grad(set_to_none=True)
            logit.backward()
        finally:
            handle.remove()
    activations, gradients = captured["activations"].detach()[0], captured["gradients"].detach()[0]
    weights = gradients.mean(dim=(1, 2), keepdim=True)
    evidence = (weights * activations).sum(dim=0)
    cell_logits = logit.detach() + evidence.numel() * (evidence - evidence.mean())
    cam = torch.relu(cell_logits - predictor.threshold_logit())
    cam = torch.nn.functional.interpolate(cam[None, None], size=pixels.shape, mode="bilinear", align_corners=False)
    cam = cam[0, 0]
    peak = float(cam.max())
    heatmap = (cam / peak).numpy() if peak > 0 else np.zeros(pixels.shape, dtype=np.float32)
    probability = float(predictor.calibrated(logit.detach()))
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
