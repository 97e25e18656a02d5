"""The model's forward pass for serving: ONNX Runtime exported from the same weights, or eager torch.

Measured on 2 CPU cores (README, "Serving predictions"): the default EfficientNet-Lite0 at 128 px
costs 10.7 ms an image in eager torch on one thread and 3.4 ms in ONNX Runtime, at batch 16, with
logits equal to within 2e-6. The pusher exports `model.onnx` next to the weights and keeps it only
when its logits match torch's within `ONNX_TOLERANCE` on a fixed check batch; serving runs it when the
package has it (XRAY_INFERENCE_RUNTIME), torch otherwise. Training and Grad-CAM always use torch.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from xray.preprocessing import Preprocessing, normalise_array
from xray.settings import INFERENCE_RUNTIMES

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
ONNX_TOLERANCE = 1e-4  # largest logit difference from torch an exported model may show
ONNX_OPSET = 17


class RuntimeUnavailableError(RuntimeError):
    """The runtime asked for cannot run this package (no model.onnx, or onnxruntime missing)."""


class Forward(Protocol):
    """Normalised float32 N x C x H x W inputs to N raw logits."""

    name: str

    def __call__(self, inputs: np.ndarray) -> np.ndarray: ...


def check_batch(preprocessing: Preprocessing) -> np.ndarray:
    """Inputs the exported model is checked on: seeded noise, smooth gradients, a blank and a saturated image."""
    size = preprocessing.image_size
    generator = np.random.default_rng(0)
    noise = generator.integers(0, 256, (4, size, size), dtype=np.uint8)
    ramp = np.linspace(0, 255, size, dtype=np.float64)
    gradients = np.stack([np.add.outer(ramp, ramp) / 2, np.add.outer(ramp, 255 - ramp) / 2]).astype(np.uint8)
    flat = np.stack([np.zeros((size, size), np.uint8), np.full((size, size), 255, np.uint8)])
    pixels = np.concatenate([noise, gradients, flat])
    return normalise_array(pixels, preprocessing)


def export_onnx(model: torch.nn.Module, preprocessing: Preprocessing, path: str | Path) -> float:
    """Write `model` as ONNX at `path` and return its largest logit difference from torch on `check_batch`.

    Raises RuntimeError (and leaves no file) when the export fails or differs by more than ONNX_TOLERANCE:
    a package then ships without ONNX and serves with torch, never with different numbers.
    """
    import torch

    path = Path(path)
    inputs = check_batch(preprocessing)
    model = model.eval()
    try:
        with torch.inference_mode():
            expected = model(torch.from_numpy(inputs)).float().numpy()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's notes on constant folding and its legacy path
            torch.onnx.export(model, (torch.from_numpy(inputs[:1]),), str(path), input_names=["pixels"],
                              output_names=["logits"], dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}},
                              opset_version=ONNX_OPSET, dynamo=False)  # fmt: skip
        actual = OnnxForward(path, threads=1)(inputs)
        difference = float(np.max(np.abs(actual - expected)))
    except Exception as error:
        path.unlink(missing_ok=True)
        raise RuntimeError(f"ONNX export failed: {type(error).__name__}: {error}") from error
    if not difference <= ONNX_TOLERANCE:
        path.unlink(missing_ok=True)
        raise RuntimeError(f"ONNX export differs from torch by {difference:.2e} (tolerance {ONNX_TOLERANCE:g})")
    return difference


class OnnxForward:
    """An ONNX Runtime session on the CPU with a fixed thread count (no spinning pool when it is one)."""

    name = "onnx"

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        try:
            import onnxruntime
        except ImportError as error:
            raise RuntimeUnavailableError("onnxruntime is not installed") from error
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: its optimiser's notes are not the user's business
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(inputs, dtype=np.float32)})[0]


def on_device(model: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """`model` on `device`: the model itself when it is there already, else a copy, so the caller's model stays put."""
    import torch

    device = torch.device(device)
    if all(tensor.device == device for tensor in model.state_dict().values()):
        return model
    return copy.deepcopy(model).to(device)


class TorchForward:
    """Eager torch, channels-last (1.3 to 4 times faster than the default layout on these convolutions)."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, device: torch.device | None = None) -> None:
        """Score with `model` on `device` (default the CPU, as serving does; evaluation may pass the training GPU)."""
        import torch

        self.device = device or torch.device("cpu")
        self.model = on_device(model, self.device).eval().to(memory_format=torch.channels_last)

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            tensor = torch.from_numpy(np.ascontiguousarray(inputs)).to(self.device)
            return self.model(tensor.contiguous(memory_format=torch.channels_last)).float().cpu().numpy()


def load_forward(runtime: str, directory: str | Path, load_model: Callable[[], torch.nn.Module],
                 threads: int) -> Forward:  # fmt: skip
    """The forward pass `runtime` names for a package folder: `auto` takes ONNX when it can run, else torch.

    `load_model` builds the torch model; it is called only when torch is the runtime.

    `onnx` is strict: RuntimeUnavailableError when the package has no model.onnx or onnxruntime is missing.
    """
    if runtime not in INFERENCE_RUNTIMES:
        raise ValueError(f"unknown inference runtime {runtime!r}; choose one of {', '.join(INFERENCE_RUNTIMES)}")
    onnx_path = Path(directory) / ONNX_FILE
    if runtime != "torch":
        if onnx_path.is_file():
            try:
                return OnnxForward(onnx_path, threads)
            except RuntimeUnavailableError:
                if runtime == "onnx":
                    raise
                logger.info("onnxruntime is not installed: the model runs in torch")
        elif runtime == "onnx":
            raise RuntimeUnavailableError(
                f"the model package has no {ONNX_FILE} (it was made before ONNX export, or its export did not "
                "match torch); set XRAY_INFERENCE_RUNTIME=torch"
            )
    return TorchForward(load_model())
