"""Backbones for transfer learning: a timm name, a torchvision name or any ``nn.Module``.

:func:`create_backbone` turns one of three sources into a feature extractor and its feature width:

- a **timm** model name, e.g. ``"resnet18"`` or ``"resnet18.a1_in1k"`` (a pretrained tag);
- a **torchvision** classification model name with the prefix ``"torchvision/"``, e.g.
  ``"torchvision/mobilenet_v2"``, optionally with a weights tag in timm's ``name.tag`` style, e.g.
  ``"torchvision/mobilenet_v2.IMAGENET1K_V1"`` (default: the model's ``DEFAULT`` weights);
- any ``nn.Module``, used as is.

Pretrained weights come either through the libraries' standard online path (``pretrained=True``: the
Hugging Face hub for timm, ``$TORCH_HOME/hub/checkpoints`` for torchvision, so a pre-seeded cache works
offline) or from a local file (``pretrained="path/to/weights.pth"`` or ``.safetensors``), which never
touches the network.

:func:`backbone_data_config` gives the preprocessing the weights expect (input size, mean, std,
interpolation, crop fraction) in timm's data-config format.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from typing import Any

import timm
import timm.data
import torch
import torchvision
from torch import Tensor, nn

__all__ = ["backbone_data_config", "create_backbone", "remap_state_dict_by_order"]

TORCHVISION_PREFIX = "torchvision/"
"""Prefix that selects a torchvision model name in :func:`create_backbone`."""

# Name of the attribute that remembers where a torchvision backbone came from, e.g.
# "torchvision/mobilenet_v2.IMAGENET1K_V1"; backbone_data_config reads it back. A plain str attribute
# survives pickling and deepcopy and stays out of the state dict.
_SOURCE_ATTR = "_lt_finetune_source"
_CLASSIFIER_ATTRS = ("fc", "classifier", "head", "heads")
# torchvision models whose auxiliary classifiers only matter for their original training recipe.
_TORCHVISION_AUX_HEADS: dict[str, tuple[str, ...]] = {"googlenet": ("aux1", "aux2"), "inception_v3": ("AuxLogits",)}
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_MAX_LISTED = 5


def create_backbone(
    backbone: str | nn.Module,
    pretrained: bool | str | os.PathLike[str] = False,
    *,
    input_size: tuple[int, int, int] = (3, 224, 224),
    model_kwargs: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, int]:
    """Create a feature extractor and return it with its feature width.

    The feature extractor maps images ``[B, C, H, W]`` to pooled features ``[B, D]``. timm and torchvision
    backbones always return ``[B, D]``; a plain ``nn.Module`` may instead return feature maps
    ``[B, D, h, w]``, which the caller global-average-pools to ``[B, D]``.

    Args:
        backbone: One of

            - a timm model name (``"resnet18"``, ``"mobilenetv2_100"``, ``"resnet18.a1_in1k"``), created
              with ``num_classes=0`` so that it outputs pooled features;
            - ``"torchvision/<name>"`` for a torchvision classification model (``"torchvision/resnet18"``,
              ``"torchvision/vit_b_16"``), optionally ``"torchvision/<name>.<WEIGHTS>"`` to pick a weights
              enum member such as ``IMAGENET1K_V1`` (default ``DEFAULT``). The last ``nn.Linear`` of its
              classifier (``fc``, ``classifier``, ``head`` or ``heads``) and the classifier's dropouts are
              replaced by ``nn.Identity``; other classifier layers (e.g. ConvNeXt's norm) are kept;
            - an ``nn.Module``, returned unchanged. Its feature width is its ``num_features`` or
              ``out_features`` attribute if it has one, else found by one forward pass of
              ``torch.zeros(1, *input_size)`` in eval mode and without gradients.
        pretrained: ``False`` for random initialisation. ``True`` for the library's standard pretrained
            weights: timm downloads from the Hugging Face hub, torchvision from its URL into
            ``$TORCH_HOME/hub/checkpoints`` (a file already there is used offline). A path to a local file
            (``.pth``/``.pt``/``.bin`` saved by ``torch.save``, or ``.safetensors``) holding a state dict of
            the full model; a top-level ``"state_dict"`` or ``"model"`` entry is unwrapped and the
            classifier's weights in the file are ignored, so a file for any number of classes loads. Must be
            ``False`` for an ``nn.Module``.
        input_size: ``(C, H, W)`` of the dry forward pass used to find the width of a plain module.
        model_kwargs: Extra keyword arguments for ``timm.create_model`` or ``torchvision.models.get_model``,
            e.g. ``{"drop_path_rate": 0.1}``. Not allowed with an ``nn.Module``.

    Returns:
        ``(feature_extractor, feature_dim)``.

    Raises:
        TypeError: If ``backbone`` or ``pretrained`` has the wrong type.
        ValueError: If the model name is unknown (with close matches), the weights file does not match the
            architecture, ``pretrained`` or ``model_kwargs`` is given with an ``nn.Module``, or a module's
            output is neither 2-D nor 4-D.
        FileNotFoundError: If the weights file does not exist.
        OSError: If ``pretrained=True`` and the weights can be neither downloaded nor found in the cache.

    Example::

        >>> model, dim = create_backbone("resnet18")
        >>> dim
        512
        >>> model(torch.zeros(2, 3, 64, 64)).shape
        torch.Size([2, 512])
        >>> model, dim = create_backbone("torchvision/mobilenet_v2")
        >>> dim
        1280
    """
    _check_input_size(input_size)
    if not isinstance(pretrained, (bool, str, os.PathLike)):
        raise TypeError(f"Expected `pretrained` to be a bool or a path to a weights file, got {pretrained!r}.")
    if isinstance(pretrained, (str, os.PathLike)) and not os.fspath(pretrained):
        raise ValueError("Expected `pretrained` to be a bool or a path to a weights file, got ''.")
    kwargs = dict(model_kwargs or {})
    if isinstance(backbone, nn.Module):
        if pretrained is not False:
            raise ValueError(
                f"Expected `pretrained` to be False when `backbone` is an nn.Module, got {pretrained!r}. "
                "Load the weights into the module before passing it."
            )
        if kwargs:
            raise ValueError(
                f"Expected `model_kwargs` to be empty when `backbone` is an nn.Module, got {kwargs!r}. "
                "Configure the module before passing it."
            )
        return backbone, _module_feature_dim(backbone, input_size)
    if not isinstance(backbone, str):
        raise TypeError(f"Expected `backbone` to be a model name or an nn.Module, got {type(backbone).__name__}.")
    if backbone.startswith(TORCHVISION_PREFIX):
        return _create_torchvision(backbone[len(TORCHVISION_PREFIX) :], pretrained, kwargs)
    return _create_timm(backbone, pretrained, kwargs)


def backbone_data_config(model: nn.Module, *, input_size: tuple[int, int, int] | None = None) -> dict[str, Any]:
    """Preprocessing that a backbone's weights expect, in timm's data-config format.

    - torchvision backbones from :func:`create_backbone`: from the transforms of the weights enum member
      named in the source (``DEFAULT`` unless a tag was given), e.g. resize 256 then center-crop 224 gives
      ``crop_pct = 224 / 256``;
    - timm models (anything with a ``pretrained_cfg``): ``timm.data.resolve_data_config``;
    - other modules: ImageNet mean and std, 224 px, bicubic, ``crop_pct`` 0.875 (timm's defaults).

    Args:
        model: A backbone, typically the first value returned by :func:`create_backbone`.
        input_size: ``(C, H, W)`` that replaces the model's default input size, e.g. for small images.

    Returns:
        ``{"input_size": (C, H, W), "mean": (...), "std": (...), "interpolation": "bilinear" | "bicubic" |
        ..., "crop_pct": float}``: resize the shorter side to ``H / crop_pct``, center-crop to ``(H, W)``,
        scale to ``[0, 1]``, then normalise with ``mean`` and ``std``.

    Example::

        >>> model, _ = create_backbone("torchvision/mobilenet_v2.IMAGENET1K_V1")
        >>> cfg = backbone_data_config(model)
        >>> cfg["input_size"], cfg["crop_pct"], cfg["interpolation"]
        ((3, 224, 224), 0.875, 'bilinear')
    """
    if input_size is not None:
        _check_input_size(input_size)
    source = getattr(model, _SOURCE_ATTR, None)
    if isinstance(source, str) and source.startswith(TORCHVISION_PREFIX):
        name, _, tag = source[len(TORCHVISION_PREFIX) :].partition(".")
        transforms = torchvision.models.get_model_weights(name)[tag or "DEFAULT"].transforms()
        crop, resize = int(transforms.crop_size[0]), int(transforms.resize_size[0])
        config: dict[str, Any] = {
            "input_size": input_size or (3, crop, crop),
            "mean": tuple(float(m) for m in transforms.mean),
            "std": tuple(float(s) for s in transforms.std),
            "interpolation": str(transforms.interpolation.value),
            "crop_pct": crop / resize,
        }
        return config
    resolved = timm.data.resolve_data_config({"input_size": input_size} if input_size else {}, model=model)
    return {
        "input_size": tuple(int(i) for i in resolved["input_size"]),
        "mean": tuple(float(m) for m in resolved["mean"]),
        "std": tuple(float(s) for s in resolved["std"]),
        "interpolation": str(resolved["interpolation"]),
        "crop_pct": float(resolved["crop_pct"]),
    }


def remap_state_dict_by_order(state_dict: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Rename the entries of a state dict to ``model``'s keys by pairing them in order.

    For weights of the same architecture saved under other names (a port from another code base), e.g. the
    ``_conv_stem...`` EfficientNet-Lite0 file onto timm's ``efficientnet_lite0``. Every pair must have the
    same shape; that catches most misalignments, but not two swapped tensors of equal shape, so check the
    result (e.g. its accuracy on a few images).

    Args:
        state_dict: The weights, in the order their module defines them.
        model: The model whose ``state_dict()`` keys, in order, the weights are renamed to.

    Returns:
        A new state dict with ``model``'s keys and ``state_dict``'s tensors, ready for
        ``model.load_state_dict``.

    Raises:
        ValueError: If the counts differ or a pair's shapes differ.
    """
    target = model.state_dict()
    if len(state_dict) != len(target):
        raise ValueError(
            f"Expected `state_dict` to have as many entries as the model ({len(target)}), got {len(state_dict)}. "
            "Drop or add entries (e.g. the classifier) so that both list the same tensors in the same order."
        )
    remapped: dict[str, Tensor] = {}
    for position, ((src_key, tensor), (dst_key, dst_tensor)) in enumerate(zip(state_dict.items(), target.items())):
        if tensor.shape != dst_tensor.shape:
            raise ValueError(
                f"Cannot pair the weights by order: entry {position} is {src_key!r} {tuple(tensor.shape)} in "
                f"`state_dict` but {dst_key!r} {tuple(dst_tensor.shape)} in the model. "
                "The two do not define their tensors in the same order."
            )
        remapped[dst_key] = tensor
    return remapped


def _check_input_size(input_size: Any) -> None:
    if (
        not isinstance(input_size, (tuple, list))
        or len(input_size) != 3
        or not all(isinstance(i, int) and i > 0 for i in input_size)
    ):
        raise ValueError(f"Expected `input_size` to be (C, H, W) with positive ints, got {input_size!r}.")


def _create_timm(name: str, pretrained: bool | str | os.PathLike[str], kwargs: dict[str, Any]) -> tuple[nn.Module, int]:
    base, tag = timm.models.split_model_name_tag(name)
    if not timm.is_model(base):
        raise ValueError(f"Unknown timm model {name!r}. {_timm_suggestions(base)}")
    if tag and name not in timm.list_pretrained(f"{base}.*"):
        raise ValueError(
            f"Unknown pretrained tag {tag!r} for timm model {base!r}; available: {timm.list_pretrained(f'{base}.*')}."
        )
    if kwargs.setdefault("num_classes", 0) != 0:
        raise ValueError(
            f"Expected `model_kwargs['num_classes']` to be 0 for a backbone, got {kwargs['num_classes']!r}. "
            "The classifier head belongs to the task, not the backbone; leave num_classes out."
        )
    if pretrained is True:
        try:
            model = timm.create_model(name, pretrained=True, **kwargs)
        except (OSError, RuntimeError) as err:
            raise _download_error(f"timm model {name!r}", name, err) from err
    else:
        model = timm.create_model(name, pretrained=False, **kwargs)
        if pretrained is not False:
            pretrained_cfg: dict[str, Any] = getattr(model, "pretrained_cfg", None) or {}
            classifier = pretrained_cfg.get("classifier") or ()
            prefixes = (classifier,) if isinstance(classifier, str) else tuple(classifier)
            _load_weights_file(model, pretrained, prefixes, f"timm model {name!r}")
    num_features: int = getattr(model, "num_features")  # noqa: B009  (typed as Tensor | Module by nn.Module)
    return model, int(num_features)


def _timm_suggestions(name: str) -> str:
    known = timm.list_models()
    matches = list(dict.fromkeys(difflib.get_close_matches(name, known, n=_MAX_LISTED) + timm.list_models(f"*{name}*")))
    hint = f"Close matches: {matches[: 2 * _MAX_LISTED]}." if matches else "No close match in timm.list_models()."
    if name in torchvision.models.list_models(module=torchvision.models):
        return f"{hint} For torchvision's model use {TORCHVISION_PREFIX + name!r}."
    return f"{hint} Prefix torchvision names with {TORCHVISION_PREFIX!r}, e.g. 'torchvision/resnet18'."


def _create_torchvision(
    spec: str, pretrained: bool | str | os.PathLike[str], kwargs: dict[str, Any]
) -> tuple[nn.Module, int]:
    name, _, tag = spec.partition(".")
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        matches = difflib.get_close_matches(name, known, n=_MAX_LISTED) or [k for k in known if name in k]
        raise ValueError(
            f"Unknown torchvision classification model {name!r}; close matches: {matches[:_MAX_LISTED]}. "
            "Use a name from torchvision.models.list_models(module=torchvision.models), or drop the "
            f"{TORCHVISION_PREFIX!r} prefix for a timm model."
        )
    weights_enum = torchvision.models.get_model_weights(name)
    if tag and tag not in weights_enum.__members__:
        raise ValueError(
            f"Unknown weights {tag!r} for torchvision model {name!r}; available: {list(weights_enum.__members__)}."
        )
    aux_heads = _TORCHVISION_AUX_HEADS.get(name, ())
    if aux_heads:
        kwargs.setdefault("aux_logits", False)
        if pretrained is not False:
            # torchvision's builders turn this on whenever they load ImageNet weights; a file needs it too.
            kwargs.setdefault("transform_input", True)
    if pretrained is True:
        try:
            model = torchvision.models.get_model(name, weights=tag or "DEFAULT", **kwargs)
        except (OSError, RuntimeError) as err:
            raise _download_error(f"torchvision model {name!r}", TORCHVISION_PREFIX + spec, err) from err
    else:
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    feature_dim, classifier_paths = _strip_classifier(model, name)
    if pretrained is not True and pretrained is not False:
        _load_weights_file(model, pretrained, classifier_paths + aux_heads, f"torchvision model {name!r}")
    setattr(model, _SOURCE_ATTR, TORCHVISION_PREFIX + spec)
    return model, feature_dim


def _strip_classifier(model: nn.Module, name: str) -> tuple[int, tuple[str, ...]]:
    """Replace the last Linear and the dropouts of the classifier by Identity; return its width and path."""
    for attr in _CLASSIFIER_ATTRS:
        classifier = getattr(model, attr, None)
        if not isinstance(classifier, nn.Module):
            continue
        linears = [(path, m) for path, m in classifier.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            break
        path, last = linears[-1]
        dropouts = [p for p, m in classifier.named_modules() if isinstance(m, _DROPOUTS)]
        for sub_path in [path, *dropouts]:
            if sub_path:
                classifier.set_submodule(sub_path, nn.Identity())
            else:
                setattr(model, attr, nn.Identity())
        return int(last.in_features), (f"{attr}.{path}" if path else attr,)
    raise ValueError(
        f"Cannot find an nn.Linear classifier in torchvision model {name!r} (looked at {list(_CLASSIFIER_ATTRS)}). "
        "Remove its classifier yourself and pass the nn.Module as `backbone`."
    )


def _download_error(what: str, name: str, err: BaseException) -> OSError:
    return OSError(
        f"Could not download or find cached pretrained weights for {what} ({type(err).__name__}: {err}). "
        f"Without network access, pass a local file instead: create_backbone({name!r}, "
        "pretrained='path/to/weights.pth')."
    )


def _read_weights_file(path: str) -> dict[str, Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Weights file {path!r} does not exist (from the working directory {os.getcwd()!r}); check the "
            "`pretrained` path. In a config file given to `lt-finetune --config`, a relative path may also be "
            "relative to the config file's folder."
        )
    if path.endswith(".safetensors"):
        import safetensors.torch

        return dict(safetensors.torch.load_file(path, device="cpu"))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"Weights file {path!r} could not be read as a state dict saved by torch.save (weights_only=True): {err}"
        ) from err
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(
            f"Expected weights file {path!r} to hold a state dict (names to tensors), got {type(obj).__name__}. "
            "Save it with torch.save(model.state_dict(), path)."
        )
    return dict(obj)


def _load_weights_file(
    model: nn.Module, path: str | os.PathLike[str], classifier_prefixes: tuple[str, ...], what: str
) -> None:
    """Load a local state dict into ``model``, ignoring the file's entries under ``classifier_prefixes``."""
    path = os.fspath(path)
    state_dict = _read_weights_file(path)
    expected = model.state_dict()

    def is_classifier(key: str) -> bool:
        return key not in expected and any(key == p or key.startswith(p + ".") for p in classifier_prefixes)

    state_dict = {k: v for k, v in state_dict.items() if not is_classifier(k)}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems = [
        f"{len(found)} {label} ({found[:_MAX_LISTED]}{', ...' if len(found) > _MAX_LISTED else ''})"
        for label, found in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if found
    ]
    if problems:
        raise ValueError(
            f"Weights file {path!r} does not match {what}: {', '.join(problems)}. Is the file for another architecture?"
        )
    model.load_state_dict(state_dict)


def _module_feature_dim(module: nn.Module, input_size: tuple[int, int, int]) -> int:
    num_classes = getattr(module, "num_classes", 0)
    if hasattr(module, "reset_classifier") and isinstance(num_classes, int) and num_classes > 0:
        raise ValueError(
            f"Expected `backbone` to output features, got a timm model with a {num_classes}-class classifier. "
            "Create it with num_classes=0 or call model.reset_classifier(0) first."
        )
    for attr in ("num_features", "out_features"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return _dry_forward_dim(module, input_size)


@torch.no_grad()
def _dry_forward_dim(module: nn.Module, input_size: tuple[int, int, int]) -> int:
    modes = {m: m.training for m in module.modules()}
    reference = next(module.parameters(), None)
    device = reference.device if reference is not None else None
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else None
    module.eval()
    try:
        out = module(torch.zeros(1, *input_size, device=device, dtype=dtype))
    finally:
        # Restore each submodule, not just the root: a frozen BatchNorm may be in eval inside a training model.
        for m, mode in modes.items():
            m.training = mode
    if not isinstance(out, Tensor) or out.ndim not in (2, 4):
        got = f"a {out.ndim}-D tensor of shape {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"Expected `backbone` to output features [B, D] or feature maps [B, D, h, w], got {got} for an input of "
            f"shape {(1, *input_size)}. Wrap the module so that its forward returns one such tensor."
        )
    return int(out.shape[1])
