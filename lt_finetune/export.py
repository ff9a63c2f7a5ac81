"""Export a trained TransferModule for serving: TorchScript (traced) or ONNX, with its class names beside it.

The exported model maps normalised images ``[B, 3, H, W]`` to logits ``[B, C]``, like ``TransferModule.forward``.
A JSON file next to it (``<output>.json``) holds the class names, task and preprocessing (input size, mean, std,
interpolation, crop fraction) the model was trained with, as saved in the checkpoint (see
:mod:`lt_finetune.inference`). ONNX needs the optional extra ``pip install "lt_finetune[onnx]"``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from pathlib import Path
from typing import Any, Literal

import torch

from lt_finetune.validation import check_choice

__all__ = ["EXPORT_FORMATS", "export_model"]

EXPORT_FORMATS = ("torchscript", "onnx")
_SUFFIX = {"torchscript": ".pt", "onnx": ".onnx"}


def export_model(
    model: Any, output: str | os.PathLike[str], format: Literal["torchscript", "onnx"] = "torchscript"
) -> tuple[Path, Path]:
    """Write ``model`` (a :class:`~lt_finetune.TransferModule`) to ``output`` and its settings to ``<output>.json``.

    TorchScript is traced (timm and torchvision backbones trace, not all script) on one image of the eval size;
    ONNX (opset 17, legacy TorchScript-based exporter) has a dynamic batch axis, input ``images`` and output
    ``logits``.

    Args:
        model: The model, e.g. ``TransferModule.load_from_checkpoint(path)``.
        output: File to write.
        format: ``"torchscript"`` or ``"onnx"``.

    Returns:
        The model file and the settings file.

    Raises:
        ValueError: For an unknown ``format``.
        ImportError: For ``"onnx"`` without the ``onnx`` package.
    """
    check_choice("format", format, EXPORT_FORMATS)
    if format == "onnx" and importlib.util.find_spec("onnx") is None:
        raise ImportError('Exporting to ONNX needs the `onnx` package: pip install "lt_finetune[onnx]".')
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = model._inference_settings()
    example = torch.zeros(1, *settings["preprocessing"]["input_size"], device=model.device)
    was_training = model.training
    model.eval()
    try:
        if format == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch 2.9+ notes TorchScript is deprecated
                torch.jit.save(model.to_torchscript(method="trace", example_inputs=example), str(path))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the exporter's notes on tracing; the test compares outputs
                torch.onnx.export(
                    model,
                    (example,),
                    str(path),
                    dynamo=False,
                    input_names=["images"],
                    output_names=["logits"],
                    dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                    opset_version=17,
                )
    finally:
        model.train(was_training)
    sidecar = path.with_name(path.name + ".json")
    sidecar.write_text(json.dumps({"format": format, "outputs": "logits", **settings}, indent=2) + "\n")
    return path, sidecar


def default_output(ckpt_path: str | os.PathLike[str], format: str) -> Path:
    """``<checkpoint stem>.pt`` or ``.onnx`` beside the checkpoint."""
    ckpt = Path(ckpt_path)
    return ckpt.with_name(ckpt.stem + _SUFFIX[format])
