"""Per-class results from a confusion matrix: a precision/recall table and a plot (torchmetrics' plotting)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["per_class_metrics", "per_class_table", "plot_confusion_matrix"]


def per_class_metrics(confusion: Tensor) -> dict[str, Tensor]:
    """Precision, recall and support per class from a confusion matrix ``[true, predicted]``.

    A class never predicted has precision 0; a class with no true sample has recall 0 (as torchmetrics with
    ``zero_division=0``).

    Example::

        >>> m = per_class_metrics(torch.tensor([[3, 1], [0, 2]]))
        >>> [round(p, 4) for p in m["precision"].tolist()], m["recall"].tolist(), m["support"].tolist()
        ([1.0, 0.6667], [0.75, 1.0], [4, 2])
    """
    confusion = confusion.long()
    correct = confusion.diagonal().float()
    predicted = confusion.sum(dim=0).float()
    support = confusion.sum(dim=1)
    precision = torch.where(predicted > 0, correct / predicted.clamp(min=1), torch.zeros_like(correct))
    recall = torch.where(support > 0, correct / support.clamp(min=1).float(), torch.zeros_like(correct))
    return {"precision": precision, "recall": recall, "support": support}


def per_class_table(confusion: Tensor, classes: Sequence[str]) -> str:
    """A text table ``class | precision | recall | support``, one row per class.

    Example::

        >>> print(per_class_table(torch.tensor([[3, 1], [0, 2]]), ["cat", "dog"]))
        class  precision  recall  support
        cat        1.000   0.750        4
        dog        0.667   1.000        2
    """
    metrics = per_class_metrics(confusion)
    width = max(5, *(len(c) for c in classes))
    lines = [f"{'class':<{width}}  precision  recall  support"]
    for name, p, r, n in zip(
        classes, metrics["precision"].tolist(), metrics["recall"].tolist(), metrics["support"].tolist()
    ):
        lines.append(f"{name:<{width}}  {p:9.3f}  {r:6.3f}  {n:7d}")
    return "\n".join(lines)


def plot_confusion_matrix(confusion: Tensor, classes: Sequence[str], path: str | os.PathLike[str]) -> str:
    """Draw ``confusion`` (rows: true class, columns: predicted) with class names to the PNG ``path``.

    Uses :meth:`torchmetrics.classification.MulticlassConfusionMatrix.plot`.

    Returns:
        ``path`` as a string.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from torchmetrics.classification import MulticlassConfusionMatrix

    size = max(4.0, 0.6 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    MulticlassConfusionMatrix(num_classes=len(classes)).plot(confusion, ax=ax, labels=list(classes))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)
