"""Exact fingerprints of tensors: a digest of dtype, shape and bytes. Pure: no Trainer needed.

Two tensors have the same digest exactly when they hold the same values bit for bit (up to the odds of a 128-bit
hash collision). Slim checkpoints store the digests of the pretrained tensors they leave out, so a different
source of weights is refused when loading; the feature cache keeps those of the frozen backbone, so it notices
when the backbone changed.

Example::

    >>> a = torch.arange(4.0)
    >>> tensor_digest(a) == tensor_digest(a.clone()), tensor_digest(a) == tensor_digest(a + 1e-7)
    (True, False)
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["state_digests", "tensor_digest", "unchanged_since", "versions"]


def tensor_digest(tensor: Tensor) -> str:
    """Hex digest (32 characters) of ``tensor``'s dtype, shape and values; copies it to the CPU if needed."""
    data = tensor.detach()
    if data.device.type != "cpu":
        data = data.cpu()
    data = data.contiguous().reshape(-1)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{data.dtype}|{tuple(tensor.shape)}|".encode())
    if data.numel():
        digest.update(data.view(torch.uint8).numpy().data)  # the buffer itself: no copy
    return digest.hexdigest()


def state_digests(tensors: Mapping[str, Tensor]) -> dict[str, str]:
    """``{name: tensor_digest}`` of a state dict."""
    return {name: tensor_digest(t) for name, t in tensors.items()}


def versions(tensors: Mapping[str, Tensor]) -> dict[str, tuple[int, int]]:
    """``{name: (storage address, version counter)}``: both change whenever a tensor is written or replaced."""
    return {name: (t.data_ptr(), t._version) for name, t in tensors.items()}


def unchanged_since(
    tensors: Mapping[str, Tensor], seen: Mapping[str, tuple[int, int]], digests: Mapping[str, str]
) -> bool:
    """Whether ``tensors`` still hold the values whose ``digests`` were taken when their versions were ``seen``.

    Tensors nobody wrote to since (same address and version counter) are not hashed again.
    """
    if tensors.keys() != digests.keys():
        return False
    now = versions(tensors)
    return all(now[name] == seen.get(name) or tensor_digest(t) == digests[name] for name, t in tensors.items())
