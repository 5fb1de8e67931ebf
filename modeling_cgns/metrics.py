"""Downstream classification metrics (ALGORITHM.md E.1): AUROC per class and macro, top-1 accuracy.

One implementation for every caller (the Trainer's ``compute_metrics``, the final test report,
the benchmark), built on scikit-learn so it runs offline (``evaluate.load("roc_auc")`` needs the Hub).

A class with no positive (or no negative) example in a split has no AUROC. It is reported as
``None`` with a warning that names the class, and the macro average runs over the classes that do
have one. Nothing here raises on such a split: with 1 % of the labels it is a normal event.
"""
import warnings
from typing import Dict, List, Optional, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, roc_auc_score

MULTI_LABEL = "multi_label_classification"
SINGLE_LABEL = "single_label_classification"


class UndefinedMetricWarning(UserWarning):
    """A metric could not be computed on this split (e.g. a class without positives)."""


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def per_class_auroc(targets: np.ndarray, scores: np.ndarray, label_names: Optional[Sequence[str]] = None,
                    split: str = "evaluation") -> List[Optional[float]]:
    """AUROC of each column of ``scores`` (N, C) against binary ``targets`` (N, C).

    Returns C values; ``None`` (with an :class:`UndefinedMetricWarning`) for a class whose targets
    are all 0 or all 1 in this split.
    """
    targets = np.asarray(targets, dtype=np.float64).reshape(len(targets), -1)
    scores = np.asarray(scores, dtype=np.float64).reshape(len(scores), -1)
    if targets.shape != scores.shape:
        raise ValueError(f"targets {targets.shape} and scores {scores.shape} must have the same shape (N, C)")
    names = list(label_names) if label_names is not None else [str(c) for c in range(targets.shape[1])]
    values: List[Optional[float]] = []
    for column, name in enumerate(names):
        positives = int(targets[:, column].sum())
        if positives == 0 or positives == len(targets):
            kind = "positive" if positives == 0 else "negative"
            warnings.warn(f"AUROC undefined for class {name!r} on the {split} split ({len(targets)} "
                          f"examples): no {kind} example; it is reported as None and left out of the "
                          f"macro average",
                          UndefinedMetricWarning, stacklevel=2)
            values.append(None)
        else:
            values.append(float(roc_auc_score(targets[:, column], scores[:, column])))
    return values


def macro_mean(values: Sequence[Optional[float]]) -> Optional[float]:
    """Mean over the defined values; ``None`` when none is defined."""
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def classification_metrics(logits: np.ndarray, labels: np.ndarray, problem_type: str,
                           label_names: Optional[Sequence[str]] = None, split: str = "evaluation") -> Dict:
    """All metrics of one split from raw logits.

    Args:
        logits: (N, C) head outputs.
        labels: (N, C) binary targets (multi-label / binary) or (N,) class indices (single-label).
        problem_type: ``"multi_label_classification"`` or ``"single_label_classification"``.
        label_names: C class names (keys of ``auroc_per_class``).

    Returns a dict with ``auroc`` (macro over the defined classes, or ``None``), ``auroc_per_class``
    (name -> value or ``None``), ``num_examples`` and, for single-label, ``accuracy`` (top-1) — there
    the per-class AUROC is one-vs-rest on the softmax probabilities.
    """
    logits = np.asarray(logits, dtype=np.float64)
    logits = logits.reshape(len(logits), -1)
    names = list(label_names) if label_names is not None else [str(c) for c in range(logits.shape[1])]
    if len(names) != logits.shape[1]:
        raise ValueError(f"{len(names)} label names for {logits.shape[1]} logit columns")
    result: Dict = {"num_examples": int(len(logits))}
    if problem_type == MULTI_LABEL:
        targets = np.asarray(labels, dtype=np.float64).reshape(len(labels), -1)
        scores = sigmoid(logits)
    elif problem_type == SINGLE_LABEL:
        classes = np.asarray(labels).reshape(-1).astype(np.int64)
        targets = np.eye(logits.shape[1])[classes]
        scores = softmax(logits)
        result["accuracy"] = float(accuracy_score(classes, logits.argmax(axis=-1))) if len(classes) else None
    else:
        raise ValueError(f"problem_type must be {MULTI_LABEL!r} or {SINGLE_LABEL!r}, got {problem_type!r}")
    per_class = per_class_auroc(targets, scores, names, split=split)
    result["auroc"] = macro_mean(per_class)
    result["auroc_per_class"] = dict(zip(names, per_class))
    return result


def flat_numeric_metrics(metrics: Dict) -> Dict[str, float]:
    """``classification_metrics`` output -> the flat ``{name: float}`` a Trainer logs (``None`` left out)."""
    flat: Dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update({f"{key}/{name}": v for name, v in value.items() if v is not None})
        elif value is not None:
            flat[key] = float(value)
    return flat


__all__ = [
    "UndefinedMetricWarning",
    "classification_metrics",
    "flat_numeric_metrics",
    "macro_mean",
    "per_class_auroc",
    "sigmoid",
    "softmax",
    "MULTI_LABEL",
    "SINGLE_LABEL",
]
